"""Decode speed: eager vs compiled, per dtype, median of several runs, against the memory-bandwidth roofline.

    python scripts/bench_generate.py --threads 1                    # default model, CPU, fp32 + bf16
    python scripts/bench_generate.py --device cuda --dtypes bf16 --llama2_7b_random

Roofline = measured copy bandwidth / weight bytes: every decode step must stream all weights once.
Prints a markdown table (paste it into BENCHMARKS.md with this command beside it).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from checkpoint import load_model, load_tokenizer_for, resolve_checkpoint  # noqa: E402
from cli import DTYPES, run  # noqa: E402
from generate import compile_fns, decode_one_token, generate, prefill, weight_bytes  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def copy_bandwidth(device, nbytes=1 << 29, repeats=7) -> float:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def decode_speeds(model, prompt, new_tokens, fns, runs):
    prefill_fn, decode_fn = fns
    generate(model, prompt, new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)  # warm-up (and compile)
    return [generate(model, prompt, new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)[1].decode_tokens_per_s
            for _ in range(runs)]


def random_llama2_7b(device, dtype):
    with torch.device(device):
        model = Transformer(ModelArgs.from_name("llama-2-7b")).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--llama2_7b_random", action="store_true", help="also a random Llama-2-7B-shaped model (GPU)")
    a = p.parse_args()
    unknown = set(a.dtypes.split(",")) - set(DTYPES)
    if unknown:
        raise ValueError(f"unknown dtype {sorted(unknown)} (choose from {', '.join(DTYPES)})")
    dtypes = [DTYPES[d] for d in a.dtypes.split(",")]
    modes = a.modes.split(",")
    if set(modes) - {"eager", "compiled"}:
        raise ValueError(f"unknown mode in {a.modes!r} (eager, compiled)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ckpt = resolve_checkpoint(a.checkpoint)
    tokenizer = load_tokenizer_for(ckpt)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    prompt = torch.tensor(ids, dtype=torch.int, device=a.device)
    bw = copy_bandwidth(a.device)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({device_name}), torch {torch.__version__}, threads {a.threads}, "
          f"cores {os.cpu_count()}, measured copy bandwidth {bw:.1f} GB/s")
    print(f"prompt {len(ids)} tokens, {a.new_tokens} new tokens (greedy), median of {a.runs} runs\n")
    print("| model | dtype | decode | tok/s median | min-max | weights MB | achieved GB/s | roofline tok/s | % of roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    models = [("SmolLM2-135M", lambda dt: load_model(ckpt, a.device, dt))]
    if a.llama2_7b_random:
        models.append(("Llama-2-7B (random)", lambda dt: random_llama2_7b(a.device, dt)))
    for name, build in models:
        for dtype in dtypes:
            model = build(dtype)
            model.setup_caches(1, -(-(len(ids) + a.new_tokens) // 64) * 64, dtype=dtype, device=a.device)
            nbytes = weight_bytes(model)
            for mode in modes:
                torch._dynamo.reset()
                fns = compile_fns(a.device) if mode == "compiled" else (prefill, decode_one_token)
                speeds = decode_speeds(model, prompt, a.new_tokens, fns, a.runs)
                med = statistics.median(speeds)
                roof = bw * 1e9 / nbytes
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {mode} | {med:.1f} | "
                      f"{min(speeds):.1f}-{max(speeds):.1f} | {nbytes / 1e6:.0f} | {med * nbytes / 1e9:.1f} | "
                      f"{roof:.0f} | {100 * med / roof:.0f}% |", flush=True)
            del model


if __name__ == "__main__":
    run(main)
