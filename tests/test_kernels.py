"""kernels/: bit layout, pack/unpack round trips, dequantize and the Triton matmuls, each against an independent
reference (python-int bit streams; float64 math on the integer codes).

Triton chooses interpreter or compiler when a kernel is defined, so the kernel tests run once, in a subprocess with
TRITON_INTERPRET=1 (this file as a script); setting it here would leak into every other test in the session.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # also when run as the kernel-test subprocess
from kernels import triton_quant  # noqa: E402
from kernels.formats import FEW_ROWS, SCALAR_BITS  # noqa: E402
from kernels.packing import (dequantize_packed, pack, pack_int2, pack_int3, pack_int4, packed_size,  # noqa: E402
                             unpack, unpack_int2, unpack_int3, unpack_int4)

BITS = SCALAR_BITS  # (2, 3, 4, 8)
N = 72  # not a multiple of the kernels' BLOCK_N


def random_codes(shape, bits, seed):
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def bit_stream_reference(codes, bits):
    """The spec as one little-endian python integer per row: code k at bits k*bits."""
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    packed = [sum(c << (bits * k) for k, c in enumerate(row)).to_bytes(len(row) * bits // 8, "little") for row in rows]
    return torch.tensor([list(p) for p in packed], dtype=torch.uint8).reshape(*codes.shape[:-1], -1)


def weights_reference(codes, scales, zeros, group):
    """float64 (q - z) * s, scales and zeros repeated over each group."""
    return (codes.double() - zeros.double().repeat_interleave(group, -1)) * scales.double().repeat_interleave(group, -1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(37, 48), (1, 8), (2, 5, 24)])
def test_pack_matches_bit_stream_and_round_trips(bits, shape):
    codes = random_codes(shape, bits, seed=bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] * bits // 8)
    assert torch.equal(packed, bit_stream_reference(codes, bits))
    assert torch.equal(unpack(packed, bits, shape[-1]), codes)


@pytest.mark.parametrize("pack_fn,unpack_fn,bits", [(pack_int2, unpack_int2, 2), (pack_int3, unpack_int3, 3),
                                                    (pack_int4, unpack_int4, 4)])
def test_named_packers_round_trip_any_integer_dtype(pack_fn, unpack_fn, bits):
    codes = random_codes((5, 64), bits, seed=10 + bits)
    packed = pack_fn(codes.to(torch.int64))
    assert packed.shape == (5, 64 * bits // 8) and packed_size(64, bits) == 64 * bits // 8
    assert torch.equal(unpack_fn(packed), codes)


def test_documented_layout_examples():
    assert pack_int4(torch.tensor([[1, 2]])).tolist() == [[0x21]]  # k=0 low nibble
    assert pack_int2(torch.tensor([[1, 2, 3, 0]])).tolist() == [[0b00_11_10_01]]
    # 24-bit word 0x1f58d1 = 1 | 2<<3 | 3<<6 | ... | 7<<18, bytes little-endian
    assert pack_int3(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])).tolist() == [[0xD1, 0x58, 0x1F]]


@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes(bits):
    top = (1 << bits) - 1
    for codes, byte in ((torch.zeros(3, 32, dtype=torch.uint8), 0), (torch.full((3, 32), top, dtype=torch.uint8), 255)):
        packed = pack(codes, bits)
        assert packed.eq(byte).all()
        assert torch.equal(unpack(packed, bits, 32), codes)
    alternating = torch.tensor([0, top] * 16, dtype=torch.uint8).expand(3, 32)
    packed = pack(alternating, bits)
    assert torch.equal(packed, bit_stream_reference(alternating, bits))
    assert torch.equal(unpack(packed, bits, 32), alternating)


@pytest.mark.parametrize("call,match", [
    (lambda: pack(torch.zeros(2, 8), 4), "integer tensor"),
    (lambda: pack(torch.zeros(2, 8, dtype=torch.int32), 5), "bits must be one of"),
    (lambda: pack(torch.zeros(2, 3, dtype=torch.int32), 4), "multiple of 2"),
    (lambda: pack(torch.zeros(2, 6, dtype=torch.int32), 2), "multiple of 4"),
    (lambda: pack(torch.zeros(2, 12, dtype=torch.int32), 3), "multiple of 8"),
    (lambda: pack(torch.full((2, 8), -1), 3), r"\[0, 7\], got \[-1, -1\]"),
    (lambda: pack(torch.full((2, 8), 16), 4), r"\[0, 15\]"),
    (lambda: pack(torch.full((2, 8), 256), 8), r"\[0, 255\]"),
    (lambda: unpack(torch.zeros(2, 4, dtype=torch.int32), 4, 8), "uint8"),
    (lambda: unpack(torch.zeros(2, 4, dtype=torch.uint8), 4, 16), "8 bytes per row"),
    (lambda: unpack_int3(torch.zeros(2, 4, dtype=torch.uint8)), "3-byte words"),
    (lambda: dequantize_packed(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 4, 12, 16),
     "must have shape"),  # 16 = 12 + a ragged group of 4: two groups
    (lambda: dequantize_packed(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 2), 4, 8, 16),
     "must have shape"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [8, 32])
def test_dequantize_matches_float64(bits, group):
    gen = torch.Generator().manual_seed(20 + bits)
    codes = random_codes((N, 96), bits, seed=bits)
    scales = torch.rand(N, 96 // group, generator=gen) + 0.1
    zeros = torch.rand(N, 96 // group, generator=gen) * ((1 << bits) - 1)  # not integers
    w = dequantize_packed(pack(codes, bits), scales, zeros, bits, group, 96)
    assert w.dtype == torch.float32 and w.shape == (N, 96)
    torch.testing.assert_close(w.double(), weights_reference(codes, scales, zeros, group), rtol=1e-6, atol=1e-6)


def test_unpack_and_dequantize_compile_without_graph_breaks():
    codes = random_codes((N, 64), 3, seed=3)
    scales, zeros = torch.rand(N, 2) + 0.1, torch.full((N, 2), 4.0)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))

    def matvec(packed, scales, zeros, x):
        return (dequantize_packed(packed, scales, zeros, 3, 32, 64) * x).sum(-1)

    compiled = torch.compile(matvec, fullgraph=True, backend="aot_eager")
    ref = weights_reference(codes, scales, zeros, 32) @ x.double()
    torch.testing.assert_close(compiled(pack(codes, 3), scales, zeros, x).double(), ref, rtol=1e-5, atol=1e-5)


# --- Triton kernels ---------------------------------------------------------------------------------------------

def quant_case(bits, group, m, dtype, n=N, seed=0):
    """x [m, 3 * group], codes and packed [n, ...], positive scales and non-integer zeros, all but the codes in
    dtype (as a model holds them): never all zero."""
    k, dtype = 3 * group, getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed + 1000 * bits + group + 7 * m)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) + 0.1).to(dtype)
    zeros = (torch.rand(n, k // group, generator=gen) * ((1 << bits) - 1)).to(dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x, codes, pack(codes, bits), scales, zeros


def matmul_reference(x, codes, scales, zeros, group):
    return x.double() @ weights_reference(codes, scales, zeros, group).T


TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
TRITON_CASES = (
    [(bits, group, m, "float32") for bits in BITS for group in (32, 64, 128) for m in (1, 3, 17)]
    + [(bits, 128, m, "bfloat16") for bits in BITS for m in (1, 3, 17)]
    + [(4, 64, m, "float16") for m in (1, 17)]
    + [(3, 96, 3, "float32")]  # a group that is not a power of two: several K tiles per group
)


def triton_kernels(m):
    """The gemm for every M, the gemv where quant_matmul would pick it (more rows only add programs)."""
    kernels = {"gemm": triton_quant.quant_matmul_gemm}
    if m <= FEW_ROWS:
        kernels["gemv"] = triton_quant.quant_matmul_gemv
    return kernels


def run_triton_cases(out_path):
    """Subprocess body: kernel outputs for every case, plus quant_matmul on 3-D x."""
    outputs = {}
    for case in TRITON_CASES:
        x, _, packed, scales, zeros = quant_case(*case)
        outputs[case] = {name: fn(x, packed, scales, zeros, case[0], case[1])
                         for name, fn in triton_kernels(case[2]).items()}
    for m in (3, 9):  # [2, m, K]: 6 rows take the gemv, 18 the gemm
        x, _, packed, scales, zeros = quant_case(3, 32, 2 * m, "float32")
        outputs["batched", m] = triton_quant.quant_matmul(x.view(2, m, -1), packed, scales, zeros, 3, 32)
    torch.save(outputs, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "outputs.pt"
    done = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_kernels_match_float64(interpreted, case):
    bits, group, m, dtype = case
    x, codes, _, scales, zeros = quant_case(*case)
    ref = matmul_reference(x, codes, scales, zeros, group)
    tol = TOLERANCE[dtype]
    assert interpreted[case].keys() == triton_kernels(m).keys()
    for name, y in interpreted[case].items():
        assert y.dtype == x.dtype and y.shape == (m, N), name
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("m", [3, 9])
def test_quant_matmul_keeps_leading_dims(interpreted, m):
    x, codes, _, scales, zeros = quant_case(3, 32, 2 * m, "float32")
    ref = matmul_reference(x, codes, scales, zeros, 32).view(2, m, N)
    y = interpreted["batched", m]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("shape,kernel", [((8, 64), "gemv"), ((2, 4, 64), "gemv"), ((9, 64), "gemm"),
                                          ((3, 3, 64), "gemm")])
def test_quant_matmul_picks_gemv_up_to_8_rows(monkeypatch, shape, kernel):
    for name in ("gemv", "gemm"):
        monkeypatch.setattr(triton_quant, f"quant_matmul_{name}", lambda *args, name=name: name)
    assert triton_quant.quant_matmul(torch.zeros(shape), None, None, None, 4, 32) == kernel


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(1, 64, dtype=torch.int32)), "x must be float16"),
    (dict(packed=torch.zeros(8, 31, dtype=torch.uint8)), r"packed must be uint8 \[N, 32\]"),
    (dict(packed=torch.zeros(8, 32, dtype=torch.int8)), "packed must be uint8"),
    (dict(group_size=8, scales=torch.ones(8, 8), zeros=torch.ones(8, 8)), "multiple of 16"),
    (dict(group_size=48), "divides K=64"),
    (dict(scales=torch.ones(8, 1)), r"must have shape \(8, 2\)"),
    (dict(bits=5), "bits must be one of"),
])
def test_triton_bad_input_raises_value_error(change, match):
    args = dict(x=torch.zeros(1, 64), packed=torch.zeros(8, 32, dtype=torch.uint8), scales=torch.ones(8, 2),
                zeros=torch.ones(8, 2), bits=4, group_size=32)
    with pytest.raises(ValueError, match=match):
        triton_quant.quant_matmul(**{**args, **change})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_triton_rejects_cpu_tensors_when_compiling():
    with pytest.raises(ValueError, match="need CUDA tensors"):
        triton_quant.quant_matmul(torch.zeros(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2),
                                  torch.ones(8, 2), 4, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 5, 77])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_compiled_on_cuda_matches_float64(bits, m, dtype):
    x, codes, packed, scales, zeros = quant_case(bits, 128, m, dtype, n=200)
    ref = matmul_reference(x, codes, scales, zeros, 128)
    tol = TOLERANCE[dtype]
    for fn in (triton_quant.quant_matmul_gemv, triton_quant.quant_matmul_gemm):
        y = fn(x.cuda(), packed.cuda(), scales.cuda(), zeros.cuda(), bits, 128).cpu()
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


if __name__ == "__main__":
    run_triton_cases(sys.argv[1])


def test_dequantize_ragged_last_group_and_symmetric():
    torch.manual_seed(11)
    codes = torch.randint(0, 16, (5, 40), dtype=torch.uint8)
    scales, zeros = torch.rand(5, 3) + 0.1, torch.randint(0, 16, (5, 3)).float()
    idx = torch.arange(40) // 16  # groups of 16, 16 and a ragged 8
    ref = (codes.double() - zeros.double()[:, idx]) * scales.double()[:, idx]
    torch.testing.assert_close(dequantize_packed(pack(codes, 4), scales, zeros, 4, 16, 40).double(), ref)
    sym = (codes.double() - 8) * scales.double()[:, idx]
    torch.testing.assert_close(dequantize_packed(pack(codes, 4), scales, None, 4, 16, 40).double(), sym)
