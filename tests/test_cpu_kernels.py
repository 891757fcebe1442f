"""kernels/cpu.py: the CPU kernels (quantized and dense matrix-vector, few-query attention) against float64 math.

The first test builds the C++ extension (about a minute, then cached); without a working compiler the tests skip
with the build error as the reason.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernels.cpu import (  # noqa: E402
    cpu_kernels_available, cpu_kernels_error, dense_gemv, few_query_attention, quant_dequantize, quant_gemv)
from kernels.packing import dequantize_packed, pack  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def built():
    if not cpu_kernels_available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels_error()}")


def make(n, k, bits, group_size, asym, scale_dtype=torch.float32, seed=0):
    """Packed weights as QuantLinear stores them, and the float64 W they stand for."""
    gen = torch.Generator().manual_seed(seed)
    g = group_size or k
    groups = -(-k // g)
    q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    qweight = (q.to(torch.int16) - 128).to(torch.int8) if bits == 8 else pack(q, bits)
    scales = (torch.rand(n, groups, generator=gen) + 0.5).to(scale_dtype) / 2**bits
    zeros = (torch.rand(n, groups, generator=gen) * (2**bits - 1)).to(scale_dtype) if asym else None
    z = zeros.double() if asym else torch.full((n, groups), 2.0 ** (bits - 1), dtype=torch.float64)
    expand = lambda t: t.repeat_interleave(g, dim=1)[:, :k]  # noqa: E731  (ragged last group: cut)
    return (qweight, scales, zeros), (q.double() - expand(z)) * expand(scales.double())


def check(x, w_ref, y):
    ref = x.double() @ w_ref.T
    assert y.dtype == x.dtype and y.shape == ref.shape
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])  # 128 does not divide K = 576: a ragged last group
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_matches_float64(bits, group_size, asym, dtype, m):
    weights, w_ref = make(72, 576, bits, group_size, asym, seed=bits + group_size)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).to(dtype)
    check(x, w_ref, quant_gemv(x, *weights, bits, group_size))


@pytest.mark.parametrize("bits,n,k,group_size,scale_dtype", [
    (8, 40, 576, 0, torch.float32),    # int8 as QuantLinear stores it: one scale per row
    (4, 5, 64, 64, torch.bfloat16),    # a row shorter than one 64-byte vector; bf16 scales and zeros
    (3, 9, 1000, 40, torch.float32),   # groups not a power of two, 3-bit rows ending inside a word triple
    (2, 33, 576, 24, torch.bfloat16),  # 2-bit groups of 8 mod 16 take the plain (non-AVX-512) loop
    (4, 17, 4096, 128, torch.float32),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_shapes(bits, n, k, group_size, scale_dtype, dtype):
    weights, w_ref = make(n, k, bits, group_size, asym=bits != 8, scale_dtype=scale_dtype, seed=k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    check(x, w_ref, quant_gemv(x, *weights, bits, group_size))


def test_wide_dynamic_range_of_x():
    """x is scaled per few elements inside the kernel: tiny values next to large ones keep their precision."""
    weights, w_ref = make(16, 512, 4, 32, asym=True)
    x = torch.randn(1, 512, dtype=torch.float64)
    x[0, ::7] *= 1e4
    x[0, 3::11] *= 1e-6
    check(x.float(), w_ref, quant_gemv(x.float(), *weights, 4, 32))


def test_leading_dims_and_non_finite_x():
    weights, w_ref = make(8, 128, 4, 32, asym=True)
    x = torch.randn(2, 3, 128)
    y = quant_gemv(x, *weights, 4, 32)
    assert y.shape == (2, 3, 8)
    check(x.reshape(6, 128), w_ref, y.reshape(6, 8))
    x[0, 0, 5] = float("inf")
    x[1, 2, 70] = float("nan")
    y = quant_gemv(x, *weights, 4, 32)
    assert not y[0, 0].isfinite().any() and y[1, 2].isnan().all() and y[0, 1:].isfinite().all()


def test_rejects_bad_inputs():
    (qweight, scales, zeros), _ = make(8, 128, 4, 32, asym=True)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8"):
        quant_gemv(x, qweight, scales, zeros, 5, 32)
    with pytest.raises(RuntimeError, match="qweight must be"):
        quant_gemv(x, qweight[:, :-1], scales, zeros, 4, 32)
    with pytest.raises(RuntimeError, match="scales must be"):
        quant_gemv(x, qweight, scales[:, :-1], zeros, 4, 32)
    with pytest.raises(RuntimeError, match="group_size must be"):
        quant_gemv(x, qweight, scales, zeros, 4, 12)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        quant_gemv(x.double(), qweight, scales, zeros, 4, 32)


def test_compiled_graph_matches_eager():
    weights, _ = make(64, 256, 4, 64, asym=True)
    x = torch.randn(1, 256)

    def f(x):
        return torch.relu(quant_gemv(x * 2, *weights, 4, 64)) + 1

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x), rtol=0, atol=0)


def test_compiled_quant_linear_calls_the_kernel():
    """A decode graph compiled before any eager call must still take the C++ kernel, not dequantize + matmul
    (which made compiled int8 decode five times slower)."""
    from qlinear import QuantFormat, QuantLinear

    weights, w_ref = make(64, 256, 4, 64, asym=True)
    m = QuantLinear(256, 64, QuantFormat.parse("int4-g64-asym"))
    m.qweight, m.scales, m.zeros = weights
    x = torch.randn(1, 1, 256)
    torch._dynamo.reset()
    with torch.profiler.profile() as prof:
        y = torch.compile(m, fullgraph=True)(x)
    assert "bitfast::quant_gemv" in {e.name for e in prof.events()}
    check(x.view(1, -1), w_ref, y.view(1, -1))


# quant_dequantize: the weight that many-row products (prefill, scoring) multiply by

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [0, 24, 64, 128])  # 24: not a power of two; 128 and 24 ragged at K = 200
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_float64_and_the_tensor_op_version(bits, group_size, asym, scale_dtype):
    k = 200 if bits != 3 else 192
    (qweight, scales, zeros), w_ref = make(37, k, bits, group_size, asym, scale_dtype)
    w32 = quant_dequantize(qweight, scales, zeros, bits, group_size, k, torch.float32)
    torch.testing.assert_close(w32.double(), w_ref, rtol=1e-6, atol=1e-7)
    if bits != 8:  # the tensor-op version reads the packed layout (int8 is stored offset to signed)
        assert torch.equal(w32, dequantize_packed(qweight, scales, zeros, bits, group_size or k, k))
    assert torch.equal(quant_dequantize(qweight, scales, zeros, bits, group_size, k, torch.bfloat16),
                       w32.to(torch.bfloat16))


def test_dequantize_rejects_bad_inputs():
    (qweight, scales, zeros), _ = make(8, 128, 4, 32, asym=True)
    with pytest.raises(RuntimeError, match="bits must be"):
        quant_dequantize(qweight, scales, zeros, 5, 32, 128, torch.float32)
    with pytest.raises(RuntimeError, match="qweight must be"):
        quant_dequantize(qweight, scales, zeros, 4, 32, 120, torch.float32)
    with pytest.raises(RuntimeError, match="scales must be"):
        quant_dequantize(qweight, scales[:, :-1], zeros, 4, 32, 128, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be"):
        quant_dequantize(qweight, scales, zeros, 4, 32, 128, torch.float16)


# dense_gemv: the float Linear's kernel for decode and speculative verify (1-8 rows)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k", [(40, 576), (7, 100), (3, 17)])  # K not a multiple of the 16/32-wide vectors too
def test_dense_gemv_matches_float64_and_is_row_independent(dtype, m, n, k):
    gen = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = dense_gemv(x, w)
    check(x, w.double(), y)
    for i in range(m):  # a row's result does not depend on the rows beside it (verify scores as decode would)
        assert torch.equal(dense_gemv(x[i:i + 1], w), y[i:i + 1])


def test_dense_gemv_rejects_bad_inputs():
    w, x = torch.randn(8, 64), torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        dense_gemv(torch.randn(9, 64), w)
    with pytest.raises(RuntimeError, match="w must have x's dtype"):
        dense_gemv(x, w.bfloat16())
    with pytest.raises(RuntimeError, match=r"w must be \[N, 64\]"):
        dense_gemv(x, w[:, :32])


# few_query_attention: decode / verify attention against the static KV cache

def sdpa_float64(q, k_cache, v_cache, pos):
    b, _, s, _ = q.shape
    mask = torch.tril(torch.ones(k_cache.shape[2], k_cache.shape[2], dtype=torch.bool))[pos.expand(b, s)]
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k_cache.double(), v_cache.double(),
                                                            attn_mask=mask.unsqueeze(1), enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,kvh,s,t,d", [(1, 9, 3, 1, 100, 64), (1, 9, 3, 4, 100, 64), (2, 4, 2, 3, 37, 20),
                                            (1, 8, 8, 2, 50, 128)])
def test_few_query_attention_matches_float64(dtype, b, h, kvh, s, t, d):
    gen = torch.Generator().manual_seed(h * t + s)
    q = torch.randn(b, s, h, d, generator=gen).to(dtype).transpose(1, 2)  # the model's strided layout
    k_cache, v_cache = (torch.randn(b, kvh, t, d, generator=gen).to(dtype) for _ in range(2))
    pos = torch.randint(0, t - s, (b, 1), generator=gen) + torch.arange(s)  # per-row positions, as batched decode
    y = few_query_attention(q, k_cache, v_cache, pos)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), sdpa_float64(q, k_cache, v_cache, pos), rtol=tol, atol=tol)
    for i in range(s):  # a query's result does not depend on the other queries in the call
        assert torch.equal(few_query_attention(q[:, :, i:i + 1], k_cache, v_cache, pos[:, i:i + 1]), y[:, :, i:i + 1])
    if b == 1:  # shared positions [S] read like [1, S]
        assert torch.equal(few_query_attention(q, k_cache, v_cache, pos[0]), y)


def test_few_query_attention_ignores_cache_beyond_position():
    """Positions past a query's own are never read: garbage (even NaN) there changes nothing."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 16, generator=gen)
    k_cache, v_cache = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    pos = torch.tensor([20, 21])
    y = few_query_attention(q, k_cache, v_cache, pos)
    k_cache[:, :, 22:], v_cache[:, :, 22:] = float("nan"), float("nan")
    assert torch.equal(few_query_attention(q, k_cache, v_cache, pos), y)


def test_few_query_attention_rejects_bad_inputs():
    q, kc = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        few_query_attention(q, kc, kc, torch.tensor([10]))
    with pytest.raises(RuntimeError, match="must share a dtype"):
        few_query_attention(q.bfloat16(), kc, kc, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="input_pos must be int64"):
        few_query_attention(q, kc, kc, torch.tensor([3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="do not fit q"):
        few_query_attention(torch.randn(1, 3, 1, 16), kc, kc, torch.tensor([3]))
