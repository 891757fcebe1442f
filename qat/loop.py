"""The training loop: losses (CAKLD, forward/reverse KL, cross-entropy), the learning-rate schedule, one optimizer
step over micro-batches (and DDP or FSDP ranks), held-out evaluation, and a whole run from its first (or resumed)
step to the export. Rank 0 logs, checkpoints and exports; under FSDP (--fsdp) every process takes part in the
evaluation, the checkpoints (each writes its shards) and the export (each gathers its shards for rank 0)."""
import contextlib
import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from checkpoint import is_checkpoint_dir, load_model, load_tokenizer_for, read_config
from cli import init_distributed
from convert import resolve_checkpoint
from eval.perplexity import perplexity
from fileio import check_output_dir
from lora import is_adapter_dir, save_adapter
from model import ModelArgs
from qat.config import INIT_METHODS, RunOptions, RunSettings
from qat.data import held_out_tokens, log_err, make_windows, step_windows, training_tokens
from qat.runs import (
    append_log,
    check_same_run,
    checkpoints,
    is_run_dir,
    plot_curves,
    read_train_state,
    restore_sharded_train_state,
    restore_train_state,
    save_sharded_train_state,
    save_train_state,
    truncate_log,
)
from qat.lora import LoRARun, build_lora_student, check_same_lora
from qat.student import build_student, checkpoint_activations, export, gathered_student, shard_student


# ---------------------------------------------------------------- losses and schedule

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


