"""Structured pruning on one model: perplexity, size and CPU speed of each ratio x importance criterion against the
unpruned model, as a markdown table (printed, and written to --out).

    python scripts/bench_prune.py --out prune.md                   # ratios 0.1,0.2,0.3 x every criterion
    python scripts/bench_prune.py --ratios 0.2 --criteria l2,taylor --max_tokens 50000 --no_speed
    python scripts/bench_prune.py --ratios 0.2 --criteria taylor --recovery lora --recovery_steps 200

Pruning: pruning.py with prune.py's defaults (both parts, block scope, first 4 and last 2 blocks kept); the
gradient criteria share one gradient pass over --calib_samples windows of the BoolQ calibration split. Then the
--recovery step (RECOVERY): "none", or "lora": LoRA adapters (lora.py, rank --lora_rank, alpha 2 x rank) on every
linear of the blocks, trained for --recovery_steps AdamW steps of --recovery_batch x --recovery_seqlen tokens to
match the unpruned model's next-token distribution (forward KL, qat.loop.loss_fn) on the calibration splits of
BoolQ and LAMBADA (disjoint from the evaluation splits), then merged into the pruned float weights, so what is scored
is an ordinary pruned checkpoint; the table gives perplexity before and after recovery. Perplexity: eval/perplexity.py's
protocol on the BoolQ and LAMBADA evaluation splits. Speed: compiled CPU decode (scripts/bench_quant.decode_speed) and eager prefill of a
--prefill_tokens prompt, bf16, --threads threads, medians.
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

from checkpoint import is_checkpoint_dir, load_model, load_tokenizer_for, model_state_for_saving, save_derived
from cli import ArgumentParser, fraction, nonempty, nonneg_int, positive_float, positive_int, run
from convert import resolve_checkpoint
from decoding import prefill
from eval.data import calibration_batches, corpus_tokens
from eval.perplexity import perplexity
from fileio import TEMP_TAG, atomic_write, check_output_dir, check_output_file
from lora import LoRAConfig, apply_lora, merge_lora
from qat.data import make_windows, step_windows, training_tokens
from qat.loop import loss_fn, lr_at
from pruning import CRITERIA, GRADIENT_CRITERIA, PruneSettings, gradient_stats, prunable_linears, prune
from scripts.bench_quant import decode_speed

TITLE = "# Structured pruning: bitfast scripts/bench_prune.py"


RECOVERY_CORPORA = ("boolq", "lambada")  # their calibration splits: the perplexity is scored on the eval splits


def recovery_windows(tokenizer, vocab_size: int, seq_len: int, batch: int) -> torch.Tensor:
    """[W, seq_len + 1] non-overlapping windows of the RECOVERY_CORPORA calibration splits; ValueError if fewer
    than one batch."""
    tokens = torch.cat([training_tokens(name, tokenizer, vocab_size) for name in RECOVERY_CORPORA])
    windows = make_windows(tokens, seq_len, "recovery text")
    if windows.shape[0] < batch:
        raise ValueError(f"recovery text: {windows.shape[0]} windows of {seq_len + 1} tokens, fewer than "
                         f"--recovery_batch {batch}")
    return windows


def lora_recovery(pruned, teacher, windows: torch.Tensor, config: LoRAConfig, steps: int, batch: int, lr: float,
                  log, seed: int = 0):
    """A copy of the pruned model with LoRA adapters trained for `steps` AdamW steps of `batch` windows (inputs
    window[:, :-1]) to match the teacher's next-token distribution (forward KL), then merged into its float weights.
    The pruned model and the teacher are unchanged (a pruned model shares its unpruned tensors with its source)."""
    student = copy.deepcopy(pruned)
    apply_lora(student, config)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, lr / 10, max(1, steps // 10), steps)
        x = windows[step_windows(step, windows.shape[0], batch, seed)][:, :-1]
        with torch.no_grad():
            target = teacher(x)
        loss = loss_fn("fkl", student(x), target, None, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"recovery step {step + 1}/{steps}: KL to the unpruned model {loss.item():.4f}")
    merge_lora(student)
    return student.requires_grad_(False).eval()


@dataclass(frozen=True)
class RecoveryBudget:
    steps: int
    seq_len: int
    batch: int
    lr: float
    rank: int

    def describe(self) -> str:
        return (f"{self.steps} steps x {self.batch} x {self.seq_len} tokens = {self.steps * self.batch * self.seq_len}"
                f" tokens, LoRA rank {self.rank}, lr {self.lr:g}")


def no_recovery(pruned, teacher, windows, budget: RecoveryBudget, log):
    return pruned


def recover_with_lora(pruned, teacher, windows, budget: RecoveryBudget, log):
    return lora_recovery(pruned, teacher, windows, LoRAConfig(budget.rank, 2.0 * budget.rank), budget.steps,
                         budget.batch, budget.lr, log)


# Recovery after pruning, by name: fn(pruned model, unpruned model, recovery_windows, budget, log) -> the model to
# score.
RECOVERY = {"none": no_recovery, "lora": recover_with_lora}


def listed(kind, choices=None):
    def parse(text):
        items = [kind(x) for x in nonempty(text).split(",")]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r} (known: {', '.join(choices)})")
        return items
    parse.__name__ = f"comma-separated list of {kind.__name__}"
    return parse


def prefill_speed(ckpt, prompt: torch.Tensor, runs: int) -> float:
    """Median eager prefill tokens/s of the prompt (after a warm-up run)."""
    model = load_model(ckpt, dtype=torch.bfloat16)
    model.setup_caches(1, prompt.numel() + 1, dtype=torch.bfloat16)
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        prefill(model, prompt.view(1, -1), torch.arange(prompt.numel()))
        times.append(time.perf_counter() - t0)
    return prompt.numel() / statistics.median(times[1:])


def measure(ckpt, a, texts: dict, prompts: tuple, log) -> dict:
    """Perplexity per text, file size, parameters, and unless --no_speed decode and prefill tokens/s."""
    model = load_model(ckpt)
    row = {"params": sum(p.numel() for p in model.parameters()),
           "size": (Path(ckpt) / "model.safetensors").stat().st_size / 1e6}
    torch.set_num_threads(os.cpu_count())
    log("perplexity on " + ", ".join(texts))
    row.update({n: perplexity(model, t, a.context)["ppl"] for n, t in texts.items()})
    if not a.no_speed:
        torch.set_num_threads(a.threads)
        log(f"decode speed (compile, then {a.runs} runs), prefill speed")
        row["decode"] = decode_speed(ckpt, prompts[0], a.new_tokens, a.runs)
        row["prefill"] = prefill_speed(ckpt, prompts[1], a.runs)
    return row


def table_row(name: str, ratio, row: dict, base: dict, recovery: str, before: dict = None) -> str:
    """A markdown row; `before`: perplexities of the pruned model before recovery (None: no recovery ran, the
    scored perplexities are the before-recovery ones)."""
    if "decode" in row:
        speed = " | ".join(f"{row[k]:.1f} | {row[k] / base[k]:.2f}x" for k in ("decode", "prefill"))
    else:
        speed = " | | | "
    ppl = (f"{before['boolq']:.3f} | {before['lambada']:.3f} | {row['boolq']:.3f} | {row['lambada']:.3f}" if before
           else f"{row['boolq']:.3f} | {row['lambada']:.3f} | - | -")
    return (f"| {name} | {ratio} | {row['params'] / 1e6:.1f} | {1 - row['params'] / base['params']:.1%} | "
            f"{row['size']:.1f} | {ppl} | {speed} | {recovery} |")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=nonempty, help="float checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--ratios", type=listed(fraction), default=[0.1, 0.2, 0.3])
    p.add_argument("--criteria", type=listed(str, CRITERIA), default=list(CRITERIA))
    p.add_argument("--keep_first", type=nonneg_int, default=4)
    p.add_argument("--keep_last", type=nonneg_int, default=2)
    p.add_argument("--recovery", default="none", choices=sorted(RECOVERY), help="step between pruning and scoring")
    p.add_argument("--recovery_steps", type=positive_int, default=100, help="LoRA recovery: optimizer steps")
    p.add_argument("--recovery_seqlen", type=positive_int, default=256, help="LoRA recovery: tokens per window")
    p.add_argument("--recovery_batch", type=positive_int, default=4, help="LoRA recovery: windows per step")
    p.add_argument("--recovery_lr", type=positive_float, default=1e-3, help="LoRA recovery: peak learning rate")
    p.add_argument("--lora_rank", type=positive_int, default=16, help="LoRA recovery: adapter rank (alpha 2 x rank)")
    p.add_argument("--calib_samples", type=positive_int, default=10)
    p.add_argument("--calib_seqlen", type=positive_int, default=128)
    p.add_argument("--context", type=positive_int, default=2048)
    p.add_argument("--max_tokens", type=positive_int, default=None, help="tokens per text (default: whole eval split)")
    p.add_argument("--no_speed", action="store_true")
    p.add_argument("--threads", type=positive_int, default=1, help="threads for the speed runs")
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--new_tokens", type=positive_int, default=128)
    p.add_argument("--prefill_tokens", type=positive_int, default=512)
    p.add_argument("--keep", type=nonempty, help="folder to keep the pruned checkpoints in (default: a temp folder)")
    p.add_argument("--out", type=nonempty, help="markdown file to write the table to")
    a = p.parse_args(argv)
    if a.context < 2 or (a.max_tokens is not None and a.max_tokens < a.context):
        p.error("argument --context/--max_tokens: need at least one window of --context tokens, at least 2")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.out:
        check_output_file(a.out, lambda f: f.read_text(errors="replace").startswith(TITLE), "benchmark table")
    if a.keep:
        benchmark(a, check_output_dir(a.keep, lambda d: all(is_checkpoint_dir(c) or TEMP_TAG in c.name
                                                            for c in d.iterdir()), "benchmark folder"))
        return
    with tempfile.TemporaryDirectory(prefix="bitfast-bench-prune-") as tmp:
        benchmark(a, Path(tmp))


def header(a, ckpt, n_layer: int, texts: dict, prompts: tuple, recovery: str) -> list:
    """The title, the settings line (recovery budget included) and the table's head."""
    return [TITLE, "", f"model {ckpt} | parts both, block scope, blocks {a.keep_first}..{n_layer - a.keep_last - 1}"
            f" pruned | calibration {a.calib_samples} x {a.calib_seqlen} BoolQ tokens | recovery {recovery} | "
            f"perplexity: context {a.context}, "
            + ", ".join(f"{n} {t.numel()} tokens" for n, t in texts.items()) + f" | decode: compiled, bf16, "
            f"{a.threads} thread(s), {a.new_tokens} tokens; prefill: eager, {prompts[1].numel()} tokens; medians of "
            f"{a.runs} | {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average at start "
            f"{os.getloadavg()[0]:.1f}", "",
            "| criterion | ratio | params M | removed | size MB | ppl BoolQ | ppl LAMBADA | ppl BoolQ recovered "
            "| ppl LAMBADA recovered | decode tok/s | vs unpruned | prefill tok/s | vs unpruned | recovery |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def benchmark(a, out_root: Path):
    ckpt = resolve_checkpoint(a.checkpoint)
    tok = load_tokenizer_for(ckpt)
    texts = {name: corpus_tokens(tok, name, max_tokens=a.max_tokens) for name in ("boolq", "lambada")}
    chat = torch.tensor(tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                             "France?"}])), dtype=torch.int)
    prompts = (chat, texts["boolq"][:a.prefill_tokens].to(torch.int))
    calib = calibration_batches(tok, a.calib_samples, a.calib_seqlen, "boolq", seed=0)
    model = load_model(ckpt)
    budget = RecoveryBudget(a.recovery_steps, a.recovery_seqlen, a.recovery_batch, a.recovery_lr, a.lora_rank)
    recovery = "none" if a.recovery == "none" else (
        f"{a.recovery}: {budget.describe()}, forward KL to the unpruned model on the "
        f"{' + '.join(RECOVERY_CORPORA)} calibration splits, merged")
    windows = None if a.recovery == "none" else recovery_windows(tok, model.args.vocab_size, budget.seq_len,
                                                                  budget.batch)
    lines = header(a, ckpt, len(model.layers), texts, prompts, recovery)
    print("\n".join(lines), flush=True)
    base = measure(ckpt, a, texts, prompts, lambda m: print(f"  unpruned: {m}", file=sys.stderr, flush=True))
    lines.append(table_row("unpruned", 0, base, base, "-"))
    print(lines[-1], flush=True)
    settings = {c: [PruneSettings(r, c, keep_first=a.keep_first, keep_last=a.keep_last) for r in a.ratios]
                for c in a.criteria}
    stats = None
    if any(c in GRADIENT_CRITERIA for c in a.criteria):  # one gradient pass serves every gradient criterion and ratio
        stats = gradient_stats(model, calib, prunable_linears(model, next(iter(settings.values()))[0]))
    for criterion, runs in settings.items():
        for s in runs:
            def log(msg, name=f"{criterion} {s.ratio}"):  # progress on stderr, so stdout stays the table
                print(f"  {name}: {msg}", file=sys.stderr, flush=True)
            pruned, record = prune(model, s, log=log, stats=stats)
            before = None
            if a.recovery != "none":
                log("perplexity before recovery on " + ", ".join(texts))
                with torch.no_grad():
                    before = {n: perplexity(pruned, t, a.context)["ppl"] for n, t in texts.items()}
            pruned = RECOVERY[a.recovery](pruned, model, windows, budget, log)
            folder = save_derived(model_state_for_saving(pruned.state_dict(), pruned.args), ckpt,
                                  out_root / f"{criterion}-{s.ratio}", {"model_args": pruned.args.to_dict(),
                                                                        "pruning": {**record, "recovery": recovery}})
            lines.append(table_row(criterion, s.ratio, measure(folder, a, texts, prompts, log), base, a.recovery,
                                   before))
            print(lines[-1], flush=True)
    if a.out:
        atomic_write(a.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    run(main)
