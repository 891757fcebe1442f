"""One function picks the kernel for a quantized matmul by format x device x batch; two say when a float Linear
and the attention of a few query tokens take the C++ CPU kernels.

Weights arrive as QuantLinear stores them: `qweight` packed codes (uint8; int8 where the format table says
stored_signed, already offset to signed), `scales`/`zeros` per group ([N, G]; zeros None = symmetric, 2^(bits-1)).
Which kernel serves which bit width is read from kernels/formats.py; "a few rows" is its FEW_ROWS."""
import torch
import torch.nn.functional as F

from kernels.cpu import cpu_kernels_available, quant_dequantize, quant_gemv
from kernels.formats import FEW_ROWS, scalar_format
from kernels.packing import dequantize_packed


@torch.compiler.assume_constant_result
def _cpu_kernels_ready() -> bool:
    """Whether the C++ kernels are built (building them on the first ask). Under torch.compile it runs once, at
    trace time, and the graph keeps the answer: a graph compiled before any eager call still gets the kernels."""
    return cpu_kernels_available()


def dense_gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x @ w.T should run on kernels.cpu.dense_gemv: decode- or verify-sized CPU input, fp32 or bf16 x and
    w alike, no gradient wanted. Decode (1 row) takes it too, though Inductor's fused loop in model.Linear is a
    little faster there: one kernel for every row count is what makes a verify step score each token bit for bit
    as decode does, so speculative greedy output equals plain greedy in bf16 too."""
    return x.shape[:-1].numel() <= FEW_ROWS and _cpu_inference(x, w)


def few_query_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, input_pos) -> bool:
    """Whether kernels.cpu.few_query_attention can serve q [B, H, S, D] against the cache: decode-sized CPU
    queries at cache positions, q and cache of one dtype (fp32 or bf16), no gradient wanted."""
    return input_pos is not None and q.shape[0] * q.shape[2] <= FEW_ROWS and _cpu_inference(q, k_cache)


def _cpu_inference(x: torch.Tensor, t: torch.Tensor) -> bool:
    """CPU tensors of one float dtype the C++ kernels take (fp32 or bf16), no gradient wanted, kernels built."""
    return (x.device.type == "cpu" and x.dtype == t.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)) and _cpu_kernels_ready())


def dequantize_weight(qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    """Float32 [N, K] weight as QuantLinear stores it: packed codes (kernels.packing.dequantize_packed), or codes
    offset to signed int8 where the format table says stored_signed."""
    if scalar_format(bits).stored_signed:
        offset, g = 1 << (bits - 1), group_size or k
        per_weight = lambda t: t.float().repeat_interleave(g, dim=-1)[..., :k]  # noqa: E731 ([N, G] -> [N, K])
        return (qweight.float() + offset - (offset if zeros is None else per_weight(zeros))) * per_weight(scales)
    return dequantize_packed(qweight, scales, zeros, bits, group_size or k, k)


def quant_linear(x, qweight, scales, zeros, bits: int, group_size: int, k: int) -> torch.Tensor:
    rows = x.shape[:-1].numel()
    fmt = scalar_format(bits)
    if x.device.type == "cuda" and fmt.triton_fits(k, group_size):
        from kernels.triton_quant import quant_matmul
        z = zeros if zeros is not None else torch.full_like(scales, 2 ** (bits - 1))
        y = quant_matmul(x.reshape(rows, k), qweight, scales, z, bits, group_size or k)
        return y.view(*x.shape[:-1], -1)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _cpu_kernels_ready():
        if fmt.cpu_gemv and rows <= FEW_ROWS:
            return quant_gemv(x, qweight, scales, zeros, bits, group_size)
        # Many rows (prefill, scoring): the matmul dominates; the C++ dequantize keeps the weight's expansion small
        # beside it (the tensor-op unpacking of dequantize_weight cost as much as the matmul at 512 rows).
        return F.linear(x, quant_dequantize(qweight, scales, zeros, bits, group_size, k, x.dtype))
    return F.linear(x, dequantize_weight(qweight, scales, zeros, bits, group_size, k).to(x.dtype))
