"""Fit a memory budget: choose a GGML type per tensor to minimise the predicted quality loss.

    moeq2gguf convert MODEL -o OUT.gguf --target-size 6GiB      (or --target-bpw 3.5)

1. quant/sensitivity.py measures, for every quantizable tensor and every candidate type, the
   reconstruction error the method's own quantizer leaves (routed experts weighted by how much the
   router uses each one).
2. Those errors live in each linear's output space; one coefficient per tensor class (CLASS_COEFFS)
   puts them on the scale of the mean KL divergence of the model's next-token distribution.
3. A multiple-choice knapsack picks one type per tensor (all experts of a tensor in a layer share
   it: llama.cpp stores them as one 3-D tensor) minimising the summed predicted KLD with the file's
   bytes within the budget. --tensor-type overrides, norms, biases and routers are fixed first.

Budgets. --target-size bounds the whole file: header, metadata (the recipe included), tensor infos,
alignment padding and tensor data, computed exactly as gguf-py writes them; convert checks the
written size too. --target-bpw bounds bits per weight as llama.cpp prints it (and as
tools/bench_quality.py computes it): 8 * tensor data bytes / parameters, every tensor counted.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import gguf
import numpy as np

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.plan.mixes import FALLBACK, allows_quantization, assign_types
from moeq2gguf.models.base import TensorSource

Q = gguf.GGMLQuantizationType

# Candidate types, smallest first. Rows whose length is not a multiple of a type's block take
# llama-quantize's fallback (Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0), or F16 when even that does not divide the row.
CANDIDATES = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.F16)
# The i-quants join the candidates when the budget is below LATTICE_BELOW_BPW bits per weight (where a tensor may need
# fewer bits than Q3_K's 3.44): measuring them costs a GPTQ walk each, and above that budget the knapsack would not pick
# them. Those ggml cannot round without an importance vector (IQ1_S, IQ2_XXS, IQ2_XS) are left out where the tensor
# is rounded without one: token_embd, the head under --method imatrix, everything under --method rtn.
LATTICE_CANDIDATES = (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S)
LATTICE_BELOW_BPW = 4.0

# Predicted KLD per unit of measured reconstruction error (quant/sensitivity.py), per tensor class.
# Measured by tools/fit_alloc_coeffs.py (defaults) on both bundled models: each class alone quantized
# with GPTQ to Q2_K and to Q3_K (llama.cpp's fallback where rows do not divide; every other tensor F32),
# mean KLD against the F32 file (eval split, 32 windows of 512 tokens) over the class's summed
# predicted error; the coefficient is the geometric mean over models and types. Its printed fit
# (2026-11-23): ratios per class within a factor 1.1 (embd, output) to 3.4 (attn_output) of each
# other; with these values the predicted KLD of every fixed mix (Q4_K_M, Q3_K_M, Q2_K, --method gptq)
# of both models is within 0.89x to 1.21x of its measured KLD.
CLASS_COEFFS: dict[str, float] = {
    "embd": 0.3205,
    "attn_qkv": 4.589e-4,
    "attn_output": 2.262e-4,
    "ffn_gate_up": 2.385e-4,
    "ffn_down": 1.036e-4,
    "shexp_gate_up": 1.735e-4,
    "shexp_down": 1.084e-4,
    "output": 1.685e-4,
}

# Mixes whose ftype an allocated file may display (llama.cpp only prints general.file_type).
DISPLAY_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")

RECIPE_KEY, TARGET_SIZE_KEY, TARGET_BPW_KEY = "moeq2gguf.recipe", "moeq2gguf.target_size", "moeq2gguf.target_bpw"


def tensor_class(name: str, tied: bool = False) -> str:
    """The class whose coefficient scales a tensor's measured error."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "output"
    if name == "token_embd.weight":
        return "embd"
    short = name.split(".")[2] if name.startswith("blk.") else name
    if "shexp" in short:
        return "shexp_down" if short.startswith("ffn_down") else "shexp_gate_up"
    if short.startswith("ffn_down"):
        return "ffn_down"
    if short.startswith(("ffn_gate", "ffn_up")):
        return "ffn_gate_up"
    if short == "attn_output":
        return "attn_output"
    return "attn_qkv"


