"""Tokenizer metadata for GGUF from a checkpoint's Hugging Face tokenizer files.

Byte-level BPE (tokenizer.json with a BPE model) is written as llama.cpp's `gpt2` tokenizer:
tokens in id order, merges, token types, special ids and the pre-tokenizer name. llama.cpp's own
converter recognises the pre-tokenizer by hashing the ids of a test string, which fails for any
freshly trained tokenizer; we read the pre-tokenizer definition instead.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from moeq2gguf.errors import TokenizerError

log = logging.getLogger(__name__)

# Split regexes of known byte-level BPE families -> llama.cpp pre-tokenizer names.
KNOWN_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


@dataclass
class Vocab:
    model: str                     # llama.cpp tokenizer model: gpt2 | llama
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pre_tokenizers(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [p for child in node.get("pretokenizers", []) for p in _pre_tokenizers(child)]
    return [node]


def detect_pre_tokenizer(tokenizer_json: dict, family_default: str) -> str:
    parts = _pre_tokenizers(tokenizer_json.get("pre_tokenizer"))
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            if regex in KNOWN_SPLIT_PATTERNS:
                return KNOWN_SPLIT_PATTERNS[regex]
    log.warning("pre-tokenizer not recognised; using the family default %r", family_default)
    return family_default


def _adds_special(post_processor: dict | None, position: str) -> bool:
    """Whether a TemplateProcessing post-processor puts a special token first (bos) or last (eos)."""
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_adds_special(p, position) for p in post_processor.get("processors", []))
    if post_processor.get("type") != "TemplateProcessing":
        return False
    single = post_processor.get("single", [])
    if not single:
        return False
    item = single[0] if position == "first" else single[-1]
    return "SpecialToken" in item


def load_vocab(model_dir: Path, vocab_size: int, config: dict, family_default_pre: str) -> Vocab:
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        if (model_dir / "tokenizer.model").is_file():
            raise TokenizerError(f"{model_dir} has only a SentencePiece tokenizer.model, which is not supported yet; "
                                 "save a tokenizer.json with transformers' tokenizer.save_pretrained")
        raise TokenizerError(f"{model_dir} has no tokenizer.json; copy the checkpoint's tokenizer files into it")
    try:
        tj = json.loads(tok_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{tok_path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-save the tokenizer") from exc
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer.json model type {model.get('type')!r} is not supported; only byte-level BPE is")
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise TokenizerError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                             "the tokenizer does not belong to this checkpoint")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(int(types[i]))
        else:  # embedding rows with no token: llama.cpp needs one entry per row
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids = {t: i for i, t in by_id.items()}
    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        content = _token_content(tcfg.get(f"{kind}_token"))
        if content is not None and content in ids:
            special[kind] = ids[content]
        elif isinstance(config.get(f"{kind}_token_id"), int):
            special[kind] = config[f"{kind}_token_id"]
    add_bos = tcfg.get("add_bos_token", _adds_special(tj.get("post_processor"), "first"))
    add_eos = tcfg.get("add_eos_token", False)
    chat_template = tcfg.get("chat_template")
    if chat_template is None and (model_dir / "chat_template.jinja").is_file():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(chat_template, list):  # several named templates: llama.cpp takes the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    return Vocab(model="gpt2", pre=detect_pre_tokenizer(tj, family_default_pre), tokens=tokens,
                 token_types=token_types, merges=merges, special_ids=special, add_bos=bool(add_bos),
                 add_eos=bool(add_eos), chat_template=chat_template)