def lr_at(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------- a run

@dataclass
class Session:
    """What a running training holds."""
    s: RunSettings
    o: RunOptions
    rank: int
    world: int
    device: str
    dtype: torch.dtype
    accum: int = 0
    run_dir: Path = None
    out: Path = None
    float_ckpt: Path = None
    windows: torch.Tensor = None
    data_hash: str = ""
    eval_tokens: torch.Tensor = None
    student: torch.nn.Module = None
    model: torch.nn.Module = None  # the student, or its DDP wrapper (FSDP shards the student itself)
    teacher: torch.nn.Module = None
    plan: dict = None
    params: dict = None
    optimizer: torch.optim.Optimizer = None
    beta: float = None
    meta: dict = None
    tokenizer: object = None
    t_start: float = 0.0
    lora: LoRARun = None  # a LoRA run: adapters over the frozen --checkpoint (qat/lora.py) instead of QAT

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: the trainable tensors, their gradients and the optimizer state are split over the processes."""
        return self.o.fsdp and self.world > 1

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.s.batch_size * self.s.seq_len

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype)


def train(s: RunSettings, o: RunOptions, flags: dict, device: str, dtype: torch.dtype,
          lora: LoRARun = None) -> dict:
    """Train (or resume) a run (QAT, or LoRA adapters with `lora`); returns a summary. `flags` (every flag as
    given) is saved in each checkpoint's state.json as its "config"."""
    if dtype == torch.float16:
        raise ValueError("--dtype float16 would need loss scaling; train in bf16 or float32")
    rank, world, device = init_distributed(device)
    try:
        run = Session(s, o, rank, world, device, dtype, lora=lora)
        resume_from, resumed = _open_run(run)
        _load_data(run)
        _build_models(run)
        start = _start(run, resume_from, resumed)
        run.meta = {"config": flags, "beta": run.beta, "data_hash": run.data_hash,
                    "plan": {n: f.name if f else "float" for n, f in run.plan.items()}}
        if lora:
            run.meta["lora"] = lora.as_dict()
        if run.main:
            log_err(f"train: {sum(p.numel() for p in run.params.values()) / 1e6:.1f}M trainable, "
                    f"{run.windows.shape[0]} windows of {s.seq_len}, {run.tokens_per_step} tokens/step, {world} "
                    f"process(es) x {run.accum} micro-batch(es), loss {s.loss}"
                    + (f" (beta {run.beta:.3f})" if s.loss == "cakld" else ""))
        return _finish(run, _steps(run, start))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _open_run(run: Session) -> tuple:
    """Check the batch split and the output folders; (checkpoint to resume from, its state) or (None, None)."""
    s, o = run.s, run.o
    per_rank, rest = divmod(s.batch_size, run.world)
    if rest or per_rank % o.micro_batch:
        raise ValueError(f"--batch_size {s.batch_size} must split into {run.world} rank(s) x micro-batches of "
                         f"{o.micro_batch}")
    run.accum = per_rank // o.micro_batch
    run.run_dir = check_output_dir(o.run_dir, is_run_dir, "QAT run folder")
    if run.lora:
        run.out = check_output_dir(o.out or run.run_dir / "adapter", is_adapter_dir, "LoRA adapter")
    else:
        run.out = check_output_dir(o.out or run.run_dir / "model", is_checkpoint_dir, "checkpoint")
    found = checkpoints(run.run_dir) if run.run_dir.is_dir() else []
    if found and not o.resume:
        raise ValueError(f"{run.run_dir} already holds checkpoints: pass --resume, or use a new --run_dir")
    resume_from = found[-1] if found and o.resume else None
    resumed = read_train_state(resume_from) if resume_from else None
    if resumed:
        check_same_run(resumed[0]["config"], s, resume_from)
        check_same_lora(resumed[0], run.lora, resume_from)
    return resume_from, resumed


def _load_data(run: Session):
    """The float checkpoint, the training windows (and their hash) and the held-out tokens, lengths checked."""
    s, o = run.s, run.o
    torch.manual_seed(s.seed)
    run.float_ckpt = resolve_checkpoint(s.checkpoint)
    if s.init not in INIT_METHODS:
        resolve_checkpoint(s.init)  # a missing or broken --init folder fails before any model loads
    model_args = ModelArgs.from_dict(read_config(run.float_ckpt)["model_args"])
    lengths = {"--seq_len": s.seq_len, "--eval_context": o.eval_context}
    if s.init in ("gptq", "awq"):
        lengths["--calib_seqlen"] = s.calib_seqlen
    for flag, n in lengths.items():
        if n > model_args.block_size:
            raise ValueError(f"{flag} {n} exceeds the model's context of {model_args.block_size} tokens")
    tokenizer = load_tokenizer_for(run.float_ckpt)
    run.windows = make_windows(training_tokens(s.data, tokenizer, model_args.vocab_size), s.seq_len, s.data)
    if run.windows.shape[0] < s.batch_size:
        raise ValueError(f"{s.data}: {run.windows.shape[0]} windows of {s.seq_len + 1} tokens, fewer than one "
                         f"batch of {s.batch_size}")
    run.data_hash = hashlib.sha256(run.windows.numpy().tobytes()).hexdigest()[:16]
    if (run.main or run.sharded) and o.eval_every:
        run.eval_tokens = held_out_tokens(tokenizer, o.eval_data, o.eval_tokens, o.eval_context)
    run.tokenizer = tokenizer


def _build_models(run: Session):
    """Student (sharded by FSDP, or DDP-wrapped, across ranks), frozen teacher (none for cross-entropy) and
    optimizer (over the student's shards under FSDP)."""
    s, device = run.s, run.device
    if run.lora:
        run.student, run.plan, teacher = build_lora_student(run.lora, run.float_ckpt, s.loss)
    else:
        (run.student, run.plan), teacher = build_student(s, run.float_ckpt, run.tokenizer), run.float_ckpt
    run.student.to(device)
    run.teacher = load_model(teacher, device=device).requires_grad_(False) if s.loss != "ce" else None
    if run.o.activation_checkpointing:
        checkpoint_activations(run.student)
    if run.sharded:
        shard_student(run.student)
    run.params = {n: p for n, p in run.student.named_parameters() if p.requires_grad}
    run.optimizer = torch.optim.AdamW(run.params.values(), lr=s.lr, weight_decay=s.weight_decay)
    run.model = run.student
    if run.world > 1 and not run.sharded:
        from torch.nn.parallel import DistributedDataParallel
        run.model = DistributedDataParallel(run.student, device_ids=[device] if device.startswith("cuda") else None,
                                            broadcast_buffers=False)


def _start(run: Session, resume_from, resumed) -> int:
    """Restore a resumed run's state (or begin a fresh run: its beta, an empty log); returns the first step."""
    s = run.s
    if resumed:
        meta, tensors = resumed
        if meta.get("data_hash") != run.data_hash:
            raise ValueError(f"{resume_from}: the training data changed since this checkpoint was written")
        if tensors is None:
            restore_sharded_train_state(run.student, run.optimizer, resume_from)
        elif run.sharded:
            raise ValueError(f"{resume_from} holds whole tensors (written without --fsdp): resume it without --fsdp")
        else:
            restore_train_state(meta, tensors, run.params, run.optimizer, resume_from)
        run.beta = meta["beta"]
        if run.main:
            truncate_log(run.log_path, meta["step"])
            for tmp in run.run_dir.glob(".step-*"):  # a checkpoint the killed run did not finish writing
                shutil.rmtree(tmp)
            log_err(f"resuming from {resume_from} (step {meta['step']})")
        return meta["step"]
    run.beta = s.beta
    if run.beta is None and s.loss == "cakld":
        n = run.windows.shape[0]
        first = run.windows[step_windows(0, n, n, s.seed)[:s.beta_windows]]
        run.beta = teacher_confidence(run.teacher, first, run.o.micro_batch, run.device, run.autocast)
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.log_path.write_text("")
    return 0


def evaluate(run: Session, step: int) -> float:
    """Held-out perplexity of the student, logged by rank 0 (under FSDP every process runs it: each block's
    forward gathers its shards from all of them)."""
    t0 = time.perf_counter()
    training = run.student.training
    with run.autocast():
        r = perplexity(run.student.eval(), run.eval_tokens, run.o.eval_context, device=run.device)
    run.student.train(training)
    if run.main:
        append_log(run.log_path, {"step": step, "tokens": step * run.tokens_per_step, "eval_ppl": r["ppl"],
                                  "eval_tokens": r["tokens"], "eval_s": round(time.perf_counter() - t0, 2)})
    return r["ppl"]


def train_step(run: Session, step: int, lr: float) -> tuple:
    """One optimizer step over this rank's share of the step's windows; (mean loss, gradient norm). A non-finite
    loss or gradient stops the run before the update."""
    s = run.s
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    mine = run.windows[step_windows(step, run.windows.shape[0], s.batch_size, s.seed)][run.rank::run.world]
    total = torch.zeros((), device=run.device)
    for i, chunk in enumerate(mine.split(run.o.micro_batch)):
        x, y = chunk[:, :-1].to(run.device), chunk[:, 1:].to(run.device)
        # DDP reduces the gradients once, after the last micro-batch; FSDP reduce-scatters after each one, so a
        # process never holds more than its shard of the gradients.
        sync = i == run.accum - 1 or run.world == 1 or run.sharded
        with contextlib.nullcontext() if sync else run.model.no_sync():
            with run.autocast():
                logits = run.model(x)
                with torch.no_grad():
                    target = run.teacher(x) if run.teacher is not None else None
            loss = loss_fn(s.loss, logits, target, y, run.beta) / run.accum
            loss.backward()
        total += loss.detach()
    if run.world > 1:
        dist.all_reduce(total)
        total /= run.world
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params.values(), s.grad_clip)
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards
        grad_norm = grad_norm.full_tensor()
    if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
        last = checkpoints(run.run_dir)
        raise ValueError(f"loss is {total.item()} (gradient norm {grad_norm.item()}) at step {step + 1}; stopped "
                         f"without updating. Last good checkpoint: {last[-1] if last else 'none'}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def _steps(run: Session, start: int) -> int:
    """Steps from `start` to the end (or --stop_after); rank 0 logs (evaluate and _save say who evaluates and
    checkpoints). Returns the end."""
    s, o = run.s, run.o
    if run.eval_tokens is not None and start == 0:
        evaluate(run, 0)
    end = s.steps if o.stop_after is None else min(s.steps, start + o.stop_after)
    bar = tqdm(total=s.steps, initial=start, unit="step", desc="qat", disable=not run.main)
    run.t_start = time.perf_counter()
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, s.lr, s.min_lr, s.warmup, s.steps)
        total, grad_norm = train_step(run, step, lr)
        seconds = time.perf_counter() - t0
        done = step + 1
        if run.main:
            row = {"step": done, "tokens": done * run.tokens_per_step, "loss": total.item(), "lr": lr,
                   "grad_norm": grad_norm.item(), "tok_s": round(run.tokens_per_step / seconds, 1),
                   "time": round(time.perf_counter() - run.t_start, 2)}
            append_log(run.log_path, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tok_s']:.0f}")
        if run.eval_tokens is not None and (done % o.eval_every == 0 or done == s.steps):
            bar.set_postfix(eval_ppl=f"{evaluate(run, done):.2f}")  # the bar is rank 0's
        if done % o.save_every == 0 or done == end:
            _save(run, done)
        if run.world > 1:
            dist.barrier()
    bar.close()
    return end


def state_bytes(params: dict, optimizer) -> int:
    """Bytes this process holds of the trainable tensors and their optimizer state (its shards under FSDP)."""
    tensors = [*params.values(), *(v for state in optimizer.state.values() for v in state.values()
                                   if isinstance(v, torch.Tensor))]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _save(run: Session, step: int):
    """An --fsdp run writes sharded checkpoints (every process its shards, also with one process); others rank 0's
    whole tensors."""
    if run.o.fsdp:
        save_sharded_train_state(run.run_dir, step, run.student, run.optimizer, run.meta, run.o.keep_checkpoints)
    elif run.main:
        save_train_state(run.run_dir, step, run.params, run.optimizer, run.meta, run.o.keep_checkpoints)


def _finish(run: Session, step: int) -> dict:
    """The run's summary; a finished run is exported and its curves plotted."""
    s = run.s
    summary = {"steps": step, "tokens": step * run.tokens_per_step, "beta": run.beta,
               "seconds": time.perf_counter() - run.t_start, "finished": step == s.steps,
               "state_bytes": state_bytes(run.params, run.optimizer)}
    finished = run.student
    if run.sharded and step == s.steps:
        finished = gathered_student(run.student, run.plan, s.train_scales)
    if run.main and step == s.steps:
        info = {"steps": step, "tokens": summary["tokens"]}
        if run.lora:
            save_adapter(run.student, run.lora.config, run.float_ckpt, run.out, {"loss": s.loss, **info})
        else:
            export(finished, run.plan, run.float_ckpt, run.out, {"method": f"qat-{s.loss}", "init": s.init, **info})
        plot_curves(run.log_path, run.run_dir / "curves.png", title=f"{'LoRA' if run.lora else 'QAT'} {s.loss}")
        summary["out"] = str(run.out)
        log_err(f"train: {step} steps, {summary['tokens']} tokens in {summary['seconds']:.0f} s -> {run.out}")
    return summary
