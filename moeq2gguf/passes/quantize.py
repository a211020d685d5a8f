"""The quantization pass (docs/METHODS.md, layer-wise quantization), streamed in GGUF file order.

For each decoder layer, with only that layer's weights in memory:
  1. run the float layer on the current calibration hidden states, collecting the statistics the method asks
     for (methods/: affinity-weighted or not, full second moments or diagonals);
  2. quantize the layer's tensors with the method;
  3. for a sequential method (gptq, moequant), re-run the layer with the dequantized weights to produce the
     next layer's inputs, so later layers see and compensate earlier errors; otherwise (imatrix, as
     llama-imatrix) the float layer's outputs go on.
A method without statistics (rtn), or an --imatrix FILE, quantizes tensor by tensor and reads no text.
`quantized_stream` yields each tensor's bytes in file order, so the writer streams them to disk.
Under torchrun the windows' batches, the routed experts' statistics and their GPTQ are shared out among the ranks
(parallel.py), with the same bytes as one process.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from tqdm import tqdm

from moeq2gguf import methods, nn, parallel
from moeq2gguf.profile import stage
from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec
from moeq2gguf.passes import expert_groups
from moeq2gguf.passes.layers import Layers, block_key, block_weights, input_of, short_name
from moeq2gguf.quant import tensor_quant
from moeq2gguf.quant.gptq import GPTQConfig
from moeq2gguf.quant.refine import RefineConfig
from moeq2gguf.quant.stats import StatsCollector

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"
    calib: str = "calib"               # split name or path to the user's text
    n_windows: int = 32
    ctx: int = 512
    batch_windows: int = 8             # windows per forward pass (memory)
    device: str = "cpu"
    gptq: GPTQConfig = GPTQConfig()
    imatrix_file: str | None = None    # a llama-imatrix GGUF to use instead of our statistics
    allow_nonfinite: bool = False      # write NaN/Inf (and F16-overflowing) weights instead of refusing them
    refine: RefineConfig = RefineConfig()   # --refine: tune each layer's K-quant codes after GPTQ (quant/refine.py)
    expert_group: int | None = None    # routed experts quantized at once (passes/expert_groups.py); None: by free memory

    def __post_init__(self) -> None:
        methods.get(self.method)   # an unknown name: the error lists the registered ones
        if self.refine.steps and not (methods.get(self.method).sequential and methods.get(self.method).full_statistics):
            raise Moeq2ggufError(f"--refine tunes what GPTQ chose; --method {self.method} does not run GPTQ: use "
                                 "--method gptq or moequant, or drop --refine")
        if self.refine.steps and not self.gptq.keep_rounded:   # the walk keeps what --refine starts from
            object.__setattr__(self, "gptq", dataclasses.replace(self.gptq, keep_rounded=True))
        if self.expert_group is not None and self.expert_group < 1:
            raise Moeq2ggufError(f"--expert-group {self.expert_group}: give at least 1 expert per group")
        if self.n_windows < 1 or self.ctx < 2:
            raise Moeq2ggufError(f"calibration needs at least one window of 2+ tokens (got {self.n_windows} x {self.ctx})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise Moeq2ggufError("--device cuda: no CUDA device is visible to torch; use --device cpu")


@dataclass
class QuantReport:
    """Per tensor: type, method, reconstruction error vs RTN; per layer and expert: coverage."""
    tensors: dict[str, dict] = field(default_factory=dict)
    coverage: dict[str, dict] = field(default_factory=dict)
    expert_stats_peak_bytes: int = 0   # the most memory one layer's routed-input statistics took (this rank's share)
    refine: dict[int, dict] = field(default_factory=dict)   # per layer: --refine's loss before / after, codes moved
    expert_groups: dict[int, int] = field(default_factory=dict)   # layers quantized in expert groups: their size

    def add(self, name: str, info: dict) -> None:
        coverage = info.pop("coverage", None)
        if coverage is not None:
            self.coverage[name] = coverage
        self.tensors[name] = info


def _run(xs: list[torch.Tensor], w: dict[str, torch.Tensor], spec: ModelSpec, observer, bid: int,
         ffn_inputs: list | None = None) -> list[torch.Tensor]:
    """One block over each batch of windows (run_block's chunks, kept apart); ffn_inputs: receives each batch's
    FFN input and routing (nn.decoder_layer)."""
    with torch.no_grad():
        return [nn.decoder_layer(c, w, spec, observer, bid=bid, ffn_inputs=ffn_inputs)[0] for c in xs]


def _observed_run(xs: list[torch.Tensor], n_batches: int, w, spec: ModelSpec, collector: StatsCollector, bid: int,
                  world: parallel.World, ffn_inputs: list | None = None) -> list[torch.Tensor]:
    """The float block over this rank's batches, its observations reaching `collector` in global batch order: under
    torchrun each batch's are recorded by the rank that ran it, broadcast and replayed by every rank (parallel.py)."""
    if not world.distributed:
        return _run(xs, w, spec, collector, bid, ffn_inputs)
    outs, records = [], {}
    for b, c in zip(range(world.rank, n_batches, world.size), xs):
        recorder = parallel.Recorder()
        outs.append(_run([c], w, spec, recorder, bid)[0])
        records[b] = recorder.calls
    for b in range(n_batches):
        parallel.replay(parallel.broadcast(records.pop(b, None), b % world.size, world), collector)
    return outs


def _next_layer(layers: Layers, bid: int, spec: ModelSpec, device):
    """What the routing term of --refine compares after layer bid: the next MoE layer's router (its float attention
    half and router weights), or after the last layer the output logits; nothing before a dense layer."""
    if bid + 1 < len(layers.blocks):
        block = layers.blocks[bid + 1]
        if not any(block_key(s.name) == "ffn_gate_inp.weight" for s in block):
            return (None, None, None)
        skip = ("_exps.", "_shexp.", "ffn_gate.", "ffn_up.", "ffn_down.")
        return ("router", block_weights([s for s in block if not any(k in s.name for k in skip)], device), bid + 1)
    tail = {s.name: s for s in layers.tail}
    out = tail.get("output.weight") or layers.embedding   # tied: the head is token_embd
    return ("head", {"output_norm.weight": tail["output_norm.weight"].load().reshape(tail["output_norm.weight"].shape).to(device),
                     "output": out.load().reshape(out.shape).to(device)}, None)


def _refine(layers, bid, block, xs, targets, w, qweights, walks, encoded, spec, cfg: QuantConfig, report, device) -> None:
    """--refine on one layer (quant/refine.py): the K-quant tensors' codes tuned, re-packed into their frozen blocks."""
    from moeq2gguf.quant import refine
    tunable = {}
    for s in block:
        walk = walks.get(s.name)
        if walk is not None and refine.refinable(walk[0]):
            grid, params, codes, rounded = walk
            tunable[block_key(s.name)] = (s, refine.KQuantCodes(grid, params, codes, rounded, w[block_key(s.name)].shape,
                                                                device))
    if not tunable:
        return
    t0 = time.perf_counter()
    codes, info = refine.refine_layer(xs, targets, qweights, {k: t for k, (_, t) in tunable.items()}, spec, bid,
                                      _next_layer(layers, bid, spec, device), cfg.refine)
    for key, (s, t) in tunable.items():
        grid = walks[s.name][0]
        tuned_codes, tuned_d = codes[key]
        data = grid.pack(t.tuned_params(tuned_d), tuned_codes.reshape(-1, t.codes0.shape[-1]).cpu())
        deq = torch.from_numpy(np.asarray(grid.fmt.dequantize(data), dtype=np.float32)).reshape(t.shape).to(device)
        if not torch.equal(deq, t.values_of(tuned_codes.to(device), t.weight_scales(tuned_d))):
            raise AssertionError(f"refined {s.name} bytes do not dequantize to the weights the refinement tuned")
        qweights[key] = deq
        encoded[s.name] = data.reshape(*t.shape[:-1], -1)
        report.tensors[s.name]["method"] += f"+refine{cfg.refine.steps}"
    info["seconds"] = time.perf_counter() - t0   # the tuning alone, packing and checks excluded
    report.refine[bid] = info


def _quantize_in_groups(grouping: expert_groups.ExpertGrouping, block, w: dict[str, torch.Tensor], ffn_inputs: list,
                        collector: StatsCollector, method, type_of: dict, spec: ModelSpec, cfg: QuantConfig,
                        report: QuantReport, bid: int, device: torch.device, bar) -> dict[str, tuple]:
    """The routed expert stacks of one layer, `grouping.size` experts at a time (passes/expert_groups.py): each group's
    statistics from the stored FFN inputs (the pooled sums from `collector`, which saw every token), its GPTQ, its
    statistics freed. Returns per stack (bytes, dequantized weights where the stack lives, report info)."""
    stacks = [s for s in block if s.name in grouping.stacks]
    parts: dict[str, list] = {s.name: [] for s in stacks}
    dequantized = {s.name: torch.empty(s.shape, dtype=torch.float32, device=w[block_key(s.name)].device) for s in stacks}
    for g0 in range(0, spec.n_experts, grouping.size):
        experts = range(g0, min(g0 + grouping.size, spec.n_experts))
        stats = method.collector(spec.n_experts, device, experts)
        with stage("forward", bid):   # only these experts, on the tokens routed to them
            with torch.no_grad():
                for flat, routing in ffn_inputs:
                    nn.routed_experts(flat, routing, w, spec, stats, experts, None)
        stats.adopt_pooled(collector)
        report.expert_stats_peak_bytes = max(report.expert_stats_peak_bytes, routed_stats_bytes(stats))
        for s in stacks:
            key = block_key(s.name)
            with stage("quantize", bid):
                q = methods.quantize_tensor(method, w[key][g0:experts.stop].to(device), type_of[s.name], stats,
                                            input_of(s.name), cfg.gptq)
            dequantized[s.name][g0:experts.stop] = q.weights
            parts[s.name].append((q.data, q.info))
            bar.set_postfix_str(f"{short_name(s.name)} experts {g0}-{experts.stop - 1}")
            bar.update(len(experts))
        del stats
    return {name: (np.concatenate([p[0] for p in ps]), dequantized[name], methods.merge_infos([p[1] for p in ps]))
            for name, ps in parts.items()}


def routed_stats_bytes(collector: StatsCollector) -> int:
    """Bytes of a layer's routed-input statistics (every expert's sums and the pooled ones)."""
    return sum(t.numel() * t.element_size() for s in collector.inputs.values() if s.routed
               for t in vars(s).values() if isinstance(t, torch.Tensor))


def quantized_stream(layers: Layers, spec: ModelSpec, types: list[Q], cfg: QuantConfig, report: QuantReport,
                     windows: torch.Tensor | None = None, progress: bool = True,
                     world: parallel.World = parallel.World()) -> Iterator[np.ndarray]:
    """The bytes of every tensor in file order. windows [N, L]: the calibration tokens (a calibrated method).
    world: this process's share under torchrun (every rank runs the stream; rank 0 writes it)."""
    sources = [layers.embedding, *(s for _, block in layers for s in block), *layers.tail]
    type_of = dict(zip((s.name for s in sources), types))
    method = methods.get(cfg.method)

    def check(name: str, w: torch.Tensor, qtype: Q) -> None:
        if not cfg.allow_nonfinite:
            tensor_quant.check_weights(name, w, qtype)

    device = torch.device(cfg.device)

    if not method.calibrated or cfg.imatrix_file:
        importance = tensor_quant.load_imatrix(cfg.imatrix_file, sources) if cfg.imatrix_file else {}
        for s in tqdm(sources, desc=f"quantize {cfg.method}", unit="tensor", disable=not progress):
            if s.raw_qtype is not None and type_of[s.name] == s.raw_qtype:
                report.tensors[s.name] = {"type": s.raw_qtype.name, "method": "copied"}
                yield s.load_raw().numpy()
                continue
            with stage("read"):
                w = s.load().reshape(s.shape)
            check(s.name, w, type_of[s.name])
            with stage("pack"):
                data, _ = tensor_quant.encode(w, type_of[s.name], importance.get(s.name))
            report.tensors[s.name] = {"type": type_of[s.name].name, "method": "imatrix-file" if cfg.imatrix_file else "rtn"}
            yield data
        return

    unsupported = nn.unsupported_reason(spec)
    if unsupported:
        raise Moeq2ggufError(f"--method {cfg.method} cannot calibrate {spec.family} yet ({unsupported}); "
                             "use --method rtn or --imatrix FILE for it")
    assert windows is not None, "a calibrated method needs the calibration windows"
    embd = layers.embedding
    token_embd = embd.load().reshape(embd.shape)
    check(embd.name, token_embd, type_of[embd.name])
    data, deq = tensor_quant.encode(token_embd, type_of[embd.name], None)
    report.tensors[embd.name] = {"type": type_of[embd.name].name, "method": "rtn"}
    yield data
    # llama.cpp embeds by dequantizing rows of token_embd: a sequential method starts from those.
    batches = windows.split(cfg.batch_windows)   # run_block's chunks; under torchrun batch b is rank b mod N's
    n_batches = len(batches)
    table = (deq if method.sequential else token_embd).to(device)
    xs = [nn.embed(batches[b], table) for b in range(world.rank, n_batches, world.size)]
    del token_embd, deq, table
    experts = world.experts(spec.n_experts) if world.distributed else None

    if world.distributed and cfg.expert_group is not None:
        raise Moeq2ggufError("--expert-group applies to one process; under torchrun each rank already keeps only its "
                             "share of every layer's experts: drop --expert-group")
    bar = tqdm(total=spec.n_layers, desc=f"quantize {cfg.method}", unit="layer", disable=not progress)
    for bid, block in layers:
        copied = {s.name for s in block if s.raw_qtype is not None and type_of[s.name] == s.raw_qtype}
        grouping = None if world.distributed else expert_groups.plan(
            expert_groups.routed_stacks(block, copied), spec.n_experts, method.full_statistics, device, cfg.expert_group)
        if grouping is not None and cfg.refine.steps:
            raise Moeq2ggufError(f"layer {bid}: its experts are quantized in groups of {grouping.size} (to fit memory), "
                                 "and --refine tunes a whole layer at once: drop --refine, or convert on a device "
                                 "with more free memory")
        if grouping is not None:
            report.expert_groups[bid] = grouping.size
            if not grouping.fits:
                log.warning("layer %d: even one expert at a time is estimated not to fit the %s's free memory; "
                            "the conversion may run out of memory (use a machine with more, or a GPU)", bid,
                            device.type)
            log.info("layer %d: experts in groups of %d%s", bid, grouping.size,
                     ", expert weights in host memory" if grouping.host_stacks else "")
        with stage("read", bid):
            on_host = set(grouping.stacks) if grouping is not None and grouping.host_stacks else set()
            w = block_weights([s for s in block if s.name not in on_host], device)
            w.update(block_weights([s for s in block if s.name in on_host], "cpu"))
            for s in block:
                if s.name not in copied:
                    check(s.name, w[block_key(s.name)], type_of[s.name])
        # grouped: this pass keeps every routed expert's tokens in the pooled sums only, and the FFN inputs
        collector = method.collector(spec.n_experts, device, range(0) if grouping else experts)
        ffn_inputs = [] if grouping else None
        with stage("forward", bid):
            x_float = _observed_run(xs, n_batches, w, spec, collector, bid, world, ffn_inputs)
        report.expert_stats_peak_bytes = max(report.expert_stats_peak_bytes, routed_stats_bytes(collector))
        encoded, qweights, walks, infos = {}, {}, {}, {}
        # A second bar inside the layer, over its tensors counted in groups (a routed expert stack counts
        # E, any other tensor 1): the expert stacks are where a big model's GPTQ time goes.
        groups = [s.shape[0] if s.role == "expert" and len(s.shape) == 3 else 1 for s in block]
        inner = tqdm(total=sum(groups), desc=f"layer {bid}", unit="group", leave=False, position=1,
                     disable=not progress)
        if grouping is not None:
            for name, (data, deq, info) in _quantize_in_groups(grouping, block, w, ffn_inputs, collector, method,
                                                               type_of, spec, cfg, report, bid, device,
                                                               inner).items():
                encoded[name], qweights[block_key(name)], infos[name] = data, deq, info
            del ffn_inputs
        for s, n_groups in zip(block, groups):
            key, qtype = block_key(s.name), type_of[s.name]
            inner.set_postfix_str(short_name(s.name))   # the tensor being quantized
            if s.name in encoded:   # quantized in groups above (the bar counted them there)
                continue
            elif s.name in copied:
                # blocks the checkpoint already holds in a GGML format (GPT-OSS MXFP4 experts) are copied;
                # w[key] holds their exact values, which the next layers then see
                encoded[s.name], qweights[key] = s.load_raw().numpy(), w[key]
                infos[s.name] = {"type": s.raw_qtype.name, "method": "copied"}
            elif experts is not None and s.role == "expert" and len(s.shape) == 3:
                # this rank's experts, then every rank's gathered in expert order (parallel.py)
                with stage("quantize", bid):
                    q = methods.quantize_tensor(method, w[key][experts.start:experts.stop], qtype, collector,
                                                input_of(s.name), cfg.gptq)
                parts = parallel.gather_all((q.data, q.weights.cpu(), q.info), world)
                encoded[s.name] = np.concatenate([p[0] for p in parts])
                qweights[key] = torch.cat([p[1] for p in parts]).to(device)
                infos[s.name] = methods.merge_infos([p[2] for p in parts])
            else:
                with stage("quantize", bid):
                    q = methods.quantize_tensor(method, w[key], qtype, collector, input_of(s.name), cfg.gptq)
                encoded[s.name], qweights[key] = q.data, q.weights
                if q.walk is not None:
                    walks[s.name] = q.walk
                infos[s.name] = q.info
            inner.update(n_groups)
        inner.close()
        for s in block:   # the report in file order, whichever order the tensors were quantized in
            if s.name in infos:
                report.add(s.name, infos[s.name])
        if cfg.refine.steps and walks:
            with stage("refine", bid):
                _refine(layers, bid, block, xs, x_float, w, qweights, walks, encoded, spec, cfg, report, device)
        if method.sequential:
            with stage("forward", bid):
                xs = _run(xs, qweights, spec, None, bid)
        else:
            xs = x_float
        del w, qweights, collector, x_float
        for s in block:
            yield encoded.pop(s.name)
        bar.update()
    bar.close()

    # final norm + head: the output projection is calibrated on the final normed hidden states
    tail_w = layers.tail_weights(device)
    for name, t in tail_w.items():
        check(name, t, type_of[name])
    output_w = tail_w.get("output.weight")
    collector = StatsCollector(1, affinity=False, full=method.full_statistics, device=device)
    if output_w is not None and method.calibrates_head:
        recorder = parallel.Recorder() if world.distributed else collector
        records = {}
        for b, chunk in zip(range(world.rank, n_batches, world.size), xs):
            normed = nn.rms_norm(chunk, tail_w["output_norm.weight"], spec.rms_norm_eps)
            recorder.observe("output", normed.reshape(-1, normed.shape[-1]), None, None)
            if world.distributed:
                records[b], recorder.calls = recorder.calls, []
        if world.distributed:
            for b in range(n_batches):
                parallel.replay(parallel.broadcast(records.pop(b, None), b % world.size, world), collector)
    for s in layers.tail:
        with stage("quantize"):   # outside the layers: the profile's fixed costs
            data, info = methods.quantize_rows(method, tail_w[s.name], type_of[s.name], collector,
                                               "output" if s.name == "output.weight" else None, cfg.gptq)
        info.pop("coverage", None)
        report.tensors[s.name] = info
        yield data
