"""The engine's float layer math (GGUF orientation, llama.cpp's RoPE layout) against transformers,
for every family and layer kind the adapters convert, and the observer's view of every weight."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moeq2gguf import nn
from moeq2gguf.plan.mixes import allows_quantization
from moeq2gguf.models.registry import open_model
from testing import DeepseekMoeReference, random_deepseek_moe, random_model, save_checkpoint

DEEPSEEK_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=64,
                     beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
GPT_OSS_YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                    original_max_position_embeddings=64, truncate=True)

# case -> (random_model family, overrides); "deepseek" is testing's DeepSeekMoE reference
CASES = {
    "mixtral": ("mixtral", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)),
    "qwen2moe": ("qwen2moe", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=3)),
    "qwen3moe": ("qwen3moe", dict(num_hidden_layers=3)),
    "olmoe": ("olmoe", dict(num_hidden_layers=3)),
    # layer 0 dense, then softmax-routed experts plus unweighted shared experts
    "deepseek": ("deepseek", dict()),
    # V2-Lite layout: q_proj, layer 0 dense, softmax, no renormalisation
    "deepseek_v2-lite": ("deepseek_v2", dict(num_hidden_layers=3)),
    # V2 with q LoRA, top-3, routed scaling factor
    "deepseek_v2-qlora": ("deepseek_v2", dict(q_lora_rank=24, num_hidden_layers=3, num_experts_per_tok=3,
                                              routed_scaling_factor=1.5)),
    # V2-Lite's real RoPE: YaRN with mscale_all_dim
    "deepseek_v2-yarn": ("deepseek_v2", dict(rope_parameters=DEEPSEEK_YARN, max_position_embeddings=2560)),
    # V3: sigmoid + selection bias, 4 groups of 2, best 2 groups compete, renormalised, scaled 2.5
    "deepseek_v3": ("deepseek_v3", dict(num_hidden_layers=3)),
    # V3 with halves RoPE (rotary rows permuted to pairs by the adapter); no dense layer
    "deepseek_v3-halves-yarn": ("deepseek_v3", dict(rope_interleave=False, first_k_dense_replace=0, n_shared_experts=2,
                                                    rope_parameters=DEEPSEEK_YARN, max_position_embeddings=2560)),
    # Kimi-K2's shape: 384 experts, 8 active, no groups, YaRN with mscale 1
    "deepseek_v3-kimi-k2": ("deepseek_v3", dict(num_hidden_layers=2, n_routed_experts=384, num_experts_per_tok=8,
                                                n_group=1, topk_group=1, moe_intermediate_size=16,
                                                routed_scaling_factor=2.827, max_position_embeddings=2048,
                                                rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=32.0,
                                                                     original_max_position_embeddings=64, beta_fast=1.0,
                                                                     beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    # sliding (window 16 < 40 tokens) and full layers alternating, sinks, biases, clamped SwiGLU
    "gpt_oss": ("gpt_oss", dict(num_hidden_layers=3)),
    "gpt_oss-yarn-mqa": ("gpt_oss", dict(rope_parameters=GPT_OSS_YARN, max_position_embeddings=2048,
                                         num_key_value_heads=1, sliding_window=8, num_experts_per_tok=3)),
    # layer 0 dense, q/k/v biases, partial RoPE (half of each head), sigmoid + selection bias, shared expert
    "glm4moe": ("glm4moe", dict(num_hidden_layers=3)),
    # per-head q/k norm, 4 expert groups of which 2 compete, a quarter of each head rotated
    "glm4moe-qknorm-groups": ("glm4moe", dict(use_qk_norm=True, n_group=4, topk_group=2, first_k_dense_replace=0,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.25})),
    # q/k norm over the whole projection, partial RoPE, sigmoid + selection bias, renormalised, no shared expert
    "minimax_m2": ("minimax_m2", dict(num_hidden_layers=3)),
    # Gated DeltaNet layers (0-2; key heads tiled over twice as many value heads) then gated full attention (3),
    # every layer MoE with a gated shared expert; 40 tokens are run in chunks of 64, then of 16 (below)
    "qwen35moe": ("qwen35moe", dict()),
    # equal key and value heads, two full-attention layers (interval 2), MQA
    "qwen35moe-equal-heads": ("qwen35moe", dict(linear_num_value_heads=2, num_key_value_heads=1,
                                                 layer_types=["linear_attention", "full_attention"] * 2)),
    # dense and MoE layers alternating, top-1 weights on the experts' inputs, NoPE layer 3, llama3 RoPE factors
    "llama4": ("llama4", dict()),
    # every layer MoE, top-2, chunked attention over 40 tokens in chunks of 16 (the forward's chunk, set below)
    "llama4-chunked": ("llama4", dict(interleave_moe_layer_step=1, num_experts_per_tok=2, attention_chunk_size=16)),
    # a leading dense layer, softmax top-k over selection-biased scores, renormalised, 2 shared experts
    "ernie4_5_moe": ("ernie4_5_moe", dict()),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def layer_weights(sources: dict, bid: int) -> dict[str, torch.Tensor]:
    prefix = f"blk.{bid}."
    return {n[len(prefix):]: s.load().reshape(s.shape) for n, s in sources.items() if n.startswith(prefix)}


def _make(case: str, tmp_path, small_tokenizers):
    family, overrides = CASES[case]
    if family == "deepseek":
        model = random_deepseek_moe(**overrides)
    else:
        model = random_model(family, **overrides)
    tok = small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"]
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    chunk = overrides.get("attention_chunk_size")
    if chunk:   # llama.cpp (and the adapter) fix llama4's chunk at 8192: test the forward's chunking at a small one
        import json
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "attention_chunk_size": 8192}))
    adapter = open_model(ckpt)
    if chunk:
        adapter.spec = dataclasses.replace(adapter.spec, attention_chunk=chunk)
    return model, adapter, {s.name: s for s in adapter.all_tensors()}


def _reference(model, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, dict[int, tuple]]:
    """Hidden states after each layer but the last (whose output transformers reports normed), logits,
    and per MoE layer the router's choice: (expert ids [T, k], the weights their outputs are scaled by)."""
    routes: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(model, DeepseekMoeReference) and hasattr(layer.mlp, "experts"):
            # its router has no forward of its own: softmax then top-k of the MoE input, as _Moe runs it
            def record(module, args, i=i):
                probs = torch.softmax(args[0] @ module.gate.weight.T, dim=-1)
                weights, experts = probs.topk(module.k, dim=-1)
                routes.setdefault(i, []).append((experts, weights))
            hooks.append(layer.mlp.register_forward_pre_hook(record))
        elif type(getattr(getattr(layer, "feed_forward", None), "router", None)).__name__ == "Llama4Router":
            # (scores [T, E]: sigmoid of the chosen logits, 0 elsewhere; logits): the top-k of the logits
            def record(module, args, out, i=i):
                experts = out[1].topk(module.top_k, dim=-1).indices
                routes.setdefault(i, []).append((experts, out[0].gather(1, experts)))
            hooks.append(layer.feed_forward.router.register_forward_hook(record))
        elif not isinstance(model, DeepseekMoeReference) and hasattr(layer, "mlp"):
            router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
            if router is not None and not isinstance(router, torch.nn.Linear):   # (logits, weights, ids)
                hooks.append(router.register_forward_hook(
                    lambda module, args, out, i=i: routes.setdefault(i, []).append((out[2], out[1]))))
    try:
        if isinstance(model, DeepseekMoeReference):   # runs one sequence [T, hidden] at a time
            hidden, x = [], torch.stack([model.model.embed_tokens(row) for row in tokens])
            for layer in model.model.layers:
                x = torch.stack([layer(row) for row in x])
                hidden.append(x)
            logits = model.lm_head(model.model.norm(x))
        else:
            out = model(tokens, output_hidden_states=True)
            hidden, logits = list(out.hidden_states[1:]), out.logits
    finally:
        for h in hooks:
            h.remove()
    joined = {i: tuple(torch.cat(parts) for parts in zip(*calls)) for i, calls in routes.items()}
    return hidden[:-1], logits, joined