def fallback_type(qtype: Q, ne0: int) -> Q:
    """llama-quantize's type for a row of ne0 values when qtype's block does not divide it."""
    if qtype in (Q.F16, Q.F32) or ne0 % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    new = FALLBACK.get(qtype, qtype)
    return new if ne0 % gguf.GGML_QUANT_SIZES[new][0] == 0 else Q.F16


def _bpw(q: Q) -> float:
    block, type_size = gguf.GGML_QUANT_SIZES[q]
    return 8 * type_size / block


def candidate_types(shape: Sequence[int], lattice: bool = False, needs_no_importance: bool = False) -> list[Q]:
    """The types a tensor of this shape may take, smallest first: CANDIDATES (with the i-quants when lattice),
    each replaced by llama-quantize's fallback where its block does not divide the rows; needs_no_importance: only
    types ggml can quantize without an importance vector."""
    from moeq2gguf.formats.lattice import KERNEL_NEEDS_IMPORTANCE
    pool = CANDIDATES + (LATTICE_CANDIDATES if lattice else ())
    out: list[Q] = []
    for q in sorted(pool, key=_bpw):   # stable: equal sizes keep CANDIDATES' order (Q3_K before IQ3_S)
        if needs_no_importance and q in KERNEL_NEEDS_IMPORTANCE:
            continue
        t = fallback_type(q, shape[-1])
        if t not in out:
            out.append(t)
    return out


def uses_lattices(budget: Budget) -> bool:
    """Whether the i-quants are candidates under this budget (LATTICE_BELOW_BPW)."""
    return budget.n_bytes * 8 / budget.n_params < LATTICE_BELOW_BPW


def unweighted(name: str, method: str) -> bool:
    """Whether `method` rounds this tensor without an importance vector (quant/sensitivity.py measures it so too)."""
    from moeq2gguf import methods
    m = methods.get(method)
    return (not m.calibrated or name == "token_embd.weight"
            or (name == "output.weight" and not m.calibrates_head))


def tensor_candidates(source: TensorSource, budget: Budget, method: str) -> list[Q]:
    return candidate_types(source.shape, uses_lattices(budget), unweighted(source.name, method))


def tensor_nbytes(shape: Sequence[int], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert shape[-1] % block == 0, (shape, qtype)
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


# ----------------------------------------------------------------------------------------------
# Budgets

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}   # llama.cpp's --split-max-size 50G: powers of 10


