"""qlinear.fuse_projections: q|k|v and gate|up as one layer give the logits the separate layers give, float and
quantized, full forward and cached decode, eager and compiled; layers that cannot fuse are left alone."""
import pytest
import torch

from calibrate import quantize_model
from checkpoint import load_model, save_quantized
from decoding import compile_step, decode_one_token
from qlinear import QuantFormat, QuantLinear, fuse_linears, linear_names, resolve_recipe, rtn_layer
from tests.test_model import TINY, tiny_model
from tests.tiny import save_tiny

RECIPES = {
    "float": None,
    "int4": {"default": "int4-g32-asym", "quantize_output": True},
    "mixed": {"default": "int2-g32-sym", "layers": {"layers.1.*": "int8", "layers.0.attention.wk": "int3-g32"}},
}


def checkpoint(tmp_path, recipe):
    model = tiny_model(seed=3)
    src = save_tiny(model, tmp_path / "float")
    if recipe is None:
        return src
    plan = resolve_recipe(recipe, linear_names(model))
    quantize_model(model, plan, "rtn", log=lambda s: None)
    return save_quantized(model, plan, src, tmp_path / "q", {"method": "rtn"})


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_gives_the_same_logits(tmp_path, recipe, dtype, one_thread):
    ckpt = checkpoint(tmp_path, RECIPES[recipe])
    plain, fused = load_model(ckpt, dtype=dtype), load_model(ckpt, dtype=dtype, fuse=True)
    attn = fused.layers[0].attention
    # layers.0: wk int3 beside int2 wq/wv does not fuse; the FFN does
    assert (attn.wqkv is None) == (recipe == "mixed") and fused.layers[0].feed_forward.w13 is not None
    assert fused.layers[1].attention.wqkv is not None and fused.layers[1].attention.wq is None
    tokens = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(tokens), fused(tokens))
        for m in (plain, fused):
            m.setup_caches(2, 32)
        pos = torch.arange(12)
        assert torch.equal(plain(tokens, pos), fused(tokens, pos))
        for i in range(12, 15):  # cached decode, one token (the few-row kernels)
            step = tokens[:, i - 12:i - 11]
            assert torch.equal(plain(step, torch.tensor([i])), fused(step, torch.tensor([i])))


def test_compiled_fused_decode_equals_eager_unfused(tmp_path, one_thread):
    ckpt = checkpoint(tmp_path, RECIPES["int4"])
    plain, fused = load_model(ckpt, dtype=torch.bfloat16), load_model(ckpt, dtype=torch.bfloat16, fuse=True)
    step = compile_step(decode_one_token, "cpu")
    for m in (plain, fused):
        m.setup_caches(1, 32)
    eager, compiled = [torch.tensor([[5]])], [torch.tensor([[5]])]
    with torch.no_grad():
        for i in range(6):
            eager.append(decode_one_token(plain, eager[-1], torch.tensor([i])).view(1, 1))
            compiled.append(step(fused, compiled[-1], torch.tensor([i])).view(1, 1))
    assert [t.item() for t in compiled] == [t.item() for t in eager]


def test_layers_that_cannot_fuse_are_left_alone():
    w = torch.randn(16, 32)
    fmt = QuantFormat(4, 32, False)
    a, b = rtn_layer(w, fmt), rtn_layer(w, fmt)
    b.train_mode()  # fake-quant (training): not a packed layer
    assert fuse_linears([a, b]) is None
    fused = fuse_linears([a, rtn_layer(2 * w, fmt)])
    assert isinstance(fused, QuantLinear) and fused.out_features == 32
    x = torch.randn(3, 32)
    torch.testing.assert_close(fused(x)[:, 16:], 2 * a(x), rtol=1e-5, atol=1e-5)
