"""Stage 1: stream tar shards (local or S3) into raw samples of encoded bytes.

A shard that cannot be opened or ends early is logged with its name and counted; the samples it
delivered before the damage are kept. A sample without an image or tokens is counted and dropped.
Nothing is skipped silently: every drop goes through :class:`ErrorLog`.
"""

from __future__ import annotations

import logging
import tarfile
from typing import Iterator

from lapvqa.data.plan import Unit
from lapvqa.storage import Store

log = logging.getLogger("lapvqa.data")
NEEDED = ("jpg", "tokens.npy")


class ErrorLog:
    """Distinct corrupt samples/shards met by one stream; the count travels with every batch.

    A shard is read again every epoch: its damage is counted (and logged) the first time only,
    so ``count`` is the number of distinct corrupt items, comparable with data.max_errors.
    """

    def __init__(self, seen=(), where: str = ""):
        self.seen, self.where = list(seen), where
        self._seen = set(self.seen)

    @property
    def count(self) -> int:
        return len(self.seen)

    @property
    def shards(self) -> list[str]:
        return sorted({item.split("|", 1)[0] for item in self.seen})

    def add(self, shard: str, item: str, what: str) -> None:
        ident = f"{shard}|{item}"
        if ident in self._seen:
            return
        self._seen.add(ident)
        self.seen.append(ident)
        log.warning("data error #%d%s in shard %s: %s", self.count, self.where, shard, what)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, rest = member."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _finish(sample: dict, shard: str, errors: ErrorLog):
    missing = [m for m in NEEDED if m not in sample]
    if missing:
        errors.add(shard, sample["__key__"], f"sample {sample['__key__']!r} lacks {', '.join(missing)}")
        return None
    return sample


def iter_tar_samples(store: Store, shard: str, errors: ErrorLog) -> Iterator[dict]:
    """All complete samples of one shard, in tar order, as {__key__, __shard__, jpg, tokens.npy}."""
    current = None
    try:
        with store.open_read(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, member = _split_name(info.name)
                if current is not None and key != current["__key__"]:
                    done, current = _finish(current, shard, errors), None
                    if done is not None:
                        yield done
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                if member in NEEDED:
                    current[member] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        # The partial sample in flight is dropped with the shard's damage, counted once.
        errors.add(shard, "<shard>", f"unreadable after {'key ' + repr(current['__key__']) if current else 'start'}: "
                          f"{type(e).__name__}: {e}")
        return
    if current is not None:
        done = _finish(current, shard, errors)
        if done is not None:
            yield done


def iter_units(store: Store, units: list[Unit], errors: ErrorLog) -> Iterator[dict]:
    """Samples of each unit in order; a sliced unit keeps every n-th sample of its shard."""
    for unit in units:
        for i, sample in enumerate(iter_tar_samples(store, unit.shard, errors)):
            if unit.takes(i):
                yield sample
