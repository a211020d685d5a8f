"""What a conversion is asked to do, validated once: `ConvertConfig` is built by the CLI and by Python callers
(convert(model, out, type=..., method=...) builds one from its keywords), and every error a user can get from
the options alone is raised here, before any file is read."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf

from moeq2gguf import methods, plan
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.passes.quantize import QuantConfig

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class ConvertConfig:
    type: str = "F16"                        # F32 | F16 | BF16 or a llama.cpp mix (Q4_K_M, ...)
    method: str = "rtn"                      # a registered method (moeq2gguf.methods.names())
    calib: str | None = None                 # split name, .txt/.jsonl file or folder, or "ebss" (default: calib)
    calib_windows: int = 32
    calib_ctx: int = 512
    device: str = "cpu"
    tensor_types: tuple[str, ...] = ()       # llama-quantize style REGEX=TYPE overrides
    imatrix: str | None = None               # a llama-imatrix GGUF file (with rtn)
    rotate: bool | None = None               # None: the method's default (methods.Method.rotates_by_default)
    rotate_seed: int | None = None
    target_size: str | int | None = None     # '6GiB', '3.5GB', bytes: instead of type
    target_bpw: float | None = None
    smooth: str | None = None                # aggregate | down | aggregate,down | per-expert
    expert_hadamard: bool = False
    # derived in __post_init__
    type_name: str = field(init=False)       # the validated type (for a size target: the mix standing in for it)
    stock_smooth: tuple[str, ...] = field(init=False)
    patched_smooth: tuple[str, ...] = field(init=False)
    overrides: tuple[tuple[re.Pattern[str], Q], ...] = field(init=False)
    quant: QuantConfig = field(init=False)

    def __post_init__(self) -> None:
        from moeq2gguf.plan import alloc
        from moeq2gguf.plan.mixes import parse_override
        from moeq2gguf.transforms import smoothing
        from moeq2gguf.transforms.rotate import check_seed
        put = lambda name, value: object.__setattr__(self, name, value)   # noqa: E731  (frozen)
        put("tensor_types", tuple(self.tensor_types))
        type_name = self.type
        if self.targeted:
            type_name = alloc.check_request(type_name, self.target_size, self.target_bpw, self.imatrix)
        put("type_name", plan.validate_type(type_name))
        method = methods.get(self.method)
        put("quant", QuantConfig(method=self.method, calib=self.calib or "calib", device=self.device,
                                 imatrix_file=self.imatrix, n_windows=self.calib_windows, ctx=self.calib_ctx))
        if plan.is_float(self.type_name) and (method.calibrated or self.imatrix):
            raise Moeq2ggufError(f"--method {self.method} / --imatrix quantize weights; pick a quantized --type such as "
                                 "Q4_K_M")
        if self.imatrix and method.calibrated:
            raise Moeq2ggufError("--imatrix FILE replaces our statistics; use it with --method rtn (the default)")
        if self.rotate_seed is not None and self.rotate is False:
            raise Moeq2ggufError("--rotate-seed has no effect without --rotate; add --rotate or drop the seed")
        check_seed(0 if self.rotate_seed is None else self.rotate_seed)
        if self.rotate and self.imatrix:
            raise Moeq2ggufError("--imatrix FILE holds statistics of the unrotated model, which do not apply to rotated "
                                 "weights; with --rotate use --method imatrix (statistics collected on the rotated model)")
        stock, patched = smoothing.parse(self.smooth)
        put("stock_smooth", stock)
        put("patched_smooth", patched)
        if stock and self.expert_hadamard:
            raise Moeq2ggufError(f"--smooth {self.smooth} does not combine with --expert-hadamard in this version; "
                                 "choose one")
        if stock and self.imatrix:
            raise Moeq2ggufError(f"--imatrix FILE holds statistics of the unsmoothed model, which do not apply to the "
                                 f"weights --smooth {self.smooth} scales; use --method imatrix (statistics of the smoothed "
                                 "model)")
        if self.patched_runtime and (self.imatrix or self.targeted):
            raise Moeq2ggufError("--smooth per-expert / --expert-hadamard change the expert weights and inputs: an "
                                 "--imatrix FILE (statistics of the untransformed model) or a size target does not "
                                 "apply; use --method with --type")
        put("overrides", tuple(parse_override(t) for t in self.tensor_types))

    @property
    def targeted(self) -> bool:
        return self.target_size is not None or self.target_bpw is not None

    @property
    def patched_runtime(self) -> bool:
        """The file needs the patched llama.cpp (runtime_patches/)."""
        return bool(self.patched_smooth) or self.expert_hadamard

    @property
    def seed(self) -> int:
        return 0 if self.rotate_seed is None else int(self.rotate_seed)

    @property
    def method_impl(self) -> methods.Method:
        return methods.get(self.method)
