"""Quantization-aware training by self-distillation (BitDistiller): the float model teaches its own quantized copy.

    python train_qat.py gen-data --out data/teacher.jsonl --count 256        # the teacher continues corpus prompts
    python train_qat.py train --data data/teacher.jsonl --format int2-g64 --init awq --run_dir out/qat
    python train_qat.py train ... --resume                                    # continue from the latest checkpoint
    torchrun --nproc-per-node=2 train_qat.py train ...                        # DDP: gloo on CPU, nccl on GPU
    python train_qat.py export --run_dir out/qat --out checkpoints/qat        # pack a run's latest checkpoint

The student is the model with its planned linears as QuantLinear in fake-quant mode: float latent weights,
rounded on the fly with a straight-through estimator against the scales and zeros of a PTQ result (RTN, GPTQ or
AWQ+clip computed here, or any quantized checkpoint). The latents and the norms train; the scales stay fixed
unless --train_scales. The teacher is the float model, frozen; its logits are computed on the fly.
Losses: CAKLD = beta * reverse KL + (1 - beta) * forward KL with beta the teacher's mean token confidence
(its mean top-1 probability on the training data, as BitDistiller), forward KL, reverse KL, cross-entropy.

A run folder holds log.jsonl (every step; periodic held-out perplexity), step-NNNNNN/ checkpoints (trainable
tensors, optimizer, RNG, data position; written to a temp folder and renamed), curves.png, and the exported
packed checkpoint (model/ unless --out), which generate.py and eval/ load with no extra flags.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from checkpoint import (
    is_checkpoint_dir,
    load_model,
    load_state_dict,
    load_tokenizer_for,
    quant_plan,
    read_config,
    resolve_checkpoint,
    save_quantized,
)
import cli
from cli import add_device_args, run, setup_device
from eval.data import CORPORA, calibration_batches, corpus_text, load_text_file, read_jsonl
from eval.perplexity import perplexity
from fileio import TEMP_TAG, atomic_dir, atomic_write, check_output_dir, check_output_file, read_json
from generate import decode_one_token, prefill
from model import ModelArgs, RMSNorm
from quantize import (
    QuantEmbedding,
    QuantFormat,
    QuantLinear,
    linear_names,
    quantize_model,
    read_recipe,
    resolve_recipe,
    tie_quantized_head,
)

# The settings that decide the weights a run reaches: a resumed run must use the same ones.
RUN_FIELDS = ("checkpoint", "data", "format", "recipe", "init", "calib", "calib_samples", "calib_seqlen",
              "train_scales", "loss", "beta", "beta_windows", "seq_len", "batch_size", "steps", "lr", "warmup",
              "min_lr", "weight_decay", "grad_clip", "seed")
LOSSES = ("cakld", "fkl", "rkl", "ce")
INIT_METHODS = ("rtn", "gptq", "awq")
# What a run writes into its folder (besides temps and an exported checkpoint): a folder holding anything else
# is not a run folder, and is never written into.
RUN_FILE = re.compile(r"log\.jsonl|curves\.png|step-\d+|\.step-\d+\..+")
GEN_DATA_TEXT = ("prompt", "completion", "text")


def log_err(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- text sources

def source_text(source: str, split: str) -> str:
    """A corpus's split (calibration for training, eval for scoring), or a user's .txt/.jsonl file, whole."""
    return corpus_text(source, split) if source in CORPORA else load_text_file(source)


# Inputs are read with eval.data's readers and never changed. The two JSONL files this tool appends to itself
# (gen-data's --out, a run's log.jsonl) can end in a line torn by a killed run: only that line is dropped.

def _complete_lines(path: Path) -> tuple:
    """(complete lines, torn last line or b"") of our own JSONL file. A last line without its newline that parses
    is complete (written whole, killed before the newline); one that does not parse is torn."""
    lines = path.read_bytes().split(b"\n")
    last = lines.pop()
    if last.strip():
        try:
            json.loads(last)
            return lines + [last], b""
        except ValueError:
            return lines, last
    return lines, b""


def read_own_jsonl(path: Path) -> list:
    """(line number, row) of a JSONL file this tool appends to, a torn last line left out; the file is unchanged."""
    rows = []
    for n, line in enumerate(_complete_lines(path)[0], 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError as e:  # also UnicodeDecodeError
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
    return rows


def cut_torn_line(path: Path):
    """Before appending to our own JSONL file: drop a torn last line and end the file with a newline."""
    lines, torn = _complete_lines(path)
    whole = b"".join(line + b"\n" for line in lines)
    if torn or whole != path.read_bytes():
        atomic_write(path, whole)


def _is_token_list(tokens, vocab_size: int) -> bool:
    return isinstance(tokens, list) and bool(tokens) and all(type(t) is int and 0 <= t < vocab_size for t in tokens)


def is_gen_data_file(path: Path) -> bool:
    """Whether every complete line is a gen-data row: only such a file is continued by gen-data."""
    try:
        rows = read_own_jsonl(path)
    except ValueError:
        return False
    return all(isinstance(r, dict) and type(r.get("id")) is int and _is_token_list(r.get("tokens"), float("inf"))
               and all(isinstance(r.get(k), str) for k in GEN_DATA_TEXT) for _, r in rows)


def is_run_dir(folder: Path) -> bool:
    """A QAT run folder: its log, and only what a run writes (checkpoints, plot, temps, an exported checkpoint)."""
    return (folder / "log.jsonl").is_file() and all(
        RUN_FILE.fullmatch(p.name) or (p.name.startswith(".") and TEMP_TAG in p.name)
        or (p.is_dir() and is_checkpoint_dir(p)) for p in folder.iterdir())


# ---------------------------------------------------------------- teacher data

def prompt_batches(tokenizer, source: str, count: int, prompt_tokens: int, chat: bool, batch_size: int) -> list:
    """[[(id, prompt ids), ...], ...]: the first `count` paragraphs of the source as prompts, batched so each
    batch shares one prompt length (no padding). Plain prompts are a paragraph's first `prompt_tokens` tokens
    (shorter paragraphs are skipped); chat prompts wrap a whole paragraph of at most that many tokens."""
    paragraphs = [p.strip() for p in source_text(source, "calibration").split("\n\n") if p.strip()]
    prompts = []
    for text in paragraphs:
        ids = tokenizer.encode(text, allow_special=False)
        if chat and len(ids) <= prompt_tokens:
            prompts.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                                            bos=tokenizer.add_bos))
        elif not chat and len(ids) >= prompt_tokens:
            prompts.append(([tokenizer.bos_id] if tokenizer.add_bos else []) + ids[:prompt_tokens])
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(f"{source}: no paragraph fits --prompt_tokens {prompt_tokens}")
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append((i, ids))
    return [group[j:j + batch_size] for _, group in sorted(by_length.items()) for j in range(0, len(group), batch_size)]


@torch.no_grad()
def continue_batch(model, prompts: torch.Tensor, max_new_tokens: int, stop_ids, **sampling) -> list:
    """Sample continuations of equal-length prompts [B, T] with generate.py's prefill/decode steps; each row is
    cut after its first stop token."""
    b, t = prompts.shape
    model.setup_caches(b, t + max_new_tokens)
    token = prefill(model, prompts, torch.arange(t, device=prompts.device), **sampling)
    out = [token]
    stops = torch.tensor(sorted(stop_ids), device=prompts.device)
    done = torch.isin(token.view(-1), stops)
    pos = torch.tensor([t], device=prompts.device)
    while len(out) < max_new_tokens and not bool(done.all()):
        token = decode_one_token(model, token, pos, **sampling)
        out.append(token)
        done |= torch.isin(token.view(-1), stops)
        pos += 1
    rows = []
    for row in torch.cat(out, 1).tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop_ids), len(row))
        rows.append(row[:end])
    return rows


def gen_data(args):
    out = check_output_file(args.out, is_gen_data_file, "gen-data file")
    dtype = setup_device(args)
    ckpt = resolve_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer_for(ckpt)
    batches = prompt_batches(tokenizer, args.source, args.count, args.prompt_tokens, args.chat, args.batch_size)
    done = {row["id"]: row for _, row in read_own_jsonl(out)} if out.exists() else {}
    prompts = {i: ids for batch in batches for i, ids in batch}
    for i, row in done.items():
        if i not in prompts or row["tokens"][:len(prompts[i])] != prompts[i]:
            raise ValueError(f"{out}: record {i} was written with another source or prompt settings; "
                             "use a new --out or the original settings")
    model = load_model(ckpt, device=args.device, dtype=dtype)
    if max(len(ids) for ids in prompts.values()) + args.max_new_tokens > model.args.block_size:
        raise ValueError(f"prompt + --max_new_tokens exceeds the model's context of {model.args.block_size} tokens")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    todo = [(b, batch) for b, batch in enumerate(batches) if any(i not in done for i, _ in batch)]
    log_err(f"gen-data: {len(prompts)} prompts, {len(prompts) - len(done)} to generate in {len(todo)} batches -> {out}")
    t0, new_tokens = time.perf_counter(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        cut_torn_line(out)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="batch", desc="gen-data") as bar:
        for b, batch in todo:
            torch.manual_seed(args.seed * 1_000_003 + b)  # per batch: a resumed run samples what the first would have
            ids = torch.tensor([p for _, p in batch], device=args.device)
            rows = continue_batch(model, ids, args.max_new_tokens, tokenizer.stop_ids, **sampling)
            lines = []
            for (i, p), new in zip(batch, rows):
                if i in done:
                    continue
                new_tokens += len(new)
                completion = [t for t in new if t not in tokenizer.stop_ids]
                lines.append(json.dumps({"id": i, "prompt": tokenizer.decode(p), "completion": tokenizer.decode(completion),
                                         "text": tokenizer.decode(p + completion), "tokens": p + new}) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    log_err(f"gen-data: wrote {new_tokens} new tokens in {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------- training data

def training_tokens(source: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """One token stream: gen-data rows (a .jsonl whose rows carry "tokens": their exact token ids, eos-terminated),
    or text from a corpus's calibration split or a user's file."""
    path = Path(source)
    if source not in CORPORA and path.suffix == ".jsonl" and path.is_file():
        rows = read_jsonl(path)
        if any("tokens" in row for _, row in rows):
            eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            ids = []
            for line, row in rows:
                tokens = row.get("tokens")
                if not _is_token_list(tokens, vocab_size):
                    raise ValueError(f"{path}, line {line}: expected \"tokens\", a non-empty list of token ids "
                                     f"from 0 to {vocab_size - 1} (the model's vocabulary), like gen-data writes")
                ids += tokens + (eos if tokens[-len(eos):] != eos else [])
            return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(tokenizer.encode(source_text(source, "calibration"), allow_special=False), dtype=torch.long)


def make_windows(tokens: torch.Tensor, seq_len: int, source) -> torch.Tensor:
    """Non-overlapping [W, seq_len + 1] windows (inputs and their next-token labels)."""
    n = tokens.numel() // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{source}: {tokens.numel()} tokens, fewer than one training window of {seq_len + 1}")
    return tokens[:n * (seq_len + 1)].view(n, seq_len + 1)


def step_windows(step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the windows a global step trains on: a fresh seeded shuffle each epoch, partial batch dropped.
    A pure function of the step, so the data position is the step."""
    per_epoch = n_windows // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


