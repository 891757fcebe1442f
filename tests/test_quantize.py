"""quantize.py against independent references: float64 dequantize-then-matmul from the integer codes,
RTN's half-step error bound, GPTQ's promise (lower output error than RTN), save/load round trips."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model, save_quantized
from calibrate import HessianAccumulator, gptq_quantize, quantize_model
from qlinear import (
    QuantEmbedding,
    QuantFormat,
    QuantLinear,
    linear_names,
    quant_params,
    quantize_codes,
    resolve_recipe,
    rtn_layer,
)
from tests.test_model import TINY, tiny_model
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
FORMATS = [QuantFormat(8, 0, True), QuantFormat(4, 32, False), QuantFormat(4, 64, True), QuantFormat(3, 32, False),
           QuantFormat(3, 64, True), QuantFormat(2, 32, False), QuantFormat(2, 16, True)]


def reference_weight(codes, scales, zeros, fmt, k):
    """float64, written from the format's definition: W = (q - z[group]) * s[group]."""
    g = fmt.group_size or k
    idx = torch.arange(k) // g
    return (codes.double() - zeros.double()[:, idx]) * scales.double()[:, idx]


def test_format_names_round_trip_and_bits_per_weight():
    for text, bpw in [("int4-g128-asym", 4.25), ("int2-g64-asym", 2.5), ("int3-g128-sym", 3.125), ("int8", 8 + 16 / 1536)]:
        fmt = QuantFormat.parse(text)
        assert QuantFormat.parse(fmt.name) == fmt
        assert fmt.bits_per_weight(1536) == pytest.approx(bpw)
    assert QuantFormat.parse("int4-g128").bits_per_weight(576) == pytest.approx(4 + 32 * 5 / 576)  # ragged: 5 groups
    with pytest.raises(ValueError):
        QuantFormat.parse("int5-g128")
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantFormat(4, 20)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_rtn_error_is_at_most_half_a_step(fmt):
    torch.manual_seed(0)
    w = torch.randn(24, 80)  # 80 is not a multiple of 32 or 64: a ragged last group
    s, z = quant_params(w, fmt)
    q = quantize_codes(w, s, z, fmt)
    assert q.max() <= 2 ** fmt.bits - 1
    err = (reference_weight(q, s, z, fmt, 80) - w.double()).abs()
    step = reference_weight(torch.ones_like(q), s, torch.zeros_like(z), fmt, 80)
    if fmt.sym:  # the symmetric grid cannot reach +max exactly: one step at most there
        assert (err <= step * 1.0001).all()
    else:
        assert (err <= step / 2 * 1.0001).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (3, 5)], ids=["gemv", "gemm"])  # the CPU kernel vs dequantize + matmul
