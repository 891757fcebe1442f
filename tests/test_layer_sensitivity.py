"""scripts/layer_sensitivity.py: the cached partial forward equals a full forward, the greedy recipe meets its
budget with the known-best choice, and bad input fails in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import read_config
from qlinear import QuantFormat, fake_quantize, linear_names
from tests.test_model import TINY, tiny_model
from tests.test_quantize import tiny_ckpt
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from layer_sensitivity import choose_recipe, layer_sensitivity


def full_forward_nll(model, windows):
    with torch.no_grad():
        logits = model(windows)[:, :-1]
    return F.cross_entropy(logits.double().flatten(0, 1), windows[:, 1:].flatten()).item()


def test_sensitivity_equals_full_forward_with_one_layer_quantized(tmp_path):
    model, _ = tiny_ckpt(tmp_path)
    windows = torch.randint(0, TINY["vocab_size"], (3, 32), generator=torch.Generator().manual_seed(2))
    fmt = QuantFormat(2, 32)
    names = [n for n in linear_names(model) if n.startswith("layers.")]
    base, delta = layer_sensitivity(model, windows, fmt, names, log=lambda s: None)
    assert base == pytest.approx(full_forward_nll(model, windows), abs=1e-5)
    for name in ["layers.0.attention.wv", "layers.1.feed_forward.w2"]:
        layer = model.get_submodule(name)
        original = layer.weight.data.clone()
        layer.weight.data = fake_quantize(original, fmt)
        expected = full_forward_nll(model, windows) - base
        layer.weight.data = original
        assert delta[name] == pytest.approx(expected, abs=1e-5)
        assert abs(delta[name]) > 1e-4  # 2-bit really changed something
    fresh, _ = tiny_ckpt(tmp_path / "again")  # every weight put back after its measurement
    for name in names:
        torch.testing.assert_close(model.get_submodule(name).weight, fresh.get_submodule(name).weight)


def test_recipe_meets_budget_with_least_predicted_loss():
    low, high = QuantFormat(2, 64), QuantFormat(4, 64)  # 2.5 and 4.5 bits per weight
    shapes = {"a": (64, 128), "b": (64, 128), "c": (128, 128), "d": (64, 128)}
    delta = {"a": 0.01, "b": 0.5, "c": 0.03, "d": -0.002}
    # weights: a, b, d 8192 each, c 16384 (40960 total). Budget 3.5 -> save 40960 bits. By loss per bit saved the
    # order is d, a, c: d + a save 32768 (short), + c enough; then a is not needed. d + c is the optimum (0.028).
    recipe, bpw, predicted = choose_recipe(delta, shapes, low, high, budget=3.5)
    assert recipe == {"default": high.name, "layers": {"c": low.name, "d": low.name}}
    assert bpw == pytest.approx((8192 * 4.5 * 2 + 8192 * 2.5 + 16384 * 2.5) / 40960)
    assert bpw <= 3.5 and predicted == pytest.approx(0.028)
    everything_low, bpw, _ = choose_recipe(delta, shapes, low, high, budget=2.5)
    assert set(everything_low["layers"]) == set(shapes) and bpw == pytest.approx(2.5)
    with pytest.raises(ValueError, match="below"):
        choose_recipe(delta, shapes, low, high, budget=2.0)


def tiny_ckpt_with_tokenizer(tmp_path):
    """A tiny random model that reads the default model's tokenizer (vocab 49152)."""
    model = tiny_model(vocab_size=49152)
    return model, save_tiny(model, tmp_path / "float", tokenizer=True)


def run_cli(*args):
    return subprocess.run([sys.executable, "scripts/layer_sensitivity.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_a_recipe_that_quantize_accepts(tmp_path):
    _, src = tiny_ckpt_with_tokenizer(tmp_path)
    out = tmp_path / "recipe.json"
    r = run_cli("--checkpoint", str(src), "--max_tokens", "256", "--context", "64", "--budget", "3.5",
                "--low", "int2-g32", "--high", "int4-g32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    recipe = json.loads(out.read_text())
    measured = json.loads(out.with_suffix(".sensitivity.json").read_text())
    assert len(measured["delta_nll"]) == 14 and measured["tokens"] == 256
    assert recipe["default"] == "int4-g32-asym" and 0 < len(recipe["layers"]) < 14
    assert f"{len(recipe['layers'])} of 14 layers at int2-g32-asym" in r.stdout
    q = subprocess.run([sys.executable, "quantize.py", "--checkpoint", str(src), "--mode", "hybrid", "--recipe",
                        str(out), "--out", str(tmp_path / "hybrid")], cwd=ROOT, capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    saved = read_config(tmp_path / "hybrid")["quantization"]["recipe"]
    assert {n for n, f in saved.items() if f == "int2-g32-asym"} == set(recipe["layers"])


@pytest.mark.parametrize("args,message", [
    (["--budget", "2.0"], "below what int2-g64-asym everywhere gives"),
    (["--low", "int8", "--high", "int4-g32"], "is not smaller than"),
    (["--low", "int5"], "bad format"),
    (["--max_tokens", "10"], "less than one window"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    _, src = tiny_ckpt_with_tokenizer(tmp_path)
    out = tmp_path / "recipe.json"
    r = run_cli("--checkpoint", str(src), "--out", str(out), *args)
    assert r.returncode == 2 and message in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not out.exists()
