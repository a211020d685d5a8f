"""The patched llama.cpp (runtime_patches/, `moeq2gguf runtime build`) runs files with per-expert input smoothing
and the expert Hadamard exactly; stock llama.cpp refuses them with an error. Each llama.cpp runs in its own
process (llama-cpp-python binds its library at import): runtime.run_logits."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, convert, runtime
from moeq2gguf.runtime import build as runtime_build
from moeq2gguf.models.registry import open_model
from testing import random_model, save_checkpoint
from patched_reference import gguf_tensors, patched_logits
from util import eval_tokens, relative_error, transformers_logits

N_TOKENS = 64
TOL = 1e-4
CALIB = dict(calib_windows=4, calib_ctx=64)


@pytest.fixture(scope="module")
def patched_lib():
    """The cached patched build (`make setup` builds it; built here, once, when missing)."""
    return runtime_build.build().lib_dir


def test_built_libraries_keep_the_cxx_runtime_private(patched_lib):
    """No library we build exports a symbol that libstdc++ defines (issue 26: on the GPU machine libllama bound
    libstdc++'s stream output to libggml-cuda's exported copies and llama-cpp-python crashed), and each still
    exports everything else its stock counterpart does (the llama_/ggml_ interface llama-cpp-python binds)."""
    runtime_names = runtime_build.dynamic_symbols(runtime_build.cxx_runtime_library())
    stock_dir = runtime_build.stock_lib_dir()
    built = [so for so in sorted(patched_lib.glob("lib*.so"))
             if not (stock_dir / so.name).is_file() or so.resolve().read_bytes() != (stock_dir / so.name).resolve()
             .read_bytes()]
    assert [so.name for so in built] == ["libllama.so"]   # the CPU build links llama-cpp-python's own libggml
    for so in built:
        ours = runtime_build.dynamic_symbols(so)
        stock = runtime_build.dynamic_symbols(stock_dir / so.name)
        print(f"{so.name}: exports {len(ours)} symbols, {len(ours & runtime_names)} also defined by libstdc++ "
              f"(stock {so.name}: {len(stock)}, {len(stock & runtime_names)})")
        assert not ours & runtime_names, sorted(ours & runtime_names)[:5]
        assert not (stock - runtime_names) - ours, sorted((stock - runtime_names) - ours)[:5]
    script = (runtime_build.build_dir() / "private-cxx-runtime.map").read_text()
    assert "global: *;" in script and "_ZNSo9_M_insertIlEERSoT_;" in script   # std::ostream::_M_insert<long>


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("tokenizer.")}


def _check(got: np.ndarray, refs: dict[str, np.ndarray], label: str) -> None:
    for name, ref in refs.items():
        err = relative_error(got, ref)
        print(f"{label} vs {name}: max |diff| / max |ref| = {err:.2e}")
        assert err <= TOL, name
        assert (got.argmax(-1) == ref.argmax(-1)).all(), name


def test_smoothed_hadamard_mixtral(patched_lib, tmp_path, small_tokenizers, eval_text):
    """Mixtral, expert width 96 = 3 Hadamard blocks of 32, F32: the patched llama.cpp gives the torch forward
    of the transformed file, transformers' untransformed model and the untransformed file on stock llama.cpp."""
    tok = small_tokenizers["mixtral"]
    model = random_model("mixtral", intermediate_size=96)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    plain = convert(ckpt, tmp_path / "plain.gguf", type="F32", progress=False).output
    path = convert(ckpt, tmp_path / "tf.gguf", type="F32", smooth="per-expert", expert_hadamard=True, progress=False,
                   **CALIB).output
    fields = _fields(path)
    assert fields["llama.expert_smoothing"] is True and fields["llama.expert_hadamard_block"] == 32
    tensors = gguf_tensors(path)
    assert tensors["blk.0.ffn_exps_smooth"].shape == (4, 64) and tensors["ffn_exps_hadamard"].shape == (32, 32)
    assert runtime.patched_features(path) and not runtime.patched_features(plain)

    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    spec = open_model(ckpt).spec
    got = runtime.run_logits(path, tokens, patched=True)
    stock_plain = runtime.run_logits(plain, tokens)
    _check(got, {"torch forward of the transformed file": patched_logits(tensors, spec, tokens, 32),
                 "transformers (untransformed)": transformers_logits(model, tokens),
                 "stock llama.cpp, untransformed file": stock_plain}, "patched llama.cpp, transformed file")
    # the patch changes nothing for a file without the transforms
    np.testing.assert_array_equal(runtime.run_logits(plain, tokens, patched=True), stock_plain)

    # stock llama.cpp refuses the file itself, and says why
    with pytest.raises(Moeq2ggufError, match="wrong number of tensors") as err:
        runtime.run_logits(path, tokens)
    assert "per-expert input smoothing" in str(err.value) and "expert Hadamard" in str(err.value)
    if runtime.is_patched() is False:   # this process bound the stock library
        with pytest.raises(Moeq2ggufError, match="stock llama.cpp cannot run"):
            with runtime.load(path):
                pass


