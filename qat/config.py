"""A QAT run's settings: the train flags (their types and ranges are also the rules a saved state.json is checked
against), the settings that decide the weights (RunSettings: a resumed run must use the same ones) and the ones
that only decide how the run is carried out (RunOptions)."""
import argparse
from dataclasses import dataclass, fields
from pathlib import Path

import cli
from cli import add_device_args
from qlinear import QuantFormat

LOSSES = ("cakld", "fkl", "rkl", "ce")
INIT_METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class RunSettings:
    """The settings that decide the weights a run reaches (each is the train flag of the same name)."""
    checkpoint: str | None
    data: str
    format: str
    recipe: str | None
    init: str
    calib: str
    calib_samples: int
    calib_seqlen: int
    train_scales: bool
    loss: str
    beta: float | None
    beta_windows: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    min_lr: float
    weight_decay: float
    grad_clip: float
    seed: int

    @classmethod
    def from_flags(cls, flags: dict) -> "RunSettings":
        """From a mapping of flag values (the parsed flags, or a checkpoint's saved config)."""
        return cls(**{name: flags[name] for name in RUN_FIELDS})


RUN_FIELDS = tuple(f.name for f in fields(RunSettings))


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out: none of these changes the weights it reaches."""
    micro_batch: int
    fsdp: bool
    activation_checkpointing: bool
    eval_data: str
    eval_every: int
    eval_tokens: int
    eval_context: int
    save_every: int
    keep_checkpoints: int
    run_dir: str
    out: str | None
    resume: bool
    stop_after: int | None

    @classmethod
    def from_flags(cls, flags: dict) -> "RunOptions":
        return cls(**{f.name: flags[f.name] for f in fields(cls)})


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
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the trainable tensors and the optimizer state over the processes "
                        "(FSDP2, per block); checkpoints are sharded (torch.distributed.checkpoint)")
    t.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, more time)")
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


def saved_settings(config: dict, path: Path) -> RunSettings:
    """The RunSettings of a saved config, each checked by the type and choices of the train flag that sets it."""
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
    return RunSettings.from_flags(settings)