def parse_size(text: str | int, option: str = "--target-size") -> int:
    """'6GiB' -> 6442450944; also B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB, or a plain byte count."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise Moeq2ggufError(f"{option} {text!r} is not a size; write e.g. 6GiB, 6.5GB, 50G, 500MiB or a byte count")
        value, unit = float(m.group(1)), m.group(2).upper()
    n = int(value * _UNITS[unit])
    if n <= 0:
        raise Moeq2ggufError(f"{option} {text!r} must be positive")
    return n


@dataclass(frozen=True)
class Budget:
    n_bytes: int              # the limit
    kind: str                 # file: the whole GGUF file; bpw: tensor data bytes (llama.cpp's BPW numerator)
    label: str                # as requested, for messages and metadata
    n_params: int             # every tensor's element count (the BPW denominator)
    bpw: float | None = None

    def bpw_of(self, tensor_bytes: int) -> float:
        return 8 * tensor_bytes / self.n_params


def mix_tensor_bytes(sources: Sequence[TensorSource], spec, mix: str) -> int:
    """Tensor data bytes of llama.cpp's `mix` of this model (its types as llama-quantize with an imatrix picks them;
    plan.mixes reproduces them byte for byte)."""
    types = assign_types([(s.name, s.shape) for s in sources], mix, n_layer=spec.n_layers, n_expert=spec.n_experts,
                         n_head=spec.n_heads, n_head_kv=spec.n_kv_heads, has_imatrix=True)
    return sum(tensor_nbytes(s.shape, t) for s, t in zip(sources, types))


def make_budget(sources: Sequence[TensorSource], target_size: str | int | None, target_bpw: float | None,
                spec) -> Budget:
    """The budget of --target-size (bytes of the whole file, '6GiB', or a llama.cpp mix name: that mix's tensor bytes
    for this model, e.g. Q4_K_M: the best file of Q4_K_M's size) or of --target-bpw."""
    from moeq2gguf.plan.mixes import MIXES
    if (target_size is None) == (target_bpw is None):
        raise Moeq2ggufError("give one of --target-size and --target-bpw")
    n_params = sum(math.prod(s.shape) for s in sources)
    if isinstance(target_size, str) and target_size.upper() in MIXES:
        mix = target_size.upper()
        n_bytes = mix_tensor_bytes(sources, spec, mix)
        return Budget(n_bytes, "bpw", f"{mix}'s size", n_params, 8 * n_bytes / n_params)
    if target_bpw is not None:
        if not 0 < target_bpw <= 32:
            raise Moeq2ggufError(f"--target-bpw {target_bpw} must be in (0, 32]")
        return Budget(int(target_bpw * n_params / 8), "bpw", f"{target_bpw:g}bpw", n_params, float(target_bpw))
    return Budget(parse_size(target_size), "file", str(target_size), n_params)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------------
# Solver

def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int,
          resolution: int = 1 << 16) -> list[int]:
    """Multiple-choice knapsack: one option per item, sum of costs <= budget, least summed loss.

    Returns the chosen option index of every item. Dynamic programming over the bytes above the
    cheapest choice, in units of the gcd of the options' extra costs; exact when that slack spans at
    most `resolution` units, otherwise costs are rounded *up* to slack/resolution (always feasible,
    at most one unit per item short of optimal) and a greedy pass spends the bytes left. Raises
    ValueError when even the cheapest options exceed the budget."""
    n = len(costs)
    frontiers: list[list[int]] = []   # per item: Pareto-optimal options, cost ascending, loss descending
    for c, l in zip(costs, losses):
        assert len(c) == len(l) and len(c) > 0
        keep, best = [], math.inf
        for k in sorted(range(len(c)), key=lambda k: (c[k], l[k])):
            if l[k] < best:
                keep.append(k)
                best = l[k]
        frontiers.append(keep)
    base = sum(int(costs[i][f[0]]) for i, f in enumerate(frontiers))
    if base > budget:
        raise ValueError(f"the cheapest options need {base}, more than the budget {budget}")
    slack = budget - base
    extra = [[int(costs[i][k]) - int(costs[i][f[0]]) for k in f] for i, f in enumerate(frontiers)]
    g = 0
    for e in extra:
        for v in e:
            g = math.gcd(g, v)
    unit = max(g, 1)
    if slack // unit > resolution:
        unit = -(-slack // resolution)
    n_units = slack // unit
    dp = np.zeros(n_units + 1)                        # least loss so far within u units
    choice = np.zeros((n, n_units + 1), dtype=np.uint8)
    for i, f in enumerate(frontiers):
        new = np.full(n_units + 1, np.inf)
        for j, k in enumerate(f):
            cu = -(-extra[i][j] // unit)
            if cu > n_units:
                break
            cand = dp[:n_units + 1 - cu] + float(losses[i][k])
            better = cand < new[cu:]
            new[cu:][better] = cand[better]
            choice[i, cu:][better] = j
        dp = new
    pick, u = [0] * n, n_units
    for i in reversed(range(n)):
        j = int(choice[i, u])
        pick[i] = j
        u -= -(-extra[i][j] // unit)
    # spend what the rounding left: best loss decrease per item that still fits, until none does
    left = slack - sum(extra[i][j] for i, j in enumerate(pick))
    while unit > g and left > 0:
        best = None
        for i, f in enumerate(frontiers):
            for j in range(pick[i] + 1, len(f)):
                d = extra[i][j] - extra[i][pick[i]]
                if d <= left:
                    gain = float(losses[i][f[pick[i]]]) - float(losses[i][f[j]])
                    if best is None or gain > best[0]:
                        best = (gain, i, j, d)
        if best is None:
            break
        _, i, j, d = best
        pick[i], left = j, left - d
    return [frontiers[i][j] for i, j in enumerate(pick)]


# ----------------------------------------------------------------------------------------------
# The recipe

@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]
    layer: int | None
    cls: str | None                  # tensor class (None: not quantizable)
    qtype: Q
    n_bytes: int                     # tensor data bytes
    loss: float | None = None        # predicted KLD share (None: fixed, not allocated)
    fixed: str | None = None         # why fixed: float | override | raw


@dataclass
class Allocation:
    budget: Budget
    method: str
    choices: list[TensorChoice]
    total: int = 0                   # the budget's measure of the result: file bytes, or tensor data bytes
    smallest: int = 0                # the same for the cheapest recipe
    coeffs: dict[str, float] = field(default_factory=dict)

    @property
    def types(self) -> list[Q]:
        return [c.qtype for c in self.choices]

    @property
    def predicted(self) -> float:
        return sum(c.loss or 0.0 for c in self.choices)

    @property
    def tensor_bytes(self) -> int:
        return sum(c.n_bytes for c in self.choices)

    def recipe_json(self) -> str:
        """The recipe as stored in the GGUF: type and predicted KLD of every quantizable tensor. Numbers are
        written at a fixed width (%.3e), so the recipe's length, hence the file's size, depends on the types
        alone: the smallest file is known before anything is measured."""
        tensors = ",".join(f'{json.dumps(c.name)}:["{c.qtype.name}",{"null" if c.loss is None else format(c.loss, ".3e")}]'
                           for c in self.choices if c.cls is not None)
        return (f'{{"method":{json.dumps(self.method)},"budget":{self.budget.n_bytes},"budget_kind":"{self.budget.kind}",'
                f'"predicted_kld":{self.predicted:.3e},"tensors":{{{tensors}}}}}')

    def table(self) -> str:
        """Compact per-layer table (type of each tensor), then per-class bytes and predicted KLD."""
        b = self.budget
        lines = [f"recipe for {b.label} ({'whole file' if b.kind == 'file' else 'bits per weight'}), --method {self.method}: "
                 f"{self.total:,} of {b.n_bytes:,} bytes ({100 * self.total / b.n_bytes:.2f}%), "
                 f"{b.bpw_of(self.tensor_bytes):.3f} bpw, predicted KLD {self.predicted:.4g}"]
        quant = [c for c in self.choices if c.cls is not None]
        columns = list(dict.fromkeys(c.name.split(".")[2] for c in quant if c.layer is not None))
        width = max([6, *map(len, columns)])
        lines.append("layer " + " ".join(f"{c:>{width}}" for c in columns) + f" {'MiB':>8} {'pred. KLD':>10}")
        for layer in sorted({c.layer for c in quant if c.layer is not None}):
            row = {c.name.split(".")[2]: c for c in quant if c.layer == layer}
            cells = [f"{(row[c].qtype.name + ('*' if row[c].fixed else '')) if c in row else '-':>{width}}" for c in columns]
            n_bytes = sum(c.n_bytes for c in row.values())
            loss = sum(c.loss or 0.0 for c in row.values())
            lines.append(f"{layer:>5} " + " ".join(cells) + f" {n_bytes / 2**20:8.3f} {loss:10.3e}")
        for c in quant:
            if c.layer is None:
                lines.append(f"{c.name:<20} {c.qtype.name + ('*' if c.fixed else ''):>{width}} {c.n_bytes / 2**20:8.3f} "
                             f"{c.loss or 0.0:10.3e}")
        per_class = {}
        for c in quant:
            n_bytes, loss = per_class.get(c.cls, (0, 0.0))
            per_class[c.cls] = (n_bytes + c.n_bytes, loss + (c.loss or 0.0))
        lines.append("by class: " + "; ".join(f"{cls} {n / 2**20:.3f} MiB, {loss:.3e}" for cls, (n, loss) in per_class.items()))
        if any(c.fixed == "override" for c in quant):
            lines.append("* fixed by --tensor-type")
        return "\n".join(lines)


def nearest_mix(sources: Sequence[TensorSource], spec, budget: Budget) -> str:
    """The largest llama.cpp mix whose tensor data fits the budget (else the smallest): the
    general.file_type an allocated file displays."""
    best = DISPLAY_MIXES[0]
    for name in DISPLAY_MIXES:
        if mix_tensor_bytes(sources, spec, name) <= budget.n_bytes:
            best = name
    return best


def fixed_types(sources: Sequence[TensorSource], overrides: Sequence[tuple[re.Pattern[str], Q]]) -> list[tuple[Q, str] | None]:
    """Per tensor: (type, why) when the allocator may not choose it, else None."""
    out: list[tuple[Q, str] | None] = []
    for s in sources:
        if s.raw_qtype is not None:
            out.append((s.raw_qtype, "raw"))
        elif not allows_quantization(s.name, len(s.shape)):
            out.append((Q.F32, "float"))
        else:
            q = next((q for pattern, q in overrides if pattern.search(s.name)), None)
            out.append(None if q is None else (fallback_type(q, s.shape[-1]) if q not in (Q.F32, Q.BF16) else q, "override"))
    return out


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


# bytes of one scalar of each GGUF value type (GGUF spec; strings and arrays are sized below)
_SCALAR_BYTES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                 gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                 gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                 gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


def _string_bytes(value) -> int:
    return 8 + len(value.encode("utf-8") if isinstance(value, str) else bytes(value))   # u64 length + bytes


def _value_bytes(value, vtype: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None) -> int:
    """A key/value's value as the GGUF format lays it out: u32 type, then the value."""
    if vtype == gguf.GGUFValueType.STRING:
        return 4 + _string_bytes(value)
    if vtype == gguf.GGUFValueType.ARRAY:   # u32 type, u32 element type, u64 count, elements
        if len(value) == 0:
            return 4 + 4 + 8
        if sub_type is None:   # gguf-py's rule: the type of the first element
            sub_type = gguf.GGUFValueType.get_type(value[0])
        if sub_type == gguf.GGUFValueType.STRING:
            return 4 + 4 + 8 + sum(_string_bytes(v) for v in value)
        return 4 + 4 + 8 + len(value) * _SCALAR_BYTES[sub_type]
    return 4 + _SCALAR_BYTES[vtype]


def metadata_bytes(kv: dict[str, gguf.GGUFValue], sources: Sequence[TensorSource]) -> int:
    """Header + key/values + tensor infos of a file holding kv and sources, as the GGUF format lays them out
    (convert checks the written size against this)."""
    n = 4 + 4 + 8 + 8   # magic, version, tensor count, kv count
    for key, val in kv.items():
        n += _string_bytes(key) + _value_bytes(val.value, val.type, val.sub_type)
    for s in sources:   # name, n_dims, dims, type, offset
        n += 8 + len(s.name.encode()) + 4 + 8 * len(s.shape) + 4 + 8
    return n


def _recipe_kv(alloc: Allocation) -> dict[str, gguf.GGUFValue]:
    kv = {RECIPE_KEY: gguf.GGUFValue(alloc.recipe_json(), gguf.GGUFValueType.STRING),
          TARGET_SIZE_KEY: gguf.GGUFValue(alloc.budget.n_bytes, gguf.GGUFValueType.UINT64)}
    if alloc.budget.bpw is not None:
        kv[TARGET_BPW_KEY] = gguf.GGUFValue(alloc.budget.bpw, gguf.GGUFValueType.FLOAT32)
    return kv


def measured_candidates(sources: Sequence[TensorSource], budget: Budget, method: str,
                        include_raw: bool = False) -> dict[str, list[Q]]:
    """The tensors the sensitivity pass measures, with their candidate types: every quantizable tensor, overridden
    or not (one cached measurement serves any overrides); include_raw: also those the checkpoint holds in a GGML
    format (a transform will replace their values)."""
    return {s.name: tensor_candidates(s, budget, method) for s in sources
            if (include_raw or s.raw_qtype is None) and allows_quantization(s.name, len(s.shape))}


class _Knapsack:
    """The choices of one allocation: fixed tensors, the candidates and byte costs of the others, and the file's
    exact size for any pick (kv: every key/value of the file but the recipe)."""

    def __init__(self, kv: dict[str, gguf.GGUFValue], align: int, sources: list[TensorSource],
                 overrides: Sequence[tuple[re.Pattern[str], Q]], budget: Budget, method: str, coeffs: dict[str, float]):
        self.kv, self.align, self.sources, self.budget = kv, align, sources, budget
        tied = not any(s.name == "output.weight" for s in sources)
        self.fixed = fixed_types(sources, overrides)
        self.candidates = {s.name: tensor_candidates(s, budget, method) for s, f in zip(sources, self.fixed) if f is None}
        self.measure = (lambda n: _pad(n, align)) if budget.kind == "file" else (lambda n: n)
        choices: list[TensorChoice] = []
        self.items: list[int] = []
        self.costs: list[list[int]] = []
        for i, (s, f) in enumerate(zip(sources, self.fixed)):
            cls = tensor_class(s.name, tied) if allows_quantization(s.name, len(s.shape)) else None
            if f is not None:
                choices.append(TensorChoice(s.name, s.shape, s.layer, cls, f[0], tensor_nbytes(s.shape, f[0]), None, f[1]))
                continue
            opts = self.candidates[s.name]
            self.items.append(i)
            self.costs.append([self.measure(tensor_nbytes(s.shape, q)) for q in opts])
            choices.append(TensorChoice(s.name, s.shape, s.layer, cls, opts[0], tensor_nbytes(s.shape, opts[0])))
        self.alloc = Allocation(budget, method, choices, coeffs=coeffs)
        self.losses: list[list[float]] = [[0.0] * len(c) for c in self.costs]   # placeholders until measured

    def apply(self, pick: list[int]) -> int:
        sources, alloc = self.sources, self.alloc
        for i, k, l_opts in zip(self.items, pick, self.losses):
            c = alloc.choices[i]
            q_opts = self.candidates[sources[i].name]
            c.qtype, c.n_bytes, c.loss = q_opts[k], tensor_nbytes(c.shape, q_opts[k]), l_opts[k]
        data = sum(self.measure(c.n_bytes) for c in alloc.choices)
        if self.budget.kind != "file":
            return data
        return _pad(metadata_bytes({**self.kv, **_recipe_kv(alloc)}, sources), self.align) + data

    def check_smallest(self) -> None:
        alloc, budget = self.alloc, self.budget
        alloc.smallest = self.apply([0] * len(self.items))
        if alloc.smallest > budget.n_bytes:
            raise Moeq2ggufError(
                f"--target-{'size' if budget.kind == 'file' else 'bpw'} {budget.label} is below the smallest this model can be "
                f"written as: {alloc.smallest:,} bytes ({_human(alloc.smallest)}, {budget.bpw_of(alloc.tensor_bytes):.3f} bpw) with "
                f"every quantizable tensor at its smallest candidate type "
                f"({', '.join(sorted({self.candidates[self.sources[i].name][0].name for i in self.items}))})"
                f"{' and the --tensor-type overrides' if any(f and f[1] == 'override' for f in self.fixed) else ''}; "
                "ask for at least that much")


def _writer_kv(writer: gguf.GGUFWriter) -> dict[str, gguf.GGUFValue]:
    return dict(writer.kv_data[0])   # the key/values added so far (one output file: shard 0)


def check_budget(writer: gguf.GGUFWriter, sources: list[TensorSource], overrides: Sequence[tuple[re.Pattern[str], Q]],
                 budget: Budget, method: str) -> None:
    """Fail fast, before any measurement, when even the smallest types exceed the budget."""
    _Knapsack(_writer_kv(writer), writer.data_alignment, sources, overrides, budget, method, CLASS_COEFFS).check_smallest()


def allocate(writer: gguf.GGUFWriter, sources: list[TensorSource], overrides: Sequence[tuple[re.Pattern[str], Q]],
             budget: Budget, method: str, sensitivity: dict[str, dict[str, float]],
             coeffs: dict[str, float] | None = None) -> Allocation:
    """Choose every tensor's type within the budget from the measured sensitivity ({tensor: {type: loss}},
    quant/sensitivity.py) and add the recipe to the writer's metadata.

    The writer must already hold every other key/value of the file (its tensor infos are not yet
    declared): the file's size is then known exactly for any choice of types."""
    coeffs = {**CLASS_COEFFS, **(coeffs or {})}
    k = _Knapsack(_writer_kv(writer), writer.data_alignment, sources, overrides, budget, method, coeffs)
    alloc, sources = k.alloc, k.sources
    k.check_smallest()
    for n, i in enumerate(k.items):
        s = sources[i]
        k.losses[n] = [coeffs[alloc.choices[i].cls] * sensitivity[s.name][q.name] for q in k.candidates[s.name]]
    k.check_smallest()   # again with the recipe's real length
    fixed_cost = sum(k.measure(c.n_bytes) for c, f in zip(alloc.choices, k.fixed) if f is not None)
    overhead = alloc.smallest - sum(k.measure(c.n_bytes) for c in alloc.choices)
    if not k.items:
        alloc.total = alloc.smallest
    for _ in range(8):  # the recipe's own length varies a little with the choice: tighten until it fits
        try:
            pick = solve(k.costs, k.losses, budget.n_bytes - fixed_cost - overhead)
        except ValueError:  # only the cheapest recipe is left, and it fits (checked above)
            pick = [0] * len(k.items)
        alloc.total = k.apply(pick)
        if alloc.total <= budget.n_bytes:
            break
        overhead += alloc.total - budget.n_bytes
    else:
        raise AssertionError("the allocation did not converge under the budget")
    for key, val in _recipe_kv(alloc).items():
        writer.add_key_value(key, val.value, val.type)
    return alloc


def check_request(type_name: str, target_size: str | int | None, target_bpw: float | None, imatrix: str | None) -> str:
    """Refuse what a size target cannot combine with; returns the mix that stands for the request in
    convert's checks until the budget is known (nearest_mix then names the file's ftype)."""
    if target_size is not None and target_bpw is not None:
        raise Moeq2ggufError("--target-size and --target-bpw both set the budget; give one of them")
    if type_name.upper() != "F16":
        raise Moeq2ggufError(f"--type {type_name} and a size target both choose the tensor types; drop --type "
                             "(pin single tensors with --tensor-type REGEX=TYPE instead)")
    if imatrix:
        raise Moeq2ggufError("--imatrix FILE cannot be combined with a size target; use --method imatrix, which collects "
                             "the same statistics itself")
    return "Q8_0"


def check_written(path, allocation: Allocation, tensor_bytes: int) -> None:
    """The written file is what the allocation predicted, within the budget."""
    import os
    if allocation.budget.kind == "file":
        size = os.path.getsize(path)
        if size != allocation.total or size > allocation.budget.n_bytes:
            raise AssertionError(f"wrote {size} bytes, predicted {allocation.total}, budget {allocation.budget.n_bytes}")
    elif tensor_bytes != allocation.total or tensor_bytes > allocation.budget.n_bytes:
        raise AssertionError(f"wrote {tensor_bytes} tensor bytes, predicted {allocation.total}, budget {allocation.budget.n_bytes}")
