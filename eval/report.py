"""One report for several checkpoints evaluated on the same tasks: report.json (every metric with its standard
error), report.md (a table with one column per checkpoint), report.png (each task's headline metric against
model size in MB). All three are made before any is written.

A run is {"checkpoints": [{"name", "path", "size_mb", "tasks": {task: {"metrics": {metric: {"value",
"stderr"}}, "samples", "seconds", "tokens", "tokens_per_s"}}}], ...run settings}. Each task's metrics start with its
headline metric (the first one its config lists), the one plotted.
"""
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fileio import TEMP_TAG, atomic_write  # noqa: E402

REPORT_FILES = ("report.json", "report.md", "report.png")


def _number(x):
    """A float, or None for lm-eval's "N/A" and for NaN (JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def metrics_from_lm_eval(task_results: dict, headline: str | None = None) -> dict:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, ...} -> {"acc": {"value", "stderr"}}, the headline metric
    first. A metric under a named filter keeps the filter's name: "exact_match,strict-match" -> "exact_match
    (strict-match)"."""
    keys = sorted(task_results, key=lambda k: k.split(",")[0] != headline)  # stable: lm-eval's order otherwise
    metrics = {}
    for key in keys:
        value = task_results[key]
        if "," not in key or "_stderr," in key:
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else f"{metric} ({filter_name})"
        metrics[name] = {"value": _number(value), "stderr": _number(task_results.get(f"{metric}_stderr,{filter_name}"))}
    return metrics


def _cell(m: dict) -> str:
    if m["value"] is None:
        return "n/a"
    return f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")


def markdown_table(run: dict) -> str:
    ckpts = run["checkpoints"]
    lines = ["| task | metric | " + " | ".join(c["name"] for c in ckpts) + " |",
             "|---|---|" + "---|" * len(ckpts),
             "| | weights MB | " + " | ".join(f"{c['size_mb']:.1f}" for c in ckpts) + " |"]
    for task, first in ckpts[0]["tasks"].items():
        lines.append(f"| {task} | samples | " + " | ".join(str(c["tasks"][task]["samples"]) for c in ckpts) + " |")
        for metric in first["metrics"]:
            lines.append(f"| {task} | {metric} | " + " | ".join(_cell(c["tasks"][task]["metrics"][metric])
                                                             for c in ckpts) + " |")
        lines.append(f"| {task} | tokens/s | " + " | ".join(f"{c['tasks'][task]['tokens_per_s']:.0f}"
                                                           for c in ckpts) + " |")
    return "\n".join(lines) + "\n"


def plot(run: dict, path):
    """Headline metric against size, one line per task; perplexities (lower is better) get their own axes."""
    ckpts = sorted(run["checkpoints"], key=lambda c: c["size_mb"])
    sizes = [c["size_mb"] for c in ckpts]
    lines = {}
    for task in ckpts[0]["tasks"]:
        metric = next(iter(ckpts[0]["tasks"][task]["metrics"]))
        lines[(task, metric)] = [c["tasks"][task]["metrics"][metric]["value"] for c in ckpts]
    groups = [[k for k in lines if "perplexity" not in k[1]], [k for k in lines if "perplexity" in k[1]]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for task, metric in group:
            values = [float("nan") if v is None else v for v in lines[(task, metric)]]
            ax.plot(sizes, values, marker="o", label=f"{task} ({metric})")
        for c in ckpts:
            ax.axvline(c["size_mb"], color="0.85", lw=0.8, zorder=0)
            ax.annotate(c["name"], (c["size_mb"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color="0.4")
        ax.set_xlabel("weights (MB)")
        ax.set_ylabel("perplexity (lower is better)" if "perplexity" in group[0][1] else "score (higher is better)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    limit = f", --limit {run['limit']}" if run.get("limit") else ""
    fig.suptitle(f"task score vs model size{limit}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def is_report_file(path: Path) -> bool:
    """A report file, or the temp of one that a killed run left."""
    return path.is_file() and (path.name in REPORT_FILES
                               or path.name.startswith(tuple(f".{n}{TEMP_TAG}" for n in REPORT_FILES)))


def is_report_dir(folder: Path) -> bool:
    """An earlier report folder: only report files, which a new report replaces."""
    return all(map(is_report_file, folder.iterdir()))


def write_report(run: dict, out_dir) -> dict:
    """report.json, report.md and report.png in out_dir; returns their paths. Check out_dir first
    (fileio.check_output_dir with is_report_dir)."""
    out_dir = Path(out_dir)
    image = io.BytesIO()
    plot(run, image)
    contents = {"json": json.dumps(run, indent=2, allow_nan=False) + "\n", "markdown": markdown_table(run),
                "plot": image.getvalue()}
    paths = dict(zip(contents, (out_dir / name for name in REPORT_FILES)))
    for key, data in contents.items():
        atomic_write(paths[key], data)
    return paths
