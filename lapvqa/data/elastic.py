"""Elastic resume of the training stream: a checkpoint's data state re-dealt to another topology.

A checkpoint records, per stream of the old topology (old ranks x workers), how far that stream got
in its current epoch. Streams drift apart (their shares of an epoch differ in size), so they may
stand in different epochs. To continue on another number of streams without losing or repeating
a sample of any epoch already begun, each old stream ``s`` at ``(epoch e, pos p)`` leaves
*segments* ``[n_old, s, e, p], [n_old, s, e+1, 0], ..., [n_old, s, last, 0]`` -- the rest of its
epoch and its whole share of every later epoch some other stream had already begun (``last`` = the
newest epoch any old stream is in). Together with what was consumed, every epoch up to ``last``
is then read exactly once. Each old stream's segments go, whole and in order, to new stream
``s % n_new``, which replays them under the old deal (same units, shuffle and augmentation draws)
and then starts its own epochs at ``last + 1`` under the new deal.

Whole old streams (not single segments) move, so the distinct-error log each old stream kept goes
with them: a replay never counts an error twice. Those errors were found within the old ranks'
``data.max_errors`` budgets; they are recorded as inherited and do not count against the new
ranks' budgets (4 ranks with 3 errors each must not fail 1 rank at max_errors=10). Segments an
old stream was itself still carrying (from an earlier elastic resume) move with it, in front.
"""

from __future__ import annotations

from lapvqa.data.manifest import DataError


def _old_streams(data_state: dict) -> tuple[int, int, dict[int, dict]]:
    ranks = data_state["ranks"]
    shapes = {(r["world_size"], r["workers"], r["seed"]) for r in ranks}
    if len(shapes) != 1 or any(r.get("version") != 1 for r in ranks):
        raise DataError("the checkpoint's data state is inconsistent across ranks; it cannot be re-dealt")
    world, workers, _ = shapes.pop()
    if len(ranks) != world:
        raise DataError(f"the checkpoint's data state holds {len(ranks)} ranks, it was written by {world}")
    n_old = world * workers
    streams = {sid: {"epoch": 0, "pos": 0, "errors_seen": []} for sid in range(n_old)}
    for r in ranks:
        streams.update({int(k): v for k, v in r["streams"].items()})
    return world, workers, streams


def rebalance(data_state: dict, rank: int, world: int, workers: int) -> dict:
    """This rank's data state on ``world`` ranks x ``workers`` streams each, from a checkpoint's
    ``data_state`` (all ranks) written by another topology. Needs the same shards and seed."""
    old_world, old_workers, streams = _old_streams(data_state)
    n_old, n_new = old_world * old_workers, world * max(1, workers)
    last = max(int(s["epoch"]) for s in streams.values())
    new = {j: {"epoch": last + 1, "pos": 0, "errors_seen": [], "segments": []} for j in range(n_new)}
    for sid in range(n_old):
        s, target = streams[sid], new[sid % n_new]
        e, p = int(s["epoch"]), int(s["pos"])
        target["segments"] += [list(seg) for seg in s.get("segments", [])]
        target["segments"] += [[n_old, sid, epoch, p if epoch == e else 0] for epoch in range(e, last + 1)]
        target["errors_seen"] += [x for x in s["errors_seen"] if x not in target["errors_seen"]]
    other = {str(n_old): data_state["ranks"][0]["units"]}
    for r in data_state["ranks"]:
        other.update(r.get("other_units", {}))
    workers = max(1, workers)
    mine = range(rank * workers, (rank + 1) * workers)
    return {"version": 1, "rank": rank, "world_size": world, "workers": workers, "units": None,
            "seed": data_state["ranks"][0]["seed"], "next_worker": 0, "other_units": other,
            "errors_inherited": sum(len(new[j]["errors_seen"]) for j in mine),
            "streams": {str(j): new[j] for j in mine}}
