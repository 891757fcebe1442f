"""QLoRA (adapters over an int4 base) vs LoRA (adapters over the float model) vs full fine-tuning, at equal steps on
the same data: final training loss, held-out perplexity, peak memory and training tokens/s.

    python scripts/bench_lora.py --steps 200 --data my.jsonl --out out/bench_lora.json
    python scripts/bench_lora.py --steps 3 --seq_len 64 --batch_size 2 --eval_tokens 512 --threads 2   # a smoke run

Each mode trains in a process of its own and reports its memory before the model, once the model and data are
loaded, and at the peak of the training steps (CUDA: what torch allocated; CPU: the process's resident set on
Linux, the interpreter and torch included, so compare modes by their differences). All modes run one loop, so they differ only in what trains: AdamW on qat.loop.lr_at's schedule,
cross-entropy on the same windows in the same order (qat.data.step_windows), one batch per step. The int4 base is
an RTN --qformat quantization of --checkpoint, made once in the work folder (scripts/bench_quant.build), unless
--quantized names one. Loss is the mean of the last --last steps; tokens/s leaves the first step (warm-up) out.
"""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from bench_quant import build

import cli
from checkpoint import load_model, load_tokenizer_for, read_config
from cli import add_device_args, run, setup_device
from convert import resolve_checkpoint
from eval.perplexity import perplexity
from fileio import atomic_write, check_output_file, read_json
from lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from qat.config import quant_format
from qat.data import held_out_tokens, make_windows, step_windows, training_tokens
from qat.loop import loss_fn, lr_at

MODES = ("qlora", "lora", "full")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="float checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quantized", help="its quantized checkpoint for QLoRA (default: RTN --qformat, made here)")
    p.add_argument("--qformat", default="int4-g128", type=quant_format, help="format of the QLoRA base made here")
    p.add_argument("--work", default="out/bench_lora", type=cli.nonempty, help="folder for the quantized base")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--data", default="boolq", type=cli.nonempty, help="training text: boolq | lambada | .txt/.jsonl")
    p.add_argument("--eval_data", default="boolq", type=cli.nonempty, help="held-out text (a corpus's eval split)")
    p.add_argument("--eval_tokens", type=cli.positive_int, default=8192)
    p.add_argument("--context", type=cli.positive_int, default=512, help="perplexity window")
    p.add_argument("--steps", type=cli.positive_int, default=100)
    p.add_argument("--last", type=cli.positive_int, default=10, help="steps the final loss averages")
    p.add_argument("--seq_len", type=cli.positive_int, default=512)
    p.add_argument("--batch_size", type=cli.positive_int, default=4)
    p.add_argument("--lr", type=cli.positive_float, default=2e-4, help="adapters' learning rate")
    p.add_argument("--full_lr", type=cli.positive_float, default=2e-5, help="full fine-tuning's learning rate")
    p.add_argument("--warmup", type=cli.nonneg_int, default=10)
    p.add_argument("--rank", type=cli.positive_int, default=16)
    p.add_argument("--alpha", type=cli.positive_float, default=32.0)
    p.add_argument("--targets", nargs="+", type=cli.nonempty, default=list(DEFAULT_TARGETS))
    p.add_argument("--seed", type=cli.nonneg_int, default=0)
    p.add_argument("--out", default="out/bench_lora.json", type=cli.nonempty, help="results JSON")
    p.add_argument("--one", choices=MODES, help="(internal) run one mode in this process and print its result")
    add_device_args(p)
    return p.parse_args(argv)


def memory_mb(device: str, peak: bool) -> float:
    """Memory in use now, or its peak since reset_peak_memory: CUDA, what torch allocated; CPU (Linux), the
    process's resident set (VmRSS, VmHWM; not getrusage's ru_maxrss, which Linux carries over from the parent)."""
    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2 ** 20
    field = "VmHWM:" if peak else "VmRSS:"
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1]) / 1024


