"""One function picks the kernel for a quantized matmul by format x device x batch; two say when a float Linear
and the attention of a few query tokens take the C++ CPU kernels.

Weights arrive as QuantLinear stores them: `qweight` packed codes (uint8; int8 for 8-bit, already
offset to signed), `scales`/`zeros` per group ([N, G]; zeros None = symmetric, 2^(bits-1))."""
import torch
import torch.nn.functional as F

from kernels.cpu import DENSE_MAX_ROWS, cpu_kernels_available, quant_gemv
from kernels.packing import dequantize

GEMV_MAX_ROWS = 8  # up to this many rows of x (decode, small batches) the GEMV kernels win; beyond, GEMM


@torch.compiler.assume_constant_result
def _cpu_kernels_ready() -> bool:
    """Whether the C++ kernels are built (building them on the first ask). Under torch.compile it runs once, at
    trace time, and the graph keeps the answer: a graph compiled before any eager call still gets the kernels."""
    return cpu_kernels_available()


def dense_gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T should run on kernels.cpu.dense_gemv: decode- or verify-sized CPU input, fp32 or bf16 x and
    w alike, no gradient wanted. Decode (1 row) takes it too, though Inductor's fused loop in model.Linear is ~4%
    faster there (compiled, 1 thread, scratch A/B): one kernel for every row count is what makes a verify step
    score each token bit for bit as decode does, so speculative greedy output equals plain greedy in bf16 too."""
    return x.shape[:-1].numel() <= DENSE_MAX_ROWS and _cpu_inference(x, w)


def few_query_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, input_pos) -> bool:
    """Whether kernels.cpu.few_query_attention can serve q [B, H, S, D] against the cache: decode-sized CPU
    queries at cache positions, q and cache of one dtype (fp32 or bf16), no gradient wanted."""
    return input_pos is not None and q.shape[0] * q.shape[2] <= DENSE_MAX_ROWS and _cpu_inference(q, k_cache)


def _cpu_inference(x: torch.Tensor, t: torch.Tensor) -> bool:
    """CPU tensors of one float dtype the C++ kernels take (fp32 or bf16), no gradient wanted, kernels built."""
    return (x.device.type == "cpu" and x.dtype == t.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)) and _cpu_kernels_ready())


def dequantize_weight(qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    """Float32 [N, K] weight as QuantLinear stores it (8-bit codes offset to signed int8)."""
    if bits == 8:
        return (qweight.float() + 128 - (128 if zeros is None else zeros.float())) * scales.float()
    return dequantize(qweight, scales, zeros, bits, group_size or k, k)


def quant_linear(x, qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    rows = x.shape[:-1].numel()
    g = group_size or k
    if x.device.type == "cuda" and bits in (2, 3, 4) and k % g == 0 and g % 16 == 0:  # the Triton kernels' tiling
        from kernels.triton_quant import quant_matmul
        z = zeros if zeros is not None else torch.full_like(scales, 2 ** (bits - 1))
        y = quant_matmul(x.reshape(rows, k), qweight, scales, z, bits, g)
        return y.view(*x.shape[:-1], -1)
    if (x.device.type == "cpu" and rows <= GEMV_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16)
            and _cpu_kernels_ready()):
        return quant_gemv(x, qweight, scales, zeros, bits, group_size)
    return F.linear(x, dequantize_weight(qweight, scales, zeros, bits, group_size, k).to(x.dtype))
