"""Checkpoints: our on-disk format, written, validated and loaded (the converters into it live in convert.py).

Our format is a folder with `model.safetensors` (our parameter names) and `config.json`:
    {"model_args": {...}, "tokenizer": {"file": "tokenizer.json", ...}, "source": "...",
     "quantization": {"recipe": {layer: format}, ...}, "checksums": {file name: "sha256:..."}}
Loading validates config.json field by field, verifies the checksums and refuses NaN/Inf weights.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fileio import atomic_dir, check_output_dir, read_json, sha256_file
from memory import into_fresh_memory
from model import ModelArgs, Transformer, float_linear
from qlinear import QuantFormat, fuse_projections, linear_names, plan_format_names, quantized_linear_factory

CACHE_DIR = Path(os.environ.get("BITFAST_CACHE", Path(__file__).resolve().parent / "checkpoints"))


# ---------------------------------------------------------------- our format

# Every file a checkpoint folder may hold: a folder holding anything else is not ours to replace.
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "awq_clip.safetensors"}
TOKENIZER_FIELDS = {"file": str, "bos_id": int, "eos_id": int, "add_bos": bool, "add_eos": bool, "chat_template": str,
                    "default_system_prompt": str}


def read_config(ckpt_dir) -> dict:
    """config.json, checked field by field (ValueError naming the file and the field)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a bitfast checkpoint (no config.json); "
                                "convert it with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py")
    path = ckpt_dir / "config.json"
    config = read_json(path)
    if not isinstance(config, dict) or "model_args" not in config:
        raise ValueError(f"{ckpt_dir}: not a bitfast checkpoint (config.json has no model_args); "
                         "convert it with scripts/convert_hf_checkpoint.py")
    try:
        check_config(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return config


def check_config(config: dict):
    ModelArgs.from_dict(config["model_args"])
    tok = config.get("tokenizer")
    if tok is not None:
        _check_object(tok, "tokenizer", TOKENIZER_FIELDS)
        if "file" in tok and (tok["file"] in ("", ".", "..") or "/" in tok["file"] or "\\" in tok["file"]):
            raise ValueError(f"tokenizer.file: expected a file name inside the checkpoint folder, got {tok['file']!r}")
    quant = config.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict) or not isinstance(quant.get("recipe"), dict) or not quant["recipe"]:
            raise ValueError("quantization: expected an object with a non-empty 'recipe' object")
        for layer, fmt in quant["recipe"].items():
            if not isinstance(fmt, str):
                raise ValueError(f"quantization.recipe.{layer}: expected a format name, got {fmt!r}")
            if fmt != "float":
                QuantFormat.parse(fmt)
    sums = config.get("checksums")
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v.startswith("sha256:") for k, v in sums.items())):
        raise ValueError("checksums: expected an object of file name -> 'sha256:...'")


def _check_object(obj, where: str, kinds: dict):
    """A JSON object whose known keys hold values of the given types (or null); unknown keys are refused."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for k, v in obj.items():
        if k not in kinds:
            raise ValueError(f"{where}: unknown field {k!r} (known: {', '.join(kinds)})")
        if v is not None and not (isinstance(v, kinds[k]) and (kinds[k] is bool or not isinstance(v, bool))):
            raise ValueError(f"{where}.{k}: expected {kinds[k].__name__} or null, got {v!r}")


def is_checkpoint_dir(folder) -> bool:
    """A folder bitfast wrote as a checkpoint: config.json with model_args, and no file a checkpoint never holds."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_args" in config and all(
        p.name in CHECKPOINT_FILES and p.is_file() for p in folder.iterdir())


def check_output_checkpoint(out_dir, *inputs) -> Path:
    """Refuse, before any work, an output folder that holds someone else's files or is one of the inputs."""
    out_dir = Path(out_dir)
    for src in inputs:
        if src is not None and Path(src).exists() and out_dir.exists() and out_dir.resolve() == Path(src).resolve():
            raise ValueError(f"{out_dir}: is the input {src}; write the output to another folder")
    return check_output_dir(out_dir, is_checkpoint_dir, "checkpoint")


def load_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def save_checkpoint(out_dir, state_dict: dict, config: dict, files: dict = None):
    """Write a checkpoint folder atomically: build it in a temp folder beside the target, then rename.
    `files` maps names in the folder to bytes or text (the tokenizer). config.json records each file's sha256."""
    out_dir = check_output_checkpoint(out_dir)
    unknown = set(files or {}) - CHECKPOINT_FILES
    if unknown:
        raise ValueError(f"not checkpoint files: {sorted(unknown)}")
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "config.json").write_text(json.dumps({**config, "checksums": sums}, indent=2))


def verify_checksums(ckpt_dir, config: dict, names=None):
    """Compare files with the sha256 config.json recorded (checkpoints written before checksums have none)."""
    for name, want in (config.get("checksums") or {}).items():
        if names is None or name in names:
            path = Path(ckpt_dir) / name
            if path.is_file() and sha256_file(path) != want:
                raise ValueError(f"{path}: checksum mismatch (the file changed or is corrupt since it was written); "
                                 "generate.py --skip_checksum loads it anyway")


