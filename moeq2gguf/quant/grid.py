"""A GGML block format seen as GPTQ's grid (gptq.Grid): fit a block's scales with ggml's own search,
round columns to that frozen grid, and pack the result into the format's bytes."""
from __future__ import annotations

import gguf
import numpy as np
import torch

from moeq2gguf.formats import get_format
from moeq2gguf.formats.base import BlockParams
from moeq2gguf.profile import stage


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
            return self._round(column, params, j)

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