# ---------------------------------------------------------------- losses

def kl_terms(student_logits, teacher_logits):
    """Per-token forward KL(teacher || student) and reverse KL(student || teacher), in float32."""
    ls = F.log_softmax(student_logits.float(), -1)
    lt = F.log_softmax(teacher_logits.float(), -1)
    forward = (lt.exp() * (lt - ls)).sum(-1)
    reverse = (ls.exp() * (ls - lt)).sum(-1)
    return forward, reverse


def loss_fn(kind: str, student_logits, teacher_logits, labels, beta: float) -> torch.Tensor:
    """Mean over tokens of the chosen loss."""
    if kind == "ce":
        return F.cross_entropy(student_logits.float().flatten(0, 1), labels.flatten())
    forward, reverse = kl_terms(student_logits, teacher_logits)
    if kind == "fkl":
        return forward.mean()
    if kind == "rkl":
        return reverse.mean()
    return (beta * reverse + (1 - beta) * forward).mean()


@torch.no_grad()
def teacher_confidence(teacher, windows: torch.Tensor, micro_batch: int, device, autocast) -> float:
    """The teacher's mean top-1 probability over the given windows: CAKLD's beta (BitDistiller)."""
    total = 0.0
    for chunk in windows.split(micro_batch):
        with autocast():
            logits = teacher(chunk[:, :-1].to(device))
        total += F.softmax(logits.float(), -1).amax(-1).sum().item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay from --lr to --min_lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------- the student

