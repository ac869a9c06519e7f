"""The whole pipeline on an embedded synthetic set: ``python -m lapvqa.demo --out demo_out``.

Stages (each the same command a user runs on MIMIC-CXR, echoed with its log file):

1. ``python -m lapvqa.synth``        2500 synthetic studies in MIMIC-CXR-JPG's layout
2. ``python -m lapvqa.shard``        -> WebDataset shards + manifest.json (frontal views, at the model's 64 px)
3. ``deepspeed launch/train.py``     the tiny preset, ZeRO-2, 2 ranks (CPU: gloo)
4. ``python -m lapvqa.consolidate``  -> model_best.pt, encoder_final.pt, config.json
5. ``python -m lapvqa.generate``     reports for the test split
6. agreement of each generated report with what its image shows, per finding, next to the
   majority-class baseline; PNGs of the loss curves and of test images with their reports.

Re-running continues: a finished stage whose inputs did not change is skipped (``--fresh`` redoes
everything). Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET, BASELINE_MAX = 0.9, 0.6


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo_out"
    studies: int = 2500
    seed: int = 0
    ranks: int = 2  # DeepSpeed processes (CPU ranks without a GPU)
    config: str = str(ROOT / "configs" / "demo.yaml")
    steps: int | None = None  # None: the config's train.max_steps
    launcher: str = "deepspeed"  # deepspeed | python (one plain process, for --ranks 1)
    fresh: bool = False
    max_new_tokens: int | None = None  # None: generate's default (the shards' max_tokens + 1)
    train_overrides: tuple[str, ...] = ()  # extra --a.b=v for launch/train.py
    lateral_rate: float = 0.25  # laterals are synthesised (and skipped by --views frontal)
    # What a tiny model can learn in minutes on 2 CPU cores: one fixed sentence per finding
    # state (--variety low) in IMPRESSION-only reports (training cost grows with report tokens).
    variety: str = "low"
    impression_only_rate: float = 1.0
    odd_layout_rate: float = 0.0
    image_size: tuple[int, int] = (384, 512)  # longer side, px: the model sees 64 px anyway
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # val picks model_best; test measures

    @property
    def paths(self) -> "Paths":
        return Paths(Path(self.out).resolve())


@dataclass(frozen=True)
class Paths:
    root: Path
    data: Path = field(init=False)
    shards: Path = field(init=False)
    run: Path = field(init=False)
    release: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self):
        for name in ("data", "shards", "run", "release", "logs"):
            object.__setattr__(self, name, self.root / name)


class StageError(RuntimeError):
    """A stage failed; the message names the stage, the command and its log."""


# ---- stages ---------------------------------------------------------------------------------
def stage_synth(cfg: DemoConfig, p: Paths) -> None:
    settings = {"studies": cfg.studies, "seed": cfg.seed, "lateral_rate": cfg.lateral_rate,
                "split": list(cfg.split), "impression_only_rate": cfg.impression_only_rate,
                "odd_layout_rate": cfg.odd_layout_rate, "variety": cfg.variety,
                "image_size": list(cfg.image_size)}
    if _stamp_matches(p.data, settings):
        return _skip("synth", p.data)
    args = ["--out", str(p.data), "--studies", str(cfg.studies), "--seed", str(cfg.seed),
            "--lateral-rate", str(cfg.lateral_rate), "--split", ",".join(map(str, cfg.split)),
            "--impression-only-rate", str(cfg.impression_only_rate),
            "--odd-layout-rate", str(cfg.odd_layout_rate), "--variety", cfg.variety,
            "--min-size", str(cfg.image_size[0]), "--max-size", str(cfg.image_size[1]), "--force"]
    _run("synth", [sys.executable, "-m", "lapvqa.synth", *args], p)
    for stale in (p.shards, p.run, p.release):  # everything downstream is now out of date
        _remove_owned(stale)
    _write_stamp(p.data, settings)


def stage_shard(cfg: DemoConfig, p: Paths, train_cfg) -> None:
    size, max_tokens = train_cfg.model.image_size or 128, train_cfg.data.max_tokens
    args = ["--images", str(p.data), "--reports", str(p.data), "--out", str(p.shards),
            "--size", str(size), "--sections", "findings-impression", "--views", "frontal",
            "--max-tokens", str(max_tokens), "--samples-per-shard", "256", "--no-progress"]
    # The sharder itself verifies and keeps finished shards of the same plan.
    _run("shard", [sys.executable, "-m", "lapvqa.shard", *args], p)


def stage_train(cfg: DemoConfig, p: Paths) -> None:
    script = ROOT / "launch" / "train.py"
    overrides = [f"--run.dir={p.run}", f"--data.shards={p.shards}", "--run.progress=false"]
    if cfg.steps is not None:
        every = max(1, cfg.steps // 3)  # three validation points for the loss plot
        overrides += [f"--train.max_steps={cfg.steps}", f"--checkpoint.every_steps={every}",
                      f"--validate.every_steps={every}",
                      f"--train.warmup_steps={min(20, cfg.steps)}"]
    overrides += list(cfg.train_overrides)
    if cfg.launcher == "python":
        cmd = [sys.executable, str(script)]
    else:
        cmd = [_deepspeed(), "--num_gpus", str(cfg.ranks), "--master_port", str(_free_port()),
               str(script)]
    _run("train", cmd + ["--config", cfg.config, *overrides], p, env=_thread_env(cfg.ranks))


def stage_consolidate(cfg: DemoConfig, p: Paths) -> None:
    _remove_owned(p.release)  # consolidate refuses a non-empty --out: it never overwrites one
    _run("consolidate", [sys.executable, "-m", "lapvqa.consolidate", str(p.run),
                         "--out", str(p.release)], p)


def stage_generate(cfg: DemoConfig, p: Paths) -> Path:
    out = p.root / "generated_test.jsonl"
    cap = ["--max-new-tokens", str(cfg.max_new_tokens)] if cfg.max_new_tokens else []
    _run("generate", [sys.executable, "-m", "lapvqa.generate", "--release", str(p.release),
                      "--shards", str(p.shards), "--split", "test", "--out", str(out),
                      "--metrics", str(p.root / "generated_test_metrics.json"), *cap], p)
    return out


def stage_evaluate(cfg: DemoConfig, p: Paths, generated: Path) -> list:
    from lapvqa.synth import read_truth
    from lapvqa.synth.evaluate import format_table, majority_classes, score

    truth = read_truth(str(p.data))
    rows = [json.loads(line) for line in generated.read_text().splitlines() if line.strip()]
    scores = score(rows, truth, majority_classes(truth))
    table = format_table(scores, TARGET, BASELINE_MAX)
    (p.root / "agreement.txt").write_text(table + "\n")
    (p.root / "agreement.json").write_text(json.dumps([asdict(s) for s in scores], indent=2))
    return scores


def stage_figures(cfg: DemoConfig, p: Paths, generated: Path) -> None:
    _run("plot", [sys.executable, "-m", "lapvqa.plot", str(p.run),
                  "--out", str(p.root / "loss_curves.png")], p)
    from lapvqa.synth import read_truth
    from lapvqa.synth.figures import report_grid

    rows = [json.loads(line) for line in generated.read_text().splitlines() if line.strip()]
    report_grid(rows, read_truth(str(p.data)), str(p.data), str(p.root / "test_reports.png"))


# ---- helpers ---------------------------------------------------------------------------------
def _run(stage: str, cmd: list[str], p: Paths, env: dict | None = None) -> None:
    p.logs.mkdir(parents=True, exist_ok=True)
    log = p.logs / f"{stage}.log"
    shown = " ".join(_short(c) for c in cmd)
    print(f"[{time.strftime('%H:%M:%S')}] {stage:<11} $ {shown}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT),
                             env={**os.environ, **(env or {}), "PYTHONPATH": _pythonpath()})
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise StageError(f"stage {stage} failed (exit {rc}); command and full output in "
                         f"{log}:\n{tail}")
    seconds = time.perf_counter() - t0
    print(f"{'':>11}   done in {seconds:.0f} s (log: {_short(str(log))})", flush=True)


def _short(path: str) -> str:
    """``path`` relative to the working directory when that is shorter (for readable logs)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return rel if os.path.isabs(path) and len(rel) < len(path) else path


