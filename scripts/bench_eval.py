"""Task accuracy of the default model, float vs its int8 and int4-g128 checkpoints: runs eval/run.py on the
offline tasks and writes the report's table into BENCHMARKS.md (its own section, replaced on each run).

    python scripts/bench_eval.py                      # --limit 200, the three checkpoints below
    python scripts/bench_eval.py --limit 50 --tasks hellaswag_offline --no_benchmarks_md

The quantized checkpoints are made with
    python quantize.py --mode int8 --quantize_output --out checkpoints/smollm2-int8
    python quantize.py --mode int4 --groupsize 128 --method rtn --quantize_output --out checkpoints/smollm2-int4-g128
"""
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

import cli  # noqa: E402
from convert import resolve_checkpoint  # noqa: E402
from cli import run  # noqa: E402
from eval.report import is_report_dir, is_report_file, write_report  # noqa: E402
from fileio import atomic_write, check_output_dir  # noqa: E402

CHECKPOINTS = ("checkpoints/SmolLM2-135M-Instruct", "checkpoints/smollm2-int8", "checkpoints/smollm2-int4-g128")
TASKS = "hellaswag_offline,arc_easy_offline,piqa_offline"
HEADING = "## Task accuracy: float vs int8 vs int4-g128 (lm-eval, offline tasks)"


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section under `heading` (up to the next "## " heading) replaced, or appended."""
    section = f"{heading}\n\n{body.rstrip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        return text.rstrip() + "\n\n" + section
    end = text.find("\n## ", start + len(heading))
    return text[:start] + section + (text[end:] if end >= 0 else "")


def evaluate_in_parallel(args) -> dict:
    """One eval/run.py process per checkpoint, all at once, each on one thread (on a shared, oversubscribed box,
    one-thread processes side by side finish sooner than one process with several threads: those wait on
    each other). Their reports are merged into one."""
    outs = [Path(args.out) / Path(c).name for c in args.checkpoints]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "eval/run.py"), "--checkpoints", c, "--tasks", args.tasks,
                               "--limit", str(args.limit), "--threads", "1", "--out", str(out)])
             for c, out in zip(args.checkpoints, outs)]
    if any(p.wait() != 0 for p in procs):
        raise ValueError("an evaluation failed (its error is above)")
    runs = [json.loads((out / "report.json").read_text()) for out in outs]
    return {**runs[0], "checkpoints": [c for r in runs for c in r["checkpoints"]]}


def is_bench_dir(folder: Path) -> bool:
    """An earlier benchmark folder: the merged report's files and one report folder per checkpoint."""
    return all(is_report_file(p) or p.is_dir() and is_report_dir(p) for p in folder.iterdir())


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoints", nargs="+", type=cli.nonempty, default=list(CHECKPOINTS))
    p.add_argument("--tasks", default=TASKS, type=cli.nonempty)
    p.add_argument("--limit", type=cli.positive_int, default=200)
    p.add_argument("--out", default="out/bench_eval", type=cli.nonempty)
    p.add_argument("--no_benchmarks_md", action="store_true", help="write the report only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    names = [Path(c).name for c in args.checkpoints]
    if len(set(names)) < len(names):  # each checkpoint's report goes to OUT/<its folder name>
        p.error(f"--checkpoints: two checkpoints share a folder name ({', '.join(names)})")
    check_output_dir(args.out, is_bench_dir, "benchmark report folder")
    for c in args.checkpoints:
        resolve_checkpoint(c)  # a bad one fails here, in one line, before any evaluation starts
    write_report(evaluate_in_parallel(args), args.out)
    if args.no_benchmarks_md:
        return
    table = (Path(args.out) / "report.md").read_text()
    command = f"python scripts/bench_eval.py --limit {args.limit} --tasks {args.tasks} --checkpoints {' '.join(args.checkpoints)}"
    body = (f"Command: `{command}`\n"
            f"Machine: the project's 2-core CPU box ({platform.machine()}), one process per checkpoint side by side, "
            f"1 thread each, torch {torch.__version__}, lm-eval harness through eval/lm_adapter.py, "
            f"{date.today().isoformat()}. The box is shared with other jobs: tokens/s is indicative only.\n"
            f"Each cell is the metric ± its standard error over the first {args.limit} documents of each task "
            "(lm-eval's order); acc_norm normalizes a choice's log-likelihood by its length in bytes. Chance: "
            "HellaSwag and ARC-Easy 0.25, PIQA 0.5. Plot: `out/bench_eval/report.png` (not committed).\n\n" + table)
    path = ROOT / "BENCHMARKS.md"
    atomic_write(path, replace_section(path.read_text(), HEADING, body))
    print(f"wrote the table into {path}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
