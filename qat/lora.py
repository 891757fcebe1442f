"""LoRA / QLoRA fine-tuning through the QAT loop (`train_qat.py lora`): the student is the --checkpoint as it is,
float or quantized (packed, no float latent), frozen, with lora.LoRALinear adapters on the target layers; only the
adapters train. The losses are the QAT loop's: cross-entropy on the data (fine-tuning a user's JSONL), or
distillation from a float teacher (recovery after pruning or quantization: --teacher, by default the float base
itself or the float checkpoint a quantized base records as its source). A finished run saves the adapter folder
(RUN_DIR/adapter unless --out) instead of a packed checkpoint."""
import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cli
from checkpoint import load_model, quant_plan, read_config
from convert import resolve_checkpoint
from lora import DEFAULT_TARGETS, LoRAConfig, apply_lora

# Train flags that decide how QAT quantizes: a LoRA run keeps its base's weights, so they must stay unset.
QAT_ONLY = ("format", "recipe", "init", "calib", "calib_samples", "calib_seqlen", "train_scales")


@dataclass(frozen=True)
class LoRARun:
    """What a LoRA run adds to RunSettings (a resumed run must use the same)."""
    config: LoRAConfig
    teacher: str | None

    @classmethod
    def from_flags(cls, flags: dict) -> "LoRARun":
        return cls(LoRAConfig(flags["rank"], flags["alpha"], flags["dropout"], tuple(flags["targets"])),
                   flags["teacher"])

    @classmethod
    def saved(cls, meta: dict, ckpt: Path) -> "LoRARun":
        """The LoRARun a checkpoint's state.json records, checked (ValueError naming the file)."""
        saved = meta.get("lora")
        try:
            if not (isinstance(saved, dict) and isinstance(saved.get("targets"), list)
                    and (saved.get("teacher") is None or isinstance(saved["teacher"], str))):
                raise ValueError(f"'lora': expected an object of LoRA settings, got {saved!r}")
            return cls.from_flags(saved)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ckpt / 'state.json'}: {e}") from None

    def as_dict(self) -> dict:
        """As a checkpoint's state.json stores it (under "lora"): JSON values, so a saved one compares equal."""
        return json.loads(json.dumps({**asdict(self.config), "teacher": self.teacher}))


def add_lora_flags(t):
    """The LoRA flags, on a parser that already has the train flags (qat.config.add_train_flags)."""
    for a in t._actions:  # argparse's list of flags: the QAT-only ones are hidden (and refused if set)
        if a.dest in QAT_ONLY:
            a.help = argparse.SUPPRESS
        if a.dest == "checkpoint":
            a.help = "the base the adapters train on, float or quantized (default: SmolLM2-135M-Instruct)"
        if a.dest == "out":
            a.help = "adapter folder written at the end (default: RUN_DIR/adapter)"
    t.set_defaults(loss="ce", run_dir="out/lora")
    t.add_argument("--teacher", type=cli.nonempty,
                   help="float teacher for the distillation losses (default: a float base itself, or the float "
                        "checkpoint a quantized base records as its source)")
    t.add_argument("--rank", type=cli.positive_int, default=16)
    t.add_argument("--alpha", type=cli.positive_float, default=32.0, help="the update is scaled by alpha / rank")
    t.add_argument("--dropout", type=cli.nonneg_float, default=0.0, help="dropout on the adapters' input, in [0, 1)")
    t.add_argument("--targets", nargs="+", type=cli.nonempty, default=list(DEFAULT_TARGETS),
                   help="layer-name patterns: globs (layers.*.attention.wq) or re:REGEX (default: layers.*)")
    return t


def check_lora_flags(t, args):
    """What the LoRA flags' types cannot check (t.error: one line, exit 2)."""
    defaults = {a.dest: a.default for a in t._actions}
    for name in QAT_ONLY:
        if getattr(args, name) != defaults[name]:
            t.error(f"--{name} is a QAT flag; a LoRA run trains adapters over --checkpoint as it is")
    if args.dropout >= 1:
        t.error(f"argument --dropout: expected a number in [0, 1), got {args.dropout}")
    if args.fsdp:  # adapters are small: every process can hold them whole (DDP under torchrun)
        t.error("--fsdp shards a QAT student; a LoRA run trains only its adapters and uses DDP under torchrun")
    if args.teacher and args.loss == "ce":
        t.error("--teacher is used by the distillation losses (--loss cakld|fkl|rkl), not by --loss ce")


def check_same_lora(meta: dict, lora: LoRARun | None, ckpt: Path):
    """A resumed checkpoint was written by the same kind of run (QAT or LoRA) with the same LoRA settings."""
    saved, now = meta.get("lora"), lora.as_dict() if lora else None
    if saved != now:
        raise ValueError(f"{ckpt} was written by a {'LoRA' if saved else 'QAT'} run"
                         + (f" with other LoRA settings ({saved}, now {now})" if saved and now else "")
                         + "; use a new --run_dir")


def teacher_checkpoint(lora: LoRARun, base: Path, plan: dict) -> Path:
    """The float teacher: --teacher, else a float base itself, else the float source a quantized base records."""
    if lora.teacher:
        teacher = resolve_checkpoint(lora.teacher)
    elif not plan:
        teacher = base
    else:
        source = (read_config(base)["quantization"]).get("source")
        if not (isinstance(source, str) and (Path(source) / "config.json").is_file()):
            raise ValueError(f"{base} is quantized and records no float source checkpoint; pass --teacher")
        teacher = resolve_checkpoint(source)
    if quant_plan(read_config(teacher)):
        raise ValueError(f"--teacher {teacher} is a quantized checkpoint; the teacher is a float model")
    if read_config(teacher)["model_args"]["vocab_size"] != read_config(base)["model_args"]["vocab_size"]:
        raise ValueError(f"--teacher {teacher} has another vocabulary than the base {base}")
    return teacher


def build_lora_student(lora: LoRARun, base: Path, loss: str) -> tuple:
    """(student, the base's plan, teacher checkpoint or None for cross-entropy): the base as stored, frozen, in
    training mode (adapter dropout), with fresh adapters on the target layers."""
    plan = quant_plan(read_config(base))
    teacher = teacher_checkpoint(lora, base, plan) if loss != "ce" else None
    model = load_model(base).train()
    apply_lora(model, lora.config)
    return model, plan, teacher

