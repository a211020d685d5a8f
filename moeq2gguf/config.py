"""What a conversion is asked to do, validated once: `ConvertConfig` is built by the CLI and by Python callers
(convert(model, out, type=..., method=...) builds one from its keywords), and every error a user can get from
the options alone is raised here, before any file is read."""
from __future__ import annotations

import os
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
    calib: str | None = None                 # split name, .txt/.jsonl file or folder, or "ebss" (default: default_calib)
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
    allow_nonfinite: bool = False            # write NaN/Inf or F16-overflowing weights instead of refusing them
    split_max_size: str | int | None = None  # split the output into parts of at most this size ('50G', bytes)
    split_max_tensors: int = 0               # ... or of at most this many tensors (0: no limit)
    refine: int = 0                          # --refine STEPS: tune each layer's K-quant codes after GPTQ
    refine_routing: float = 1.0              # weight of the routing-consistency term of --refine
    refine_scales: float = 0.2               # --refine moves each block scale by a factor in [1 - r, 1 + r] (0: codes only)
    expert_group: int | None = None          # routed experts quantized at once (None: as many as free memory allows)
    # derived in __post_init__
    type_name: str = field(init=False)       # the validated type (for a size target: the mix standing in for it)
    stock_smooth: tuple[str, ...] = field(init=False)
    patched_smooth: tuple[str, ...] = field(init=False)
    overrides: tuple[tuple[re.Pattern[str], Q], ...] = field(init=False)
    quant: QuantConfig = field(init=False)
    split_max_bytes: int = field(init=False)

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
        put("quant", QuantConfig(method=self.method, calib=self.calib or default_calib(self.device), device=self.device,
                                 imatrix_file=self.imatrix, n_windows=self.calib_windows, ctx=self.calib_ctx,
                                 allow_nonfinite=self.allow_nonfinite, expert_group=self.expert_group,
                                 refine=_refine_config(self.refine, self.refine_routing,
                                                      self.refine_scales)))
        if plan.is_float(self.type_name) and (method.calibrated or self.imatrix):
            raise Moeq2ggufError(f"--method {self.method} / --imatrix quantize weights; pick a quantized --type such as "
                                 "Q4_K_M")
        if self.imatrix and method.calibrated:
            raise Moeq2ggufError("--imatrix FILE replaces our statistics; use it with --method rtn (the default)")
        from moeq2gguf.plan.mixes import IMATRIX_MIXES
        if self.type_name in IMATRIX_MIXES and not method.calibrated and not self.imatrix:
            raise Moeq2ggufError(f"--type {self.type_name} is a very-low-bit mix that llama.cpp quantizes only with an "
                                 "importance matrix; use --method moequant (or imatrix, gptq), or --imatrix FILE")
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
        if self.patched_runtime and self.imatrix:
            raise Moeq2ggufError("--smooth per-expert / --expert-hadamard change the expert weights and inputs: an "
                                 "--imatrix FILE (statistics of the untransformed model) does not apply; use --method "
                                 "imatrix (statistics of the transformed model)")
        put("overrides", tuple(parse_override(t) for t in self.tensor_types))
        put("split_max_bytes", alloc.parse_size(self.split_max_size, "--split-max-size")
            if self.split_max_size is not None else 0)
        if self.split_max_tensors < 0:
            raise Moeq2ggufError(f"--split-max-tensors {self.split_max_tensors}: give a positive number of tensors per part")
        if (self.split_max_bytes or self.split_max_tensors) and self.targeted:
            raise Moeq2ggufError("a size target bounds one file; convert to one file with --target-size, or split "
                                 "without a size target")

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