@pytest.mark.parametrize("family, overrides, smooth, hadamard, block", [
    # one block over the whole expert width (128), Hadamard only
    ("mixtral", dict(intermediate_size=128), None, True, 128),
    # smoothing only
    ("mixtral", dict(), "per-expert", False, 0),
    # qwen2moe: the same build_moe_ffn path with a gated shared expert beside it (expert width 32)
    ("qwen2moe", dict(), "per-expert", True, 32),
])
def test_each_transform_and_family(patched_lib, tmp_path, small_tokenizers, eval_text, family, overrides, smooth,
                                   hadamard, block):
    tok = small_tokenizers["mixtral" if family == "mixtral" else "qwen2moe"]
    model = random_model(family, **overrides)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    path = convert(ckpt, tmp_path / "tf.gguf", type="F32", smooth=smooth, expert_hadamard=hadamard, progress=False,
                   **CALIB).output
    arch = open_model(ckpt).spec.gguf_arch
    fields = _fields(path)
    assert fields.get(f"{arch}.expert_smoothing", False) is (smooth is not None)
    assert fields.get(f"{arch}.expert_hadamard_block", 0) == block
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    _check(runtime.run_logits(path, tokens, patched=True), {"transformers (untransformed)": transformers_logits(model, tokens)},
           f"{family} smooth={smooth} hadamard={hadamard}")
    with pytest.raises(Moeq2ggufError, match="wrong number of tensors"):
        runtime.run_logits(path, tokens)


