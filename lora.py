"""LoRA adapters on any linear of a model, float (`model.Linear`) or quantized (`qlinear.QuantLinear`: QLoRA, the
packed base used as is): y = base(x) + (alpha / r) * B(A(dropout(x))), A [r, K] Kaiming-initialised, B [N, r] zeros,
so a fresh adapter leaves the model unchanged. The base stays frozen; only A and B train.

Which layers get an adapter: target patterns over layer names (`layers.*.attention.wq`), fnmatch globs, or regular
expressions written `re:...` (matched whole). Every pattern must name at least one linear.

An adapter folder holds adapter.safetensors ({layer}.lora_a / {layer}.lora_b) and adapter.json: rank, alpha,
dropout, the target patterns, the adapted layers and the base's fingerprint (the sha256 its config.json records for
model.safetensors), so an adapter is never applied to another base. Merging adds scale * B @ A to the weight: into a
float base exactly; into a quantized base, into its dequantized weight, then quantized again in the base's own
format (RTN, or GPTQ given calibration tokens), with the error of that re-quantization reported.
"""
import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from calibrate import quantize_model
from checkpoint import load_state_dict, model_state_for_saving, read_config, save_checkpoint, save_quantized
from fileio import atomic_dir, read_json, sha256_file
from model import Linear
from qlinear import QuantLinear, linear_names

ADAPTER_FILES = {"adapter.json", "adapter.safetensors"}
DEFAULT_TARGETS = ("layers.*",)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS  # patterns over layer names (globs, or "re:" regexes)

    def __post_init__(self):
        if type(self.rank) is not int or self.rank < 1:
            raise ValueError(f"LoRA rank: expected a whole number >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0):
            raise ValueError(f"LoRA alpha: expected a number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise ValueError(f"LoRA targets: expected non-empty patterns, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------- the module

class _FrozenQuantLinear(torch.autograd.Function):
    """A packed QuantLinear in a graph that needs the input's gradient: the forward runs the layer's own kernel,
    the backward dequantizes the weight for the moment it takes (grad_x = grad_y @ W), so no float copy stays."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.float_weight().to(grad_y.dtype), None


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # float32 whatever the base's dtype (the optimizer's master copy); forward casts them to the input's dtype
        device = (base.weight if isinstance(base, nn.Linear) else base.scales).device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises a weight (and PEFT A)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        if isinstance(self.base, QuantLinear) and torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenQuantLinear.apply(x, self.base)
        else:
            y = self.base(x)
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y + self.scale * update

    def delta(self) -> torch.Tensor:
        """scale * B @ A, float64 [N, K]: what merging adds to the base's weight."""
        return self.scale * (self.lora_b.detach().double() @ self.lora_a.detach().double())

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


# ---------------------------------------------------------------- applying and removing

def target_layers(model, targets) -> list:
    """The linear layers the patterns name, in model order; ValueError for a pattern that names none, or for a tied
    head (its weight is the embedding: an update there would change the embedding too)."""
    names = linear_names(model)
    hit = set()
    for pattern in targets:
        if pattern.startswith("re:"):
            try:
                rx = re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"LoRA target {pattern!r}: bad regular expression ({e})") from None
            found = [n for n in names if rx.fullmatch(n)]
        else:
            found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not found:
            raise ValueError(f"LoRA target {pattern!r} names no linear layer (layers look like {names[0]!r}, "
                             f"{names[-1]!r})")
        hit.update(found)
    if "output" in hit and model.args.tie_embeddings:
        raise ValueError("LoRA target 'output': this model's head is tied to the token embedding; "
                         "target the blocks' layers (e.g. layers.*)")
    return [n for n in names if n in hit]


def apply_lora(model, config: LoRAConfig, layers=None) -> list:
    """Freeze the model and wrap each target linear (or exactly `layers`) in a LoRALinear, in place, in the model's
    mode (train/eval) and on its device. Returns the adapted layer names."""
    if adapted_layers(model):
        raise ValueError("the model already has LoRA adapters (merge_lora or remove_lora them first)")
    layers = target_layers(model, config.targets) if layers is None else layers
    model.requires_grad_(False)
    for name in layers:
        base = model.get_submodule(name)
        if not isinstance(base, (Linear, QuantLinear)):
            raise ValueError(f"{name}: not a float or quantized linear layer ({type(base).__name__})")
        model.set_submodule(name, LoRALinear(base, config.rank, config.alpha, config.dropout).train(model.training))
    return layers


def adapted_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model):
    """Put every adapted layer's base back (the adapters are dropped)."""
    for name, m in adapted_layers(model).items():
        model.set_submodule(name, m.base)


