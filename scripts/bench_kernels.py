"""Triton quantized matmuls against bf16 F.linear on a CUDA GPU: decode (gemv, M=1) and prefill (gemm).

    python scripts/bench_kernels.py                          # bits 2,3,4, group 128, prefill M=512
    python scripts/bench_kernels.py --prefill_m 2048 --repeats 50

Shapes are Llama-7B's (K x N): attention 4096x4096, MLP up 4096x11008, MLP down 11008x4096. Each time is the
median over repeats of CUDA-event timings, with L2 flushed before every run so the weights come from memory as
in a real decode step. GB/s = bytes of weights read (packed codes + bf16 scales + bf16 zeros; bf16 weights for
F.linear) / time, next to the measured device copy bandwidth, which bounds a weight-streaming GEMV.
Prints a markdown table; "rel err" is the kernel against F.linear on the same weights dequantized to bf16.
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cli import ArgumentParser, positive_int, run  # noqa: E402
from kernels.packing import dequantize, pack  # noqa: E402
from kernels.triton_quant import quant_matmul_gemm, quant_matmul_gemv  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2


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


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--bits", default="2,3,4", help="comma-separated, each 2, 3, 4 or 8")
    p.add_argument("--group_size", type=positive_int, default=128)
    p.add_argument("--prefill_m", type=positive_int, default=512)
    p.add_argument("--repeats", type=positive_int, default=30)
    a = p.parse_args(argv)
    if set(a.bits.split(",")) - {"2", "3", "4", "8"}:
        p.error(f"argument --bits: expected a comma-separated list of 2, 3, 4 or 8, got {a.bits!r}")
    if any(k % a.group_size for k, _ in SHAPES):
        p.error(f"argument --group_size: must divide every benchmarked K, {sorted({k for k, _ in SHAPES})}")
    if not torch.cuda.is_available():
        raise ValueError("bench_kernels.py times the Triton kernels on a CUDA GPU, and none is available")
    bits_list = [int(b) for b in a.bits.split(",")]
    import triton

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    bw = copy_bandwidth(a.repeats)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"measured copy bandwidth {bw:.0f} GB/s")
    print(f"x bf16, group {a.group_size}, median of {a.repeats} runs, L2 flushed before each\n")
    print("| K x N | M | bits | F.linear bf16 us | bf16 GB/s | quant us | quant GB/s | % of copy GB/s | speed-up | "
          "quant TFLOP/s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, n in SHAPES:
        w_bf16 = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m, kernel in ((1, quant_matmul_gemv), (a.prefill_m, quant_matmul_gemm)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base_ms = time_ms(lambda: F.linear(x, w_bf16), a.repeats, flush)
            for bits in bits_list:
                packed, scales, zeros = quantized_weight(k, n, bits, a.group_size, seed=bits)
                ms = time_ms(lambda: kernel(x, packed, scales, zeros, bits, a.group_size), a.repeats, flush)
                y = kernel(x, packed, scales, zeros, bits, a.group_size).float()
                ref = F.linear(x, dequantize(packed, scales, zeros, bits, a.group_size, k).to(torch.bfloat16)).float()
                gbs = (packed.nbytes + scales.nbytes + zeros.nbytes) / (ms * 1e-3) / 1e9
                base_gbs = w_bf16.nbytes / (base_ms * 1e-3) / 1e9
                print(f"| {k}x{n} | {m} | {bits} | {base_ms * 1e3:.1f} | {base_gbs:.0f} | "
                      f"{ms * 1e3:.1f} | {gbs:.0f} | {100 * gbs / bw:.0f}% | {base_ms / ms:.2f}x | "
                      f"{2 * m * n * k / (ms * 1e-3) / 1e12:.1f} | {((y - ref).norm() / ref.norm()).item():.1e} |",
                      flush=True)


if __name__ == "__main__":
    run(main)
