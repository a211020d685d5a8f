"""Small models and tokenizers made on the spot, for tests and fixture training (no model hub here).

A checkpoint made here is saved with transformers' save_pretrained, i.e. in the on-disk layout of
hub checkpoints of that family (per-expert tensor names), with a byte-level BPE tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

FAMILY_CLASSES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "glm4moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM"),
    "qwen35moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM"),
}

# Tiny shapes per family, respecting what llama.cpp assumes of each (docs/PLATFORMS.md): OLMoE with
# key/value heads = heads and eps 1e-5, Qwen3-MoE renormalised, DeepSeek-V2 lite layout (no q LoRA)
# with q_lora_rank written as 0 in GGUF, DeepSeek-V3 with grouped sigmoid routing and a selection
# bias, GPT-OSS with alternating sliding-window layers (default RoPE: llama.cpp's YaRN rounds the
# correction range, transformers' GPT-OSS YaRN does not).
_FAMILY_DEFAULTS = {
    "mixtral": dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5),
    "qwen2moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=96,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-6, qkv_bias=True),
    "qwen3moe": dict(head_dim=32, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                     num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6),
    "olmoe": dict(num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  rms_norm_eps=1e-5, pad_token_id=None, eos_token_id=None),
    "deepseek_v2": dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=32,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                        routed_scaling_factor=1.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None),
    "deepseek_v3": dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=4,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6,
                        num_nextn_predict_layers=0, bos_token_id=None, eos_token_id=None),
    "gpt_oss": dict(head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                    rms_norm_eps=1e-5, max_position_embeddings=1024),
    "glm4moe": dict(head_dim=32, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                    norm_topk_prob=True, routed_scaling_factor=2.5, attention_bias=True, use_qk_norm=False,
                    rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    "minimax_m2": dict(head_dim=32, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rotary_dim=16,
                       rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None),
    # three Gated DeltaNet layers then one gated full-attention layer; 2 key heads tiled over 4 value heads
    "qwen35moe": dict(num_hidden_layers=4, head_dim=32, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                       "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
    # Scout's layout in small: dense and MoE layers alternating (step 2), NoPE in layer 3, top-1 sigmoid routing
    # onto the experts' inputs, one shared expert; llama3 RoPE scaling
    "llama4": dict(num_hidden_layers=4, head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
                   num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, rms_norm_eps=1e-5,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # ERNIE-4.5-21B-A3B's layout in small: one leading dense layer, softmax routing with a selection bias, 2 shared
    "ernie4_5_moe": dict(num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                         num_experts_per_tok=2, moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_interval=1,
                         rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None),
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, family: str):
    """Byte-level BPE with the GPT-2 pre-tokenizer regex (llama.cpp pre-tokenizer 'gpt-2'), special
    tokens as the family uses them: Mixtral prepends <s>, Qwen adds nothing and ends with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if family != "mixtral" else ["<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if family == "mixtral":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None)
        fast.add_bos_token = True
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def make_config(family: str, **overrides):
    import transformers
    config_cls = getattr(transformers, FAMILY_CLASSES[family][0])
    base = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(_FAMILY_DEFAULTS[family])
    base.update(overrides)
    return config_cls(**base)


def random_model(family: str, seed: int = 0, init_std: float = 0.1, **overrides):
    """A randomly initialised model; init_std well above the default 0.02 so that logits and routing
    are not all near-ties (tests of argmax agreement need clear decisions)."""
    import transformers
    config = make_config(family, **overrides)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_CLASSES[family][1])(config)
    with torch.no_grad():  # norm weights start at 1; vary them so a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith((".bias", "_bias", ".sinks")):
                p.normal_(0, init_std)
        for name, b in model.named_buffers():  # DeepSeek-V3's selection bias starts at zero
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, init_std)
    return model.eval()


