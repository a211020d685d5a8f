"""Tokenizer metadata for GGUF from a checkpoint's Hugging Face tokenizer files.

Byte-level BPE (tokenizer.json with a BPE model and a ByteLevel pre-tokenizer or decoder) is
written as llama.cpp's `gpt2` tokenizer: tokens in id order, merges, token types, special ids and
the pre-tokenizer name. llama.cpp's own converter recognises the pre-tokenizer by hashing the ids of
a test string, which fails for any freshly trained tokenizer; we read the pre-tokenizer definition
instead (the split regexes of known families), and fall back to the family's name.

A SentencePiece `tokenizer.model` (Mixtral, Llama, Mistral) is written as llama.cpp's `llama`
tokenizer: pieces in id order with their scores and types (normal, unknown, control,
user-defined, unused, byte: the byte-fallback pieces <0x00>..<0xFF>), unk/bos/eos ids, and
add_space_prefix from the model's add_dummy_prefix. The model file is a protobuf; we read the few
fields we need ourselves rather than depend on the protobuf package. llama.cpp's SPM tokenizer
merges by piece score, as SentencePiece's BPE does; it does no Unicode normalisation, so a model
with a normaliser other than identity is converted with a warning.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from moeq2gguf.errors import TokenizerError

log = logging.getLogger(__name__)

# Split regexes of known byte-level BPE families -> llama.cpp pre-tokenizer names.
KNOWN_SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # DeepSeek-V3 (and R1): digits in threes, CJK runs, then this one
    r'[!"#$%&' + r"'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "deepseek-v3",
    # DeepSeek LLM / DeepSeekMoE / V2: one of its several splits (ASCII and full-width punctuation)
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+": "deepseek-llm",
    # o200k (GPT-OSS)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}


def _escape_line_breaks(regex: str) -> str:
    """tokenizer.json files spell CR/LF in character classes either as escapes or as the characters."""
    return regex.replace("\r", r"\r").replace("\n", r"\n")


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
    add_space_prefix: bool | None = None   # SentencePiece: prepend a space to the text (add_dummy_prefix)

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
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
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
            regex = _escape_line_breaks(pattern.get("Regex") or pattern.get("String") or "")
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


def _is_byte_level(tokenizer_json: dict) -> bool:
    parts = _pre_tokenizers(tokenizer_json.get("pre_tokenizer"))
    decoder = tokenizer_json.get("decoder") or {}
    decoders = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts) or any(d.get("type") == "ByteLevel" for d in decoders)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-save the tokenizer") from exc


def _chat_template(model_dir: Path, tcfg: dict) -> str | None:
    chat_template = tcfg.get("chat_template")
    if chat_template is None and (model_dir / "chat_template.jinja").is_file():
        chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(chat_template, list):  # several named templates: llama.cpp takes the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    return chat_template


def load_vocab(model_dir: Path, vocab_size: int, config: dict, family_default_pre: str) -> Vocab:
    """The checkpoint's tokenizer as GGUF metadata: byte-level BPE from tokenizer.json, or the
    SentencePiece tokenizer.model (preferred when tokenizer.json is not byte-level, as Mixtral's)."""
    tok_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tj = _read_json(tok_path) if tok_path.is_file() else None
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    if sp_path.is_file() and (tj is None or not _is_byte_level(tj)):
        return load_sentencepiece_vocab(sp_path, vocab_size, config, tcfg, tj)
    if tj is None:
        raise TokenizerError(f"{model_dir} has no tokenizer.json or tokenizer.model; copy the checkpoint's tokenizer files into it")
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer.json model type {model.get('type')!r} is not supported; only byte-level BPE "
                             "(tokenizer.json) and SentencePiece (tokenizer.model) are")
    if not _is_byte_level(tj):
        raise TokenizerError(f"{tok_path} is a SentencePiece-style BPE (no ByteLevel step); copy the checkpoint's "
                             "tokenizer.model next to it, which is what gets converted")

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
    chat_template = _chat_template(model_dir, tcfg)
    return Vocab(model="gpt2", pre=detect_pre_tokenizer(tj, family_default_pre), tokens=tokens,
                 token_types=token_types, merges=merges, special_ids=special, add_bos=bool(add_bos),
                 add_eos=bool(add_eos), chat_template=chat_template)


