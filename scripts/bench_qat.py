"""QAT against PTQ at low bits on the default model: the numbers and the curve plot in BENCHMARKS.md.

    python scripts/bench_qat.py --threads 2                       # int2-g64-asym, CPU budget as in BENCHMARKS.md
    python scripts/bench_qat.py --format int3-g128 --steps 40 --no_losses --no_speed

Stages, each reusing what the work folder already holds (an interrupted benchmark continues where it stopped;
QAT runs resume from their checkpoints):
1. float, RTN, GPTQ and AWQ+clip perplexity: eval/perplexity.py's protocol on the first --eval_tokens tokens of
   the BoolQ evaluation split (odd documents); calibration from the BoolQ calibration split (even documents).
2. teacher data: `train_qat.py gen-data`, the float model continuing BoolQ calibration passages.
3. QAT from the best PTQ checkpoint on the teacher data (CAKLD), --steps steps; its curve (held-out perplexity
   on a --curve_tokens slice every --eval_every steps) is plotted to --plot.
4. losses: CAKLD, forward KL, reverse KL and cross-entropy from the same start at an equal, smaller budget.
5. training throughput: tokens/s of one optimizer step, fake-quant student vs the float model, median of runs.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import train_qat  # noqa: E402
from checkpoint import load_model, load_tokenizer_for, resolve_checkpoint, save_quantized  # noqa: E402
from cli import run  # noqa: E402
from eval.data import calibration_batches, corpus_text  # noqa: E402
from eval.perplexity import perplexity  # noqa: E402
from quantize import QuantFormat, linear_names, quantize_model, resolve_recipe  # noqa: E402


def ptq_checkpoint(ckpt, fmt: QuantFormat, method: str, calib, work: Path) -> tuple:
    """(folder, seconds): the float model quantized by `method` (the head stays float, as in BitDistiller)."""
    out = work / f"{fmt.name}-{method}"
    if (out / "config.json").is_file():
        return out, json.loads((out / "config.json").read_text())["quantization"]["seconds"]
    t0 = time.perf_counter()
    model = load_model(ckpt)
    plan = resolve_recipe({"default": fmt.name}, linear_names(model))
    quantize_model(model, plan, method, calib if method != "rtn" else None, log=lambda s: None)
    seconds = round(time.perf_counter() - t0, 1)
    save_quantized(model, plan, ckpt, out, {"method": method, "seconds": seconds})
    return out, seconds


def ppl_of(folder, tokens, context) -> float:
    return perplexity(load_model(folder), tokens, context)["ppl"]


def qat_args(a, ckpt, init, run_dir, data, loss, steps, eval_every):
    return train_qat.parse_args([
        "train", "--checkpoint", str(ckpt), "--data", str(data), "--init", str(init), "--loss", loss,
        "--seq_len", str(a.seq_len), "--batch_size", str(a.batch_size), "--micro_batch", str(a.micro_batch),
        "--steps", str(steps), "--lr", str(a.lr), "--min_lr", str(a.lr / 10), "--warmup", str(a.warmup),
        *(["--train_scales"] if a.train_scales else []), "--eval_every", str(eval_every),
        "--eval_tokens", str(a.curve_tokens), "--eval_context", str(a.context), "--save_every", "5",
        "--run_dir", str(run_dir), "--resume", "--threads", str(a.threads)])


def train_seconds(run_dir: Path) -> float:
    """Time spent in optimizer steps (evaluations excluded), summed over every invocation of the run."""
    rows = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return sum(r["tokens"] / r["step"] / r["tok_s"] for r in rows if "loss" in r)


def step_tok_s(student, teacher, windows, runs: int) -> float:
    """Median tokens/s of a full optimizer step (CAKLD against on-the-fly teacher logits, AdamW)."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    speeds = []
    for _ in range(runs + 1):  # the first step warms up allocations
        t0 = time.perf_counter()
        x = windows[:, :-1]
        with torch.no_grad():
            target = teacher(x)
        train_qat.loss_fn("cakld", student(x), target, windows[:, 1:], 0.5).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(speeds[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="int2-g64-asym")
    p.add_argument("--work", default="out/bench_qat", help="folder for checkpoints, data and runs (reused)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--curve_tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--calib_samples", type=int, default=64)
    p.add_argument("--gen_count", type=int, default=160)
    p.add_argument("--gen_new_tokens", type=int, default=192)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--train_scales", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval_every", type=int, default=20)
    p.add_argument("--loss_steps", type=int, default=20)
    p.add_argument("--no_losses", action="store_true")
    p.add_argument("--no_speed", action="store_true")
    p.add_argument("--plot", default="docs/qat_curve.png")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    fmt = QuantFormat.parse(a.format)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_checkpoint(None)
    tok = load_tokenizer_for(ckpt)
    tokens = torch.tensor(tok.encode(corpus_text("boolq", "eval"), bos=tok.add_bos, allow_special=False))[:a.eval_tokens]
    print(f"model {ckpt.name} | {fmt.name}, output head float | perplexity: BoolQ eval split, first {tokens.numel()} "
          f"tokens, context {a.context} | CPU, {a.threads} thread(s), torch {torch.__version__}", flush=True)

    # 1. PTQ rows
    calib = calibration_batches(tok, a.calib_samples, 512, "boolq", seed=0)
    rows = [("float", "-", ppl_of(ckpt, tokens, a.context))]
    ptq = {}
    for method in ("rtn", "gptq", "awq"):
        folder, seconds = ptq_checkpoint(ckpt, fmt, method, calib, work)
        ptq[method] = (folder, ppl_of(folder, tokens, a.context))
        rows.append((f"PTQ {method.upper()}" + ("+clip" if method == "awq" else ""),
                     f"{seconds:.0f} s ({a.calib_samples} x 512 calibration tokens)" if method != "rtn" else f"{seconds:.0f} s",
                     ptq[method][1]))
        print(f"  {rows[-1]}", flush=True)
    best = min(ptq, key=lambda m: ptq[m][1])

    # 2. teacher data
    data = work / "teacher.jsonl"
    t0 = time.perf_counter()
    train_qat.main(["gen-data", "--out", str(data), "--count", str(a.gen_count), "--prompt_tokens", "64",
                    "--max_new_tokens", str(a.gen_new_tokens), "--threads", str(a.threads)])
    gen_seconds = time.perf_counter() - t0
    data_tokens = train_qat.training_tokens(str(data), tok).numel()

    # 3. the main QAT run
    main_dir = work / f"qat-{fmt.name}-cakld"
    summary = train_qat.train(qat_args(a, ckpt, ptq[best][0], main_dir, data, "cakld", a.steps, a.eval_every))
    qat_ppl = ppl_of(summary["out"], tokens, a.context)
    qat_s = train_seconds(main_dir)
    rows.append((f"QAT CAKLD from {best.upper()}", f"{a.steps} steps, {summary['tokens']} tokens, {qat_s / 60:.1f} min",
                 qat_ppl))
    float_ppl = rows[0][2]
    print(f"\nteacher data: {data_tokens} tokens ({a.gen_count} BoolQ calibration prompts of 64 tokens, up to "
          f"{a.gen_new_tokens} new tokens, temperature 0.7; {gen_seconds:.0f} s this invocation)")
    print(f"QAT: seq_len {a.seq_len}, batch {a.batch_size}, AdamW lr {a.lr} (warm-up {a.warmup}, cosine to {a.lr / 10}), "
          f"train_scales {a.train_scales}, beta {summary['beta']:.3f}\n")
    print("| model | cost | ppl BoolQ | x float |")
    print("|---|---|---|---|")
    for name, cost, ppl in rows:
        print(f"| {name} | {cost} | {ppl:.2f} | {ppl / float_ppl:.2f} |")
    train_qat.plot_curves(main_dir / "log.jsonl", Path(a.plot),
                          {"float": float_ppl, f"PTQ {best.upper()}": ptq[best][1]},
                          title=f"{ckpt.name} {fmt.name}: QAT (CAKLD) from {best.upper()}")
    print(f"\ncurve: {a.plot} (held-out perplexity on the first {a.curve_tokens} tokens)")

    # 4. losses at an equal budget
    if not a.no_losses:
        print(f"\nlosses, each {a.loss_steps} steps ({a.loss_steps * a.batch_size * a.seq_len} tokens) from PTQ "
              f"{best.upper()}, perplexity on the first {a.curve_tokens} tokens:\n")
        print("| loss | ppl BoolQ | x float | train min |")
        print("|---|---|---|---|")
        short = tokens[:a.curve_tokens]
        short_float = perplexity(load_model(ckpt), short, a.context)["ppl"]
        for loss in train_qat.LOSSES:
            run_dir = work / f"loss-{fmt.name}-{loss}"
            s = train_qat.train(qat_args(a, ckpt, ptq[best][0], run_dir, data, loss, a.loss_steps, 0))
            ppl = ppl_of(s["out"], short, a.context)
            print(f"| {loss} | {ppl:.2f} | {ppl / short_float:.2f} | {train_seconds(run_dir) / 60:.1f} |", flush=True)

    # 5. throughput
    if not a.no_speed:
        windows = train_qat.make_windows(train_qat.training_tokens(str(data), tok), a.seq_len, data)[:a.batch_size]
        teacher = load_model(ckpt).requires_grad_(False)
        student, _ = train_qat.build_student(qat_args(a, ckpt, ptq[best][0], work / "unused", data, "cakld", 1, 0),
                                             ckpt, tok)
        float_student = load_model(ckpt)
        float_student.tok_embeddings.weight.requires_grad_(False)  # as in QAT: the embedding/head stays frozen
        speeds = {"fake-quant student": step_tok_s(student, teacher, windows, 3),
                  "float model": step_tok_s(float_student, teacher, windows, 3)}
        print(f"\ntraining throughput, one step of {windows.shape[0]} x {a.seq_len} tokens (CAKLD, teacher on the fly, "
              f"AdamW), median of 3:\n")
        print("| trained model | tok/s | vs float |")
        print("|---|---|---|")
        for name, s in speeds.items():
            print(f"| {name} | {s:.1f} | {s / speeds['float model']:.2f} |")


if __name__ == "__main__":
    run(main)
