"""A QAT run folder: log.jsonl (every step; periodic held-out perplexity), step-NNNNNN/ checkpoints (trainable
tensors, optimizer, RNG, data position; written to a temp folder and renamed), curves.png, and the exported packed
checkpoint. Writing, reading and checking checkpoints and the log, resuming, and exporting the latest checkpoint."""
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from checkpoint import is_checkpoint_dir, load_state_dict, load_tokenizer_for
from convert import resolve_checkpoint
from fileio import TEMP_TAG, atomic_dir, atomic_write, read_json
from lora import is_adapter_dir, save_adapter
from qat.config import RUN_FIELDS, RunSettings, saved_settings
from qat.data import read_own_jsonl
from qat.lora import LoRARun, build_lora_student
from qat.student import build_student, export

# What a run writes into its folder (besides temps and an exported checkpoint): a folder holding anything else
# is not a run folder, and is never written into.
RUN_FILE = re.compile(r"log\.jsonl|curves\.png|step-\d+|\.step-\d+\..+")


def is_run_dir(folder: Path) -> bool:
    """A QAT run folder: its log, and only what a run writes (checkpoints, plot, temps, an exported checkpoint or
    LoRA adapter)."""
    return (folder / "log.jsonl").is_file() and all(
        RUN_FILE.fullmatch(p.name) or (p.name.startswith(".") and TEMP_TAG in p.name)
        or (p.is_dir() and (is_checkpoint_dir(p) or is_adapter_dir(p))) for p in folder.iterdir())


# ---------------------------------------------------------------- checkpoints

def checkpoints(run_dir: Path) -> list:
    """Finished checkpoint folders, oldest first (a folder appears only by rename, so each is complete)."""
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def save_train_state(run_dir: Path, step: int, params: dict, optimizer, meta: dict, keep: int) -> Path:
    opt = optimizer.state_dict()
    names = list(params)
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    for i, state in opt["state"].items():
        tensors.update({f"optim/{names[i]}/{k}": v for k, v in state.items()})
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    final = run_dir / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "param_groups": opt["param_groups"]}))
    _keep_latest(run_dir, keep)
    return final


def _keep_latest(run_dir: Path, keep: int):
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


# A sharded checkpoint (an --fsdp run's) is a torch.distributed.checkpoint folder: this index beside each
# process's shard file (__RANK_0.distcp), and state.json.
SHARDED_INDEX = ".metadata"
# Only the trainable tensors are saved (the frozen ones come from the --init start). dcp.load fails on any of them
# missing from the checkpoint, so loading need not be strict about the frozen ones it leaves alone.
_TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / SHARDED_INDEX).is_file()


def _sharded_state(model, optimizer=None) -> dict:
    """What a sharded checkpoint holds, as torch.distributed.checkpoint saves and loads it: the trainable tensors
    and, with an optimizer, its state and the random-number state. Each process's own shards under FSDP (DCP
    reshards on load, so a run may resume with another number of processes), whole tensors otherwise."""
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=_TRAINABLE_ONLY)}
    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE_ONLY)
    return {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}


def save_sharded_train_state(run_dir: Path, step: int, model, optimizer, meta: dict, keep: int) -> Path:
    """Called by every process: each writes its shards into rank 0's temp folder, which rank 0 renames once all
    are written (dcp.save returns after the last shard and the index), so step-N/ is whole or absent."""
    state = _sharded_state(model, optimizer)
    main = not dist.is_initialized() or dist.get_rank() == 0
    final = run_dir / f"step-{step:06d}"
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
        if dist.is_initialized():
            shared = [tmp]
            dist.broadcast_object_list(shared, src=0)
            tmp = shared[0]
        dcp.save(state, checkpoint_id=tmp)
        if main:
            (tmp / "state.json").write_text(json.dumps({**meta, "step": step, "param_groups": groups}))
    if main:
        _keep_latest(run_dir, keep)
    return final


def _load_sharded(state: dict, ckpt: Path):
    try:
        dcp.load(state, checkpoint_id=ckpt)
    except CheckpointException as e:  # it wraps each process's failure: a missing key, a shape, a torn file
        first = next(iter(e.failures.values()))[0]
        raise ValueError(f"{ckpt}: sharded checkpoint is damaged or does not match the model being trained "
                         f"({' '.join(str(first).split())[:200]})") from None


def restore_sharded_train_state(model, optimizer, ckpt: Path):
    """Called by every process: load a sharded checkpoint into the (sharded or whole) model and optimizer."""
    state = _sharded_state(model, optimizer)
    _load_sharded(state, ckpt)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_TRAINABLE_ONLY)
    torch.set_rng_state(state["rng"])


def load_sharded_params(model, ckpt: Path):
    """One process: the trainable tensors of a sharded checkpoint, whole, into an unsharded model."""
    state = _sharded_state(model)
    _load_sharded(state, ckpt)
    set_model_state_dict(model, state["model"], options=_TRAINABLE_ONLY)


