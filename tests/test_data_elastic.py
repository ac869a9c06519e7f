"""Elastic resume of the training stream (lapvqa/data/elastic.py): a data state written by one
topology (ranks x workers) continued on another loses and repeats no sample of any begun epoch."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from lapvqa.data import build_train_loader
from lapvqa.data.elastic import rebalance
from lapvqa.data.manifest import DataError
from test_data import _all_keys, _cfg, _take, uneven  # noqa: F401  (fixture)


def _epoch_of(meta: dict) -> int:
    """With one sample per batch, the epoch that sample belongs to."""
    return meta["segments"][0][2] if meta.get("segments") else meta["epoch"]


def _run(cfg, rank, world, saved, n):
    batches, state = _take(build_train_loader(cfg, 64, rank, world, saved=saved), n)
    return [(b.keys[0], _epoch_of(b.meta)) for b in batches], batches, state


def _drain(cfg, world, saved_for, extra=0):
    """Each rank of ``world`` reads until its streams carry nothing more, then ``extra`` batches."""
    seen, states = [], []
    for rank in range(world):
        loader, state = build_train_loader(cfg, 64, rank, world, saved=saved_for(rank))
        it, left = iter(loader), None
        for _ in range(2000):
            b = next(it)
            state.update(b.meta)
            seen.append((b.keys[0], _epoch_of(b.meta)))
            if not any(s.get("segments") for s in state.streams.values()) and \
                    len(state.streams) == state.spec.workers:
                left = extra if left is None else left - 1
                if left <= 0:
                    break
        states.append(state.state_dict())
    return seen, states


def _check_epochs(seen, keys, last):
    by_epoch = {}
    for key, epoch in seen:
        by_epoch.setdefault(epoch, Counter())[key] += 1
    for epoch in range(last + 1):
        assert by_epoch.get(epoch) == Counter(keys), f"epoch {epoch}: lost or repeated samples"
    for epoch in range(last + 1, max(by_epoch) + 1):  # begun on the new topology, not finished
        assert max(by_epoch[epoch].values()) == 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("new_world, new_workers", [(3, 1), (1, 1)])
def test_other_topology_reads_every_begun_epoch_exactly_once(uneven, new_world, new_workers):
    """2 ranks x 2 workers (streams drift into different epochs over 5 uneven shards), then
    re-dealt to 3 x 1 or 1 x 1: every epoch any old stream had begun is read exactly once in
    total, and then the new topology's own epochs start."""
    old = _cfg(uneven, train__micro_batch_size=1)
    seen, states = [], []
    for rank in range(2):
        s, _, state = _run(old, rank, 2, None, 23)
        seen += s
        states.append(state.state_dict())
    data_state = {"world_size": 2, "ranks": states}
    last = max(e for _, e in seen)
    assert last >= 1 and min(e for _, e in seen) == 0, "the old streams must stand in different epochs"
    new = _cfg(uneven, train__micro_batch_size=1, data__num_workers=new_workers)
    more, _ = _drain(new, new_world, lambda r: rebalance(data_state, r, new_world, new_workers), extra=3)
    _check_epochs(seen + more, _all_keys(uneven, "train"), last)


@pytest.mark.timeout(300)
def test_resume_while_carrying_is_exact_and_can_move_again(uneven):
    """A checkpoint taken mid-way through carried segments resumes exactly on the same topology,
    and can itself be re-dealt once more (segments of two earlier deals in flight)."""
    first = _cfg(uneven, train__micro_batch_size=2)
    states = [_take(build_train_loader(first, 64, r, 2), 9)[1].state_dict() for r in range(2)]
    second = _cfg(uneven, train__micro_batch_size=2, data__num_workers=1)
    saved = rebalance({"world_size": 2, "ranks": states}, 0, 1, 1)
    ref, _ = _take(build_train_loader(second, 64, 0, 1, saved=saved), 12)
    head, state = _take(build_train_loader(second, 64, 0, 1, saved=saved), 5)
    mid = state.state_dict()
    assert mid["streams"]["0"].get("segments") and mid["other_units"], "checkpoint while carrying"
    tail, _ = _take(build_train_loader(second, 64, 0, 1, saved=mid), 7)
    for a, b in zip(ref, head + tail):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.aug, b.aug)
    # move again: 1 x 1 -> 2 x 2, with the 4-stream deal's segments still being carried
    third = _cfg(uneven, train__micro_batch_size=2, data__num_workers=2)
    again = [rebalance({"world_size": 1, "ranks": [mid]}, r, 2, 2) for r in range(2)]
    assert {seg[0] for r in again for s in r["streams"].values() for seg in s["segments"]} == {4, 1}
    more = [_take(build_train_loader(third, 64, r, 2, saved=again[r]), 20)[0] for r in range(2)]
    assert all(len(b) == 20 for b in more)


def test_changed_shards_or_inconsistent_state_refused(uneven, tmp_path):
    cfg = _cfg(uneven, data__num_workers=0)
    state = _take(build_train_loader(cfg, 64, 0, 1), 2)[1].state_dict()
    with pytest.raises(DataError, match="inconsistent across ranks"):
        rebalance({"world_size": 2, "ranks": [state, {**state, "workers": 3}]}, 0, 2, 1)
    saved = rebalance({"world_size": 1, "ranks": [state]}, 0, 2, 1)
    saved["other_units"] = {k: "0" * 16 for k in saved["other_units"]}
    with pytest.raises(DataError, match="different shard set"):
        build_train_loader(cfg, 64, 0, 2, saved=saved)


def _corrupt_first_jpeg(tar: Path) -> None:
    data = tar.read_bytes()
    i = data.index(b"\xff\xd8\xff")
    tar.write_bytes(data[:i] + b"\x00" * 64 + data[i + 64:])


@pytest.mark.timeout(120)
def test_errors_handed_over_are_remembered_not_charged_to_the_new_ranks(uneven, tmp_path):
    bad = Path(shutil.copytree(uneven, tmp_path / "bad"))
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        _corrupt_first_jpeg(bad / name)
    old = _cfg(str(bad), data__num_workers=0)
    states = [_take(build_train_loader(old, 64, r, 2), 10)[1] for r in range(2)]  # > 1 epoch each
    assert [s.errors for s in states] == [3, 3] and all(s.inherited == 0 for s in states)  # each met all
    saved = rebalance({"world_size": 2, "ranks": [s.state_dict() for s in states]}, 0, 1, 0)
    assert saved["errors_inherited"] == 3  # the same 3 items, once
    _, state = _take(build_train_loader(old, 64, 0, 1, saved=saved), 20)  # re-reads the damage
    assert state.errors == 3 and state.errors - state.inherited == 0  # nothing new, nothing recounted
    assert state.state_dict()["errors_inherited"] == 3  # and a checkpoint keeps it so