class HeadEmbedding(nn.Module):
    """While training, a quantized tied head's embedding reads the head's fake-quantized latent (QuantEmbedding
    reads the packed codes, which change only at export)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = [head]  # a list, so the head is not registered twice

    def forward(self, idx):
        return F.embedding(idx, self.head[0].fake_quant_weight())


def plan_for(args, model) -> dict:
    recipe = read_recipe(args.recipe) if args.recipe else {"default": QuantFormat.parse(args.format).name}
    return resolve_recipe(recipe, linear_names(model))


def build_student(args, float_ckpt, tokenizer):
    """The PTQ starting point in fake-quant mode, on the CPU. Returns (model, plan)."""
    if args.init in ("rtn", "gptq", "awq"):
        model = load_model(float_ckpt)
        plan = plan_for(args, model)
        calib = None if args.init == "rtn" else calibration_batches(tokenizer, args.calib_samples, args.calib_seqlen,
                                                                     args.calib, args.seed)
        quantize_model(model, plan, args.init, calib, log=lambda s: None)
    else:
        config = read_config(args.init)
        plan = quant_plan(config)
        if not plan:
            raise ValueError(f"--init {args.init} is a float checkpoint; give a quantized one, or rtn|gptq|awq")
        if config["model_args"] != read_config(float_ckpt)["model_args"]:
            raise ValueError(f"--init {args.init} is not a quantization of {float_ckpt} (model arguments differ)")
        model = load_model(args.init)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.train_mode()
            if args.train_scales:
                m.scales = nn.Parameter(m.scales)
        elif isinstance(m, RMSNorm):
            m.weight.requires_grad_(True)
    if isinstance(model.tok_embeddings, QuantEmbedding):
        model.tok_embeddings = HeadEmbedding(model.output)
    return model, plan


def checkpoint_activations(model):
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        forward = block.forward
        block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=False)


def export(model, plan, float_ckpt, out, info) -> Path:
    """Pack the latents into codes (in place) and save a normal quantized checkpoint."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.latent is not None:
            if isinstance(m.scales, nn.Parameter):  # trained scales: codes chosen against the fp16 values saved
                scales = m.scales.detach().half().float()
                del m.scales
                m.register_buffer("scales", scales)
            m.pack_latent()
    tie_quantized_head(model)
    return save_quantized(model, plan, float_ckpt, out, info)


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
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def read_train_state(ckpt: Path) -> tuple:
    """(meta, tensors) of a checkpoint folder, with a clear error for a damaged or hand-edited one: meta["config"]
    holds the run's settings, checked as their flags are."""
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
    return meta, load_state_dict(ckpt / "state.safetensors")


