"""``python -m lapvqa.plot RUN_DIR --out run.png``: see lapvqa.train.plot."""

import sys

from lapvqa.train.plot import main, plot_run, read_metrics  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