def _skip(stage: str, where: Path) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage:<11} up to date in {_short(str(where))}",
          flush=True)


def _pythonpath() -> str:
    return os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)


def _thread_env(ranks: int) -> dict:
    # Each rank would otherwise start one intra-op thread per core: 2 ranks x 2 threads on 2 cores
    # thrash. The user's own OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, ranks)))}


def _deepspeed() -> str:
    beside = Path(sys.executable).with_name("deepspeed")
    found = str(beside) if beside.exists() else shutil.which("deepspeed")
    if not found:
        raise StageError("the 'deepspeed' launcher is not installed "
                         "(make setup, or pip install deepspeed)")
    return found


def _free_port() -> int:
    # DeepSpeed's default 29500 may be taken by another job on this machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stamp_matches(folder: Path, settings: dict) -> bool:
    stamp = folder / "demo-stamp.json"
    return stamp.exists() and json.loads(stamp.read_text()) == settings


def _write_stamp(folder: Path, settings: dict) -> None:
    (folder / "demo-stamp.json").write_text(json.dumps(settings))


def _remove_owned(folder: Path) -> None:
    """Delete one of the demo's own output folders (a direct child of an --out it marked)."""
    if not (folder.parent / MARKER).exists():
        raise StageError(f"refusing to delete {folder}: not inside a demo --out")
    if folder.exists():
        shutil.rmtree(folder)


def _load_train_config(cfg: DemoConfig):
    from lapvqa.config import load_config

    return load_config(cfg.config, list(cfg.train_overrides))


