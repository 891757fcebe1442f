"""Y = X @ W^T with W stored as packed codes (kernels/packing.py, kernels/formats.py), dequantized inside Triton
kernels.

    y = quant_matmul(x, packed, scales, zeros, bits=4, group_size=128)   # x [..., K] -> y [..., N]

x is fp16, bf16 or fp32 (fp32 accumulation, output in x's dtype); packed uint8 [N, K * bits / 8]; scales and
zeros float [N, K // group_size]. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
This module imports without triton; the kernels (kernels/triton_quant_kernels.py) load on the first call.
"""
import torch

from kernels.formats import FEW_ROWS, scalar_format
from kernels.packing import packed_size, word_layout

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quant_matmul(x, packed, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """gemv for M <= FEW_ROWS rows of x (the weight read dominates: decode, speculative verify), gemm otherwise."""
    fn = quant_matmul_gemv if x.shape[:-1].numel() <= FEW_ROWS else quant_matmul_gemm
    return fn(x, packed, scales, zeros, bits, group_size)


def quant_matmul_gemv(x, packed, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Decode-shaped: one program per row of x and block of N, streaming its packed weights once."""
    kernels = _kernels()
    x2, packed, scales, zeros, y = _prepare(x, packed, scales, zeros, bits, group_size, kernels.INTERPRET)
    (m, k), n = x2.shape, packed.shape[0]
    codes_per_word, word_bytes = word_layout(bits)

    def grid(meta):
        return m, _cdiv(n, meta["BLOCK_N"])

    kernels.gemv_kernel[grid](x2, packed, scales, zeros, y, n, k, packed.stride(0), scales.stride(0), BITS=bits,
                              GROUP=group_size, CODES_PER_WORD=codes_per_word, WORD_BYTES=word_bytes,
                              BLOCK_K=_block_k(group_size, 128))
    return y.view(*x.shape[:-1], n)


def quant_matmul_gemm(x, packed, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Prefill-shaped: [BLOCK_M, BLOCK_N] output tiles, each weight tile dequantized once per tile and fed to tl.dot."""
    kernels = _kernels()
    x2, packed, scales, zeros, y = _prepare(x, packed, scales, zeros, bits, group_size, kernels.INTERPRET)
    (m, k), n = x2.shape, packed.shape[0]
    codes_per_word, word_bytes = word_layout(bits)
    # fp32 x: plain tf32 only where torch's own matmuls may use it, else 3xTF32 (about fp32's accuracy, still on
    # tensor cores: an "ieee" fp32 dot runs on CUDA cores and spills registers at every tile size)
    precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)

    kernels.gemm_kernel[grid](x2, packed, scales, zeros, y, m, n, k, packed.stride(0), scales.stride(0),
                              _next_power_of_2(m), BITS=bits, GROUP=group_size, CODES_PER_WORD=codes_per_word,
                              WORD_BYTES=word_bytes, DOT_PRECISION=precision, BLOCK_K=_block_k(group_size, 64))
    return y.view(*x.shape[:-1], n)


def _prepare(x, packed, scales, zeros, bits, group_size, interpret):
    """Validate; return contiguous x as [M, K], packed, scales, zeros, and the output [M, N]."""
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_size(k, bits):
        raise ValueError(f"packed must be uint8 [N, {packed_size(k, bits)}] for {bits}-bit codes and K={k}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    # a tile of BLOCK_K codes (a power of two dividing the group, >= 16 for tl.dot) shares one scale and zero
    multiple = scalar_format(bits).triton_group_multiple
    if multiple is None:
        raise ValueError(f"no Triton kernel takes {bits}-bit codes")
    if group_size <= 0 or k % group_size or group_size % multiple:
        raise ValueError(f"group_size must be a multiple of {multiple} that divides K={k}, got {group_size}")
    groups = (packed.shape[0], k // group_size)
    if scales.shape != groups or zeros.shape != groups:
        raise ValueError(f"scales and zeros must have shape {groups}, "
                         f"got {tuple(scales.shape)} and {tuple(zeros.shape)}")
    if not (scales.dtype.is_floating_point and zeros.dtype.is_floating_point):
        raise ValueError(f"scales and zeros must be float tensors, got {scales.dtype} and {zeros.dtype}")
    devices = {t.device for t in (x, packed, scales, zeros)}
    if len(devices) != 1:
        raise ValueError(f"x, packed, scales and zeros must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpret:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], packed.shape[0], dtype=x.dtype, device=x.device)
    return x2, packed.contiguous(), scales.contiguous(), zeros.contiguous(), y


def _kernels():
    try:
        from kernels import triton_quant_kernels
    except ImportError as e:
        raise RuntimeError(f"the quantized matmul kernels need triton, which failed to import: {e}") from e
    return triton_quant_kernels


def _block_k(group_size: int, cap: int) -> int:
    """The largest power of two dividing the group (so a K tile has one scale), at most cap."""
    return min(group_size & -group_size, cap)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
