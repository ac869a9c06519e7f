# Set-up, tests and the demo. Everything installs into ./.venv from nothing but python3 + pip.
PY ?= python3
VENV ?= .venv
PYBIN := $(VENV)/bin/python
STAMP := $(VENV)/.lapvqa-installed
# The versions this project is developed and tested with; override for another CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup test demo clean-demo

setup: $(STAMP)

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip setuptools wheel
	$(PYBIN) -m pip install -q $(TORCH_SPEC)
	# DeepSpeed's sdist imports torch while building: build it against the torch above
	# instead of letting pip fetch another multi-GB torch into an isolated build env.
	$(PYBIN) -m pip install -q --no-build-isolation 'deepspeed>=0.16'
	$(PYBIN) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(PYBIN) -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	$(PYBIN) -m lapvqa.demo --out $(DEMO_OUT)

clean-demo:
	rm -rf $(DEMO_OUT)