def reset_peak_memory(device: str):
    """Start the peak over from what is in use now (CPU: Linux's clear_refs 5 resets VmHWM to VmRSS)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def train_one(a, mode: str, dtype) -> dict:
    """Train one mode from a fresh model and report it (run in its own process)."""
    torch.manual_seed(a.seed)
    ckpt = resolve_checkpoint(a.quantized if mode == "qlora" else a.checkpoint)
    start_mb = memory_mb(a.device, peak=False)
    model = load_model(ckpt, device=a.device).train()
    if mode == "full":
        model.requires_grad_(True)
    else:
        apply_lora(model, LoRAConfig(a.rank, a.alpha, 0.0, tuple(a.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    lr = a.full_lr if mode == "full" else a.lr
    optimizer = torch.optim.AdamW(params, lr=lr)
    tokenizer = load_tokenizer_for(ckpt)
    windows = make_windows(training_tokens(a.data, tokenizer, model.args.vocab_size), a.seq_len, a.data)
    if windows.shape[0] < a.batch_size:
        raise ValueError(f"{a.data}: {windows.shape[0]} windows of {a.seq_len + 1} tokens, fewer than one batch")
    loaded_mb = memory_mb(a.device, peak=False)
    reset_peak_memory(a.device)  # the peak of the steps, not of loading (which reads the file beside the copy)
    autocast = torch.autocast(torch.device(a.device).type, dtype=dtype, enabled=dtype != torch.float32)
    losses, seconds = [], []
    for step in range(a.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, lr / 10, a.warmup, a.steps)
        batch = windows[step_windows(step, windows.shape[0], a.batch_size, a.seed)].to(a.device)
        with autocast:
            logits = model(batch[:, :-1])
        loss = loss_fn("ce", logits, None, batch[:, 1:], 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        seconds.append(time.perf_counter() - t0)
    peak_mb = memory_mb(a.device, peak=True)
    tokens = held_out_tokens(tokenizer, a.eval_data, a.eval_tokens, a.context)
    with autocast:
        ppl = perplexity(model.eval(), tokens, a.context, device=a.device)["ppl"]
    tok_s = a.batch_size * a.seq_len / statistics.median(seconds[1:] or seconds)
    return {"mode": mode, "checkpoint": str(ckpt), "trainable_params": sum(p.numel() for p in params),
            "loss_first": losses[0], "loss_last": statistics.fmean(losses[-a.last:]), "eval_ppl": ppl,
            "memory_before_model_mb": round(start_mb, 1), "memory_loaded_mb": round(loaded_mb, 1),
            "peak_memory_mb": round(peak_mb, 1),
            "tok_s": round(tok_s, 1), "lr": lr}


def child_result(mode: str, argv: list) -> dict:
    """One mode in a fresh process: its last stdout line is its result."""
    r = subprocess.run([sys.executable, __file__, *argv, "--one", mode], check=False, capture_output=True, text=True)
    if r.returncode:
        raise ValueError(f"{mode}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def is_results_file(path: Path) -> bool:
    try:
        return isinstance(read_json(path), dict) and "bench_lora" in read_json(path)
    except (OSError, ValueError):
        return False


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    dtype = setup_device(a)
    if a.one:
        print(json.dumps(train_one(a, a.one, dtype)))
        return
    out = check_output_file(a.out, is_results_file, "LoRA benchmark result")
    ckpt = resolve_checkpoint(a.checkpoint)
    quantized = a.quantized
    if "qlora" in a.modes and not quantized:
        quantized = build(ckpt, a.qformat, None, Path(a.work), False, log=lambda m: print(m, file=sys.stderr))[0]
    argv = [*argv, "--checkpoint", str(ckpt)] + (["--quantized", str(quantized)] if quantized else [])
    rows = []
    for mode in a.modes:
        print(f"bench_lora: {mode} ...", file=sys.stderr, flush=True)
        rows.append(child_result(mode, argv))
    settings = {k: v for k, v in vars(a).items() if k not in ("one", "out")}
    atomic_write(out, json.dumps({"bench_lora": rows, "settings": settings,
                                  "model_args": read_config(ckpt)["model_args"]}, indent=2))
    print("| mode | trainable | loss (first -> last) | held-out ppl | peak training memory MB | tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable_params'] / 1e6:.2f}M | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
              f"| {r['eval_ppl']:.2f} | {r['peak_memory_mb']:.0f} | {r['tok_s']:.0f} |")
    print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
