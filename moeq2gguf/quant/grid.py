"""A GGML block format seen as GPTQ's grid (gptq.Grid): fit a block's scales with ggml's own search,
round columns to that frozen grid, and pack the result into the format's bytes.

Rounding runs where the weights are. For the K-quants (Q2_K..Q6_K: what the Q2_K..Q6_K mixes are made of)
it is a few float32 tensor operations on the column's device, bit-identical to the format's numba rule
(tests/quant/test_grid.py): a GPU walk then never copies a column to the host. The scales are copied to that
device once per fitted block. The other formats round on the host, through the format's own kernel.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch

from moeq2gguf.formats import get_format
from moeq2gguf.formats.base import BlockParams
from moeq2gguf.formats.k_common import QK_K, ScaleMinFormat, SignedScaleFormat
from moeq2gguf.profile import stage

NEAREST_INT_LIMIT = 4194303.0   # ggml's nearest_int is exact below 2**22; beyond, the numba rule saturates


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (round half to even) of float32 values, saturated as formats.numerics does; NaN -> 0."""
    return torch.nan_to_num(v, nan=0.0).clamp(-NEAREST_INT_LIMIT, NEAREST_INT_LIMIT).round().to(torch.int32)


class _KQuantColumns:
    """One fitted block's K-quant scales on a device: per row and sub-block the float32 products the numba rule
    forms (d * sc, dmin * mn), and ggml's fallback codes where d * sc == 0."""

    def __init__(self, fmt, params: BlockParams, device: torch.device):
        if params.n_blocks != 1:
            raise ValueError("GPTQ fits one block at a time; params must cover exactly one block")
        self.fmt, self.device = fmt, device
        d = torch.from_numpy(np.ascontiguousarray(params.d[:, 0]))
        sc = torch.from_numpy(params.sc[:, 0].astype(np.float32))
        self.dsub = (d[:, None] * sc).to(device)                                 # [R, sub-blocks], float32
        if isinstance(fmt, ScaleMinFormat):
            dmin = torch.from_numpy(np.ascontiguousarray(params.dmin[:, 0]))
            self.dm = (dmin[:, None] * torch.from_numpy(params.mn[:, 0].astype(np.float32))).to(device)
            self.sub = fmt.sub
        else:
            self.dm, self.sub = None, 16
        self.fallback = torch.from_numpy(params.fallback[:, :QK_K].astype(np.int32)).to(device)

    def round(self, column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = j // self.sub
        dsub, x = self.dsub[:, s], column.to(torch.float32)
        zero = dsub == 0
        safe = torch.where(zero, torch.ones_like(dsub), dsub)
        if self.dm is not None:        # Q2_K / Q4_K / Q5_K: code in 0..nmax, value (d*sc)*code - dmin*mn
            dm = self.dm[:, s]
            codes = _nearest_int((x + dm) / safe).clamp(0, self.fmt.nmax)
            codes = torch.where(zero, self.fallback[:, j], codes)
            values = dsub * codes.to(torch.float32) - dm
        else:                          # Q3_K / Q6_K: code - half in -half..half-1, value (d*sc)*(code-half)
            half = self.fmt.half
            codes = half + _nearest_int(x / safe).clamp(-half, half - 1)
            codes = torch.where(zero, self.fallback[:, j], codes)
            values = dsub * (codes - half).to(torch.float32)
        return values, codes


class FormatGrid:
    def __init__(self, qtype: gguf.GGMLQuantizationType):
        self.fmt = get_format(qtype)
        self.group = self.fmt.block_size
        self.sigma2: np.ndarray | None = None

    def prepare(self, rows: torch.Tensor) -> None:
        """Row statistics some formats' searches read (Q4_0..Q5_1 weight blocks by the row's mean square)."""
        self.sigma2 = self.fmt.row_sigma2(np.ascontiguousarray(rows.reshape(-1, rows.shape[-1]).cpu().numpy(), dtype=np.float32))

    def fit(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        with stage("scale search"):
            return self._fit(w, importance)

    def _fit(self, w: torch.Tensor, importance: torch.Tensor) -> BlockParams:
        return self.fmt.fit_scales(np.ascontiguousarray(w.cpu().numpy(), dtype=np.float32),
                                   np.ascontiguousarray(importance.cpu().numpy(), dtype=np.float32), sigma2=self.sigma2)

    def round(self, column: torch.Tensor, params: BlockParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        with stage("round"):
            if isinstance(self.fmt, (ScaleMinFormat, SignedScaleFormat)):
                return self._round_on_device(column, params, j)
            return self._round(column, params, j)

    def _round_on_device(self, column: torch.Tensor, params: BlockParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = getattr(self, "_columns", None)
        if cached is None or cached[0] is not params or cached[1].device != column.device:
            self._columns = (params, _KQuantColumns(self.fmt, params, column.device))
        return self._columns[1].round(column, j)

    def _round(self, column: torch.Tensor, params: BlockParams, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = np.ascontiguousarray(column.cpu().numpy(), dtype=np.float32)[:, None]
        codes = self.fmt.quantize_to_grid(values, params, j)
        rounded = self.fmt.dequantize_codes(codes, params, j)[:, 0]
        return torch.from_numpy(rounded).to(column.device), torch.from_numpy(codes[:, 0].astype(np.int32))

    def pack(self, params: list[BlockParams], codes: torch.Tensor) -> np.ndarray:
        """Bytes [G*R, nb * type_size] of GPTQ's codes [G, R, K] on its per-block params."""
        joined = type(params[0]).concat(params)
        flat = codes.reshape(-1, codes.shape[-1]).numpy().astype(self.fmt.code_dtype)
        return self.fmt.pack(np.ascontiguousarray(flat), joined)
