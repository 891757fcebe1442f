"""The kernels' timing tables: Triton quantized matmuls against bf16 F.linear on a CUDA GPU (decode gemv, M=1,
and prefill gemm), or with --cpu the C++ few-row CPU kernels (kernels/cpu.py) against PyTorch's own.

    python scripts/bench_kernels.py                          # bits 2,3,4, group 128, prefill M=512
    python scripts/bench_kernels.py --prefill_m 2048 --repeats 50
    python scripts/bench_kernels.py --cpu                    # CPU quant_gemv, 1 thread

GPU: 
Shapes are Llama-7B's (K x N): attention 4096x4096, MLP up 4096x11008, MLP down 11008x4096. Each time is the
median over repeats of CUDA-event timings, with L2 flushed before every run so the weights come from memory as
in a real decode step. GB/s = bytes of weights read (packed codes + bf16 scales + bf16 zeros; bf16 weights for
F.linear) / time, next to the measured device copy bandwidth, which bounds a weight-streaming GEMV.
Prints a markdown table; "rel err" is the kernel against F.linear on the same weights dequantized to bf16.

CPU (--cpu): one thread, x of 1 row in fp32 and bf16, Llama shapes (N x K) from SmolLM-135M to 7B; weights rotated
through 20 copies (2-20 for the largest) so they come from memory, not cache; every kernel interleaved in each of
the repeats (median), so all see the same machine noise. GB/s counts weight bytes.
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cli import ArgumentParser, positive_int, run  # noqa: E402
from kernels.formats import SCALAR_BITS, SCALAR_FORMATS, scalar_format  # noqa: E402
from kernels.packing import dequantize_packed, pack  # noqa: E402
from kernels.triton_quant import quant_matmul_gemm, quant_matmul_gemv  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2
TRITON_BITS = ",".join(str(b) for b, f in SCALAR_FORMATS.items() if f.triton_fits(128, 128))
CPU_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096), (11008, 4096),
              (4096, 11008)]  # (N, K)
CPU_FORMATS = [("int8", 8, 0, False), ("int4 g128", 4, 128, True), ("int4 g32", 4, 32, True),
               ("int3 g128", 3, 128, True), ("int2 g64", 2, 64, True)]  # (label, bits, group size, asymmetric)
CPU_DTYPES = (torch.float32, torch.bfloat16)


def time_ms(fn, repeats, flush=None) -> float:
    fn()  # warm-up: compile and autotune
    times = []
    for _ in range(repeats):
        if flush is not None:  # evict L2; queued ahead of fn, it also hides fn's host-side launch time
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats, nbytes=1 << 30) -> float:
    """GB/s of a device-to-device copy, counting the bytes read and the bytes written (1 GiB spills any L2)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), repeats) * 1e-3) / 1e9