def saved_settings(config: dict, path: Path) -> dict:
    """The RUN_FIELDS of a saved config, each checked by the type and choices of the train flag that sets it."""
    # A fresh train parser holds the rules; _actions is argparse's list of them.
    actions = {a.dest: a for a in add_train_flags(cli.ArgumentParser())._actions}
    settings = {}
    for name in RUN_FIELDS:
        a, v = actions[name], config.get(name)
        if name not in config:
            raise ValueError(f"{path}: config has no {name!r}")
        if a.nargs == 0:  # an on/off flag
            ok = isinstance(v, bool)
        elif v is None:
            ok = a.default is None
        else:
            try:
                parsed = (a.type or str)(str(v))
            except (argparse.ArgumentTypeError, ValueError):
                parsed = None
            ok = parsed == v and isinstance(v, (str, int, float)) and not isinstance(v, bool) \
                and (a.choices is None or v in a.choices)
        if not ok:
            raise ValueError(f"{path}: config {name!r}: {v!r} is not a valid --{name}")
        settings[name] = v
    return settings


def check_same_run(meta: dict, args, ckpt: Path):
    saved = meta["config"]
    differ = [f for f in RUN_FIELDS if saved[f] != getattr(args, f)]
    if differ:
        raise ValueError(f"{ckpt} was written by a run with other settings: "
                         + ", ".join(f"--{f} {saved[f]!r} (now {getattr(args, f)!r})" for f in differ[:4]))


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


