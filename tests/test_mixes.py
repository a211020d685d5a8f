"""Our port of llama-quantize's type rules gives the same type per tensor as llama-quantize itself."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import convert
from moeq2gguf.runtime.llama_tools import llama_quantize
from moeq2gguf.plan.mixes import MIXES, assign_types, parse_override
from testing import random_model, save_checkpoint

Q = gguf.GGMLQuantizationType
# Q2_K_S and the i-quant mixes need an importance matrix in llama-quantize (tested below with one).
NEEDS_IMATRIX = ["Q2_K_S", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M"]
MIXES_WITHOUT_IMATRIX = [m for m in MIXES if m not in NEEDS_IMATRIX]

SHAPES = {
    # 8 experts: llama.cpp's Mixtral bumps (attn_v/attn_k -> Q8_0, attn_output -> Q5_K); 16 layers reach
    # the n/16 and n/8 thresholds; GQA 4; rows of 256 so K-quants apply without fallback.
    "mixtral-8x-16layers": ("mixtral", dict(hidden_size=256, intermediate_size=256, num_hidden_layers=16,
                                            num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                            vocab_size=512)),
    # fine-grained experts 64 wide (fallback types), tied embeddings, no GQA
    "qwen2moe-tied": ("qwen2moe", dict(hidden_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=256,
                                       num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=4,
                                       tie_word_embeddings=True, vocab_size=512)),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def f32_gguf(request, tmp_path_factory, small_tokenizers):
    family, overrides = SHAPES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = save_checkpoint(random_model(family, **overrides), small_tokenizers[family], tmp / "ckpt")
    return convert(ckpt, tmp / "f32.gguf", type="F32", progress=False).output


def _hparams(reader: gguf.GGUFReader) -> dict:
    arch = reader.get_field("general.architecture").contents()
    g = lambda key: reader.get_field(f"{arch}.{key}").contents()  # noqa: E731
    return dict(n_layer=g("block_count"), n_expert=g("expert_count"), n_head=g("attention.head_count"),
                n_head_kv=g("attention.head_count_kv"))


@pytest.mark.parametrize("mix", MIXES_WITHOUT_IMATRIX)
def test_types_match_llama_quantize(f32_gguf, mix, tmp_path):
    reader = gguf.GGUFReader(f32_gguf)
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in reader.tensors]
    ours = dict(zip([n for n, _ in tensors], assign_types(tensors, mix, **_hparams(reader))))
    out = llama_quantize(f32_gguf, tmp_path / f"{mix}.gguf", mix)
    theirs = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    assert ours == theirs


def _unit_imatrix(f32_gguf, path):
    """An imatrix with every quantizable weight's entry (in_sum2 = 1, counts = 1), per expert where the weight is."""
    from moeq2gguf.calib.imatrix_export import ImatrixEntry, write_imatrix
    from moeq2gguf.plan.mixes import allows_quantization
    entries = {}
    for t in gguf.GGUFReader(f32_gguf).tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if allows_quantization(t.name, len(shape)):
            groups = shape[0] if len(shape) == 3 else 1
            entries[t.name] = ImatrixEntry(np.ones((groups, shape[-1])), np.ones(groups))
    return write_imatrix(path, entries, ["unit"], 1, 1, "plain")


@pytest.mark.parametrize("mix", NEEDS_IMATRIX)
def test_types_with_an_imatrix_match_llama_quantize(f32_gguf, mix, tmp_path):
    """The mixes llama-quantize runs only with an importance matrix, the i-quant mixes among them. Their types come
    from llama-quantize --dry-run (the same type choice, printed per tensor, without the slow i-quant searches; the
    bytes of whole files are compared in tests/test_iq_mixes.py)."""
    import re
    from moeq2gguf.runtime.llama_tools import llama_tool, run_tool
    reader = gguf.GGUFReader(f32_gguf)
    tensors = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist()))) for t in reader.tensors]
    ours = dict(zip([n for n, _ in tensors], assign_types(tensors, mix, has_imatrix=True, **_hparams(reader))))
    imatrix = _unit_imatrix(f32_gguf, tmp_path / "unit.imatrix.gguf")
    log = run_tool([llama_tool("llama-quantize"), "--dry-run", "--imatrix", imatrix, f32_gguf, mix])
    theirs = {}
    for name, rest in re.findall(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s*type =\s*(\S+.*)$", log, re.M):
        target = re.search(r"->.*\((\w+)\)\s*$", rest)
        theirs[name] = Q[(target.group(1) if target else rest.split(",")[0]).upper()]
    assert theirs.keys() == ours.keys()
    assert {n: (ours[n].name, theirs[n].name) for n in ours if ours[n] != theirs[n]} == {}


def test_override_wins_and_falls_back():
    tensors = [("blk.0.ffn_down_exps.weight", (8, 256, 128)), ("blk.0.ffn_up_exps.weight", (8, 128, 256)),
               ("blk.0.attn_norm.weight", (256,))]
    types = assign_types(tensors, "Q4_K_M", n_layer=1, n_expert=8, n_head=4, n_head_kv=4,
                         overrides=[parse_override("ffn_(down|up)_exps=Q6_K")])
    # down rows are 128 long: Q6_K falls back to Q8_0 as in llama-quantize; norms stay F32
    assert types == [Q.Q8_0, Q.Q6_K, Q.F32]


def test_bad_override_is_explained():
    from moeq2gguf.errors import Moeq2ggufError
    with pytest.raises(Moeq2ggufError, match="must look like REGEX=TYPE"):
        parse_override("ffn_down")
    with pytest.raises(Moeq2ggufError, match="is not a GGML type"):
        parse_override("ffn_down=Q9_K")
