"""The GGML block-format registry and the interface every format implements.

A format turns float32 rows into GGML blocks exactly as ggml's `ggml_quantize_chunk` does (with or
without an importance vector, ggml's "imatrix"), and exposes the same machinery in pieces for GPTQ:

    params = fmt.fit_scales(W_block, importance_block)      # ggml's scale search, frozen
    codes  = fmt.quantize_to_grid(W_col, params, j)          # ggml's rounding rule, any columns
    values = fmt.dequantize_codes(codes, params, j)          # what the runtime will compute
    blocks = fmt.pack(all_codes, params)                     # the GGML bytes

so that fit_scales -> quantize_to_grid over the whole block -> pack == quantize, byte for byte, and
dequantize(pack(codes, params)) == dequantize_codes(codes, params), bit for bit.

A GPTQ walk over one row block of width bs = fmt.block_size:

    sigma2 = fmt.row_sigma2(W)                      # only read by Q4_0/Q4_1/Q5_0/Q5_1 with importance
    params = fmt.fit_scales(W[:, b0:b0 + bs], imp[b0:b0 + bs], sigma2=sigma2)
    for j in range(bs):
        q = fmt.round_to_grid(W[:, b0 + j:b0 + j + 1], params, j)   # (R, 1) grid values
        ...                                                           # spread W[:, b0 + j] - q
    all_params = type(params).concat(per_block_params)               # then pack whole rows

Two ggml details the params carry: the legacy formats round codes against the float32 scale
*before* its fp16 rounding (params hold that inverse scale), and the K-quants keep the search's
codes in sub-blocks whose quantized scale is zero (params.fallback).

Shapes: R rows, C columns (C a multiple of block_size), nb = C // block_size blocks per row.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, TypeVar

import gguf
import numpy as np
from gguf import GGMLQuantizationType
import numba
from numba import njit, prange

from moeq2gguf.formats.numerics import f32_as_i32

FORMATS: dict[GGMLQuantizationType, "BlockFormat"] = {}
F = TypeVar("F", bound=Callable[..., Any])


def get_format(qtype: GGMLQuantizationType | int | str) -> "BlockFormat":
    """The registered BlockFormat for a GGML quantization type (enum, its value or its name)."""
    try:
        if isinstance(qtype, str):
            key = GGMLQuantizationType[qtype.upper()]
        else:
            key = GGMLQuantizationType(qtype)
        return FORMATS[key]
    except (KeyError, ValueError):
        supported = ", ".join(t.name for t in FORMATS)
        raise ValueError(f"quantization type {qtype!r} has no block format here; "
                         f"supported formats are {supported}; pick one of them") from None


@dataclasses.dataclass(frozen=True)
class BlockParams:
    """Frozen per-block quantization parameters of R rows x nb blocks (see each format's subclass).

    Every array's first two axes are (R, nb). Scales that the file stores as fp16 are kept as the
    float32 value of that fp16 (exactly what the runtime reads)."""

    @property
    def n_rows(self) -> int:
        return self.d.shape[0]  # type: ignore[attr-defined]

    @property
    def n_blocks(self) -> int:
        return self.d.shape[1]  # type: ignore[attr-defined]

    @classmethod
    def concat(cls, parts: "list[BlockParams]") -> "BlockParams":
        """Params of consecutive column ranges (e.g. GPTQ's one-block fits, in column order) joined
        into one, so that a whole row packs in one call. Arrays join along the block axis (axis 1;
        per-column arrays such as `fallback` along their column axis, also axis 1)."""
        if not parts:
            raise ValueError("concat needs at least one BlockParams; pass the fitted blocks in column order")
        fields = {}
        for f in dataclasses.fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if isinstance(values[0], np.ndarray):
                fields[f.name] = np.concatenate(values, axis=1)
            else:
                if any(v != values[0] for v in values):
                    raise ValueError(f"cannot concat params with different {f.name} ({sorted(set(values))}); "
                                     "fit every block the same way (all with or all without importance)")
                fields[f.name] = values[0]
        return cls(**fields)

    def select_rows(self, rows: Any) -> "BlockParams":
        """The params of a subset of rows (any numpy index on the first axis)."""
        return type(self)(**{f.name: (getattr(self, f.name)[rows] if isinstance(getattr(self, f.name), np.ndarray)
                                      else getattr(self, f.name)) for f in dataclasses.fields(self)})


# below these many weights a call runs on the calling thread only: starting numba's thread team
# costs more than it saves on GPTQ's one-block / one-column calls (and far more on a busy machine)
_MIN_PARALLEL_FIT = 1 << 16
_MIN_PARALLEL_ROUND = 1 << 18


def _small_calls_serial(threshold: int, name: str) -> Callable[[F], F]:
    """Run a method on the calling thread alone when its first array argument (called `name`) has
    fewer than `threshold` elements."""
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            array = args[1] if len(args) > 1 else kwargs.get(name)
            if np.size(array) >= threshold or numba.get_num_threads() == 1:
                return method(*args, **kwargs)
            previous = numba.get_num_threads()
            numba.set_num_threads(1)
            try:
                return method(*args, **kwargs)
            finally:
                numba.set_num_threads(previous)
        return wrapper  # type: ignore[return-value]
    return decorate


class BlockFormat:
    """One GGML block format. Subclasses register with `class X(BlockFormat, qtype=...)`."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]          # weights per block (from gguf.GGML_QUANT_SIZES)
    type_size: ClassVar[int]           # bytes per block (from gguf.GGML_QUANT_SIZES)
    code_dtype: ClassVar[type] = np.uint8
    code_min: ClassVar[int] = 0        # codes are integers in [code_min, code_max], as packed
    code_max: ClassVar[int]
    params_type: ClassVar[type[BlockParams]]

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:       # an intermediate base class
            return
        cls.qtype = qtype
        cls.block_size, cls.type_size = gguf.GGML_QUANT_SIZES[qtype]
        assert qtype not in FORMATS, f"{qtype.name} registered twice"
        FORMATS[qtype] = cls()

    def __repr__(self) -> str:
        return f"<BlockFormat {self.qtype.name}: {self.block_size} weights in {self.type_size} bytes>"

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def n_codes(self) -> int:
        return self.code_max - self.code_min + 1

    def row_bytes(self, n_cols: int) -> int:
        self._check_width(n_cols, "row size")
        return n_cols // self.block_size * self.type_size

    # ---------------------------------------------------------------- public API

    @_small_calls_serial(_MIN_PARALLEL_FIT, "rows")
    def quantize(self, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
        """RTN quantization identical to ggml_quantize_chunk(qtype, rows, imatrix=importance).

        rows: (R, C) float32; importance: (C,) float32 >= 0 (ggml's imatrix, the same for every row),
        (R, C) for a per-row importance, or None (imatrix=NULL).
        Returns (R, C // block_size * type_size) uint8."""
        rows = self._check_rows(rows, finite=False)
        qw = self._check_importance(importance, rows.shape)
        fused = self._quantize_fused(rows) if qw.shape[0] == 0 else None
        if fused is not None:
            out, nonfinite_rows = fused
            if nonfinite_rows.any():
                self._require_finite(rows, "rows")
        else:
            self._require_finite(rows, "rows")
            params, codes = self._fit(rows, qw, None)
            out = self._pack(codes, params)
        self._check_packed(out, rows.shape)
        return out

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        """GGML blocks (R, nb * type_size) uint8 -> (R, nb * block_size) float32, by gguf-py."""
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % self.type_size:
            raise ValueError(f"{self.name} data must be a 2-D uint8 array with a multiple of {self.type_size} "
                             f"bytes per row, got {data.dtype} {data.shape}; pass quantize()'s output")
        return gguf.quants.dequantize(data, self.qtype).reshape(data.shape[0], -1)

    @_small_calls_serial(_MIN_PARALLEL_FIT, "weights")
    def fit_scales(self, weights: np.ndarray, importance: np.ndarray | None = None, *,
                   sigma2: np.ndarray | None = None) -> BlockParams:
        """ggml's scale search for these weights, frozen into params.

        weights: (R, W) float32, W a multiple of block_size (GPTQ passes one block, W = block_size);
        importance: (W,) or (R, W) float32 >= 0, or None, with the same meaning as in quantize().
        sigma2: (R,) float32, only read by Q4_0/Q4_1/Q5_0/Q5_1 with importance, whose weighting uses
        the mean square of the *whole row*; compute it with row_sigma2(full_rows). Default: computed
        from `weights`, which is exact when they are whole rows.
        Returns params for R rows x W // block_size blocks (plus, for K-quants, the codes ggml keeps
        in sub-blocks whose scale quantizes to zero)."""
        weights = self._check_rows(weights, what="weights")
        qw = self._check_importance(importance, weights.shape)
        if sigma2 is not None:
            sigma2 = np.ascontiguousarray(sigma2, dtype=np.float32)
            if sigma2.shape != (weights.shape[0],):
                raise ValueError(f"sigma2 shape {sigma2.shape} must be ({weights.shape[0]},), one value per row; "
                                 "compute it with row_sigma2(rows)")
        params, _ = self._fit(weights, qw, sigma2)
        return params

    @_small_calls_serial(_MIN_PARALLEL_ROUND, "values")
    def quantize_to_grid(self, values: np.ndarray, params: BlockParams, column_offset: int = 0) -> np.ndarray:
        """Codes of `values` on the frozen grid, by ggml's own rounding rule for these params.

        values: (R, w) float32, the columns column_offset .. column_offset + w - 1 of the blocks that
        params describe (0 <= column_offset, column_offset + w <= params.n_blocks * block_size).
        Values outside the grid's range get the nearest end code. Returns (R, w) code_dtype."""
        values = self._check_grid_values(values, params, column_offset)
        codes = np.empty(values.shape, dtype=self.code_dtype)
        self._to_grid(values, params, column_offset, codes)
        return codes

    @_small_calls_serial(_MIN_PARALLEL_ROUND, "codes")
    def dequantize_codes(self, codes: np.ndarray, params: BlockParams, column_offset: int = 0) -> np.ndarray:
        """The float32 values the runtime computes for these codes: (R, w) codes -> (R, w) float32,
        for the columns column_offset .. column_offset + w - 1 of params' blocks."""
        codes = self._check_grid_values(codes, params, column_offset, what="codes")
        cols = column_offset + np.arange(codes.shape[1])
        return self._dequantize_codes(codes.astype(np.int32), params, cols).astype(np.float32, copy=False)

    def round_to_grid(self, values: np.ndarray, params: BlockParams, column_offset: int = 0) -> np.ndarray:
        """dequantize_codes(quantize_to_grid(values, ...)): the grid value GPTQ keeps for each weight."""
        return self.dequantize_codes(self.quantize_to_grid(values, params, column_offset), params, column_offset)

    def grid_values(self, params: BlockParams, column_offset: int = 0, width: int | None = None) -> np.ndarray:
        """Every representable value: (R, w, n_codes) float32, [r, c, k] = value of code code_min + k
        at column column_offset + c."""
        width = params.n_blocks * self.block_size - column_offset if width is None else width
        out = np.empty((params.n_rows, width, self.n_codes), dtype=np.float32)
        for k in range(self.n_codes):
            codes = np.full((params.n_rows, width), self.code_min + k, dtype=self.code_dtype)
            out[:, :, k] = self.dequantize_codes(codes, params, column_offset)
        return out

    @_small_calls_serial(_MIN_PARALLEL_ROUND, "codes")
    def pack(self, codes: np.ndarray, params: BlockParams) -> np.ndarray:
        """GGML blocks from codes (R, nb * block_size) code_dtype and params (R, nb):
        (R, nb * type_size) uint8."""
        codes = np.asarray(codes)
        expected = (params.n_rows, params.n_blocks * self.block_size)
        if codes.shape != expected:
            raise ValueError(f"codes shape {codes.shape} does not match params ({expected}); "
                             "pass one code per weight of the blocks that params describe")
        lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (self.code_min, self.code_min)
        if lo < self.code_min or hi > self.code_max:
            raise ValueError(f"{self.name} codes must lie in [{self.code_min}, {self.code_max}], got [{lo}, {hi}]; "
                             "use quantize_to_grid to produce them")
        out = self._pack(np.ascontiguousarray(codes, dtype=self.code_dtype), params)
        self._check_packed(out, expected)
        return out

    @_small_calls_serial(_MIN_PARALLEL_ROUND, "rows")
    def row_sigma2(self, rows: np.ndarray) -> np.ndarray:
        """Per-row mean of x**2 in ggml's float32 summation order: (R, C) -> (R,) float32 (the row
        statistic that Q4_0/Q4_1/Q5_0/Q5_1 weight blocks by when an importance vector is given)."""
        rows = self._check_rows(rows)
        out = np.empty(rows.shape[0], dtype=np.float32)
        _row_sigma2(rows, out)
        return out

    # ---------------------------------------------------------------- to implement

    def _quantize_fused(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Optional one-pass kernel for the no-importance path of the cheap formats, where a separate
        fit/pack pass and finiteness check would dominate: (bytes, per-row non-finite flags)."""
        return None

    def _fit(self, x: np.ndarray, qw: np.ndarray, sigma2: np.ndarray | None) -> tuple[BlockParams, np.ndarray]:
        """x (R, C) float32 C-contiguous; qw (Rq, C) float32 with Rq in {0, 1, R} (0: no importance).
        Returns (params, codes (R, C) code_dtype) exactly as ggml's quantizer chooses them."""
        raise NotImplementedError

    def _pack(self, codes: np.ndarray, params: BlockParams) -> np.ndarray:
        raise NotImplementedError

    def _to_grid(self, values: np.ndarray, params: BlockParams, offset: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _dequantize_codes(self, codes: np.ndarray, params: BlockParams, cols: np.ndarray) -> np.ndarray:
        """codes (R, w) int32 at absolute columns cols (w,) -> float32, in gguf-py's operation order."""
        raise NotImplementedError

    # ---------------------------------------------------------------- validation

    def _check_width(self, n_cols: int, what: str) -> None:
        if n_cols % self.block_size == 0 and n_cols > 0:
            return
        if self.block_size > 32:
            fix = f"use Q8_0 or pad to a multiple of {self.block_size}"
        else:
            fix = f"pad the rows to a multiple of {self.block_size}"
        raise ValueError(f"{what} {n_cols} is not a multiple of {self.name} block size {self.block_size}; {fix}")

    def _check_rows(self, rows: np.ndarray, what: str = "rows", finite: bool = True) -> np.ndarray:
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ValueError(f"{what} must be 2-D (n_rows, n_cols), got shape {rows.shape}; reshape to (-1, n_cols)")
        if rows.dtype.kind != "f":
            raise ValueError(f"{what} dtype {rows.dtype} is not a float type; pass float32 weights")
        self._check_width(rows.shape[1], "row size")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if finite:
            self._require_finite(rows, what)
        return rows

    def _require_finite(self, rows: np.ndarray, what: str) -> None:
        bad = _first_nonfinite(rows)
        if bad >= 0:
            r, c = divmod(int(bad), rows.shape[1])
            raise ValueError(f"{what}[{r}, {c}] is {rows[r, c]}; {self.name} quantization needs finite weights; "
                             "fix the checkpoint or replace NaN/Inf before quantizing")

    def _check_importance(self, importance: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
        if importance is None:
            return np.zeros((0, shape[1]), dtype=np.float32)
        qw = np.asarray(importance)
        if qw.ndim == 1:
            if qw.shape[0] != shape[1]:
                raise ValueError(f"importance length {qw.shape[0]} does not match row size {shape[1]}; "
                                 f"pass one value per column ({shape[1]})")
            qw = qw[None, :]
        elif qw.ndim != 2 or qw.shape != tuple(shape):
            raise ValueError(f"importance shape {qw.shape} matches neither ({shape[1]},) nor {tuple(shape)}; "
                             "pass one value per column, or one per weight")
        one_vector = np.ndim(importance) == 1
        qw = np.ascontiguousarray(qw, dtype=np.float32)

        def where(mask: np.ndarray) -> str:
            r, c = (int(i) for i in np.argwhere(mask)[0])
            return f"importance[{c}]" if one_vector else f"importance[{r}, {c}]"

        finite = np.isfinite(qw)
        if not finite.all():
            bad = where(~finite)
            raise ValueError(f"{bad} is {qw[~finite][0]}; importance must be finite and >= 0; "
                             "recompute the imatrix or clip it")
        if (qw < 0).any():
            bad = where(qw < 0)
            raise ValueError(f"{bad} is {qw[qw < 0][0]}, negative; importance must be >= 0 "
                             "(a sum of squared activations); recompute the imatrix or clip it at 0")
        return qw

    def _check_grid_values(self, values: np.ndarray, params: BlockParams, column_offset: int,
                           what: str = "values") -> np.ndarray:
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] != params.n_rows:
            raise ValueError(f"{what} shape {values.shape} must be ({params.n_rows}, width): one row per params row")
        width = params.n_blocks * self.block_size
        if column_offset < 0 or column_offset + values.shape[1] > width:
            raise ValueError(f"columns {column_offset}..{column_offset + values.shape[1] - 1} fall outside the "
                             f"{width} columns that params describe; keep column_offset + width <= {width}")
        if what == "values":
            values = np.ascontiguousarray(values, dtype=np.float32)
        return values

    def _check_packed(self, out: np.ndarray, shape: tuple[int, int]) -> None:
        assert out.dtype == np.uint8, out.dtype
        assert out.shape == (shape[0], shape[1] // self.block_size * self.type_size), (out.shape, shape)


def gather_columns(array: np.ndarray, cols: np.ndarray, block_size: int, sub_size: int | None = None) -> np.ndarray:
    """Per-column view of a per-block (R, nb) or per-sub-block (R, nb, ns) params array: (R, w)."""
    blocks = cols // block_size
    if array.ndim == 2:
        return array[:, blocks]
    assert sub_size is not None
    return array[:, blocks, (cols % block_size) // sub_size]


@njit(parallel=True, cache=True, error_model="numpy")
def _first_nonfinite(x):
    """Flat index of the first NaN/Inf in a (R, C) array, or -1."""
    n_rows, n_cols = x.shape
    first = np.full(n_rows, -1, dtype=np.int64)
    for r in prange(n_rows):
        # an all-ones exponent marks Inf/NaN; an integer max over the exponent bits vectorizes
        top = np.int32(0)
        for c in range(n_cols):
            top = max(top, np.int32(f32_as_i32(x[r, c]) & np.int32(0x7F800000)))
        if top == np.int32(0x7F800000):
            for c in range(n_cols):
                if not np.isfinite(x[r, c]):
                    first[r] = r * n_cols + c
                    break
    for r in range(n_rows):
        if first[r] >= 0:
            return first[r]
    return -1


@njit(parallel=True, cache=True, error_model="numpy")
def _row_sigma2(x, out):
    """out[r] = (sum of x[r]**2, summed left to right in float32) / C, as ggml computes it."""
    n_rows, n_cols = x.shape
    fcols = np.float32(n_cols)
    for r in prange(n_rows):
        s = np.float32(0.0)
        for c in range(n_cols):
            s += x[r, c] * x[r, c]
        out[r] = s / fcols
