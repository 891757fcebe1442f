"""Few-row CPU matrix-vector kernels (C++): what decode and speculative verify steps run on a CPU.

- `quant_gemv(x, qweight, scales, zeros, bits, group_size)` (kernels/cpu_quant.cpp) computes x @ W.T for
  W = (q - z) * s stored as QuantLinear stores it, without dequantizing W.
- `dense_gemv(x, w)` (kernels/cpu_dense.cpp) computes x @ w.T for fp32 or bf16 w, up to FEW_ROWS rows of x
  (kernels/formats.py, compiled in as BITFAST_MAX_ROWS), each row summed
  in the same order whatever the number of rows.
- `few_query_attention(q, k_cache, v_cache, input_pos)` (kernels/cpu_attention.cpp): causal attention of a few query
  tokens against the static KV cache, reading only the positions the queries can see.

They are ops in `torch.ops.bitfast`, so torch.compile(fullgraph=True) keeps each as one opaque call in a compiled
decode graph.

The C++ extension is compiled on first use (about a minute, -march=native; cached in the torch extensions
directory), never at import. If it cannot be built, `cpu_kernels_available()` is False and `cpu_kernels_error()`
says why; callers then take their slow path.

Timing table: `python scripts/bench_kernels.py --cpu`.
"""
import logging
import threading
from pathlib import Path
from typing import Optional

import torch

from kernels.formats import FEW_ROWS

_SOURCES = [str(Path(__file__).with_name(f)) for f in ("cpu_quant.cpp", "cpu_dense.cpp", "cpu_attention.cpp")]
_lock = threading.Lock()
_built = False
_error: Optional[str] = None

# The op's schema and shape function live here, so torch.compile can trace it before anything is built. The
# extension registers the C++ kernel for CPU tensors when loaded: calls then go straight from the dispatcher to
# C++ (a Python kernel, as torch.library.custom_op makes, costs more per eager call than a few-row product).
torch.library.define("bitfast::quant_gemv",
                     "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size) -> Tensor")
torch.library.define("bitfast::quant_dequantize", "(Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
                     "int group_size, int k, ScalarType dtype) -> Tensor")
torch.library.define("bitfast::dense_gemv", "(Tensor x, Tensor w) -> Tensor")
torch.library.define("bitfast::few_query_attention",
                     "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos) -> Tensor")
_op = torch.ops.bitfast.quant_gemv.default
_dequantize_op = torch.ops.bitfast.quant_dequantize.default
_dense_op = torch.ops.bitfast.dense_gemv.default
_attention_op = torch.ops.bitfast.few_query_attention.default
# Changing a define changes extra_cflags, which torch's extension versioner hashes: the cached build is redone.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", f"-DBITFAST_MAX_ROWS={FEW_ROWS}"]


@torch.library.register_fake("bitfast::quant_gemv")
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.impl("bitfast::quant_gemv", "CompositeExplicitAutograd")
def _build_then_call(x, qweight, scales, zeros, bits, group_size):
    """Reached only while no CPU kernel is registered: builds it, after which the dispatcher picks it."""
    _build_for("quant_gemv", x)
    return _op(x, qweight, scales, zeros, bits, group_size)


@torch.library.register_fake("bitfast::quant_dequantize")
def _(qweight, scales, zeros, bits, group_size, k, dtype):
    return qweight.new_empty(qweight.shape[0], k, dtype=dtype)


@torch.library.impl("bitfast::quant_dequantize", "CompositeExplicitAutograd")
def _build_then_call_dequantize(qweight, scales, zeros, bits, group_size, k, dtype):
    _build_for("quant_dequantize", qweight)
    return _dequantize_op(qweight, scales, zeros, bits, group_size, k, dtype)


@torch.library.register_fake("bitfast::dense_gemv")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.impl("bitfast::dense_gemv", "CompositeExplicitAutograd")
def _build_then_call_dense(x, w):
    _build_for("dense_gemv", x)
    return _dense_op(x, w)


@torch.library.register_fake("bitfast::few_query_attention")
def _(q, k_cache, v_cache, input_pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.impl("bitfast::few_query_attention", "CompositeExplicitAutograd")
def _build_then_call_attention(q, k_cache, v_cache, input_pos):
    _build_for("few_query_attention", q)
    return _attention_op(q, k_cache, v_cache, input_pos)


def _build_for(op: str, x: torch.Tensor):
    if not cpu_kernels_available() or x.device.type != "cpu":
        raise RuntimeError(f"bitfast::{op} needs CPU tensors and the built CPU kernels "
                           f"(device {x.device}; build error: {_error})")


def cpu_kernels_available() -> bool:
    """Whether the extension is built and loaded (building it now if this is the first ask)."""
    global _built, _error
    with _lock:
        if not _built and _error is None:
            from torch.utils.cpp_extension import load
            log = logging.getLogger("torch.utils.cpp_extension")  # its compiler warnings: the error says it all
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                load(name="bitfast_cpu", sources=_SOURCES, is_python_module=False,
                     extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"])
                _built = True
            except Exception as e:  # no compiler, no headers, unsupported flags: the caller falls back
                _error = f"{type(e).__name__}: {e}"
            finally:
                log.setLevel(level)
    return _built


def cpu_kernels_error() -> Optional[str]:
    """Why the extension could not be built; None if it was built or not tried yet."""
    return _error


def quant_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
               bits: int, group_size: int) -> torch.Tensor:
    """x [..., K] (fp32 or bf16) @ W.T -> [..., N] in x's dtype, W [N, K] = (q - z) * s, for a few rows of x.

    qweight: packed codes as kernels/packing.py lays them out, [N, K * bits / 8] uint8 (int8 for 8 bits: q - 128);
    scales, zeros: [N, ceil(K / group_size)] fp32 or bf16, zeros None for symmetric (z = 2^(bits - 1));
    group_size: a multiple of 8 (the last group of a row may be shorter), 0 for one group per row.
    """
    return _op(x, qweight, scales, zeros, bits, group_size)


def quant_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                     group_size: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight W [N, K] = (q - z) * s (computed in fp32) as `dtype` (fp32 or bf16), from qweight, scales and zeros
    laid out as for quant_gemv: what a many-row product multiplies by. Equal to kernels.packing.dequantize_packed
    (then cast), rows split across threads."""
    return _dequantize_op(qweight, scales, zeros, bits, group_size, k, dtype)


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] for w [N, K] of x's dtype (fp32 or bf16), at most FEW_ROWS rows of x.

    Each output is summed in an order that does not depend on the number of rows: a row's result is the same
    whichever rows share the call. No autograd (inference only)."""
    return _dense_op(x, w)


def few_query_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        input_pos: torch.Tensor) -> torch.Tensor:
    """Causal attention for q [B, H, S, D] against caches [B, KVH, T, D] (GQA: H a multiple of KVH), query (b, s)
    seeing cache positions 0..input_pos[b, s] (input_pos [S] or [B, S], int64). fp32 math; q and the caches share
    a dtype (fp32 or bf16), which the result [B, H, S, D] has. A query's result does not depend on the other
    queries in the call. No autograd (inference only)."""
    return _attention_op(q, k_cache, v_cache, input_pos)

