"""Few-row CPU matrix-vector kernels (C++): what decode and speculative verify steps run on a CPU.

- `quant_gemv(x, qweight, scales, zeros, bits, group_size)` (kernels/cpu_quant.cpp) computes x @ W.T for
  W = (q - z) * s stored as QuantLinear stores it, without dequantizing W.
- `dense_gemv(x, w)` (kernels/cpu_dense.cpp) computes x @ w.T for fp32 or bf16 w, up to 8 rows of x, each row summed
  in the same order whatever the number of rows.
- `few_query_attention(q, k_cache, v_cache, input_pos)` (kernels/cpu_attention.cpp): causal attention of a few query
  tokens against the static KV cache, reading only the positions the queries can see.

They are ops in `torch.ops.bitfast`, so torch.compile(fullgraph=True) keeps each as one opaque call in a compiled
decode graph.

The C++ extension is compiled on first use (about a minute, -march=native; cached in the torch extensions
directory), never at import. If it cannot be built, `cpu_kernels_available()` is False and `cpu_kernels_error()`
says why; callers then take their slow path.

Timing table: `python -m kernels.cpu` (one thread; weights rotated through 20 copies so they come from
memory, not cache).
"""
import logging
import threading
from pathlib import Path
from typing import Optional

import torch

_SOURCES = [str(Path(__file__).with_name(f)) for f in ("cpu_quant.cpp", "cpu_dense.cpp", "cpu_attention.cpp")]
_lock = threading.Lock()
_built = False
_error: Optional[str] = None

# The op's schema and shape function live here, so torch.compile can trace it before anything is built. The
# extension registers the C++ kernel for CPU tensors when loaded: calls then go straight from the dispatcher to
# C++ (a Python kernel, as torch.library.custom_op makes, costs ~20 us per eager call, more than the product).
torch.library.define("bitfast::quant_gemv",
                     "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size) -> Tensor")
torch.library.define("bitfast::dense_gemv", "(Tensor x, Tensor w) -> Tensor")
torch.library.define("bitfast::few_query_attention",
                     "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos) -> Tensor")
_op = torch.ops.bitfast.quant_gemv.default
_dense_op = torch.ops.bitfast.dense_gemv.default
_attention_op = torch.ops.bitfast.few_query_attention.default
DENSE_MAX_ROWS = 8


@torch.library.register_fake("bitfast::quant_gemv")
def _(x, qweight, scales, zeros, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.impl("bitfast::quant_gemv", "CompositeExplicitAutograd")
def _build_then_call(x, qweight, scales, zeros, bits, group_size):
    """Reached only while no CPU kernel is registered: builds it, after which the dispatcher picks it."""
    _build_for("quant_gemv", x)
    return _op(x, qweight, scales, zeros, bits, group_size)


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
                     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
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


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] for w [N, K] of x's dtype (fp32 or bf16), at most DENSE_MAX_ROWS rows of x.

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


def _benchmark():
    import statistics
    import time

    import torch.nn.functional as F

    from kernels.packing import pack

    torch.set_num_threads(1)
    if not cpu_kernels_available():
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels_error()}")
    reps = 9
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (11008, 4096),
              (4096, 11008)]
    # (label, bits, group size, asymmetric)
    formats = [("int8", 8, 0, False), ("int4 g128", 4, 128, True), ("int4 g32", 4, 32, True),
               ("int3 g128", 3, 128, True), ("int2 g64", 2, 64, True)]
    print(f"1 thread, median of {reps} passes over 20 weight copies (2-20 for the largest); GB/s of weight bytes")
    print(f"{'N x K':>13} {'kernel':>16} {'fp32 x us':>10} {'GB/s':>6} {'bf16 x us':>10} {'GB/s':>6}")

    def timed(fn, calls):
        t0 = time.perf_counter()
        for args in calls:
            fn(*args)
        return (time.perf_counter() - t0) / len(calls)

    for n, k in shapes:
        copies = min(20, max(2, 2**29 // (n * k * 4)))  # at most 512 MB of dense fp32 copies
        g = torch.Generator().manual_seed(n + k)
        xs = {dt: torch.randn(1, k, generator=g).to(dt) for dt in (torch.float32, torch.bfloat16)}
        runs = {}  # label -> {x dtype: (weight bytes per call, fn, calls)}
        for label, bits, gs, asym in formats:
            groups = -(-k // (gs or k))
            calls = []
            for _ in range(copies):
                q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
                qw = (q.to(torch.int16) - 128).to(torch.int8) if bits == 8 else pack(q, bits)
                s = torch.rand(n, groups, generator=g) / 100
                calls.append((qw, s, torch.rand(n, groups, generator=g) * 2**bits if asym else None, bits, gs))
            runs[label] = {dt: (n * k * bits / 8, quant_gemv, [(x, *c) for c in calls]) for dt, x in xs.items()}
        # PyTorch's own: dense F.linear in x's dtype, int4 (its packed layout), int8 per channel
        w = torch.randn(n, k, generator=g)
        runs["F.linear dense"] = {dt: (n * k * dt.itemsize, F.linear, [(x, w.to(dt).clone()) for _ in range(copies)])
                                  for dt, x in xs.items()}
        w4 = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g), 8) for _ in range(copies)]
        ag = 128 if k % 128 == 0 else 64  # it needs whole groups
        sz = torch.rand(k // ag, n, 2, generator=g)
        runs[f"aten int4 g{ag}"] = {dt: (n * k / 2, torch.ops.aten._weight_int4pack_mm_for_cpu,
                                         [(x, w, ag, sz.to(dt)) for w in w4]) for dt, x in xs.items()}
        w8 = [torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g) for _ in range(copies)]
        s8 = torch.rand(n, generator=g)
        runs["aten int8"] = {dt: (n * k, torch.ops.aten._weight_int8pack_mm, [(x, w, s8.to(dt)) for w in w8])
                             for dt, x in xs.items()}
        times = {(label, dt): [] for label, fns in runs.items() for dt in fns}
        for _ in range(reps):  # interleaved, so every kernel sees the same machine noise
            for label, fns in runs.items():
                for dt, (_, fn, calls) in fns.items():
                    times[label, dt].append(timed(fn, calls))
        for label, fns in runs.items():
            cells = []
            for dt, (nbytes, _, _) in fns.items():
                t = statistics.median(times[label, dt])
                cells.append(f"{t * 1e6:10.1f} {nbytes / t / 1e9:6.1f}")
            print(f"{f'{n} x {k}':>13} {label:>16} {' '.join(cells)}", flush=True)
        del runs


if __name__ == "__main__":
    _benchmark()
