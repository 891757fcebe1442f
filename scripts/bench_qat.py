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
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from bench_quant import build, scores_of

import cli
import train_qat
from checkpoint import is_checkpoint_dir, load_model, load_tokenizer_for, read_config
from convert import resolve_checkpoint
from cli import run
from eval.data import calibration_batches, corpus_tokens
from fileio import TEMP_TAG, check_output_dir, check_output_file
from qat.config import LOSSES, RunSettings, quant_format
from qat.data import make_windows, training_tokens
from qat.loop import loss_fn
from qat.runs import curve_figure, is_run_dir, read_log, save_figure
from qat.student import build_student
from qlinear import QuantFormat

PNG = b"\x89PNG\r\n\x1a\n"


def ppl_of(folder, tokens, context, cache: Path) -> float:
    """Perplexity of a checkpoint on BoolQ tokens, remembered in `cache` so a rerun does not score it again."""
    return scores_of(folder, {"boolq": tokens}, context, cache)["boolq"]


def qat_args(a, ckpt, init, run_dir, data, loss, steps, eval_every):
    return train_qat.parse_args([
        "train", "--checkpoint", str(ckpt), "--data", str(data), "--init", str(init), "--loss", loss,
        "--seq_len", str(a.seq_len), "--batch_size", str(a.batch_size), "--micro_batch", str(a.micro_batch),
        "--steps", str(steps), "--lr", str(a.lr), "--min_lr", str(a.lr / 10), "--warmup", str(a.warmup),
        *([] if a.fixed_scales else ["--train_scales"]), "--dtype", a.dtype, "--eval_every", str(eval_every),
        "--eval_tokens", str(a.curve_tokens), "--eval_context", str(a.context), "--save_every", "5",
        "--run_dir", str(run_dir), "--resume", "--threads", str(a.threads)])


def is_work_dir(folder: Path) -> bool:
    """An earlier benchmark's work folder: score cache, teacher data, PTQ checkpoints, QAT runs, temps."""
    return all(p.name in ("perplexity.json", "perplexity.tmp", "teacher.jsonl") and p.is_file()
               or p.name.startswith(".") and TEMP_TAG in p.name
               or p.is_dir() and (is_checkpoint_dir(p) or is_run_dir(p)) for p in folder.iterdir())


def train_seconds(run_dir: Path) -> float:
    """Time spent in optimizer steps (evaluations excluded), summed over every invocation of the run."""
    rows = read_log(run_dir / "log.jsonl")
    return sum(r["tokens"] / r["step"] / r["tok_s"] for r in rows if "loss" in r)


def plot_with_references(log_path: Path, png: Path, references: dict, title: str):
    """A run's curves with flat lines ({label: perplexity}) to compare its held-out perplexity with."""
    fig, ppl_axes = curve_figure(log_path, title)
    for i, (label, ppl) in enumerate(references.items()):
        ppl_axes.axhline(ppl, ls="--", lw=1, color=f"C{i + 1}", label=f"{label} {ppl:.1f}")
    ppl_axes.legend(fontsize=8)
    save_figure(fig, png)


