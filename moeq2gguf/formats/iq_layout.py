"""Where an i-quant super-block keeps what GPTQ chooses per group of 8 weights, read and written in place.

GPTQ into a lattice (quant/lattice_grid.py) takes each 256-weight block's scales from ggml's own search and then picks
every 8-weight group's codebook entry itself. That needs, per group: the scale it is decoded with (`dl`, exactly as
gguf-py / ggml compute it from the stored bits, so that the walk's values equal the runtime's), and the fields that
select its values: grid index (one per 8-vector, or two 4-vectors for the IQ3s), sign bits (bit i set = weight i
negative; with parity the 8th sign is implied and the stored 7 bits are the low ones), and for the IQ1s the sign of the
+-1/8 shift. Layouts (bytes of one block, little-endian):

  IQ2_XXS 66:  d | 8 x (4 grid bytes, u32: 4 x 7 signs, ls << 28)                 dl = d (0.5 + ls) / 4 per 32
  IQ2_XS  74:  d | u16[32] (9-bit grid, 7 signs << 9) | 8 bytes of 4-bit ls       dl = d (0.5 + ls) / 4 per 16
  IQ2_S   82:  d | 32 grid low bytes | 32 sign bytes | 8 bytes of 4 x 2 high bits | 8 bytes of 4-bit ls (per 16)
  IQ3_XXS 98:  d | 64 grid bytes (per 4) | u32[8]: 4 x 7 signs, ls << 28          dl = d (0.5 + ls) / 2 per 32
  IQ3_S  110:  d | 64 grid low bytes | 8 bytes of high bits | 32 sign bytes | 4 bytes of 4-bit ls  dl = d (1 + 2 ls)
  IQ1_S   50:  d | 32 grid low bytes | u16[8]: 4 x 3 high bits, ls << 12, delta sign << 15   dl = d (2 ls + 1) per 32
  IQ1_M   56:  32 grid low bytes | 16 bytes: per group 3 high bits + delta sign | u16[4]: 4 x 3-bit ls (per 16) and
               d's four nibbles in the top bits
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256
GROUPS = QK_K // 8      # groups of 8 weights per block


@dataclass(frozen=True)
class LatticeLayout:
    qtype: Q
    block_bytes: int
    values: np.ndarray    # [codebook entries, dim] float32: the runtime's grid (magnitudes; IQ1: -1 / 0 / 1)
    parity: bool          # 7 stored signs, the 8th implied (an even number of negatives)
    signed: bool          # sign bits at all (not the IQ1s)
    delta_per_group: bool # IQ1_M: each group chooses its +-1/8 shift; IQ1_S: the block's search fixes it per 32

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    @property
    def parts(self) -> int:
        """Grid entries per group of 8 (2 for the IQ3s' 4-vectors)."""
        return 8 // self.dim


@lru_cache(maxsize=None)
def layout(qtype: Q) -> LatticeLayout:
    import gguf.quants
    quant = getattr(gguf.quants, qtype.name)
    quant.init_grid()
    values = np.ascontiguousarray(quant.grid.reshape(quant.grid_shape), dtype=np.float32)
    spec = {Q.IQ2_XXS: (66, True, True, False), Q.IQ2_XS: (74, True, True, False), Q.IQ2_S: (82, False, True, False),
            Q.IQ3_XXS: (98, True, True, False), Q.IQ3_S: (110, False, True, False),
            Q.IQ1_S: (50, False, False, False), Q.IQ1_M: (56, False, False, True)}[qtype]
    return LatticeLayout(qtype, spec[0], values, *spec[1:])


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16)[:, 0].astype(np.float32)


def _u32(b: np.ndarray, at: int, count: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 4 * count]).view(np.uint32)


def _u16(b: np.ndarray, at: int, count: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 2 * count]).view(np.uint16)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """[n, k] bytes -> [n, 2k] 4-bit values, low nibble first (the order gguf-py unpacks them)."""
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], -1).astype(np.float32)