@dataclass(frozen=True)
class CalibrateConfig:
    """What `moeq2gguf calibrate` is asked to do: EBSS generation into `output` and/or balance reports."""
    output: str | None = None                # the EBSS .jsonl to write
    ebss: bool = False
    n: int = 128
    length: int = 512
    beams: int = 4
    tau: float | None = None                 # None: calib.ebss.DEFAULT_TAU
    topk: int = 64
    seed: int = 0
    eos_guard: bool = True
    ngram_guard: int = 4
    repetition_penalty: float = 1.1
    balance: str = "candidate"
    report: tuple[str, ...] = ()             # split names or files whose expert balance to print
    reach: bool = False                      # with report: the experts each source never selects, and how near they came
    device: str | None = None                # None: the GPU when present
    imatrix_out: str | None = None           # write our statistics as a llama.cpp GGUF imatrix here
    imatrix_weighting: str = "plain"         # plain | affinity (calib/imatrix_export.py)
    calib: str | None = None                 # the text for --imatrix-out (None: the EBSS file when --ebss, else calib)
    calib_windows: int = 32
    calib_ctx: int = 512

    def __post_init__(self) -> None:
        from pathlib import Path

        from moeq2gguf.calib.imatrix_export import WEIGHTINGS
        object.__setattr__(self, "report", tuple(str(r) for r in self.report))
        if not self.ebss and not self.report and not self.imatrix_out:
            raise Moeq2ggufError("calibrate: nothing to do; pass --ebss -o FILE.jsonl, --report SPLIT|FILE and/or "
                                 "--imatrix-out FILE.gguf")
        if self.reach and not self.report:
            raise Moeq2ggufError("calibrate --reach extends --report; add --report SPLIT|FILE (e.g. --report calib)")
        if self.imatrix_out is not None and Path(self.imatrix_out).suffix != ".gguf":
            raise Moeq2ggufError(f"--imatrix-out {self.imatrix_out} must end in .gguf (llama.cpp's GGUF imatrix format)")
        if self.imatrix_weighting not in WEIGHTINGS:
            raise Moeq2ggufError(f"--imatrix-weighting {self.imatrix_weighting} is not one of {', '.join(WEIGHTINGS)}")
        if self.calib_windows < 1 or self.calib_ctx < 2:
            raise Moeq2ggufError(f"--calib-windows {self.calib_windows} / --calib-ctx {self.calib_ctx} must be positive")
        if self.ebss and self.output is None:
            raise Moeq2ggufError("calibrate --ebss needs -o FILE.jsonl to write the generated sequences to")
        if not self.ebss and self.output is not None:
            raise Moeq2ggufError("calibrate -o is only used with --ebss; add --ebss or drop -o")
        if self.ebss and Path(self.output).suffix != ".jsonl":
            raise Moeq2ggufError(f"EBSS output {self.output} must end in .jsonl (one {{\"text\", \"ids\"}} record per line)")
        self.ebss_config   # EBSSConfig's own checks

    @property
    def ebss_config(self):
        from moeq2gguf.calib.ebss import DEFAULT_TAU, EBSSConfig
        return EBSSConfig(n=self.n, length=self.length, beams=self.beams,
                          tau=DEFAULT_TAU if self.tau is None else self.tau, topk=self.topk, seed=self.seed,
                          eos_guard=self.eos_guard, ngram_guard=self.ngram_guard,
                          repetition_penalty=self.repetition_penalty, balance=self.balance)


@dataclass(frozen=True)
class EvalConfig:
    """How `moeq2gguf eval` compares a quant with its float model."""
    text: str = "eval"                       # a split name, or a .txt/.jsonl file or folder
    ctx: int = 512                           # window length; the second half of each window is scored
    chunks: int | None = None                # at most this many windows

    def __post_init__(self) -> None:
        if self.ctx < 4 or self.ctx % 2:
            raise Moeq2ggufError(f"--ctx {self.ctx} must be an even number >= 4")
        if self.chunks is not None and self.chunks < 1:
            raise Moeq2ggufError(f"--chunks {self.chunks} must be at least 1")


def default_calib(device: str, world_size: int | None = None) -> str:
    """convert's calibration text when --calib is not given. EBSS (the model's own balanced samples) on a GPU: on a
    model trained on prose it came closest to in-domain text of the out-of-domain sources (BENCHMARKS.md "Which
    calibration text": Q2_K 0.829 vs the stdlib code split's 0.910 times llama.cpp imatrix's KLD, in-domain 0.823).
    The stdlib split on CPU, where generating EBSS's 32 x 512 tokens took 10 to 36 minutes even for the 8-14M-parameter
    test models, and under torchrun (EBSS generation is not distributed yet)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return "ebss" if str(device).startswith("cuda") and world_size == 1 else "calib"


def _refine_config(steps: int, routing_weight: float, scale_range: float):
    from moeq2gguf.quant.refine import RefineConfig
    try:
        return RefineConfig(steps=steps, routing_weight=routing_weight, scale_range=scale_range)
    except ValueError as exc:
        raise Moeq2ggufError(str(exc)) from None
