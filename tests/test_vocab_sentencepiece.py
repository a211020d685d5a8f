"""SentencePiece tokenizer.model (Mixtral's real tokenizer) -> llama.cpp `llama` tokenizer: token
types, scores, special ids, and token ids equal to Hugging Face's on 200 random eval lines."""
from __future__ import annotations

import json
import random

import gguf
import pytest
import sentencepiece as spm

from moeq2gguf import convert, runtime
from moeq2gguf.errors import TokenizerError
from testing import (llama_tokenizer_from_sentencepiece, random_model,
                               save_sentencepiece_tokenizer, train_sentencepiece)
from moeq2gguf.io.vocab import read_sentencepiece_model

VOCAB = 1000


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, eval_text):
    lines = [line for line in eval_text[:400_000].splitlines() if line.strip()]
    return train_sentencepiece(lines, VOCAB, tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model):
    """A tiny Mixtral with its tokenizer files as the hub checkpoint has them."""
    out = tmp_path_factory.mktemp("mixtral-sp")
    random_model("mixtral", vocab_size=VOCAB).save_pretrained(out)
    return save_sentencepiece_tokenizer(llama_tokenizer_from_sentencepiece(sp_model), sp_model, out)


@pytest.fixture(scope="module")
def gguf_path(checkpoint, tmp_path_factory):
    return convert(checkpoint, tmp_path_factory.mktemp("out") / "m.gguf", type="F32", progress=False).output


@pytest.fixture(scope="module")
def sample(eval_text):
    lines = [line for line in eval_text.splitlines() if line.strip()]
    return random.Random(0).sample(lines, 200)


def test_model_proto_is_read_exactly(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    model = read_sentencepiece_model(sp_model)
    assert [p for p, _, _ in model.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in model.pieces] == [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (0, 1, 2, -1)
    assert model.byte_fallback and model.add_dummy_prefix and not model.remove_extra_whitespaces
    assert model.normalizer == "identity"


def test_gguf_vocab_metadata(gguf_path, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    fields = gguf.GGUFReader(gguf_path).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "llama"
    tokens, types, scores = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type"), value("tokenizer.ggml.scores")
    assert len(tokens) == len(types) == len(scores) == VOCAB
    assert tokens == [sp.id_to_piece(i) for i in range(VOCAB)]
    assert scores == pytest.approx([sp.get_score(i) for i in range(VOCAB)])
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert (value("tokenizer.ggml.unknown_token_id"), value("tokenizer.ggml.bos_token_id"),
            value("tokenizer.ggml.eos_token_id")) == (0, 1, 2)
    assert value("tokenizer.ggml.add_bos_token") is True and value("tokenizer.ggml.add_eos_token") is False
    assert value("tokenizer.ggml.add_space_prefix") is True


def test_token_ids_match_hugging_face(gguf_path, checkpoint, sp_model, sample):
    """AutoTokenizer on the checkpoint (its hub-style tokenizer.json) and SentencePiece itself."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(checkpoint)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    with runtime.load(gguf_path, n_ctx=64) as llm:
        for line in sample:
            ids = runtime.tokenize(llm, line)
            assert ids == hf(line)["input_ids"], line
            assert ids == [1] + sp.encode(line), line


def test_rebuilt_llama_tokenizer_differs_only_on_leading_spaces(gguf_path, checkpoint, sample):
    """transformers 5's LlamaTokenizer class rebuilds the pipeline with a Metaspace pre-tokenizer,
    which adds no "▁" when the text already starts with a space (SentencePiece, the tokenizer.json
    and llama.cpp always add one). Lines without a leading space agree; the others agree once
    llama.cpp is given the line without its first space."""
    from transformers import LlamaTokenizer
    rebuilt = LlamaTokenizer.from_pretrained(checkpoint)
    with runtime.load(gguf_path, n_ctx=64) as llm:
        for line in sample:
            expected = runtime.tokenize(llm, line[1:] if line.startswith(" ") else line)
            assert rebuilt(line)["input_ids"] == expected, line


def test_added_tokens_and_padding_rows(tmp_path, sp_model):
    """Tokens added on top of the SentencePiece model (tokenizer_config added_tokens_decoder) follow
    it with their type; embedding rows beyond the tokenizer become unused [PAD] tokens."""
    out = tmp_path / "ckpt"
    random_model("mixtral", vocab_size=VOCAB + 4).save_pretrained(out)
    save_sentencepiece_tokenizer(llama_tokenizer_from_sentencepiece(sp_model), sp_model, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(VOCAB): {"content": "[INST]", "special": True},
                                   str(VOCAB + 1): {"content": "<tool>", "special": False}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    fields = gguf.GGUFReader(convert(out, tmp_path / "m.gguf", type="F16", progress=False).output).fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert tokens[VOCAB:] == ["[INST]", "<tool>", f"[PAD{VOCAB + 2}]", f"[PAD{VOCAB + 3}]"]
    assert types[VOCAB:] == [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED,
                             gguf.TokenType.UNUSED, gguf.TokenType.UNUSED]


def test_sentencepiece_style_json_without_model_is_refused(tmp_path, checkpoint, sp_model):
    out = tmp_path / "ckpt"
    random_model("mixtral", vocab_size=VOCAB).save_pretrained(out)
    save_sentencepiece_tokenizer(llama_tokenizer_from_sentencepiece(sp_model), sp_model, out)
    (out / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="copy the checkpoint's tokenizer.model"):
        convert(out, tmp_path / "m.gguf", type="F16", progress=False)