def read_train_state(ckpt: Path) -> tuple:
    """(meta, tensors) of a checkpoint folder, with a clear error for a damaged or hand-edited one: meta["config"]
    becomes the run's RunSettings, checked as their flags are. tensors is None for a sharded checkpoint (its
    shards are read by restore_sharded_train_state or load_sharded_params)."""
    path = ckpt / "state.json"
    if not path.is_file():
        raise ValueError(f"{ckpt}: not a training checkpoint (no state.json)")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    step = int(ckpt.name[5:])
    beta = meta.get("beta")
    checks = {"step": (type(meta.get("step")) is int and meta.get("step") == step, f"{step}, the folder's step"),
              "beta": (beta is None or type(beta) in (int, float) and 0 <= beta <= 1, "null or a number in [0, 1]"),
              "data_hash": (isinstance(meta.get("data_hash"), str), "a string"),
              "param_groups": (isinstance(meta.get("param_groups"), list)
                               and all(isinstance(g, dict) for g in meta["param_groups"]), "a list of objects"),
              "config": (isinstance(meta.get("config"), dict), "an object of run settings")}
    for field, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"{path}: field {field!r}: expected {expected}, got {meta.get(field)!r}")
    meta["config"] = saved_settings(meta["config"], path)
    return meta, None if is_sharded(ckpt) else load_state_dict(ckpt / "state.safetensors")


def check_same_run(saved: RunSettings, now: RunSettings, ckpt: Path):
    differ = [f for f in RUN_FIELDS if getattr(saved, f) != getattr(now, f)]
    if differ:
        raise ValueError(f"{ckpt} was written by a run with other settings: "
                         + ", ".join(f"--{f} {getattr(saved, f)!r} (now {getattr(now, f)!r})" for f in differ[:4]))


def load_params(tensors: dict, params: dict, ckpt: Path):
    for n, p in params.items():
        t = tensors.get(f"param/{n}")
        if t is None or t.shape != p.shape:
            raise ValueError(f"{ckpt}: does not match the model being trained ({n}: "
                             f"{'missing' if t is None else tuple(t.shape)} vs {tuple(p.shape)})")
        with torch.no_grad():
            p.copy_(t)


def restore_train_state(meta: dict, tensors: dict, params: dict, optimizer, ckpt: Path):
    load_params(tensors, params, ckpt)
    names = list(params)
    state = {}
    for i, n in enumerate(names):
        entries = {k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"optim/{n}/")}
        wrong = [k for k, v in entries.items() if k != "step" and v.shape != params[n].shape]
        if wrong:
            raise ValueError(f"{ckpt}: optimizer state {n}/{wrong[0]} has shape {tuple(entries[wrong[0]].shape)}, "
                             f"not the parameter's {tuple(params[n].shape)}")
        if entries:
            state[i] = entries
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as e:
        raise ValueError(f"{ckpt}: optimizer state does not match this run ({e})") from None
    rng = tensors.get("rng/cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise ValueError(f"{ckpt}: no valid random-number state (rng/cpu)")
    torch.set_rng_state(rng)
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])


def export_latest(run_dir: Path, out: Path) -> Path:
    """Pack the latest checkpoint of a run (finished or not) into a quantized checkpoint at `out` (a LoRA run's:
    save its adapter folder there); returns the checkpoint it packed."""
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{run_dir}: no training checkpoints")
    meta, tensors = read_train_state(found[-1])
    settings = meta["config"]
    float_ckpt = resolve_checkpoint(settings.checkpoint)
    if "lora" in meta:
        lora = LoRARun.saved(meta, found[-1])
        student = build_lora_student(lora, float_ckpt, "ce")[0]
        load_params(tensors, {n: p for n, p in student.named_parameters() if p.requires_grad}, found[-1])
        save_adapter(student, lora.config, float_ckpt, out, {"loss": settings.loss, "steps": meta["step"]})
        return found[-1]
    student, plan = build_student(settings, float_ckpt, load_tokenizer_for(float_ckpt))
    if tensors is None:
        load_sharded_params(student, found[-1])
    else:
        load_params(tensors, {n: p for n, p in student.named_parameters() if p.requires_grad}, found[-1])
    export(student, plan, float_ckpt, out, {"method": f"qat-{settings.loss}", "init": settings.init,
                                            "steps": meta["step"]})
    return found[-1]


# ---------------------------------------------------------------- logs and plots

def append_log(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_log(path: Path) -> list:
    """A run's log rows (a torn last line left out), checked: plots and resumes read their fields."""
    rows = []
    for line, row in read_own_jsonl(path):
        if not (isinstance(row, dict) and all(type(row.get(k)) is int for k in ("step", "tokens"))
                and all(type(row.get(k, 0)) in (int, float) for k in ("loss", "eval_ppl"))):
            raise ValueError(f"{path}, line {line}: not a log row (whole-number \"step\" and \"tokens\", "
                             "numeric \"loss\" or \"eval_ppl\")")
        rows.append(row)
    return rows


def truncate_log(path: Path, step: int):
    """On resume: drop the rows a killed run wrote after its last checkpoint (they will be written again)."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def curve_figure(log_path: Path, title: str = "") -> tuple:
    """(figure, perplexity axes): training loss and held-out perplexity against tokens seen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_log(log_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_ppl" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1)
    a.set(xlabel="training tokens", ylabel="train loss", yscale="log", title=title)
    b.plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], marker="o", label="QAT student")
    b.set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log")
    b.legend(fontsize=8)
    return fig, b


def save_figure(fig, png: Path):
    """Write a figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=90, format="png")
    plt.close(fig)
    atomic_write(png, image.getvalue())


def plot_curves(log_path: Path, png: Path, title: str = ""):
    """A run's curves (curves.png)."""
    save_figure(curve_figure(log_path, title)[0], png)
