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
    if family == "mixtral":
        base.update(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5)
    else:
        base.update(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=96,
                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-6, qkv_bias=True)
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
            elif name.endswith(".bias"):
                p.normal_(0, init_std)
    return model.eval()


def save_checkpoint(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
