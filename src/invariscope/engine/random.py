"""Counter-based random draws: numbers that depend only on (seed, stream, index, draw).

Randomness in an analysis must come from ``(seed, part key)``, never from rank or
order; these draws give every image the same numbers in any batch, on any rank and
after a resume.
"""

from __future__ import annotations

import numpy as np

__all__ = ["uniform_per_image"]


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def uniform_per_image(seed: int, indices: np.ndarray, count: int, stream: int = 0) -> np.ndarray:
    """Uniform ``[0, 1)`` draws ``[B, count]`` that depend only on (seed, stream, index, draw).

    A counter-based generator (SplitMix64 hashing), so an image gets the same draws
    whichever batch it is in and whether or not the run was resumed.
    """
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed, stream], dtype=np.uint64)).astype(np.uint64)
        key = _splitmix64(base[0] ^ _splitmix64(np.asarray(indices, dtype=np.uint64) ^ base[1]))
        draws = np.arange(count, dtype=np.uint64)
        h = _splitmix64(key[:, None] ^ _splitmix64(draws + np.uint64(0x632BE59BD9B4E019))[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