# --- SentencePiece -------------------------------------------------------------------------------
# Field numbers of sentencepiece_model.proto (ModelProto, SentencePiece, TrainerSpec, NormalizerSpec).
_SP_PIECES, _SP_TRAINER, _SP_NORMALIZER = 1, 2, 3
_SP_UNIGRAM, _SP_BPE = 1, 2


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _protobuf_fields(data: bytes) -> list[tuple[int, object]]:
    """(field number, value) of one protobuf message in order: varints as int, fixed32/64 and
    length-delimited fields as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire}; tokenizer.model is not a SentencePiece model")
        out.append((field, value))
    return out


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class SentencePieceModel:
    pieces: list[tuple[str, float, int]]          # (piece, score, type) in id order; types as gguf.TokenType
    model_type: int = _SP_UNIGRAM
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer: str = ""
    has_charsmap: bool = False
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    try:
        fields = _protobuf_fields(path.read_bytes())
        pieces = []
        model = SentencePieceModel(pieces)
        for field, value in fields:
            if field == _SP_PIECES:
                piece, score, kind = "", 0.0, 1
                for f, v in _protobuf_fields(value):
                    if f == 1:
                        piece = v.decode("utf-8")
                    elif f == 2:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3:
                        kind = v
                pieces.append((piece, score, kind))
            elif field == _SP_TRAINER:
                for f, v in _protobuf_fields(value):
                    if f == 3:
                        model.model_type = v
                    elif f == 35:
                        model.byte_fallback = bool(v)
                    elif f == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif f in (40, 41, 42, 43):
                        setattr(model, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[f], _int32(v))
            elif field == _SP_NORMALIZER:
                for f, v in _protobuf_fields(value):
                    if f == 1:
                        model.normalizer = v.decode("utf-8")
                    elif f == 2:
                        model.has_charsmap = len(v) > 0
                    elif f == 3:
                        model.add_dummy_prefix = bool(v)
                    elif f == 4:
                        model.remove_extra_whitespaces = bool(v)
    except (IndexError, UnicodeDecodeError, struct.error) as exc:
        raise TokenizerError(f"{path} is not a readable SentencePiece model ({exc}); re-download it") from exc
    if not pieces:
        raise TokenizerError(f"{path} holds no pieces; it is not a SentencePiece model")
    return model


def load_sentencepiece_vocab(path: Path, vocab_size: int, config: dict, tcfg: dict, tj: dict | None) -> Vocab:
    """A SentencePiece BPE model as llama.cpp's `llama` (SPM) tokenizer."""
    sp = read_sentencepiece_model(path)
    if sp.model_type != _SP_BPE:
        raise TokenizerError(f"{path} is a SentencePiece {'unigram' if sp.model_type == _SP_UNIGRAM else 'word/char'} "
                             "model; llama.cpp's llama tokenizer reproduces SentencePiece BPE models only")
    if sp.normalizer not in ("", "identity") and sp.has_charsmap:
        log.warning("%s normalises text (%s); llama.cpp's llama tokenizer does not, so text that normalisation "
                    "changes tokenizes differently", path.name, sp.normalizer)
    if sp.remove_extra_whitespaces:
        log.warning("%s collapses repeated spaces; llama.cpp's llama tokenizer keeps them", path.name)
    if sp.treat_whitespace_as_suffix:
        raise TokenizerError(f"{path} treats whitespace as a suffix, which llama.cpp's llama tokenizer does not support")
    tokens = [piece for piece, _, _ in sp.pieces]
    scores = [score for _, score, _ in sp.pieces]
    types = [kind for _, _, kind in sp.pieces]

    # Tokens added on top of the SentencePiece model (tokenizer.json / tokenizer_config.json).
    added: dict[int, tuple[str, bool]] = {}
    for entry in (tj or {}).get("added_tokens", []):
        added[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    for token_id, entry in (tcfg.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = (entry["content"], bool(entry.get("special")))
    for token_id, (content, special) in sorted(added.items()):
        if token_id < len(tokens) and tokens[token_id] == content:
            if special and types[token_id] == gguf.TokenType.NORMAL:
                types[token_id] = int(gguf.TokenType.CONTROL)
            continue
        while len(tokens) < token_id:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        kind = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        if token_id < len(tokens):
            tokens[token_id], scores[token_id], types[token_id] = content, -1000.0, kind
        else:
            tokens.append(content)
            scores.append(-1000.0)
            types.append(kind)
    if len(tokens) > vocab_size:
        raise TokenizerError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}; "
                             "the tokenizer does not belong to this checkpoint")
    for i in range(len(tokens), vocab_size):  # embedding rows with no token
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))

    ids = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for kind, sp_id in (("bos", sp.bos_id), ("eos", sp.eos_id), ("unk", sp.unk_id), ("pad", sp.pad_id)):
        content = _token_content(tcfg.get(f"{kind}_token"))
        if content is not None and content in ids:
            special[kind] = ids[content]
        elif 0 <= sp_id < len(sp.pieces):
            special[kind] = sp_id
        elif isinstance(config.get(f"{kind}_token_id"), int):
            special[kind] = config[f"{kind}_token_id"]
    default_bos = _adds_special(tj.get("post_processor"), "first") if tj else True
    add_prefix = tcfg.get("add_prefix_space")
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores, special_ids=special,
                 add_bos=bool(tcfg.get("add_bos_token", default_bos)), add_eos=bool(tcfg.get("add_eos_token", False)),
                 chat_template=_chat_template(path.parent, tcfg),
                 add_space_prefix=sp.add_dummy_prefix if add_prefix is None else bool(add_prefix))