def load_model(ckpt_dir, device="cpu", dtype=torch.float32, verify: bool = True, fuse: bool = False) -> Transformer:
    """Build the model on the meta device and assign the stored tensors: no float copy is made twice.
    A quantized checkpoint builds its QuantLinear modules directly from the stored codes. `verify` checks the
    weights file's sha256 (~0.2 s per 300 MB) against config.json. `fuse`: for running only (generation,
    evaluation), q|k|v and gate|up become one layer each (qlinear.fuse_projections)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    args = ModelArgs.from_dict(config["model_args"])
    plan = quant_plan(config)
    if verify:
        verify_checksums(ckpt_dir, config, {"model.safetensors"})
    state = load_state_dict(ckpt_dir / "model.safetensors")
    _check_layer_count(state, args, ckpt_dir)
    with torch.device("meta"):
        model = Transformer(args, quantized_linear_factory(plan) if plan else float_linear)
    expected = model_state_for_saving(model.state_dict(), args)
    stray = sorted(set(plan) - set(linear_names(model)))
    if stray:
        raise ValueError(f"{ckpt_dir / 'config.json'}: quantization.recipe names layers the model does not have: "
                         f"{stray[:3]}")
    stored = model_state_for_saving(state, args)  # a tied file may still carry an (unused) copy of the head
    check_state(stored, expected, ckpt_dir)
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{ckpt_dir}: tensor {k} holds NaN or Inf values; the checkpoint is corrupt")
    state = into_fresh_memory(stored, device, dtype)
    model.load_state_dict(state, assign=True, strict=False)  # strict: check_state; a tied head is tied next
    model.tie_head()
    if fuse and fuse_projections(model):  # the concatenated weights join the others in one huge-page block
        model.load_state_dict(into_fresh_memory(model.state_dict(), device, dtype), assign=True)
        model.tie_head()
    return model.eval()


def _check_layer_count(state: dict, args: ModelArgs, source):
    """Before the model is built: n_layer must agree with the stored blocks (building a huge count would take
    minutes before check_state could say so)."""
    stored = {int(m.group(1)) for k in state for m in [re.match(r"layers\.(\d+)\.", k)] if m}
    if len(stored) != args.n_layer:
        raise ValueError(f"{source}: config.json says n_layer={args.n_layer}, the weights hold {len(stored)} blocks")


def quant_plan(config: dict) -> dict:
    """{layer name: QuantFormat or None} from a quantized checkpoint's config; {} for a float one."""
    recipe = (config.get("quantization") or {}).get("recipe")
    if not recipe:
        return {}
    return {n: (None if f == "float" else QuantFormat.parse(f)) for n, f in recipe.items()}


def save_quantized(model, plan: dict, src_ckpt, out_dir, info: dict, extra_files: dict = None) -> Path:
    """Packed codes, fp16 scales/zeros and the recipe, beside a copy of the source's tokenizer."""
    state = model_state_for_saving(model.state_dict(), model.args)
    state = {k: (v.half() if k.endswith((".scales", ".zeros")) else v) for k, v in state.items()}
    record = {"quantization": {"recipe": plan_format_names(plan), **info, "source": str(src_ckpt)}}
    return save_derived(state, src_ckpt, out_dir, record, extra_files)


def save_derived(state: dict, src_ckpt, out_dir, record: dict, extra_files: dict = None) -> Path:
    """A checkpoint made from src_ckpt (quantized, pruned): the new state, the source's config with `record`'s
    fields added or replaced (e.g. "quantization"; "pruning" and "model_args"), and a copy of its tokenizer."""
    config = {**read_config(src_ckpt), **record}
    tok = (config.get("tokenizer") or {}).get("file")
    files = {tok: (Path(src_ckpt) / tok).read_bytes()} if tok else {}
    save_checkpoint(out_dir, state, config, {**files, **(extra_files or {})})
    return Path(out_dir)


def load_tokenizer_for(ckpt_dir, verify: bool = True):
    from tokenizer import load_tokenizer
    config = read_config(ckpt_dir)
    meta = dict(config.get("tokenizer") or {})
    if "file" not in meta:
        raise ValueError(f"{ckpt_dir}: config.json names no tokenizer file")
    if verify:
        verify_checksums(ckpt_dir, config, {meta["file"]})
    return load_tokenizer(Path(ckpt_dir) / meta.pop("file"), **meta)


def model_state_for_saving(state: dict, args: ModelArgs) -> dict:
    """The one place that knows what a checkpoint stores of a model's state: a tied float head is the embedding,
    so output.weight is dropped (model.Transformer.tie_head ties it again after loading)."""
    if args.tie_embeddings:  # the head is the embedding: store it once
        state = {k: v for k, v in state.items() if k != "output.weight"}
    return state


def check_state(state: dict, expected: dict, source):
    """The tensors a model needs, no others, each of the shape the config implies."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")
        if state[k].is_floating_point() != v.is_floating_point() or (
                not v.is_floating_point() and state[k].dtype != v.dtype):
            raise ValueError(f"{source}: {k} is stored as {state[k].dtype}, the model expects {v.dtype}")