# ---- the whole demo ----------------------------------------------------------------------------
MARKER = "lapvqa-demo.json"
OUTPUTS = ("data", "shards", "run", "release", "logs", "generated_test.jsonl",
           "generated_test_metrics.json", "agreement.txt", "agreement.json", "loss_curves.png",
           "test_reports.png", MARKER)


def prepare_out(cfg: DemoConfig) -> Paths:
    p = cfg.paths
    if p.root.exists() and any(p.root.iterdir()) and not (p.root / MARKER).exists():
        raise StageError(f"{p.root} is not empty and was not made by the demo; "
                         "choose another --out")
    if cfg.fresh:
        for name in OUTPUTS:  # only the demo's own outputs, never anything else in --out
            target = p.root / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    p.root.mkdir(parents=True, exist_ok=True)
    (p.root / MARKER).write_text(json.dumps(asdict(cfg), indent=2))
    return p


def _train_settings(cfg: DemoConfig) -> dict:
    return {"config": Path(cfg.config).read_text(), "steps": cfg.steps, "ranks": cfg.ranks,
            "launcher": cfg.launcher, "overrides": list(cfg.train_overrides)}


def run_demo(cfg: DemoConfig) -> dict:
    """Every stage in order; returns {"scores", "seconds", "paths"}."""
    t0 = time.perf_counter()
    train_cfg = _load_train_config(cfg)  # a bad config fails here, before minutes of work
    p = prepare_out(cfg)
    stage_synth(cfg, p)
    stage_shard(cfg, p, train_cfg)
    if not _stamp_matches(p.run, _train_settings(cfg)):
        _remove_owned(p.run)  # another config or step count: train from scratch
    stage_train(cfg, p)
    _write_stamp(p.run, _train_settings(cfg))
    stage_consolidate(cfg, p)
    generated = stage_generate(cfg, p)
    scores = stage_evaluate(cfg, p, generated)
    stage_figures(cfg, p, generated)
    return {"scores": scores, "seconds": time.perf_counter() - t0, "paths": p}


def summary(result: dict) -> str:
    from lapvqa.synth.evaluate import format_table

    p: Paths = result["paths"]
    scores = result["scores"]
    met = sum(s.agreement >= TARGET and s.baseline <= BASELINE_MAX for s in scores)
    rel = _short
    return "\n".join([
        "",
        f"Generated test reports vs. what the images show ({scores[0].n} test images; "
        "agree = the generated report states the finding iff the image has it;",
        "base = always answering the training split's majority class; ref = the true reports "
        "read by the same labeler):",
        "",
        format_table(scores, TARGET, BASELINE_MAX),
        "",
        f"target met for {met} of {len(scores)} findings; "
        f"whole demo {result['seconds'] / 60:.1f} min",
        "",
        "Where everything went:",
        f"  synthetic MIMIC-CXR-JPG tree  {rel(str(p.data))}/  "
        "(files/, mimic-cxr-2.0.0-*.csv.gz, synth-truth.jsonl)",
        f"  shards + manifest             {rel(str(p.shards))}/",
        f"  training run                  {rel(str(p.run))}/  "
        "(config.yaml, metrics.jsonl, tb/, checkpoints/)",
        f"  released model                {rel(str(p.release))}/  "
        "(model_best.pt, encoder_final.pt, config.json)",
        f"  generated test reports        {rel(str(p.root / 'generated_test.jsonl'))}",
        f"  agreement table               {rel(str(p.root / 'agreement.txt'))} (+ .json)",
        f"  loss curves                   {rel(str(p.root / 'loss_curves.png'))}",
        f"  test images + reports         {rel(str(p.root / 'test_reports.png'))}",
        f"  logs of every stage           {rel(str(p.logs))}/",
    ])


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m lapvqa.demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d.out, help="everything goes here")
    p.add_argument("--studies", type=int, default=d.studies, help="synthetic studies")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ranks", type=int, default=d.ranks,
                   help="DeepSpeed ranks (CPU processes without a GPU)")
    p.add_argument("--config", default=d.config, help="training config")
    p.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--launcher", choices=("deepspeed", "python"), default=d.launcher,
                   help="'python': one plain process (use with --ranks 1)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length cap")
    p.add_argument("--train-override", action="append", default=[], metavar="--a.b=v",
                   help="extra launch/train.py override (repeatable), "
                        "e.g. --train-override=--train.lr=1e-3")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.studies < 10:
        print("lapvqa.demo: error: --studies must be at least 10 (every split needs a patient)",
              file=sys.stderr)
        return 2
    cfg = DemoConfig(out=a.out, studies=a.studies, seed=a.seed, ranks=a.ranks, config=a.config,
                     steps=a.steps, launcher=a.launcher, fresh=a.fresh,
                     max_new_tokens=a.max_new_tokens,
                     train_overrides=tuple(a.train_override))
    try:
        result = run_demo(cfg)
    except StageError as e:
        print(f"lapvqa.demo: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # e.g. a bad training config, an unwritable --out
        print(f"lapvqa.demo: error: {e}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
