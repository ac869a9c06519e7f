"""The training loop: DeepSpeed engine + streaming data + checkpoints + validation + metrics.

One step = ``train.grad_accum_steps`` micro-batches per rank, then one optimizer step. After each
step the ranks all-reduce one small vector (loss, tokens, non-finite flag, stop signal, data-error
count, ...) so that every decision (skip, abort, stop, checkpoint) is taken by all ranks together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from lapvqa import __version__
from lapvqa.config import Config, save_config
from lapvqa.data import build_train_loader
from lapvqa.data.augment import apply_augment
from lapvqa.data.elastic import rebalance
from lapvqa.train import elastic, pixel_stats
from lapvqa.train.checkpoint import Checkpoints, ResumeError
from lapvqa.train.dist import DistInfo, all_gather_object, check_shared_dir
from lapvqa.train.engine import build_engine, build_model
from lapvqa.train.evaluate import validate
from lapvqa.train.metrics import RunLog, Throughput, peak_flops, truncate_rows
from lapvqa.train.signals import EXIT_DATA, EXIT_NONFINITE, EXIT_PREEMPTED, StopFlag

log = logging.getLogger("lapvqa.train")


class TrainingAborted(RuntimeError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _rank_digest(keys: list[str]) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha256("\n".join(keys).encode()).digest()), dtype=torch.uint8)


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.ckpt = Checkpoints(self.run_dir, info.rank, info.world_size)
        self.stop = StopFlag()
        self.step, self.nonfinite_total, self.nonfinite_in_row = 0, 0, 0
        self.best_val: Optional[float] = None
        self.best_step = self.last_val_step = self.saved_step = -1

    # -- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        damaged = []
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt.remove_partial()
            damaged = self.ckpt.set_aside_damaged()
            self.ckpt.reconcile_best()
        dist.barrier()
        if info.world_size > 1:
            check_shared_dir(self.run_dir, info.rank)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model_config, model = build_model(cfg)
        mc_json = json.loads(json.dumps(dataclasses.asdict(self.model_config)))
        self.resume = self.ckpt.resume_marker(cfg.run.resume, mc_json, cfg.run.elastic_resume)
        self.elastic_from = self.resume["world_size"] if self.resume and \
            self.resume["world_size"] != info.world_size else None
        if self.resume:
            elastic.keep_global_batch(cfg, self.resume, info.world_size, self.run_dir, bool(self.elastic_from))
        if self.model_config.pixel_norm == "pixel" and not self.resume:  # resumed: from the checkpoint
            pixel_stats.apply(model, cfg, self.model_config.image_size, info.rank, info.world_size,
                              info.device)
        self.engine = build_engine(cfg, model, info, load_universal=bool(self.elastic_from))
        client = self._load() if self.resume else None
        torch.manual_seed(cfg.seed * 1000 + info.rank)  # dropout differs per rank, reproducibly
        if client is not None:
            self._restore_rng(client)
        self.loader, self.data_state = build_train_loader(
            cfg, self.model_config.image_size, info.rank, info.world_size, self._data_start(client),
            pin_memory=info.device.type == "cuda")
        self._check_manifest(client)
        self._flops = self._flops_fn()
        self.throughput = Throughput(self._flops, peak_flops(cfg.run.peak_tflops, info.device), info.world_size)
        if info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.runlog = RunLog(self.run_dir, info.is_main, self.step, cfg.train.max_steps,
                             cfg.run.tensorboard, cfg.run.progress)
        self.runlog.event("resume" if client else "start", step=self.step, world_size=info.world_size,
                          launcher=info.launcher, precision=self.engine_precision,
                          **({"elastic_from_world_size": self.elastic_from} if self.elastic_from else {}),
                          **({"damaged_checkpoints": damaged} if damaged else {}))
        self.keys_file = None
        if cfg.run.log_sample_keys:
            path = self.run_dir / "keys" / f"rank{info.rank}.jsonl"
            path.parent.mkdir(exist_ok=True)
            truncate_rows(path, self.step)  # like metrics.jsonl: one uninterrupted record
            self.keys_file = open(path, "a")
            if info.is_main:  # ranks this run does not have (another topology wrote them before)
                for other in path.parent.glob("rank*.jsonl"):
                    if other.stem[4:].isdigit() and int(other.stem[4:]) >= info.world_size:
                        truncate_rows(other, self.step)

    @property
    def engine_precision(self) -> str:
        return "bf16" if self.engine.bfloat16_enabled() else "fp32"

    def _flops_fn(self):
        from lapvqa.pretrain.model_utils import flops_per_sample
        return lambda text_len: flops_per_sample(self.model_config, text_len)["total"]

    def _load(self) -> dict:
        tag = self.resume["tag"]
        load_dir = self.ckpt.dir
        if self.elastic_from:
            load_dir = elastic.to_universal(self.ckpt.dir, tag, self.info.is_main)
        path, client = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
        if self.elastic_from:
            elastic.remove_universal(self.ckpt.dir, self.info.is_main)
            log.info("elastic resume: %s from %d ranks re-partitioned onto %d", tag, self.elastic_from,
                     self.info.world_size)
        self.step = int(client["step"])
        self.nonfinite_total = int(client.get("nonfinite_total", 0))
        best = self.ckpt.best()
        self.best_val = best["val_loss"] if best else None
        self.best_step = best["step"] if best else -1
        self.saved_step = self.step
        self.last_val_step = int(client.get("last_val_step", -1))
        log.info("resumed from %s (step %d)", tag, self.step)
        return client

    def _data_start(self, client: Optional[dict]) -> Optional[dict]:
        """This rank's data-stream state: the checkpoint's, or re-dealt when the number of ranks
        or data workers changed and run.elastic_resume allows it (else the loader refuses)."""
        if client is None:
            return None
        state, rank, world = client["data_state"], self.info.rank, self.info.world_size
        old, workers = state["ranks"][0], max(1, self.cfg.data.num_workers)
        if (old["world_size"], old["workers"]) == (world, workers):
            return state["ranks"][rank]
        if not self.cfg.run.elastic_resume:  # (another world size was refused by resume_marker)
            raise ResumeError(
                f"the checkpoint's data stream was written with data.num_workers={old['workers']}, "
                f"this run has {workers}: relaunch with data.num_workers={old['workers']}, or pass "
                "--run.elastic_resume=true to re-deal it (docs/training.md)")
        log.info("elastic resume: data stream of %d ranks x %d workers re-dealt onto %d x %d",
                 old["world_size"], old["workers"], world, workers)
        return rebalance(state, rank, world, self.cfg.data.num_workers)

    def _check_manifest(self, client: Optional[dict]) -> None:
        # The shard set itself is checked by the data stream (a change is refused); a manifest that
        # differs otherwise (e.g. re-written with other settings or rejects) is worth a warning,
        # since checkpoints and the release card record the hash.
        before = (client or {}).get("manifest_sha256")
        if before and before != self.data_state.manifest_sha256 and self.info.is_main:
            log.warning("manifest.json changed since the checkpoint (sha256 %s... -> %s...); the same "
                        "train shards, so resuming; checkpoints from now on record the new hash",
                        before[:12], self.data_state.manifest_sha256[:12])

    def _restore_rng(self, client: dict) -> None:
        states = client.get("rng") or []
        if self.info.rank < len(states) and states[self.info.rank] is not None:
            torch.set_rng_state(states[self.info.rank]["cpu"])
            if torch.cuda.is_available() and states[self.info.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(states[self.info.rank]["cuda"])

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        self.stop.install()  # before the DataLoader forks: workers inherit the flag-only handler
        it = iter(self.loader)
        cfg, code = self.cfg, 0
        try:
            while self.step < cfg.train.max_steps:
                stats = self.train_step(it)
                self.step += 1
                self.runlog.advance()
                self._after_step(stats)
                if stats["stop"]:
                    if cfg.checkpoint.save_on_signal:
                        self.save()
                    self.runlog.event("preempted", step=self.step, signal=int(self.stop.signum or 0))
                    log.warning("stopped by signal at step %d after checkpointing; exit %d",
                                self.step, EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
            self._finish()
        except TrainingAborted as e:
            log.error("%s", e)
            self.runlog.event("aborted", step=self.step, reason=str(e))
            code = e.exit_code
        finally:
            self.runlog.close()
            if self.keys_file:
                self.keys_file.close()
        return code

    def train_step(self, it) -> dict:
        cfg, dev = self.cfg, self.info.device
        poison = (self.step + 1) in set(cfg.debug.nan_steps)
        keys, loss_sum, tokens, wait, flops, nonfinite = [], 0.0, 0, 0.0, 0.0, False
        lr = float(self.engine.optimizer.param_groups[0]["lr"])  # the lr this step uses
        for _ in range(cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            self.data_state.update(batch.meta)
            b = batch.to(dev)
            images = b.images if b.aug is None else apply_augment(b.images, b.aug)
            loss = self.engine(images, b.tokens, b.mask)
            if poison:
                loss = loss * float("nan")  # fault injection (debug.nan_steps)
            value = float(loss.detach())
            nonfinite |= not math.isfinite(value)
            # Always backward + step, even on NaN: ZeRO-2's gradient reduction is collective, and
            # DeepSpeed's overflow check (bf16.check_grad_overflow) then skips the update.
            self.engine.backward(loss)
            self.engine.step()
            n = batch.n_target_tokens
            loss_sum += value * n if math.isfinite(value) else 0.0
            tokens += n
            keys += batch.keys
            flops += len(batch) * self._flops(batch.tokens.shape[1])
        if cfg.debug.step_sleep_s:
            time.sleep(cfg.debug.step_sleep_s)
        if self.keys_file:
            self.keys_file.write(json.dumps({"step": self.step + 1, "keys": keys}) + "\n")
            self.keys_file.flush()
        return self._sync(keys, loss_sum, tokens, wait, flops, nonfinite, lr)

    def _sync(self, keys, loss_sum, tokens, wait, flops, nonfinite, lr) -> dict:
        """One all_reduce for every cross-rank decision of this step."""
        data_fail = self.data_state.errors - self.data_state.inherited > self.cfg.data.max_errors
        vec = torch.tensor([loss_sum, tokens, float(nonfinite), float(bool(self.stop)),
                            float(self.data_state.errors), float(data_fail), wait, len(keys), flops],
                           dtype=torch.float64, device=self.info.device)
        dist.all_reduce(vec)
        v = vec.tolist()
        applied = self.engine.was_step_applied()
        grad_norm = self.engine.get_global_grad_norm()
        return {"keys": keys, "loss": v[0] / v[1] if v[1] and not v[2] else float("nan"),
                "tokens": int(v[1]), "nonfinite": bool(v[2]) or not applied, "stop": bool(v[3]),
                "data_errors": int(v[4]), "data_fail": bool(v[5]), "wait": v[6] / self.info.world_size,
                "images": int(v[7]), "flops": v[8], "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None}

    def _after_step(self, s: dict) -> None:
        cfg = self.cfg
        self.throughput.add(s["images"], s["tokens"], s["flops"], s["wait"])
        self._count_nonfinite(s)
        if self.step % cfg.run.log_every_steps == 0 or self.step == cfg.train.max_steps or \
                s["data_fail"] or self.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
            self._log_row(s)  # the failing step gets its row too
        if s["data_fail"]:
            shards = sorted({n for part in all_gather_object(self.data_state.error_shards) for n in part})
            raise TrainingAborted(
                f"{s['data_errors']} corrupt samples/shards, more than data.max_errors={cfg.data.max_errors} "
                f"on a rank (shards: {', '.join(shards)}); see the warnings above, fix or re-shard "
                "them, or raise data.max_errors", EXIT_DATA)
        limit = cfg.train.max_nonfinite_in_row
        if self.nonfinite_in_row >= limit:
            raise TrainingAborted(
                f"{self.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_in_row={limit}) "
                f"at step {self.step}: lower train.lr, check the data, or resume from an earlier "
                "checkpoint", EXIT_NONFINITE)
        val_loss = None
        if cfg.validate.every_steps and self.step % cfg.validate.every_steps == 0:
            val_loss = self.run_validation()
        improved = val_loss is not None and val_loss == self.best_val and self.best_step == self.step
        if self.step % cfg.checkpoint.every_steps == 0 or improved:
            self.save(val_loss)

    def _count_nonfinite(self, s: dict) -> None:
        if not s["nonfinite"]:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        log.warning("step %d: non-finite loss or gradients; update skipped (%d in a row, %d total)",
                    self.step, self.nonfinite_in_row, self.nonfinite_total)
        self.runlog.event("nonfinite", step=self.step, in_row=self.nonfinite_in_row)

    def _batch_hash(self, keys: list[str]) -> str:
        """sha256 over ranks (in rank order) of sha256 of that rank's keys in this step."""
        mine = _rank_digest(keys).to(self.info.device)
        parts = [torch.empty_like(mine) for _ in range(self.info.world_size)]
        dist.all_gather(parts, mine)
        return hashlib.sha256(b"".join(bytes(p.cpu().tolist()) for p in parts)).hexdigest()[:16]

    def _log_row(self, s: dict) -> None:
        row = {"step": self.step, "loss": s["loss"], "lr": s["lr"], "grad_norm": s["grad_norm"],
               **self.throughput.summary(), "data_errors": s["data_errors"],
               "batch_hash": self._batch_hash(s["keys"]), "nonfinite_skipped": self.nonfinite_total}
        self.throughput.reset()
        self.runlog.row(row)

    # -- validation and checkpoints ----------------------------------------------------------
    def run_validation(self) -> float:
        res = validate(self.engine, self.cfg, self.model_config.image_size, self.info.rank,
                       self.info.world_size, self.info.device)
        self.last_val_step = self.step
        if self.best_val is None or res["val_loss"] < self.best_val:
            self.best_val, self.best_step = res["val_loss"], self.step
        self.runlog.row({"step": self.step, **res, "best_val_loss": self.best_val})
        if self.info.is_main:
            log.info("step %d: val_loss %.4f over %d samples (%d tokens)", self.step,
                     res["val_loss"], res["val_samples"], res["val_tokens"])
        self.throughput.reset()  # validation time is not training throughput
        return res["val_loss"]

    def save(self, val_loss: Optional[float] = None) -> None:
        if self.saved_step == self.step:
            return
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        client = {"step": self.step, "config": self.cfg.to_dict(),
                  "model_config": dataclasses.asdict(self.model_config),
                  "data_state": {"world_size": self.info.world_size,
                                 "ranks": all_gather_object(self.data_state.state_dict())},
                  "rng": all_gather_object(rng), "nonfinite_total": self.nonfinite_total,
                  "last_val_step": self.last_val_step, "lapvqa_version": __version__,
                  "manifest_sha256": self.data_state.manifest_sha256}
        t = self.cfg.train
        marker = {"val_loss": val_loss, "precision": self.engine_precision, "lapvqa_version": __version__,
                  "global_batch": t.micro_batch_size * t.grad_accum_steps * self.info.world_size,
                  "manifest_sha256": self.data_state.manifest_sha256,
                  "model_config": json.loads(json.dumps(client["model_config"]))}
        tag = self.ckpt.save(self.engine, self.step, client, marker, self.cfg.checkpoint.keep_last)
        self.saved_step = self.step
        self.runlog.event("checkpoint", step=self.step, tag=tag, val_loss=val_loss)

    def _finish(self) -> None:
        cfg = self.cfg
        val_loss = None
        if cfg.validate.at_end and self.last_val_step != self.step:
            val_loss = self.run_validation()
        if cfg.checkpoint.save_final or (val_loss is not None and self.best_step == self.step):
            self.save(val_loss)
        self.runlog.event("finished", step=self.step, best_val_loss=self.best_val)
