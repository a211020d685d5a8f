"""inspect --plot and eval --plot: images are written (atomically, only under a picture's name), hold the data,
and bad names are refused before anything is computed."""
from __future__ import annotations

import numpy as np
import pytest

from moeq2gguf import Moeq2ggufError, cli, convert
from util import FIXTURES

MODEL = FIXTURES / "qwen2moe-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    f32 = convert(MODEL, tmp / "f32.gguf", type="F32", progress=False).output
    # a mixed recipe without calibration: experts at Q2_K, the rest of Q4_K_M
    mixed = convert(MODEL, tmp / "mixed.gguf", type="Q4_K_M", tensor_types=["ffn_.*_exps=Q2_K"], progress=False).output
    return f32, mixed


def _image(path) -> np.ndarray:
    import matplotlib.image
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_inspect_plot_shows_the_recipe(files, tmp_path, capsys):
    _, mixed = files
    out = tmp_path / "recipe.png"
    assert cli.main(["inspect", str(mixed), "--plot", str(out)]) in (0, None)
    assert f"wrote {out}" in capsys.readouterr().out
    pixels = _image(out)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50   # more than a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.png"]


def test_eval_plot_shows_the_kld_distribution(files, tmp_path, capsys):
    f32, mixed = files
    out = tmp_path / "eval.png"
    code = cli.main(["eval", str(mixed), "--base", str(f32), "--ctx", "128", "--chunks", "4", "--plot", str(out)])
    assert code in (0, None)
    assert "KLD mean" in capsys.readouterr().out
    pixels = _image(out)
    assert pixels.shape[1] > 500


def test_plot_names_are_checked(files, tmp_path, capsys):
    from moeq2gguf.commands.inspect import inspect
    from moeq2gguf.commands.plots import recipe_plot
    _, mixed = files
    with pytest.raises(Moeq2ggufError, match="give a .png, .svg or .pdf"):
        recipe_plot(inspect(mixed), tmp_path / "recipe.txt")
    with pytest.raises(Moeq2ggufError, match="does not exist"):
        recipe_plot(inspect(mixed), tmp_path / "no" / "recipe.png")
    f32, _ = files   # the CLI refuses the name before evaluating anything
    assert cli.main(["eval", str(mixed), "--base", str(f32), "--plot", str(tmp_path / "kld.jpg")]) == 2
    assert "give a .png" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
