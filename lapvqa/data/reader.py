"""Stage 1: stream tar shards (local or S3) into raw samples of encoded bytes.

A shard that cannot be opened or ends early is logged with its name and counted; the samples it
delivered before the damage are kept. A sample without an image or tokens is counted and dropped.
Nothing is skipped silently: every drop goes through :class:`ErrorLog`.
"""

from __future__ import annotations

import logging
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


class TarError(ValueError):
    """A shard that is not a readable tar (truncated, bad header)."""


def _pax_records(data: bytes) -> dict:
    out, i = {}, 0
    while i < len(data):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


def _header(block: bytes) -> tuple[str, int, bytes]:
    if sum(block) - sum(block[148:156]) + 8 * 32 != int(block[148:156].strip(b"\0 ") or b"0", 8):
        raise TarError("bad tar header checksum")
    raw = block[124:136]
    size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.strip(b"\0 ") or b"0", 8)
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def iter_tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a streamed tar (ustar/pax/GNU long names).

    A lean reader: Python's tarfile costs ~15% of a JPEG decode per sample in header parsing."""
    override: dict = {}
    while True:
        block = f.read(512)
        if block == bytes(512):
            return  # end-of-archive marker
        if len(block) < 512:
            # A shard cut at a member boundary looks whole to tarfile; the missing end marker
            # is what tells (the sharder's tar writer always writes it).
            raise TarError("unexpected end of data" + ("" if block else " (no end-of-archive marker)"))
        name, size, kind = _header(block)
        size = int(override.get("size", size))
        data = f.read(size)
        if len(data) < size:
            raise TarError("unexpected end of data")
        f.read(-size % 512)
        if kind == b"x":
            override = _pax_records(data)
        elif kind == b"L":
            override = {"path": data.rstrip(b"\0").decode("utf-8", "replace")}
        elif kind in (b"g", b"K"):
            continue
        else:
            if kind in (b"0", b"\0", b"7"):
                yield override.get("path", name), data
            override = {}


def iter_tar_samples(store: Store, shard: str, errors: ErrorLog) -> Iterator[dict]:
    """All complete samples of one shard, in tar order, as {__key__, __shard__, jpg, tokens.npy}."""
    current = None
    try:
        with store.open_read(shard) as f:
            for path, data in iter_tar_members(f):
                key, member = _split_name(path)
                if current is not None and key != current["__key__"]:
                    done, current = _finish(current, shard, errors), None
                    if done is not None:
                        yield done
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                if member in NEEDED:
                    current[member] = data
    except (TarError, OSError, EOFError, ValueError) as e:
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