def quantized_weight(k, n, bits, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = (torch.rand(n, k // group_size, generator=gen) * ((1 << bits) - 1)).to(torch.bfloat16)
    return pack(codes, bits).cuda(), scales.cuda(), zeros.cuda()


def cpu_quant_calls(n, k, copies, xs, g):
    """label -> {x dtype: (weight bytes per call, kernels.cpu.quant_gemv, calls)} for CPU_FORMATS."""
    from kernels.cpu import quant_gemv
    runs = {}
    for label, bits, gs, asym in CPU_FORMATS:
        groups = -(-k // (gs or k))
        calls = []
        for _ in range(copies):
            q = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
            qw = (q.to(torch.int16) - (1 << (bits - 1))).to(torch.int8) if scalar_format(bits).stored_signed \
                else pack(q, bits)
            s = torch.rand(n, groups, generator=g) / 100
            calls.append((qw, s, torch.rand(n, groups, generator=g) * 2**bits if asym else None, bits, gs))
        runs[label] = {dt: (n * k * bits / 8, quant_gemv, [(x, *c) for c in calls]) for dt, x in xs.items()}
    return runs


def cpu_aten_calls(n, k, copies, xs, g):
    """PyTorch's own: dense F.linear in x's dtype, int4 (its packed layout), int8 per channel."""
    w = torch.randn(n, k, generator=g)
    runs = {"F.linear dense": {dt: (n * k * dt.itemsize, F.linear, [(x, w.to(dt).clone()) for _ in range(copies)])
                               for dt, x in xs.items()}}
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
    return runs


def time_cpu_calls(fn, calls) -> float:
    t0 = time.perf_counter()
    for args in calls:
        fn(*args)
    return (time.perf_counter() - t0) / len(calls)


def cpu_table(repeats):
    """The CPU kernels' table (--cpu): us per call and GB/s of weight bytes, for fp32 and bf16 x."""
    from kernels.cpu import cpu_kernels_available, cpu_kernels_error
    torch.set_num_threads(1)
    if not cpu_kernels_available():
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels_error()}")
    print(f"1 thread, median of {repeats} passes over 20 weight copies (2-20 for the largest); GB/s of weight bytes")
    print(f"{'N x K':>13} {'kernel':>16} {'fp32 x us':>10} {'GB/s':>6} {'bf16 x us':>10} {'GB/s':>6}")
    for n, k in CPU_SHAPES:
        copies = min(20, max(2, 2**29 // (n * k * 4)))  # at most 512 MB of dense fp32 copies
        g = torch.Generator().manual_seed(n + k)
        xs = {dt: torch.randn(1, k, generator=g).to(dt) for dt in CPU_DTYPES}
        runs = {**cpu_quant_calls(n, k, copies, xs, g), **cpu_aten_calls(n, k, copies, xs, g)}
        times = {(label, dt): [] for label, fns in runs.items() for dt in fns}
        for _ in range(repeats):  # interleaved, so every kernel sees the same machine noise
            for label, fns in runs.items():
                for dt, (_, fn, calls) in fns.items():
                    times[label, dt].append(time_cpu_calls(fn, calls))
        for label, fns in runs.items():
            cells = []
            for dt, (nbytes, _, _) in fns.items():
                t = statistics.median(times[label, dt])
                cells.append(f"{t * 1e6:10.1f} {nbytes / t / 1e9:6.1f}")
            print(f"{f'{n} x {k}':>13} {label:>16} {' '.join(cells)}", flush=True)
        del runs


def gpu_table(bits_list, group_size, prefill_m, repeats):
    """The Triton kernels' markdown table against bf16 F.linear."""
    import triton

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    bw = copy_bandwidth(repeats)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"measured copy bandwidth {bw:.0f} GB/s")
    print(f"x bf16, group {group_size}, median of {repeats} runs, L2 flushed before each\n")
    print("| K x N | M | bits | F.linear bf16 us | bf16 GB/s | quant us | quant GB/s | % of copy GB/s | speed-up | "
          "quant TFLOP/s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        w_bf16 = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m, kernel in ((1, quant_matmul_gemv), (prefill_m, quant_matmul_gemm)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base_ms = time_ms(lambda: F.linear(x, w_bf16), repeats, flush)
            for bits in bits_list:
                packed, scales, zeros = quantized_weight(k, n, bits, group_size, seed=bits)
                ms = time_ms(lambda: kernel(x, packed, scales, zeros, bits, group_size), repeats, flush)
                y = kernel(x, packed, scales, zeros, bits, group_size).float()
                w = dequantize_packed(packed, scales, zeros, bits, group_size, k).to(torch.bfloat16)
                ref = F.linear(x, w).float()
                gbs = (packed.nbytes + scales.nbytes + zeros.nbytes) / (ms * 1e-3) / 1e9
                base_gbs = w_bf16.nbytes / (base_ms * 1e-3) / 1e9
                print(f"| {k}x{n} | {m} | {bits} | {base_ms * 1e3:.1f} | {base_gbs:.0f} | "
                      f"{ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {base_ms / ms:.2f}x | "
                      f"{2 * m * n * k / (ms * 1e-3) / 1e12:.1f} | {((y - ref).norm() / ref.norm()).item():.1e} |",
                      flush=True)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    widths = ", ".join(map(str, SCALAR_BITS))
    p.add_argument("--cpu", action="store_true", help="time the C++ CPU kernels instead (--bits, --group_size, "
                   "--prefill_m do not apply)")
    p.add_argument("--bits", default=TRITON_BITS, help=f"comma-separated, each one of {widths}")
    p.add_argument("--group_size", type=positive_int, default=128)
    p.add_argument("--prefill_m", type=positive_int, default=512)
    p.add_argument("--repeats", type=positive_int, default=None, help="default 30 on the GPU, 9 with --cpu")
    a = p.parse_args(argv)
    if set(a.bits.split(",")) - {str(b) for b in SCALAR_BITS}:
        p.error(f"argument --bits: expected a comma-separated list of {widths}, got {a.bits!r}")
    if any(k % a.group_size for k, _ in SHAPES):
        p.error(f"argument --group_size: must divide every benchmarked K, {sorted({k for k, _ in SHAPES})}")
    if a.cpu:
        return cpu_table(a.repeats or 9)
    if not torch.cuda.is_available():
        raise ValueError("bench_kernels.py times the Triton kernels on a CUDA GPU, and none is available")
    gpu_table([int(b) for b in a.bits.split(",")], a.group_size, a.prefill_m, a.repeats or 30)


if __name__ == "__main__":
    run(main)
