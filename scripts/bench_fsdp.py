"""Memory per process of QAT (train_qat.py train) with --fsdp over 1 and 2 torchrun processes: each process's
peak resident memory, its resident memory when training ends, and the bytes it holds of the trainable tensors and
their AdamW state (its shards under FSDP).

    python scripts/bench_fsdp.py                  # the default model, int2-g64, 1 step of 64 tokens per process
    python scripts/bench_fsdp.py --activation_checkpointing
    python scripts/bench_fsdp.py --processes 1 2 4 --checkpoint checkpoints/llama --loss cakld

Each process also holds what FSDP does not shard: the frozen embedding and head, the packed PTQ codes, the teacher
(for the KL losses; --loss ce trains without one), activations (fake quantization saves several weight-sized
intermediates per linear for the backward pass) and the Python/torch runtime. RSS counts all of it, and peak RSS
also the whole student that every process builds (from the PTQ start) before FSDP shards it. The processes run on
this machine's CPU with gloo.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli
import train_qat
from cli import run

MIB = 2 ** 20


def worker(train_argv: list):
    """One torchrun process: train, then print this process's figures as one JSON line."""
    summary = train_qat.train(train_qat.parse_args(train_argv))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    print(json.dumps({"processes": int(os.environ["WORLD_SIZE"]), "rank": int(os.environ["RANK"]),
                      "peak_rss_mib": round(peak / MIB, 1), "end_rss_mib": round(now / MIB, 1),
                      "state_mib": round(summary["state_bytes"] / MIB, 2)}), flush=True)


def measure(processes: int, args) -> list:
    """Per-process figures of one run over `processes` torchrun processes."""
    with tempfile.TemporaryDirectory() as tmp:
        train_argv = ["train", "--fsdp", "--format", args.format, "--loss", args.loss, "--steps", str(args.steps),
                      "--seq_len", str(args.seq_len), "--batch_size", str(2 * processes), "--micro_batch", "1",
                      "--warmup", "0", "--eval_every", "0", "--run_dir", str(Path(tmp) / "run"), "--device", "cpu"]
        if args.checkpoint:
            train_argv += ["--checkpoint", args.checkpoint]
        if args.activation_checkpointing:
            train_argv.append("--activation_checkpointing")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               __file__, "--worker", *train_argv]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{processes} process(es) failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda row: row["rank"])


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--processes", type=cli.positive_int, nargs="+", default=[1, 2])
    p.add_argument("--checkpoint", type=cli.nonempty, help="float checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--format", default="int2-g64", type=cli.nonempty)
    p.add_argument("--loss", default="ce", choices=("ce", "cakld", "fkl", "rkl"))
    p.add_argument("--steps", type=cli.positive_int, default=1)
    p.add_argument("--seq_len", type=cli.positive_int, default=64)
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block in the backward pass: the fake-quant intermediates (each the size of "
                        "a weight) are then kept for one block at a time, not for all of them")
    args = p.parse_args()
    print("| processes | rank | peak RSS (MiB) | RSS at the end (MiB) | trainable + AdamW state (MiB) |")
    print("|---|---|---|---|---|")
    for n in args.processes:
        for row in measure(n, args):
            print(f"| {row['processes']} | {row['rank']} | {row['peak_rss_mib']} | {row['end_rss_mib']} | "
                  f"{row['state_mib']} |", flush=True)


if __name__ == "__main__":
    run(main)