def test_packed_forward_equals_float64_reference(fmt, dtype, rows):
    torch.manual_seed(1)
    k = 96
    w = torch.randn(40, k)
    layer = rtn_layer(w, fmt).to(dtype)
    x = torch.randn(*rows, k)
    s, z = quant_params(w, fmt)
    ref = x.double() @ reference_weight(quantize_codes(w, s, z, fmt), s, z, fmt, k).T
    got = layer(x.to(dtype)).double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert layer.codes().tolist() == quantize_codes(w, s, z, fmt).tolist()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fake_quant_forward_equals_packed_and_trains_latent(fmt):
    torch.manual_seed(2)
    layer = rtn_layer(torch.randn(32, 64), fmt)
    x = torch.randn(4, 64)
    packed = layer(x)
    layer.train_mode()
    fake = layer(x)
    torch.testing.assert_close(fake, packed, rtol=1e-5, atol=1e-5)
    fake.square().sum().backward()
    # Straight-through: the latent gets the gradient a float layer with the quantized weight would get.
    expected = (2 * fake).T @ x
    torch.testing.assert_close(layer.latent.grad, expected.detach(), rtol=1e-5, atol=1e-4)
    codes = layer.codes().clone()
    layer.pack_latent()
    assert layer.latent is None and layer.codes().tolist() == codes.tolist()


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.exp(torch.randn(k, generator=g))  # some input channels matter much more
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("fmt", [QuantFormat(4, 32), QuantFormat(3, 32), QuantFormat(2, 32), QuantFormat(4, 0, True)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(fmt, act_order):
    torch.manual_seed(3)
    w = torch.randn(48, 128)
    x = correlated_inputs(2048, 128)
    acc = HessianAccumulator(128)
    for chunk in x.split(500):
        acc.add(chunk)
    torch.testing.assert_close(acc.h, 2 * x.double().T @ x.double() / x.shape[0])
    q, s, z = gptq_quantize(w, acc.h, fmt, act_order=act_order)
    gptq_w = reference_weight(q, s, z, fmt, 128)
    rs, rz = quant_params(w, fmt)
    rtn_w = reference_weight(quantize_codes(w, rs, rz, fmt), rs, rz, fmt, 128)
    err = lambda wq: ((x.double() @ (wq - w.double()).T) ** 2).mean().item()
    assert err(gptq_w) < 0.8 * err(rtn_w)
    assert q.max() <= 2 ** fmt.bits - 1


def tiny_ckpt(tmp_path, **over):
    model = tiny_model(**over)
    return model, save_tiny(model, tmp_path / "float")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_model_save_load_same_logits(tmp_path, method):
    model, src = tiny_ckpt(tmp_path, tie_embeddings=True)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = model(tokens)
    plan = resolve_recipe({"default": "int4-g32-asym", "layers": {"layers.1.*": "int8", "output": "int8"}},
                          linear_names(model))
    calib = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(model, plan, method, calib, log=lambda s: None)
    assert isinstance(model.layers[0].attention.wq, QuantLinear) and model.layers[0].attention.wq.fmt.bits == 4
    assert model.layers[1].feed_forward.w2.fmt.bits == 8
    assert isinstance(model.tok_embeddings, QuantEmbedding)
    with torch.no_grad():
        q_logits = model(tokens)
    rel = ((q_logits - float_logits).norm() / float_logits.norm()).item()
    assert 1e-4 < rel < 0.5  # quantized, and still recognisably the same (chaotic, random) model
    out = save_quantized(model, plan, src, tmp_path / "q", {"method": method})
    loaded = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), q_logits, rtol=1e-5, atol=1e-5)
    float_bytes = (src / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.45 * float_bytes


def test_recipe_errors_and_nan_weights(tmp_path):
    model = tiny_model()
    names = linear_names(model)
    with pytest.raises(ValueError, match="matches no layer"):
        resolve_recipe({"default": "int4-g32", "layers": {"blocks.*": "int8"}}, names)
    plan = resolve_recipe({"default": "int4-g32"}, names)
    assert plan["output"] is None and plan["layers.0.attention.wq"] == QuantFormat(4, 32)
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(model, plan)


def test_cli_bad_recipe_leaves_nothing(tmp_path):
    _, src = tiny_ckpt(tmp_path)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": "int4-g32", "layers": {"nope.*": "int8"}}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "quantize.py", "--checkpoint", str(src), "--mode", "hybrid", "--recipe",
                        str(recipe), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "matches no layer" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, "quantize.py", "--checkpoint", str(src), "--mode", "int4", "--groupsize", "20",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "multiple of 8" in r.stderr and not out.exists()


def test_calibrated_methods_beat_rtn_on_tiny_model_and_awq_returns_clips():
    model = tiny_model(seed=4)
    plan = resolve_recipe({"default": "int3-g32-asym"}, linear_names(model))
    calib = torch.randint(0, TINY["vocab_size"], (8, 32), generator=torch.Generator().manual_seed(5))
    tokens = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(tokens)
    errs = {}
    for method in ["rtn", "awq", "gptq", "awq+gptq"]:
        m = tiny_model(seed=4)
        clips = quantize_model(m, plan, method, calib, log=lambda s: None)
        with torch.no_grad():
            errs[method] = ((m(tokens) - ref) ** 2).mean().item()
        if method == "awq":
            assert set(clips) and all(not n.endswith(("wq", "wk")) for n in clips)
            w2 = "layers.0.feed_forward.w2"
            assert clips[w2].shape == (TINY["dim"], TINY["intermediate_size"] // 32)
    assert max(errs["awq"], errs["gptq"], errs["awq+gptq"]) < errs["rtn"]


def test_awq_clip_search_never_worse_than_no_clip():
    from calibrate import awq_search_clip
    from qlinear import fake_quantize
    torch.manual_seed(7)
    w = torch.randn(16, 64)
    w[:, 5] *= 8  # an outlier column stretches every group's range
    x = torch.randn(256, 64)
    fmt = QuantFormat(2, 32)
    clip = awq_search_clip(x, w, fmt)
    err = lambda wq: ((x @ (wq - w).T) ** 2).mean().item()
    assert err(fake_quantize(w, fmt, clip)) <= err(fake_quantize(w, fmt))
    assert (clip < w.abs().view(16, 2, 32).amax(-1)).any()  # it does clip somewhere
