#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see README "Performance"): kernel correctness on
# the real chip, then the attention and model benchmarks. Needs the wheels from
# ../shared/tools/device_wheels.sh carried as .whl/. Results go to $OUT (or benchmarks/results).
set -u
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
R=${OUT:-benchmarks/results}
mkdir -p "$R"
STAGES=${STAGES:-check,attention,model,ds}
# default budget 150 + 120 + 150 + 60 = 480 s of commands
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$R/gpu_env.txt"
case ",$STAGES," in *,check,*)
  timeout ${CHECK_S:-150} python3 benchmarks/gpu_check.py --out "$R/attention_gpu_check.jsonl" 2>&1 | tee "$R/gpu_check.log";;
esac
case ",$STAGES," in *,attention,*)
  timeout ${ATTN_S:-120} python3 benchmarks/attention.py --out "$R/attention.jsonl" --time-budget $(( ${ATTN_S:-120} - 30 )) 2>&1 | tee "$R/attention.log";;
esac
case ",$STAGES," in *,model,*)
  timeout ${MODEL_S:-150} python3 benchmarks/model.py --budget-s $(( ${MODEL_S:-150} - 30 )) ${MODEL_ARGS:-} --json-out "$R/model.jsonl" 2>&1 | tee "$R/model.log";;
esac
case ",$STAGES," in *,ds,*)
  timeout ${DS_S:-60} python3 benchmarks/ds_overhead.py --device cuda --steps 10 2>&1 | tee "$R/ds_overhead.log";;
esac
echo "gpu_run: done"