def group_scales(qtype: Q, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dl [n, 32] float32, delta [n, 32] float32) of blocks [n, block_bytes]: the factor each group's grid values are
    decoded with, computed as gguf-py does (the same float32 operations), and the IQ1s' +-1/8 shift (0 otherwise)."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = b.shape[0]
    delta = np.zeros((n, GROUPS), dtype=np.float32)
    if qtype in (Q.IQ2_XXS, Q.IQ3_XXS):
        d = _f16(b, 0)[:, None]
        words = _u32(b, 2, 16)[:, 1::2] if qtype == Q.IQ2_XXS else _u32(b, 66, 8)
        ls = (words >> 28).astype(np.float32)
        dl = d * (np.float32(0.5) + ls) * np.float32(0.25 if qtype == Q.IQ2_XXS else 0.5)   # per 32
        return np.repeat(dl, 4, axis=1), delta
    if qtype in (Q.IQ2_XS, Q.IQ2_S):
        d = _f16(b, 0)[:, None]
        ls = _nibbles(b[:, 66:74] if qtype == Q.IQ2_XS else b[:, 74:82])                     # per 16
        return np.repeat(d * (np.float32(0.5) + ls) * np.float32(0.25), 2, axis=1), delta
    if qtype == Q.IQ3_S:
        d = _f16(b, 0)[:, None]
        ls = _nibbles(b[:, 106:110])                                                          # per 32
        return np.repeat(d * (1 + 2 * ls), 4, axis=1), delta
    if qtype == Q.IQ1_S:
        d = _f16(b, 0)[:, None]
        qh = _u16(b, 34, 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1)
        delta = np.where(qh & 0x8000, np.float32(-0.125), np.float32(0.125)).astype(np.float32)
        return np.repeat(dl, 4, axis=1).astype(np.float32), np.repeat(delta, 4, axis=1)
    if qtype == Q.IQ1_M:
        sc = _u16(b, 48, 4)
        dbits = ((sc[:, 0] & 0xF000) >> 12) | ((sc[:, 1] & 0xF000) >> 8) | ((sc[:, 2] & 0xF000) >> 4) | (sc[:, 3] & 0xF000)
        d = np.ascontiguousarray(dbits.astype(np.uint16)).view(np.float16).astype(np.float32)[:, None]
        ls = ((sc[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(n, 16)  # per 16
        qh = _nibbles(b[:, 32:48]).astype(np.uint8)
        delta = np.where(qh & 0x08, np.float32(-0.125), np.float32(0.125)).astype(np.float32)
        return np.repeat(d * (2 * ls + 1), 2, axis=1).astype(np.float32), delta
    raise ValueError(f"{qtype.name} is not an i-quant lattice")


def read_groups(qtype: Q, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid indices [n, 32, parts] int32, sign bits [n, 32] uint8 (all 8, the implied one included), delta sign
    [n, 32] bool) of blocks [n, block_bytes]: what write_groups writes."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = b.shape[0]
    signs = np.zeros((n, GROUPS), dtype=np.uint8)
    neg_delta = np.zeros((n, GROUPS), dtype=bool)
    if qtype in (Q.IQ2_XXS, Q.IQ3_XXS):
        if qtype == Q.IQ2_XXS:
            idx = b[:, 2:66].reshape(n, 8, 8)[:, :, :4].reshape(n, GROUPS, 1).astype(np.int32)
            words = _u32(b, 2, 16)[:, 1::2]
        else:
            idx = b[:, 2:66].reshape(n, GROUPS, 2).astype(np.int32)
            words = _u32(b, 66, 8)
        seven = ((words[:, :, None] >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 0x7F).reshape(n, GROUPS)
        signs = _with_parity(seven.astype(np.uint8))
    elif qtype == Q.IQ2_XS:
        q = _u16(b, 2, 32)
        idx = (q & 511).astype(np.int32)[:, :, None]
        signs = _with_parity((q >> 9).astype(np.uint8))
    elif qtype == Q.IQ2_S:
        high = ((b[:, 66:74, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(n, GROUPS)
        idx = (b[:, 2:34].astype(np.int32) | (high.astype(np.int32) << 8))[:, :, None]
        signs = b[:, 34:66].copy()
    elif qtype == Q.IQ3_S:
        high = ((b[:, 66:74, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(n, 2 * GROUPS)
        idx = (b[:, 2:66].astype(np.int32) | (high.astype(np.int32) << 8)).reshape(n, GROUPS, 2)
        signs = b[:, 74:106].copy()
    elif qtype == Q.IQ1_S:
        qh = _u16(b, 34, 8)
        high = ((qh[:, :, None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7).reshape(n, GROUPS)
        idx = (b[:, 2:34].astype(np.int32) | (high.astype(np.int32) << 8))[:, :, None]
        neg_delta = np.repeat((qh & 0x8000) != 0, 4, axis=1)
    elif qtype == Q.IQ1_M:
        qh = _nibbles(b[:, 32:48]).astype(np.int32)
        idx = (b[:, 0:32].astype(np.int32) | ((qh & 7) << 8))[:, :, None]
        neg_delta = (qh & 8) != 0
    else:
        raise ValueError(f"{qtype.name} is not an i-quant lattice")
    return idx, signs, neg_delta


def _with_parity(seven: np.ndarray) -> np.ndarray:
    """7 stored sign bits -> the 8-bit pattern (bit 7 makes the number of negatives even), as ggml's ksigns table."""
    ones = np.unpackbits(seven[..., None], axis=-1).sum(-1)
    return (seven | ((ones & 1) << 7).astype(np.uint8)).astype(np.uint8)


def write_groups(qtype: Q, blocks: np.ndarray, idx: np.ndarray, signs: np.ndarray, neg_delta: np.ndarray) -> None:
    """Store each group's grid indices [n, 32, parts], sign bits [n, 32] (with parity the 8th must be the implied one)
    and delta sign [n, 32] (IQ1_M; IQ1_S's is the block's, left as it is) into blocks [n, block_bytes], in place;
    the scales are not touched."""
    n = blocks.shape[0]
    idx = np.asarray(idx, dtype=np.int64)
    signs = np.asarray(signs, dtype=np.uint8)
    if qtype in (Q.IQ2_XXS, Q.IQ3_XXS):
        seven = (signs & 0x7F).astype(np.uint32).reshape(n, 8, 4)
        packed = (seven << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(-1, dtype=np.uint32)
        if qtype == Q.IQ2_XXS:
            sub = blocks[:, 2:66].reshape(n, 8, 8)
            sub[:, :, :4] = idx.reshape(n, 8, 4).astype(np.uint8)
            words = np.ascontiguousarray(sub[:, :, 4:]).view(np.uint32)[:, :, 0]
            sub[:, :, 4:] = ((words & 0xF0000000) | packed).astype(np.uint32)[:, :, None].view(np.uint8)
            blocks[:, 2:66] = sub.reshape(n, 64)
        else:
            blocks[:, 2:66] = idx.reshape(n, 64).astype(np.uint8)
            words = _u32(blocks, 66, 8)
            blocks[:, 66:98] = ((words & 0xF0000000) | packed).astype(np.uint32).view(np.uint8)
    elif qtype == Q.IQ2_XS:
        q = (idx[:, :, 0] | ((signs.astype(np.int64) & 0x7F) << 9)).astype(np.uint16)
        blocks[:, 2:66] = q.view(np.uint8)
    elif qtype == Q.IQ2_S:
        blocks[:, 2:34] = (idx[:, :, 0] & 0xFF).astype(np.uint8)
        blocks[:, 34:66] = signs
        high = ((idx[:, :, 0] >> 8) & 3).reshape(n, 8, 4) << np.array([0, 2, 4, 6])
        blocks[:, 66:74] = high.sum(-1).astype(np.uint8)
    elif qtype == Q.IQ3_S:
        flat = idx.reshape(n, 2 * GROUPS)
        blocks[:, 2:66] = (flat & 0xFF).astype(np.uint8)
        blocks[:, 66:74] = (((flat >> 8) & 1).reshape(n, 8, 8) << np.arange(8)).sum(-1).astype(np.uint8)
        blocks[:, 74:106] = signs
    elif qtype == Q.IQ1_S:
        blocks[:, 2:34] = (idx[:, :, 0] & 0xFF).astype(np.uint8)
        qh = _u16(blocks, 34, 8)
        high = (((idx[:, :, 0] >> 8) & 7).reshape(n, 8, 4) << np.array([0, 3, 6, 9])).sum(-1)
        blocks[:, 34:50] = ((qh & 0xF000) | high).astype(np.uint16).view(np.uint8)
    elif qtype == Q.IQ1_M:
        blocks[:, 0:32] = (idx[:, :, 0] & 0xFF).astype(np.uint8)
        nib = (((idx[:, :, 0] >> 8) & 7) | (np.asarray(neg_delta, dtype=np.int64) << 3)).reshape(n, 16, 2)
        blocks[:, 32:48] = (nib[:, :, 0] | (nib[:, :, 1] << 4)).astype(np.uint8)
    else:
        raise ValueError(f"{qtype.name} is not an i-quant lattice")
