"""Train the bundled reference MoE models on the train split of the stdlib corpus (or, --corpus pydoc, of the Python
documentation's prose: moeq2gguf.calib.corpus).

Two families, saved exactly as hub checkpoints of that family lie on disk (config.json,
generation_config.json, tokenizer.json + tokenizer_config.json, model.safetensors with the
per-expert tensor names real checkpoints use):
  mixtral : MixtralForCausalLM, 8 experts top-2, softmax renormalised over the top-2
  qwen2moe: Qwen2MoeForCausalLM, 16 fine-grained experts top-4 (not renormalised) plus the
            sigmoid-gated shared expert, qkv biases
  qwen3moe: Qwen3MoeForCausalLM, 16 experts top-4 renormalised, q/k norms, no shared expert (not bundled: the
            third model of the quality benchmarks, trained on pydoc prose into .cache)
  deepseek_v3: DeepseekV3ForCausalLM, MLA attention, the first layer dense, then 16 experts top-4
            chosen by sigmoid scores within the best 2 of 4 groups, renormalised and scaled, one shared
            expert (not bundled: trained for the EBSS benchmark, into .cache)
All use hidden 256 and 4 layers. Widths are multiples of 256 where llama.cpp's K-quants need
them, except Qwen2-MoE's experts (128 wide), which like Qwen1.5-MoE-A2.7B's 1408 make llama-quantize
fall back on ffn_down_exps; the pair stays under 40 MB in bf16.

usage: python tools/train_fixture.py {mixtral,qwen2moe,qwen3moe,deepseek_v3} -o DIR [--corpus pydoc] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # testing.py: the tokenizer trainer
from moeq2gguf.calib import corpus  # noqa: E402
from testing import train_bpe_tokenizer  # noqa: E402

VOCAB_SIZE = 2048
SEQ_LEN = 256


def split_name(source: str, split: str) -> str:
    return split if source == "stdlib" else f"pydoc-{split}"


def train_tokenizer(family: str, source: str = "stdlib"):
    return train_bpe_tokenizer(corpus.iter_texts(split_name(source, "train")), VOCAB_SIZE,
                               "qwen2moe" if family == "qwen3moe" else family)


def build_model(family: str, tokenizer, aux_coef: float):
    from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    if family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                            rms_norm_eps=1e-5, router_aux_loss_coef=aux_coef, output_router_logits=True,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return MixtralForCausalLM(cfg)
    if family == "deepseek_v3":
        cfg = DeepseekV3Config(**{**common, "num_key_value_heads": 4}, intermediate_size=512, moe_intermediate_size=256,
                               n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
                               n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                               q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=32, qk_nope_head_dim=32,
                               v_head_dim=32, num_nextn_predict_layers=0, rms_norm_eps=1e-6,
                               router_aux_loss_coef=aux_coef, output_router_logits=True,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        return DeepseekV3ForCausalLM(cfg)
    if family == "qwen3moe":
        cfg = Qwen3MoeConfig(**common, head_dim=64, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
                             num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             rms_norm_eps=1e-6, router_aux_loss_coef=aux_coef, output_router_logits=True,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return Qwen3MoeForCausalLM(cfg)
    cfg = Qwen2MoeConfig(**common, intermediate_size=512, moe_intermediate_size=128, shared_expert_intermediate_size=512,
                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, rms_norm_eps=1e-6,
                         router_aux_loss_coef=aux_coef, output_router_logits=True, qkv_bias=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return Qwen2MoeForCausalLM(cfg)


def token_stream(tokenizer, split: str) -> np.ndarray:
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    for text in corpus.iter_texts(split):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, starts: np.ndarray, bos: int | None) -> torch.Tensor:
    rows = np.stack([stream[s:s + SEQ_LEN] for s in starts])
    if bos is not None:
        rows[:, 0] = bos
    return torch.from_numpy(rows)


@torch.no_grad()
def eval_loss(model, stream: np.ndarray, bos: int | None, n: int = 64) -> float:
    model.eval()
    starts = np.linspace(0, len(stream) - SEQ_LEN - 1, n).astype(np.int64)
    losses = []
    for chunk in np.array_split(starts, max(1, n // 16)):
        x = windows(stream, chunk, bos)
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return float(np.mean(losses))


def reach_loss(router_logits) -> torch.Tensor:
    """Sum over layers of KL(uniform || batch-mean routing probability). The Switch load-balancing
    loss pushes an expert's logit up in proportion to its routing probability, so an expert the router
    stopped choosing early (probability ~0.003) never comes back: mixtral-tiny trained with it alone
    (even at weight 0.1) kept experts that no text routes to. This term's pull on a starved expert's
    logit does not shrink with its probability."""
    total = 0.0
    for logits in router_logits:
        mean_prob = torch.softmax(logits.float(), dim=-1).mean(dim=0)
        total = total - torch.log(mean_prob * mean_prob.numel()).mean()
    return total


def least_used_share(router_logits, config) -> str:
    """Per MoE layer, the least-selected expert's share of this batch's top-k picks, times n_expert
    (1.00 = perfectly balanced, 0.00 = an expert nothing routes to)."""
    k = config.num_experts_per_tok
    shares = []
    for logits in router_logits:
        n = logits.shape[-1]
        counts = torch.bincount(logits.detach().topk(k, dim=-1).indices.flatten(), minlength=n)
        shares.append(f"{counts.min().item() * n / counts.sum().item():.2f}")
    return " ".join(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=["mixtral", "qwen2moe", "qwen3moe", "deepseek_v3"])
    ap.add_argument("--corpus", choices=["stdlib", "pydoc"], default="stdlib",
                    help="training text: the stdlib sources' train split or the Python documentation's prose")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--steps", type=int, default=3000, help="step budget (the schedule's length)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock budget instead of --steps: the schedule follows elapsed time")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aux-coef", type=float, default=0.01,
                    help="weight of transformers' router load-balancing loss (Switch/Mixtral)")
    ap.add_argument("--reach-coef", type=float, default=0.0,
                    help="weight of KL(uniform || mean routing probability), summed over layers (see reach_loss)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    tokenizer = train_tokenizer(args.family, args.corpus)
    train_ids = token_stream(tokenizer, split_name(args.corpus, "train"))
    eval_ids = token_stream(tokenizer, split_name(args.corpus, "eval"))
    bos = tokenizer.bos_token_id if args.family == "mixtral" else None
    print(f"tokenizer + data: {time.time() - t0:.0f} s, train {len(train_ids)} tokens, eval {len(eval_ids)} tokens", flush=True)

    model = build_model(args.family, tokenizer, args.aux_coef)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100

    def progress(step: int) -> float:
        if args.minutes is not None:
            return (time.time() - t_train) / (60 * args.minutes)
        return step / args.steps

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress(step)))))

    model.train()
    t_train = time.time()
    step = 0
    while (progress(step) < 1.0) if args.minutes is not None else (step < args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = windows(train_ids, rng.integers(0, len(train_ids) - SEQ_LEN - 1, args.batch), bos)
        out = model(input_ids=x, labels=x)
        loss = out.loss + args.reach_coef * reach_loss(out.router_logits) if args.reach_coef else out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            rate = (step + 1) * args.batch * SEQ_LEN / (time.time() - t_train)
            print(f"step {step:5d} loss {out.loss.item():.3f} lr {lr_at(step):.2e} {rate:.0f} tok/s "
                  f"least-used expert share per layer {least_used_share(out.router_logits, model.config)}", flush=True)
        step += 1

    train_minutes = (time.time() - t_train) / 60
    loss = eval_loss(model, eval_ids, bos)
    tokens_seen = step * args.batch * SEQ_LEN
    print(f"eval-split loss {loss:.4f} (ppl {math.exp(loss):.2f}) after {tokens_seen} tokens, {train_minutes:.1f} min", flush=True)

    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    command = "python tools/train_fixture.py " + " ".join(sys.argv[1:])
    (out_dir / "README.md").write_text(
        f"# {out_dir.name}\n\n"
        f"A {model.config.architectures[0]} trained by moeq2gguf's `tools/train_fixture.py` on the train split of\n"
        + (f"the Python {sys.version.split()[0]} standard library sources (docs/EVALUATION.md)" if args.corpus == "stdlib" else
           f"the Python {sys.version.split()[0]} documentation's prose (pydoc_data.topics; moeq2gguf.calib.corpus)")
        + ", saved in bf16 in the\non-disk layout of hub checkpoints of its family.\n\n"
        f"- command: `{command}`\n"
        f"- parameters: {n_params / 1e6:.2f}M\n"
        f"- tokens seen: {tokens_seen} ({step} steps x {args.batch} x {SEQ_LEN})\n"
        f"- training time: {train_minutes:.1f} min on {torch.get_num_threads()} CPU threads\n"
        f"- eval-split loss: {loss:.4f} nats/token (perplexity {math.exp(loss):.2f}), fp32, 64 windows of {SEQ_LEN}\n")
    (out_dir / "train_log.json").write_text(json.dumps({
        "command": command, "tokens_seen": tokens_seen, "eval_loss": loss, "params": n_params,
        "minutes": train_minutes}, indent=1) + "\n")
    print(f"saved {out_dir}")


if __name__ == "__main__":
    main()