def save_checkpoint(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir



def save_mxfp4_gpt_oss(model, tokenizer, out_dir: str | Path, seed: int = 1) -> dict[tuple[int, str], tuple]:
    """Save a random GPT-OSS `model` as released checkpoints ship it: experts as HF MXFP4 blocks and
    scales (random, exponents 2^-5 .. 2^-3), the rest float. The model's expert weights are set to
    exactly the MXFP4 values, so it is the reference. Returns {(layer, "gate_up_proj" | "down_proj"):
    (blocks, scales)}."""
    from safetensors.torch import save_file

    from moeq2gguf.models.gpt_oss import mxfp4_dequantize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    packed = {}
    for i, layer in enumerate(model.model.layers):
        p, experts = f"model.layers.{i}.mlp.experts.", layer.mlp.experts
        e, n_in, two_ff = experts.gate_up_proj.shape
        for stem, rows, cols in (("gate_up_proj", two_ff, n_in), ("down_proj", n_in, two_ff // 2)):
            blocks = torch.randint(0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
            scales = torch.randint(122, 125, (e, rows, cols // 32), dtype=torch.uint8, generator=gen)
            with torch.no_grad():  # HF's float layout is [E, in, out]
                getattr(experts, stem).copy_(mxfp4_dequantize(blocks, scales).transpose(1, 2))
            del state[p + stem]
            state[p + stem + "_blocks"], state[p + stem + "_scales"] = blocks, scales
            packed[(i, stem)] = (blocks, scales)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = ["GptOssForCausalLM"]
    model.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return packed

# --- DeepSeekMoE-16B (DeepseekForCausalLM) ----------------------------------------------------
# transformers has no class for it (the hub checkpoint deepseek-ai/deepseek-moe-16b-base runs remote
# code), so tests build the hub's on-disk layout and config keys here and compare llama.cpp with this
# reference forward, written from the architecture: RMSNorm, llama attention with rotate-half RoPE,
# SwiGLU MLPs, the first first_k_dense_replace layers dense, the others softmax top-k routing (no
# renormalisation unless norm_topk_prob) over n_routed_experts plus n_shared_experts fused into one
# MLP added unweighted. Its state_dict keys are the hub's tensor names.

def deepseek_moe_config(**overrides) -> dict:
    """config.json of a tiny DeepSeekMoE with the hub checkpoint's keys."""
    config = {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
        "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }
    config.update(overrides)
    return config


class _RMSNorm(torch.nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Mlp(torch.nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, width, bias=False)
        self.up_proj = torch.nn.Linear(hidden, width, bias=False)
        self.down_proj = torch.nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _Router(torch.nn.Module):
    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n_experts, hidden))


class _Moe(torch.nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, width = c["hidden_size"], c["moe_intermediate_size"]
        self.k, self.renormalize = c["num_experts_per_tok"], c["norm_topk_prob"]
        self.gate = _Router(hidden, c["n_routed_experts"])
        self.experts = torch.nn.ModuleList(_Mlp(hidden, width) for _ in range(c["n_routed_experts"]))
        if c["n_shared_experts"]:
            self.shared_experts = _Mlp(hidden, width * c["n_shared_experts"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, hidden]
        probs = torch.softmax(x @ self.gate.weight.T, dim=-1)            # [T, E]
        weights, chosen = probs.topk(self.k, dim=-1)                      # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if len(token):
                out.index_add_(0, token, weights[token, slot, None] * expert(x[token]))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Attention(torch.nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, self.n_heads, self.n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim, self.theta = hidden // self.n_heads, c["rope_theta"]
        self.q_proj = torch.nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(hidden, self.n_kv * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, hidden]
        n, d = x.shape[0], self.head_dim
        q = self.q_proj(x).view(n, self.n_heads, d).transpose(0, 1)       # [H, T, d]
        k = self.k_proj(x).view(n, self.n_kv, d).transpose(0, 1)
        v = self.v_proj(x).view(n, self.n_kv, d).transpose(0, 1)
        inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]   # [T, d/2]
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(self.n_heads // self.n_kv, dim=0)
        v = v.repeat_interleave(self.n_heads // self.n_kv, dim=0)
        scores = q @ k.transpose(1, 2) / d ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v                          # [H, T, d]
        return self.o_proj(out.transpose(0, 1).reshape(n, self.n_heads * d))


class _Layer(torch.nn.Module):
    def __init__(self, c: dict, index: int):
        super().__init__()
        self.self_attn = _Attention(c)
        moe = index >= c["first_k_dense_replace"] and index % c["moe_layer_freq"] == 0
        self.mlp = _Moe(c) if moe else _Mlp(c["hidden_size"], c["intermediate_size"])
        self.input_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(torch.nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = torch.nn.ModuleList(_Layer(c, i) for i in range(c["num_hidden_layers"]))
        self.norm = _RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class DeepseekMoeReference(torch.nn.Module):
    """Float reference of DeepseekForCausalLM; called like a transformers model (.logits)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.model = _Decoder(config)
        self.lm_head = torch.nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    def forward(self, input_ids: torch.Tensor):
        from types import SimpleNamespace
        logits = []
        for row in input_ids:
            x = self.model.embed_tokens(row)
            for layer in self.model.layers:
                x = layer(x)
            logits.append(self.lm_head(self.model.norm(x)))
        return SimpleNamespace(logits=torch.stack(logits))

    def save_pretrained(self, out_dir: str | Path) -> None:
        import json
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, out_dir / "model.safetensors",
                  metadata={"format": "pt"})
        (out_dir / "config.json").write_text(json.dumps(self.config, indent=2))


def random_deepseek_moe(seed: int = 0, init_std: float = 0.1, **overrides) -> DeepseekMoeReference:
    torch.manual_seed(seed)
    model = DeepseekMoeReference(deepseek_moe_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, init_std)
    return model.eval()


# --- SentencePiece tokenizers (Mixtral / Llama / Mistral style) -----------------------------------

def train_sentencepiece(lines: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """A SentencePiece BPE model trained like Llama's and Mistral's: byte fallback (<0x00>..<0xFF>
    at ids 3..258), identity normalisation, repeated spaces kept, digits split, dummy prefix,
    <unk>/<s>/</s> at 0/1/2. Returns the tokenizer.model path."""
    import sentencepiece as spm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=0.9999, num_threads=1, minloglevel=2)
    return out_dir / "tokenizer.model"


def llama_tokenizer_from_sentencepiece(model_path: str | Path):
    """The fast tokenizer transformers' LlamaTokenizerFast converter made for hub checkpoints such as
    Mixtral (its tokenizer.json): byte-fallback BPE with merges from the piece order, a normaliser
    that prepends "▁" and replaces spaces by "▁", <s> prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from moeq2gguf.io.vocab import read_sentencepiece_model
    sp = read_sentencepiece_model(Path(model_path))
    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, None), unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_sentencepiece_tokenizer(tokenizer, model_path: str | Path, out_dir: str | Path) -> Path:
    """Tokenizer files as Mixtral's hub checkpoint ships them: tokenizer.model, tokenizer.json and a
    tokenizer_config.json naming LlamaTokenizer (legacy, <s> added, no </s>)."""
    import json
    import shutil
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.copy(model_path, out_dir / "tokenizer.model")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="LlamaTokenizer", legacy=True, add_bos_token=True, add_eos_token=False,
               bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None, clean_up_tokenization_spaces=False)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


# --- Deep checkpoints written layer by layer (memory benchmarks) ---------------------------------

def write_random_mixtral(out_dir: str | Path, n_layers: int, hidden_size: int = 256, n_experts: int = 8,
                         expert_width: int = 512, n_heads: int = 8, n_kv_heads: int = 2, vocab_size: int = 512,
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A Mixtral checkpoint in the hub's sharded on-disk layout (one safetensors shard per layer,
    per-expert w1/w2/w3 names, model.safetensors.index.json), written one layer at a time so that
    generating a model larger than memory needs memory for one layer only. Weights are random
    (N(0, 0.02)), norms ones. No tokenizer is written. Returns sizes in bytes:
    {"layer_f32": one decoder layer as float32, "model_f32": everything as float32, "on_disk": ...}."""
    import json
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head_dim = hidden_size // n_heads
    config = make_config("mixtral", vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, intermediate_size=expert_width,
                         num_local_experts=n_experts, num_experts_per_tok=2)
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(out_dir)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        out = {p + "input_layernorm.weight": torch.ones(hidden_size, dtype=dtype),
               p + "post_attention_layernorm.weight": torch.ones(hidden_size, dtype=dtype),
               p + "self_attn.q_proj.weight": rand(n_heads * head_dim, hidden_size),
               p + "self_attn.k_proj.weight": rand(n_kv_heads * head_dim, hidden_size),
               p + "self_attn.v_proj.weight": rand(n_kv_heads * head_dim, hidden_size),
               p + "self_attn.o_proj.weight": rand(hidden_size, n_heads * head_dim),
               p + "block_sparse_moe.gate.weight": rand(n_experts, hidden_size)}
        for e in range(n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out.update({q + "w1.weight": rand(expert_width, hidden_size), q + "w2.weight": rand(hidden_size, expert_width),
                        q + "w3.weight": rand(expert_width, hidden_size)})
        return out

    shards = {"model-head.safetensors": {"model.embed_tokens.weight": rand(vocab_size, hidden_size),
                                         "model.norm.weight": torch.ones(hidden_size, dtype=dtype),
                                         "lm_head.weight": rand(vocab_size, hidden_size)}}
    weight_map, sizes = {}, {"layer_f32": 0, "model_f32": 0, "on_disk": 0}
    names = ["model-head.safetensors"] + [f"model-layer{i:03d}.safetensors" for i in range(n_layers)]
    for index, fname in enumerate(names):
        tensors = shards.pop(fname) if fname in shards else layer(index - 1)
        save_file(tensors, out_dir / fname, metadata={"format": "pt"})
        f32 = sum(t.numel() * 4 for t in tensors.values())
        sizes["model_f32"] += f32
        sizes["on_disk"] += sum(t.numel() * t.element_size() for t in tensors.values())
        if index == 1:
            sizes["layer_f32"] = f32
        weight_map.update({name: fname for name in tensors})
        del tensors
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sizes["on_disk"]}, "weight_map": weight_map}, indent=1))
    return sizes


# --- Byte-level BPE with a family's split regexes (pre-tokenizer names) ---------------------------
# The regexes tokenizer.json files of these families split with before byte-level BPE, which
# llama.cpp runs under the pre-tokenizer name (src/llama-vocab.cpp).
FAMILY_SPLITS = {
    "qwen2": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "deepseek-llm": [
        "[\r\n]",
        "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
        "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
        "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
        "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
        "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
        "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
        "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
        "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
        "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
        "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
        "\\s+$",
        "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
        "\\p{N}+",
    ],
    "deepseek-v3": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                    r'[!"#$%&' + r"'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def train_split_bpe_tokenizer(texts: Iterable[str], vocab_size: int, pre: str):
    """Byte-level BPE whose pre-tokenizer splits with FAMILY_SPLITS[pre] (each match isolated), then
    maps bytes without a regex, as those families' tokenizer.json files do. No special tokens added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in FAMILY_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")
