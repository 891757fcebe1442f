"""One report for several checkpoints evaluated on the same tasks: report.json (every metric with its standard
error), report.md (a table with one column per checkpoint), report.png (each task's headline metric against
model size in MB). Nothing is renamed into place until all three are written.

A run is {"checkpoints": [{"name", "path", "size_mb", "tasks": {task: {"metrics": {metric: {"value",
"stderr"}}, "samples", "seconds", "tokens", "tokens_per_s"}}}], ...run settings}. Each task's metrics start with its
headline metric (the first one its config lists), the one plotted.
"""
import json
import math
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


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


def _write_all(files: dict):
    """{path: write(temp_path)}: every file is written to a temp file beside its target first, and only when
    all writes succeeded are they renamed into place, so a failure leaves no partial report."""
    temps = {}
    try:
        for path, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            temps[path] = tmp
            write(tmp)
            os.chmod(tmp, 0o644)
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


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


def write_report(run: dict, out_dir) -> dict:
    """report.json, report.md and report.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "report.png"}
    _write_all({paths["json"]: lambda tmp: Path(tmp).write_text(json.dumps(run, indent=2, allow_nan=False) + "\n"),
                paths["markdown"]: lambda tmp: Path(tmp).write_text(markdown_table(run)),
                paths["plot"]: lambda tmp: plot(run, tmp)})
    return paths