def _same_routing(ours: nn.Routing, experts: torch.Tensor, weights: torch.Tensor) -> float:
    """Checks both pick the same experts per token; returns the largest relative weight difference."""
    order, ref_order = ours.experts.argsort(-1), experts.argsort(-1)
    assert torch.equal(ours.experts.gather(1, order), experts.gather(1, ref_order))
    a, b = ours.weights.gather(1, order), weights.gather(1, ref_order)
    return float((a - b).abs().max() / b.abs().max())


def _relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_outputs_match_transformers(case, tmp_path, small_tokenizers):
    model, adapter, sources = _make(case, tmp_path, small_tokenizers)
    spec = adapter.spec
    tokens = torch.randint(0, spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    errors: dict[str, float] = {}
    with torch.no_grad():
        ref_hidden, ref_logits, ref_routes = _reference(model, tokens)
        assert sorted(ref_routes) == list(spec.moe_layers)
        x = nn.embed(tokens, sources["token_embd.weight"].load())
        for bid in range(spec.n_layers):
            x, routing = nn.decoder_layer(x, layer_weights(sources, bid), spec, bid=bid)
            if bid in spec.moe_layers:   # the weights the observer gets are transformers' routing weights
                assert routing.experts.shape == (80, spec.n_experts_used)
                errors[f"routing{bid}"] = _same_routing(routing, *ref_routes[bid])
            else:
                assert routing is None
            if bid < spec.n_layers - 1:
                errors[f"layer{bid}"] = _relative(x, ref_hidden[bid])
        output = sources["output.weight"] if "output.weight" in sources else sources["token_embd.weight"]
        logits = nn.head(x, sources["output_norm.weight"].load(), output.load(), spec)
        errors["logits"] = _relative(logits, ref_logits)
    print(f"{case}: max relative errors", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors


class Recorder:
    def __init__(self):
        self.seen: dict[str, list[tuple[tuple[int, ...], int | None, torch.Tensor | None]]] = {}

    def observe(self, name, x, token_weight, expert):
        if token_weight is not None:
            assert token_weight.shape == x.shape[:1], name
        self.seen.setdefault(name, []).append((tuple(x.shape), expert, token_weight))


@pytest.mark.parametrize("case", sorted(CASES))
def test_observer_sees_the_input_of_every_quantizable_weight(case, tmp_path, small_tokenizers):
    """Every 2-D/3-D weight llama-quantize would quantize has its input in INPUT_OF and observed with
    its in-dimension; routed experts per expert, with their routing weight; MLA's per-head stacks
    with one group per head."""
    _, adapter, sources = _make(case, tmp_path, small_tokenizers)
    spec = adapter.spec
    x = torch.randn(2, 24, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    for bid in range(spec.n_layers):
        w = layer_weights(sources, bid)
        recorder = Recorder()
        with torch.no_grad():
            _, routing = nn.decoder_layer(x, w, spec, recorder, bid=bid)
        quantizable = [n for n, t in w.items() if allows_quantization(n, t.dim())]
        assert quantizable
        for name in quantizable:
            short, weight = name.split(".")[0], w[name]
            assert short in nn.INPUT_OF, name
            seen = recorder.seen.get(nn.INPUT_OF[short])
            assert seen, f"{name}: its input {nn.INPUT_OF[short]} was never observed"
            assert all(shape[-1] == weight.shape[-1] for shape, _, _ in seen), name
            if short.endswith("_exps"):   # per expert, weighted by what scales its output (checked above)
                assert len(seen) == len({e for _, e, _ in seen}) > 1, name
                for _, e, a in seen:
                    tok, slot = (routing.experts == e).nonzero(as_tuple=True)
                    if spec.expert_weight_on_input:   # llama4: the weight is in the observed input, outputs count once
                        assert a is None, name
                    else:
                        assert torch.equal(a, routing.weights[tok, slot]), name
            elif weight.dim() == 3:   # attn_k_b / attn_v_b: [H, out, in], one group per head
                assert all(len(shape) == 3 and shape[1] == weight.shape[0] and e is None for shape, e, _ in seen), name
            else:
                assert all(len(shape) == 2 and e is None for shape, e, _ in seen), name


def test_sliding_window_layers_need_their_index(tmp_path, small_tokenizers):
    _, adapter, sources = _make("gpt_oss", tmp_path, small_tokenizers)
    with pytest.raises(ValueError, match="pass the layer index"):
        nn.decoder_layer(torch.zeros(1, 4, adapter.spec.hidden_size), layer_weights(sources, 0), adapter.spec)


def test_unsupported_reason_is_truthful(tmp_path, small_tokenizers):
    _, adapter, _ = _make("deepseek_v3", tmp_path, small_tokenizers)
    assert nn.unsupported_reason(adapter.spec) is None
    assert "not bailingmoe" in nn.unsupported_reason(dataclasses.replace(adapter.spec, gguf_arch="bailingmoe"))
    assert "gelu" in nn.unsupported_reason(dataclasses.replace(adapter.spec, expert_activation="gelu"))


@pytest.mark.parametrize("chunk, length", [(16, 40), (8, 8), (64, 5)])
def test_chunked_delta_rule_equals_the_token_loop(chunk, length):
    """The chunked (WY) form of the Gated DeltaNet recurrence equals running it token by token, across chunk
    boundaries, a padded last chunk and strong decays."""
    from moeq2gguf.nn.linear_attention import delta_rule_chunked, delta_rule_loop
    gen = torch.Generator().manual_seed(0)
    b, h, dk, dv = 2, 3, 8, 6
    q, k = (torch.nn.functional.normalize(torch.randn(b, h, length, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(b, h, length, dv, generator=gen)
    g = -torch.rand(b, h, length, generator=gen) * 3          # decays exp(g) in (0.05, 1]
    beta = torch.rand(b, h, length, generator=gen)
    ref = delta_rule_loop(q.double(), k.double(), v.double(), g.double(), beta.double())
    got = delta_rule_chunked(q.double(), k.double(), v.double(), g.double(), beta.double(), chunk=chunk)
    assert torch.allclose(got, ref, atol=1e-12, rtol=1e-10)