def test_quantized_file_runs_on_patched_runtime(patched_lib, tmp_path, small_tokenizers, eval_text):
    """Q8_0 of the transformed weights (rtn): the runtime tensors stay F32, and the patched runtime's logits are
    close to the float model's (measured: median per-token error 0.026 against 0.028 for the untransformed Q8_0
    file; 61 of 64 argmax equal against 63)."""
    tok = small_tokenizers["mixtral"]
    model = random_model("mixtral", intermediate_size=96)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    path = convert(ckpt, tmp_path / "q8.gguf", type="Q8_0", smooth="per-expert", expert_hadamard=True, progress=False,
                   **CALIB).output
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_exps_smooth"] == gguf.GGMLQuantizationType.F32
    assert types["ffn_exps_hadamard"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.ffn_down_exps.weight"] == gguf.GGMLQuantizationType.Q8_0
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    got, ref = runtime.run_logits(path, tokens, patched=True), transformers_logits(model, tokens)
    # per token (a near-tied router flips on a token or two here, on the untransformed Q8_0 file as well)
    per_token = np.abs(got - ref).max(-1) / np.abs(ref).max()
    assert np.median(per_token) < 0.05 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def _rewrite(src, dst, arch: str, drop: tuple[str, ...] = (), keys: dict | None = None, half: tuple[str, ...] = ()):
    """A copy of an F32 GGUF file without the tensors in `drop`, those in `half` stored as F16, and with some uint32
    keys changed."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    keys = keys or {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in keys:
            writer.add_uint32(name, keys.pop(name))
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for name, value in keys.items():
        writer.add_uint32(name, value)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.array(t.data).astype(np.float16 if t.name in half else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_patched_loader_checks_the_file(patched_lib, tmp_path, small_tokenizers, eval_text):
    """The patched llama.cpp refuses a file whose keys and tensors disagree, and loads its own output back."""
    tok = small_tokenizers["mixtral"]
    ckpt = save_checkpoint(random_model("mixtral", intermediate_size=96), tok, tmp_path / "ckpt")
    path = convert(ckpt, tmp_path / "tf.gguf", type="F32", smooth="per-expert", expert_hadamard=True, progress=False,
                   **CALIB).output
    tokens = eval_tokens(tok, eval_text, 8)
    same = _rewrite(path, tmp_path / "same.gguf", "llama")
    np.testing.assert_array_equal(runtime.run_logits(same, tokens, patched=True),
                                  runtime.run_logits(path, tokens, patched=True))
    cases = {
        "tensor 'blk.1.ffn_exps_smooth' not found": dict(drop=("blk.1.ffn_exps_smooth",)),
        "tensor 'ffn_exps_hadamard' not found": dict(drop=("ffn_exps_hadamard",)),
        "expert_hadamard_block = 64 does not divide the expert width 96": dict(keys={"llama.expert_hadamard_block": 64}),
        "expert_hadamard_block = 48 is not a power of two": dict(keys={"llama.expert_hadamard_block": 48}),
        # a Hadamard tensor of another order than the key announces
        "tensor 'ffn_exps_hadamard' has wrong shape": dict(keys={"llama.expert_hadamard_block": 16}),
        # the smoothing vector in another type: refused at load, not a failure inside the graph
        "tensor 'blk.1.ffn_exps_smooth' has type f16; expert smoothing needs F32": dict(half=("blk.1.ffn_exps_smooth",)),
    }
    for i, (message, change) in enumerate(cases.items()):
        bad = _rewrite(path, tmp_path / f"bad{i}.gguf", "llama", **change)
        with pytest.raises(Moeq2ggufError, match=message):
            runtime.run_logits(bad, tokens, patched=True)


@pytest.mark.parametrize("method", ["gptq"])   # imatrix reads the same transformed statistics (their diagonals)
def test_calibrated_methods_on_transformed_model(patched_lib, tmp_path, small_tokenizers, eval_text, method):
    """GPTQ / imatrix quantize the transformed weights with statistics of the transformed inputs (x * r_e, h H: the
    calibration forward applies the patched runtime's transforms): Q4_0 as close to the float model as the
    untransformed Q4_0 file is on stock llama.cpp; so is a file the size allocator fits in the same bytes."""
    tok = small_tokenizers["mixtral"]
    model = random_model("mixtral", intermediate_size=96)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    kw = dict(type="Q4_0", method=method, progress=False, **CALIB)
    plain = convert(ckpt, tmp_path / "plain.gguf", **kw).output
    path = convert(ckpt, tmp_path / "tf.gguf", smooth="per-expert", expert_hadamard=True, **kw).output
    # the size allocator on the transformed model (its sensitivity measured there), at the Q4_0 file's size
    budget = path.stat().st_size
    kw.pop("type")
    allocated = convert(ckpt, tmp_path / "alloc.gguf", smooth="per-expert", expert_hadamard=True, target_size=budget,
                        **kw)
    assert allocated.allocation is not None and allocated.output.stat().st_size <= budget
    assert {"moeq2gguf.recipe", "llama.expert_smoothing", "llama.expert_hadamard_block"} <= set(_fields(allocated.output))
    tokens = eval_tokens(tok, eval_text, N_TOKENS)
    ref = transformers_logits(model, tokens)
    errors = {}
    for label, logits in (("plain", runtime.run_logits(plain, tokens)),
                          ("transformed", runtime.run_logits(path, tokens, patched=True)),
                          ("transformed, allocated", runtime.run_logits(allocated.output, tokens, patched=True))):
        per_token = np.abs(logits - ref).max(-1) / np.abs(ref).max()
        errors[label] = float(np.median(per_token))
        print(f"{method} Q4_0 {label}: median per-token error {errors[label]:.4f}, "
              f"argmax agreement {(logits.argmax(-1) == ref.argmax(-1)).mean():.3f}")
    assert errors["transformed"] < 1.5 * errors["plain"]
    assert errors["transformed, allocated"] < 1.5 * errors["plain"]
