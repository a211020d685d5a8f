"""The search tables of ggml's lattice i-quants (iq2xs_init_impl / iq3xs_init_impl), built from the runtime's own
dequantization grids (gguf-py's tables), not copied.

A grid point is `dim` coordinates, each a level l (2 bits for the IQ2 family, 3 for IQ3); the search works in
units 2l+1. The level word u packs the levels (bits_per_level each, coordinate 0 lowest). kmap[u] is the grid index
of an on-grid word; for an off-grid word kmap[u] = -(o+1), and neighbours[o] is a count followed by that many grid
indices: every grid point at one of the `nwant` smallest squared distances from u, sorted by (distance, index) (a
total order, as ggml's qsort comparator makes it)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

# kind -> (gguf-py quant class name, bits per level, kmap size, nwant)
LATTICES = {
    "IQ2_XXS": ("IQ2_XXS", 2, 43692, 2),
    "IQ2_XS": ("IQ2_XS", 2, 43692, 2),
    "IQ2_S": ("IQ2_S", 2, 43692, 1),
    "IQ1_S": ("IQ1_S", 2, 43692, 3),   # IQ1_M shares it
    "IQ3_XXS": ("IQ3_XXS", 3, 4096, 2),
    "IQ3_S": ("IQ3_S", 3, 4096, 3),
}


@lru_cache(maxsize=None)
def lattice_tables(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid [n, dim] int8 in 2l+1 units, kmap int32, neighbours int32) of one i-quant."""
    import gguf.quants
    name, bits, kmap_size, nwant = LATTICES[kind]
    quant = getattr(gguf.quants, name)
    quant.init_grid()
    dim = quant.grid_shape[1]
    values = quant.grid.reshape(-1, dim)
    levels = np.searchsorted(np.asarray(quant.grid_map, dtype=np.float32), values).astype(np.int64)
    grid = (2 * levels + 1).astype(np.int8)
    words = (levels << (bits * np.arange(dim))).sum(1)
    kmap = np.full(kmap_size, -1, dtype=np.int32)
    kmap[words] = np.arange(len(words), dtype=np.int32)
    off = np.nonzero(kmap < 0)[0]
    mask = (1 << bits) - 1
    pos = (2 * ((off[:, None] >> (bits * np.arange(dim))) & mask) + 1).astype(np.int32)
    g = grid.astype(np.float64)
    n_grid = len(g)
    gg = (g * g).sum(1)
    pieces: list[np.ndarray] = []
    taken = 0
    for start in range(0, len(off), 4096):
        p = pos[start:start + 4096].astype(np.float64)
        # squared distances to every grid point (small integers: exact in float64)
        d2 = np.rint((p * p).sum(1)[:, None] + gg[None, :] - 2 * p @ g.T).astype(np.int64)   # [chunk, grid points]
        limit = d2.min(1)
        for _ in range(nwant - 1):   # the nwant-th smallest distinct distance of each word
            limit = np.where(d2 > limit[:, None], d2, np.iinfo(np.int64).max).min(1)
        keep = d2 <= limit[:, None]
        counts = keep.sum(1)
        # the kept grid points by (distance, index), as ggml's qsort comparator orders them
        keys = np.where(keep, d2 * n_grid + np.arange(n_grid), np.iinfo(np.int64).max)
        width = int(counts.max())
        nearest = np.sort(np.partition(keys, width - 1, axis=1)[:, :width], axis=1) % n_grid
        entries = np.concatenate([counts[:, None], nearest], axis=1)
        flat = entries[np.arange(width + 1)[None, :] <= counts[:, None]]    # each word: its count, then its points
        starts = taken + np.concatenate([[0], np.cumsum(1 + counts)[:-1]])
        kmap[off[start:start + 4096]] = -(starts + 1)
        pieces.append(flat)
        taken += len(flat)
    neighbours = np.concatenate(pieces).astype(np.int32)
    return grid, kmap, neighbours
