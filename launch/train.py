"""Training entry point: ``deepspeed launch/train.py --config configs/pretrain.yaml [--a.b=v ...]``.

Works the same under deepspeed, torchrun, srun (SLURM) and as one plain ``python`` process; see
docs/training.md. All the work lives in lapvqa.train.
"""

import sys

from lapvqa.train import main

if __name__ == "__main__":
    sys.exit(main())