def plot_curves(log_path: Path, png: Path, references: dict | None = None, title: str = ""):
    """Training loss and held-out perplexity against tokens seen; `references` draws flat lines
    ({label: perplexity}) for comparison."""
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
    for i, (label, ppl) in enumerate((references or {}).items()):
        b.axhline(ppl, ls="--", lw=1, color=f"C{i + 1}", label=f"{label} {ppl:.1f}")
    b.set(xlabel="training tokens", ylabel="held-out perplexity", yscale="log")
    b.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=90, format="png")
    plt.close(fig)
    atomic_write(png, image.getvalue())


# ---------------------------------------------------------------- training

def init_distributed(device: str) -> tuple:
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def train(args) -> dict:
    """Train (or resume) a run; returns a summary. Rank 0 logs, evaluates, checkpoints and exports."""
    dtype = setup_device(args)
    if dtype == torch.float16:
        raise ValueError("--dtype float16 would need loss scaling; train in bf16 or float32")
    rank, world, device = init_distributed(args.device)
    try:
        return _train(args, dtype, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(args, dtype, rank, world, device) -> dict:
    main = rank == 0
    per_rank, rest = divmod(args.batch_size, world)
    if rest or per_rank % args.micro_batch:
        raise ValueError(f"--batch_size {args.batch_size} must split into {world} rank(s) x micro-batches of "
                         f"{args.micro_batch}")
    accum = per_rank // args.micro_batch
    run_dir = check_output_dir(args.run_dir, is_run_dir, "QAT run folder")
    out = check_output_dir(args.out or run_dir / "model", is_checkpoint_dir, "checkpoint")
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if found and not args.resume:
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume, or use a new --run_dir")
    resume_from = found[-1] if found and args.resume else None
    resumed = read_train_state(resume_from) if resume_from else None
    if resumed:
        check_same_run(resumed[0], args, resume_from)

    torch.manual_seed(args.seed)
    float_ckpt = resolve_checkpoint(args.checkpoint)
    if args.init not in INIT_METHODS:
        resolve_checkpoint(args.init)  # a missing or broken --init folder fails before any model loads
    model_args = ModelArgs.from_dict(read_config(float_ckpt)["model_args"])
    lengths = {"--seq_len": args.seq_len, "--eval_context": args.eval_context}
    if args.init in ("gptq", "awq"):
        lengths["--calib_seqlen"] = args.calib_seqlen
    for flag, n in lengths.items():
        if n > model_args.block_size:
            raise ValueError(f"{flag} {n} exceeds the model's context of {model_args.block_size} tokens")
    tokenizer = load_tokenizer_for(float_ckpt)
    tokens = training_tokens(args.data, tokenizer, model_args.vocab_size)
    windows = make_windows(tokens, args.seq_len, args.data)
    if windows.shape[0] < args.batch_size:
        raise ValueError(f"{args.data}: {windows.shape[0]} windows of {args.seq_len + 1} tokens, fewer than one "
                         f"batch of {args.batch_size}")
    data_hash = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    eval_tokens = None
    if main and args.eval_every:
        text = source_text(args.eval_data, "eval")
        eval_tokens = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos, allow_special=False))[:args.eval_tokens]
        if eval_tokens.numel() < args.eval_context:
            raise ValueError(f"{args.eval_data}: {eval_tokens.numel()} held-out tokens (--eval_tokens "
                             f"{args.eval_tokens}), fewer than one --eval_context window of {args.eval_context}")

    student, plan = build_student(args, float_ckpt, tokenizer)
    student.to(device)
    teacher = load_model(float_ckpt, device=device).requires_grad_(False) if args.loss != "ce" else None
    if args.activation_checkpointing:
        checkpoint_activations(student)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=dtype)) if dtype != torch.float32 \
        else contextlib.nullcontext
    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(student, device_ids=[device] if device.startswith("cuda") else None,
                                        broadcast_buffers=False)

    log_path = run_dir / "log.jsonl"
    if resumed:
        meta, tensors = resumed
        if meta.get("data_hash") != data_hash:
            raise ValueError(f"{resume_from}: the training data changed since this checkpoint was written")
        restore_train_state(meta, tensors, params, optimizer, resume_from)
        start, beta = meta["step"], meta["beta"]
        if main:
            truncate_log(log_path, start)
            for tmp in run_dir.glob(".step-*"):  # a checkpoint the killed run did not finish writing
                shutil.rmtree(tmp)
            log_err(f"resuming from {resume_from} (step {start})")
    else:
        start = 0
        beta = args.beta
        if beta is None and args.loss == "cakld":
            first = windows[step_windows(0, windows.shape[0], windows.shape[0], args.seed)[:args.beta_windows]]
            beta = teacher_confidence(teacher, first, args.micro_batch, device, autocast)
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            log_path.write_text("")
    meta = {"config": vars(args), "beta": beta, "data_hash": data_hash, "plan": {n: f.name if f else "float"
                                                                                 for n, f in plan.items()}}
    tokens_per_step = args.batch_size * args.seq_len
    if main:
        log_err(f"train: {sum(p.numel() for p in params.values()) / 1e6:.1f}M trainable, {windows.shape[0]} windows "
                f"of {args.seq_len}, {tokens_per_step} tokens/step, {world} process(es) x {accum} micro-batch(es), "
                f"loss {args.loss}" + (f" (beta {beta:.3f})" if args.loss == "cakld" else ""))

    def evaluate(step):
        t0 = time.perf_counter()
        with autocast():
            r = perplexity(student, eval_tokens, args.eval_context, device=device)
        append_log(log_path, {"step": step, "tokens": step * tokens_per_step, "eval_ppl": r["ppl"],
                              "eval_tokens": r["tokens"], "eval_s": round(time.perf_counter() - t0, 2)})
        return r["ppl"]

    if main and eval_tokens is not None and start == 0:
        evaluate(0)
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    bar = tqdm(total=args.steps, initial=start, unit="step", desc="qat", disable=not main)
    step, t_start = start, time.perf_counter()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = windows[step_windows(step, windows.shape[0], args.batch_size, args.seed)][rank::world]
        total = torch.zeros((), device=device)
        for i, chunk in enumerate(mine.split(args.micro_batch)):
            x, y = chunk[:, :-1].to(device), chunk[:, 1:].to(device)
            sync = i == accum - 1 or world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast():
                    logits = model(x)
                    with torch.no_grad():
                        target = teacher(x) if teacher is not None else None
                loss = loss_fn(args.loss, logits, target, y, beta) / accum
                loss.backward()
            total += loss.detach()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), args.grad_clip)
        if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
            last = checkpoints(run_dir)
            raise ValueError(f"loss is {total.item()} (gradient norm {grad_norm.item()}) at step {step + 1}; stopped "
                             f"without updating. Last good checkpoint: {last[-1] if last else 'none'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        done = step + 1
        if main:
            row = {"step": done, "tokens": done * tokens_per_step, "loss": total.item(), "lr": lr,
                   "grad_norm": grad_norm.item(), "tok_s": round(tokens_per_step / seconds, 1),
                   "time": round(time.perf_counter() - t_start, 2)}
            append_log(log_path, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tok_s']:.0f}")
            if eval_tokens is not None and (done % args.eval_every == 0 or done == args.steps):
                bar.set_postfix(loss=f"{row['loss']:.4f}", eval_ppl=f"{evaluate(done):.2f}")
            if done % args.save_every == 0 or done == end:
                save_train_state(run_dir, done, params, optimizer, meta, args.keep_checkpoints)
        if world > 1:
            dist.barrier()
    bar.close()
    step = end
    summary = {"steps": step, "tokens": step * tokens_per_step, "beta": beta, "seconds": time.perf_counter() - t_start,
               "finished": step == args.steps}
    if main and step == args.steps:
        export(student, plan, float_ckpt, out, {"method": f"qat-{args.loss}", "init": args.init, "steps": step,
                                                "tokens": summary["tokens"]})
        plot_curves(log_path, run_dir / "curves.png", title=f"QAT {args.loss}")
        summary["out"] = str(out)
        log_err(f"train: {step} steps, {summary['tokens']} tokens in {summary['seconds']:.0f} s -> {out}")
    return summary


def export_run(args):
    """Pack the latest checkpoint of a run (finished or not) into a quantized checkpoint."""
    out = check_output_dir(args.out, is_checkpoint_dir, "checkpoint")
    run_dir = Path(args.run_dir)
    found = checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{run_dir}: no training checkpoints")
    meta, tensors = read_train_state(found[-1])
    config = argparse.Namespace(**meta["config"])
    float_ckpt = resolve_checkpoint(config.checkpoint)
    student, plan = build_student(config, float_ckpt, load_tokenizer_for(float_ckpt))
    load_params(tensors, {n: p for n, p in student.named_parameters() if p.requires_grad}, found[-1])
    export(student, plan, float_ckpt, out, {"method": f"qat-{config.loss}", "init": config.init,
                                                       "steps": meta["step"]})
    print(f"exported {found[-1]} -> {out}")


# ---------------------------------------------------------------- CLI

def quant_format(text):
    """--format: checked at parse time, kept as written (it is a run setting saved as text)."""
    try:
        QuantFormat.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


quant_format.__name__ = "format"


def add_train_flags(t):
    t.add_argument("--checkpoint", help="float bitfast checkpoint, the teacher (default: SmolLM2-135M-Instruct)")
    t.add_argument("--data", default="boolq", type=cli.nonempty,
                   help="gen-data JSONL | boolq | lambada (calibration split) | .txt/.jsonl")
    t.add_argument("--format", default="int2-g64-asym", type=quant_format,
                   help="format of every linear but the head, e.g. int3-g128")
    t.add_argument("--recipe", help="hybrid recipe JSON (quantize.py's), instead of --format")
    t.add_argument("--init", default="rtn", type=cli.nonempty,
                   help="rtn | gptq | awq (computed here) | a quantized checkpoint folder")
    t.add_argument("--calib", default="boolq", type=cli.nonempty, help="calibration text for --init gptq/awq")
    t.add_argument("--calib_samples", type=cli.positive_int, default=128)
    t.add_argument("--calib_seqlen", type=cli.positive_int, default=512)
    t.add_argument("--train_scales", action="store_true", help="also train the quantization scales (LSQ-style)")
    t.add_argument("--loss", default="cakld", choices=LOSSES)
    t.add_argument("--beta", type=cli.nonneg_float, default=None,
                   help="CAKLD's beta, in [0, 1] (default: the teacher's confidence)")
    t.add_argument("--beta_windows", type=cli.positive_int, default=16,
                   help="windows that estimate the teacher's confidence")
    t.add_argument("--seq_len", type=cli.positive_int, default=512)
    t.add_argument("--batch_size", type=cli.positive_int, default=8,
                   help="sequences per optimizer step, over all processes")
    t.add_argument("--micro_batch", type=cli.positive_int, default=2,
                   help="sequences per forward pass (gradient accumulation)")
    t.add_argument("--steps", type=cli.positive_int, default=200)
    t.add_argument("--lr", type=cli.positive_float, default=1e-4)
    t.add_argument("--min_lr", type=cli.nonneg_float, default=1e-5)
    t.add_argument("--warmup", type=cli.nonneg_int, default=10)
    t.add_argument("--weight_decay", type=cli.nonneg_float, default=0.0)
    t.add_argument("--grad_clip", type=cli.positive_float, default=1.0)
    t.add_argument("--seed", type=cli.nonneg_int, default=0)
    t.add_argument("--activation_checkpointing", action="store_true")
    t.add_argument("--eval_data", default="boolq", type=cli.nonempty,
                   help="held-out text: a corpus's eval split, or a file")
    t.add_argument("--eval_every", type=cli.nonneg_int, default=50,
                   help="steps between held-out perplexities (0: never)")
    t.add_argument("--eval_tokens", type=cli.positive_int, default=8192)
    t.add_argument("--eval_context", type=cli.positive_int, default=512, help="at least 2")
    t.add_argument("--save_every", type=cli.positive_int, default=50)
    t.add_argument("--keep_checkpoints", type=cli.positive_int, default=2)
    t.add_argument("--run_dir", default="out/qat", type=cli.nonempty)
    t.add_argument("--out", type=cli.nonempty, help="exported quantized checkpoint (default: RUN_DIR/model)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--stop_after", type=cli.positive_int, default=None,
                   help="stop (with a checkpoint) after this many steps")
    add_device_args(t)
    return t


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gen-data", help="the float model continues prompts from a corpus; appends to a JSONL file")
    g.add_argument("--checkpoint", help="float bitfast checkpoint (default: SmolLM2-135M-Instruct)")
    g.add_argument("--source", default="boolq", type=cli.nonempty,
                   help="boolq | lambada (calibration split) | a .txt/.jsonl file")
    g.add_argument("--out", required=True, type=cli.nonempty,
                   help="JSONL file; an existing one is continued where it stopped")
    g.add_argument("--count", type=cli.positive_int, default=256, help="number of prompts")
    g.add_argument("--prompt_tokens", type=cli.positive_int, default=64,
                   help="prompt length (chat: longest paragraph)")
    g.add_argument("--chat", action="store_true", help="wrap each paragraph as a user message in the chat template")
    g.add_argument("--max_new_tokens", type=cli.positive_int, default=256)
    g.add_argument("--temperature", type=cli.nonneg_float, default=0.7, help="0: greedy")
    g.add_argument("--top_k", type=cli.positive_int, default=None)
    g.add_argument("--top_p", type=cli.probability, default=None)
    g.add_argument("--batch_size", type=cli.positive_int, default=16, help="prompts decoded together")
    g.add_argument("--seed", type=cli.nonneg_int, default=42)
    add_device_args(g)

    t = add_train_flags(sub.add_parser("train", help="quantization-aware training of the student against the "
                                                     "float teacher"))

    e = sub.add_parser("export", help="pack a run's latest checkpoint into a quantized checkpoint")
    e.add_argument("--run_dir", required=True, type=cli.nonempty)
    e.add_argument("--out", required=True, type=cli.nonempty)

    args = p.parse_args(argv)
    if args.command == "train":
        if args.beta is not None and args.beta > 1:
            t.error(f"argument --beta: expected a number in [0, 1], got {args.beta}")
        if args.batch_size % args.micro_batch:
            t.error(f"--batch_size {args.batch_size} is not a multiple of --micro_batch {args.micro_batch}")
        if args.eval_context < 2:
            t.error("argument --eval_context: expected a whole number >= 2 (a window scores tokens 2..N)")
        run_dir = Path(args.run_dir).resolve()
        if args.out and (Path(args.out).resolve() == run_dir or Path(args.out).resolve() in run_dir.parents):
            t.error(f"--out {args.out} would replace the run folder {args.run_dir}; name another folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    {"gen-data": gen_data, "train": train, "export": export_run}[args.command](args)


if __name__ == "__main__":
    run(main)