def adapter_state(model) -> dict:
    """{layer.lora_a: [r, K], layer.lora_b: [N, r]} of every adapted layer."""
    state = {}
    for name, m in adapted_layers(model).items():
        state[f"{name}.lora_a"], state[f"{name}.lora_b"] = m.lora_a.detach(), m.lora_b.detach()
    return state


# ---------------------------------------------------------------- adapter folders

def base_fingerprint(ckpt) -> str:
    """The base checkpoint's identity: the sha256 its config.json records for model.safetensors (computed for a
    checkpoint written before checksums)."""
    recorded = (read_config(ckpt).get("checksums") or {}).get("model.safetensors")
    return recorded or sha256_file(Path(ckpt) / "model.safetensors")


def is_adapter_dir(folder) -> bool:
    """A folder bitfast wrote as a LoRA adapter (adapter.json and adapter.safetensors, nothing else)."""
    folder = Path(folder)
    return (folder / "adapter.json").is_file() and all(p.name in ADAPTER_FILES and p.is_file()
                                                       for p in folder.iterdir())


def save_adapter(model, config: LoRAConfig, base_ckpt, out, info: dict = None) -> Path:
    """Write the adapters and adapter.json atomically to `out` (check it first: fileio.check_output_dir)."""
    meta = {**asdict(config), "targets": list(config.targets), "layers": list(adapted_layers(model)),
            "base": str(base_ckpt), "base_fingerprint": base_fingerprint(base_ckpt), **(info or {})}
    with atomic_dir(out) as tmp:
        save_file({k: v.float().cpu().contiguous() for k, v in adapter_state(model).items()},
                  str(tmp / "adapter.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2))
    return Path(out)


def read_adapter(folder) -> tuple:
    """(LoRAConfig, adapter.json as a dict, tensors) of an adapter folder, checked (ValueError naming the file)."""
    folder = Path(folder)
    path = folder / "adapter.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a LoRA adapter folder (no adapter.json)")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        if not isinstance(meta.get("targets"), list):
            raise ValueError(f"'targets': expected a list of patterns, got {meta.get('targets')!r}")
        config = LoRAConfig(meta.get("rank"), meta.get("alpha"), meta.get("dropout", 0.0), tuple(meta["targets"]))
        layers, fingerprint = meta.get("layers"), meta.get("base_fingerprint")
        if not (isinstance(layers, list) and layers and all(isinstance(n, str) for n in layers)):
            raise ValueError("'layers': expected a non-empty list of layer names")
        if not (isinstance(fingerprint, str) and fingerprint.startswith("sha256:")):
            raise ValueError(f"'base_fingerprint': expected 'sha256:...', got {fingerprint!r}")
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return config, meta, load_state_dict(folder / "adapter.safetensors")


def load_adapter(model, folder, base_ckpt) -> LoRAConfig:
    """Apply a saved adapter to `model`, loaded from `base_ckpt`: refused (ValueError) unless the adapter was
    trained on that very base (its fingerprint). The adapters sit on the model's device, in float32."""
    config, meta, tensors = read_adapter(folder)
    have = base_fingerprint(base_ckpt)
    if meta["base_fingerprint"] != have:
        raise ValueError(f"{folder}: this adapter was trained on another base ({meta.get('base')}, "
                         f"{meta['base_fingerprint'][:19]}...), not {base_ckpt} ({have[:19]}...); refusing to apply it")
    names = set(linear_names(model))
    missing = [n for n in meta["layers"] if n not in names]
    if missing:
        raise ValueError(f"{folder}: adapts layers the model does not have: {missing[:3]}")
    apply_lora(model, config, meta["layers"])
    for name, m in adapted_layers(model).items():
        for part in ("lora_a", "lora_b"):
            p, t = getattr(m, part), tensors.get(f"{name}.{part}")
            if t is None or t.shape != p.shape:
                raise ValueError(f"{folder}: {name}.{part} is {'missing' if t is None else tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
    return config


# ---------------------------------------------------------------- merging

def merge_lora(model, method: str = "rtn", calib: torch.Tensor = None) -> dict:
    """Fold every adapter into its base, in place. A float base gets W + scale * B @ A. A quantized base gets its
    dequantized weight plus the update, quantized again in the base's format by `method` (rtn, or gptq with
    `calib` tokens [n, seq]). Returns the re-quantization error of the merged quantized layers against the merged
    float weights: {"layers": {name: {"rel_fro", "max_abs"}}, "rel_fro", "max_abs"} (empty for a float base)."""
    merged_float, plan = {}, {}
    for name, m in adapted_layers(model).items():
        if isinstance(m.base, QuantLinear):
            w = m.base.float_weight().double() + m.delta()  # the merged float weight, the error's reference
            with torch.device("meta"):  # the weight is assigned next: allocate none
                layer = Linear(m.in_features, m.out_features)
            layer.weight = nn.Parameter(w.float(), requires_grad=False)
            merged_float[name], plan[name] = w, m.base.fmt
        else:
            layer = m.base
            with torch.no_grad():
                layer.weight.copy_(layer.weight.double() + m.delta())
        model.set_submodule(name, layer)
    if plan:
        quantize_model(model, plan, method, calib, log=lambda _: None)
    return requantization_error(model, merged_float)


def requantization_error(model, merged_float: dict) -> dict:
    """Relative Frobenius error ||Wq - W||_F / ||W||_F and max |Wq - W| of each re-quantized layer against its merged
    float weight W (float64), and over all of them together."""
    layers, diff_sq, ref_sq = {}, 0.0, 0.0
    for name, w in merged_float.items():
        d = model.get_submodule(name).float_weight().double() - w
        layers[name] = {"rel_fro": (d.norm() / w.norm()).item(), "max_abs": d.abs().max().item()}
        diff_sq, ref_sq = diff_sq + d.square().sum().item(), ref_sq + w.square().sum().item()
    if not layers:
        return {}
    return {"layers": layers, "rel_fro": math.sqrt(diff_sq / ref_sq), "max_abs": max(e["max_abs"]
                                                                                      for e in layers.values())}


def save_merged(model, base_ckpt, out, info: dict) -> Path:
    """Save a merged model as a normal checkpoint beside a copy of the base's tokenizer: quantized (the base's
    plan) or float."""
    config = read_config(base_ckpt)
    plan = {n: (m.fmt if isinstance(m, QuantLinear) else None) for n, m in model.named_modules()
            if isinstance(m, (Linear, QuantLinear))}
    if any(plan.values()):
        return save_quantized(model, plan, base_ckpt, out, info)
    tok = (config.get("tokenizer") or {}).get("file")
    files = {tok: (Path(base_ckpt) / tok).read_bytes()} if tok else {}
    config = {k: v for k, v in config.items() if k != "checksums"}
    config["source"] = f"{base_ckpt} + LoRA {info.get('adapter')}"
    save_checkpoint(out, model_state_for_saving(model.state_dict(), model.args), config, files)
    return Path(out)
