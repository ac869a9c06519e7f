"""Stage 2: a seeded reservoir shuffle over encoded samples (bytes, so the buffer stays small).

Its decisions depend only on the random generator and the fill level, never on the content, so
replaying the same input with the same seed reproduces the same output order exactly; that is what
makes resume exact (see lapvqa.data.stream).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def reservoir_shuffle(samples: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], s
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[j]