def step_tok_s(student, teacher, windows, runs: int, dtype) -> float:
    """Median tokens/s of one optimizer step (CAKLD against on-the-fly teacher logits, AdamW) under autocast(dtype)."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    speeds = []
    for _ in range(runs + 1):  # the first step warms up allocations
        t0 = time.perf_counter()
        x = windows[:, :-1]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = student(x)
            with torch.no_grad():
                target = teacher(x)
        loss_fn("cakld", logits, target, windows[:, 1:], 0.5).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(speeds[1:])


def parse_args():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--format", default="int2-g64-asym", type=quant_format)
    p.add_argument("--work", default="out/bench_qat", type=cli.nonempty,
                   help="folder for checkpoints, data, runs and scores (reused)")
    p.add_argument("--threads", type=cli.positive_int, default=2)
    p.add_argument("--eval_tokens", type=cli.positive_int, default=4096)
    p.add_argument("--curve_tokens", type=cli.positive_int, default=2048)
    p.add_argument("--context", type=cli.positive_int, default=512, help="perplexity window, at least 2")
    p.add_argument("--calib_samples", type=cli.positive_int, default=64)
    p.add_argument("--gen_count", type=cli.positive_int, default=48)
    p.add_argument("--gen_new_tokens", type=cli.positive_int, default=128)
    p.add_argument("--seq_len", type=cli.positive_int, default=256)
    p.add_argument("--batch_size", type=cli.positive_int, default=2)
    p.add_argument("--micro_batch", type=cli.positive_int, default=2)
    p.add_argument("--lr", type=cli.positive_float, default=2e-3)
    p.add_argument("--warmup", type=cli.nonneg_int, default=2)
    p.add_argument("--fixed_scales", action="store_true", help="do not train the quantization scales")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "bfloat16", "fp32", "float32"),
                   help="QAT compute dtype (bf16: autocast; the weights stay float32)")
    p.add_argument("--steps", type=cli.positive_int, default=24)
    p.add_argument("--eval_every", type=cli.nonneg_int, default=8)
    p.add_argument("--losses", default="cakld,fkl,ce", help=f"comma-separated, of {', '.join(LOSSES)}")
    p.add_argument("--loss_steps", type=cli.positive_int, default=6)
    p.add_argument("--no_speed", action="store_true")
    p.add_argument("--plot", default=None, type=cli.nonempty, help="default: docs/qat_FORMAT.png")
    a = p.parse_args()
    unknown = [x for x in a.losses.split(",") if x not in LOSSES] if a.losses else []
    if unknown:
        p.error(f"argument --losses: unknown loss {unknown[0]!r} (choose from {', '.join(LOSSES)})")
    if a.batch_size % a.micro_batch:
        p.error(f"--batch_size {a.batch_size} is not a multiple of --micro_batch {a.micro_batch}")
    if a.context < 2:
        p.error("argument --context: expected a whole number >= 2")
    return a


def ptq_rows(a, fmt, ckpt, tok, tokens, work, scores) -> tuple:
    """Stage 1: float, RTN, GPTQ and AWQ+clip perplexity. ({method: (folder, ppl)}, table rows)."""
    calib = calibration_batches(tok, a.calib_samples, 512, "boolq", seed=0)
    rows = [("float (teacher)", "-", ppl_of(ckpt, tokens, a.context, scores))]
    ptq = {}
    for method in ("rtn", "gptq", "awq"):
        folder, seconds = build(ckpt, f"{fmt.name}:{method}", calib, work, quantize_output=False,  # head float
                                log=lambda msg, m=method: print(f"  PTQ {m}: {msg}", file=sys.stderr, flush=True))
        ptq[method] = (folder, ppl_of(folder, tokens, a.context, scores))
        cost = f"{seconds:.0f} s" + (f" ({a.calib_samples} x 512 calibration tokens)" if method != "rtn" else "")
        rows.append((f"PTQ {method.upper()}" + ("+clip" if method == "awq" else ""), cost, ptq[method][1]))
        print(f"  {rows[-1]}", flush=True)
    return ptq, rows


def main_qat(a, fmt, ckpt, start, best, data, data_tokens, rows, tokens, short, work, scores, plot):
    """Stage 3: the main QAT run, the results table and its curve."""
    main_dir = work / f"qat-{fmt.name}-cakld"
    summary = train_qat.train(qat_args(a, ckpt, start, main_dir, data, "cakld", a.steps, a.eval_every))
    minutes = train_seconds(main_dir) / 60
    rows.append((f"QAT CAKLD from PTQ {best.upper()}", f"{a.steps} steps, {summary['tokens']} tokens, {minutes:.0f} min",
                 ppl_of(summary["out"], tokens, a.context, scores)))
    print(f"\nteacher data: {data_tokens} tokens ({a.gen_count} BoolQ calibration passages cut to 64-token prompts, up "
          f"to {a.gen_new_tokens} new tokens each, temperature 0.7)")
    print(f"QAT: {a.dtype} autocast, seq_len {a.seq_len}, batch {a.batch_size}, AdamW lr {a.lr} (warm-up {a.warmup} "
          f"steps, cosine to {a.lr / 10}), scales {'fixed' if a.fixed_scales else 'trained'}, "
          f"CAKLD beta {summary['beta']:.3f}; cost = time in optimizer steps\n")
    print("| model | cost | ppl BoolQ | x float |")
    print("|---|---|---|---|")
    float_ppl = rows[0][2]
    for name, cost, ppl in rows:
        print(f"| {name} | {cost} | {ppl:.2f} | {ppl / float_ppl:.2f} |")
    plot_with_references(main_dir / "log.jsonl", plot, {"float": ppl_of(ckpt, short, a.context, scores)},
                         title=f"{ckpt.name} {fmt.name}: QAT (CAKLD) from PTQ {best.upper()}")
    print(f"\ncurve: {plot} (held-out perplexity on the first {a.curve_tokens} tokens, {a.dtype}, every "
          f"{a.eval_every} steps)", flush=True)


def loss_table(a, fmt, ckpt, start, best, data, short, work, scores):
    """Stage 4: each loss from the same start at an equal, smaller budget."""
    print(f"\nlosses, each {a.loss_steps} steps ({a.loss_steps * a.batch_size * a.seq_len} tokens, same schedule) "
          f"from PTQ {best.upper()}; perplexity on the first {a.curve_tokens} tokens:\n")
    print("| loss | ppl BoolQ | x float | train min |")
    print("|---|---|---|---|")
    short_float = ppl_of(ckpt, short, a.context, scores)
    print(f"| (start: PTQ {best.upper()}) | {ppl_of(start, short, a.context, scores):.2f} | "
          f"{ppl_of(start, short, a.context, scores) / short_float:.2f} | - |")
    for loss in a.losses.split(","):
        run_dir = work / f"loss-{fmt.name}-{loss}"
        s = train_qat.train(qat_args(a, ckpt, start, run_dir, data, loss, a.loss_steps, 0))
        ppl = ppl_of(s["out"], short, a.context, scores)
        print(f"| {loss} | {ppl:.2f} | {ppl / short_float:.2f} | {train_seconds(run_dir) / 60:.1f} |", flush=True)


def throughput_table(a, ckpt, start, data, tok, vocab_size, work):
    """Stage 5: tokens/s of one optimizer step, fake-quant student vs the float model."""
    windows = make_windows(training_tokens(str(data), tok, vocab_size), a.seq_len, data)[:1]
    teacher = load_model(ckpt).requires_grad_(False)
    settings = RunSettings.from_flags(vars(qat_args(a, ckpt, start, work / "unused", data, "cakld", 1, 0)))
    student, _ = build_student(settings, ckpt, tok)
    float_model = load_model(ckpt)
    float_model.tok_embeddings.weight.requires_grad_(False)  # as in QAT: the tied embedding/head stays frozen
    print(f"\ntraining throughput: one optimizer step on 1 x {a.seq_len} tokens (CAKLD, teacher logits on the fly, "
          f"AdamW), median of 3 after a warm-up step:\n")
    print("| trained model | compute | tok/s | vs float model, same compute |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        speeds = {name: step_tok_s(m, teacher, windows, 3, dtype)
                  for name, m in (("float model", float_model), ("fake-quant student", student))}
        for name, tok_s in speeds.items():
            print(f"| {name} | {str(dtype)[6:]} | {tok_s:.1f} | {tok_s / speeds['float model']:.2f} |", flush=True)


def main():
    a = parse_args()
    fmt = QuantFormat.parse(a.format)
    work = check_output_dir(a.work, is_work_dir, "QAT benchmark work folder")
    plot = check_output_file(a.plot or f"docs/qat_{fmt.name}.png", lambda f: f.read_bytes()[:8] == PNG, "plot")
    torch.set_num_threads(a.threads)
    work.mkdir(parents=True, exist_ok=True)
    scores = work / "perplexity.json"
    ckpt = resolve_checkpoint(None)
    vocab_size = read_config(ckpt)["model_args"]["vocab_size"]
    tok = load_tokenizer_for(ckpt)
    stream = corpus_tokens(tok, "boolq")
    tokens, short = stream[:a.eval_tokens], stream[:a.curve_tokens]
    print(f"model {ckpt.name} | {fmt.name}, output head float (as BitDistiller) | perplexity: BoolQ eval split, first "
          f"{tokens.numel()} tokens, context {a.context}, float32 | CPU, {a.threads} thread(s), torch {torch.__version__}",
          flush=True)
    ptq, rows = ptq_rows(a, fmt, ckpt, tok, tokens, work, scores)
    best = min(ptq, key=lambda m: ptq[m][1])
    start = ptq[best][0]
    # 2. teacher data
    data = work / "teacher.jsonl"
    train_qat.main(["gen-data", "--out", str(data), "--count", str(a.gen_count), "--prompt_tokens", "64",
                    "--max_new_tokens", str(a.gen_new_tokens), "--threads", str(a.threads)])
    data_tokens = training_tokens(str(data), tok, vocab_size).numel()
    main_qat(a, fmt, ckpt, start, best, data, data_tokens, rows, tokens, short, work, scores, plot)
    if a.losses:
        loss_table(a, fmt, ckpt, start, best, data, short, work, scores)
    if not a.no_speed:
        throughput_table(a, ckpt, start, data, tok, vocab_size, work)


if __name__ == "__main__":
    run(main)
