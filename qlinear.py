"""The quantized linear family: weight formats, round-to-nearest (RTN) math, the one QuantLinear module, the
embedding a tied quantized head serves, and which layer gets which format.

A format is (bits, group size, symmetric?). Codes q are unsigned integers in [0, 2^bits); a weight is
W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]. Symmetric formats fix z = 2^(bits-1) and store no zeros.
When g does not divide the input size the last group of each row is shorter (a ragged group, no padding).
The bit widths there are, and how each is packed, are the rows of kernels/formats.py.

Two words for "which layer gets which format":
- a *recipe* is what a user writes: rules {"default": format, "layers": {glob: format}, "quantize_output": bool}
  (a JSON file for `quantize.py --recipe`); check_recipe, read_recipe.
- a *plan* is a recipe resolved against one model: {layer name: QuantFormat or None (kept float)};
  resolve_recipe makes one. A quantized checkpoint stores its plan as format names (plan_format_names) under
  config.json's `quantization.recipe`, a key older than this naming, kept so checkpoints on disk still load.

This module is the library under checkpoint.py, calibrate.py and the entry scripts; it imports none of them.
"""
import fnmatch
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import read_json
from kernels.dispatch import dequantize_weight, quant_linear
from kernels.formats import SCALAR_BITS, scalar_format
from kernels.packing import pack, unpack
from model import Linear, float_linear

_WIDTHS = ", ".join(map(str, SCALAR_BITS[:-1])) + f" or {SCALAR_BITS[-1]}"
_FORMAT_NAME = re.compile(r"int(" + "|".join(map(str, SCALAR_BITS)) + r")(?:-(?:g(\d+)|pc))?(?:-(sym|asym))?")


# ---------------------------------------------------------------- formats

@dataclass(frozen=True)
class QuantFormat:
    bits: int
    group_size: int = 128  # 0: one group per output row (per-channel)
    sym: bool = False

    def __post_init__(self):
        if self.bits not in SCALAR_BITS:
            raise ValueError(f"unsupported bit width {self.bits} ({_WIDTHS})")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise ValueError(f"group size {self.group_size} must be 0 (per channel) or a multiple of 8")

    @property
    def name(self) -> str:
        return f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "pc") + ("-sym" if self.sym else "-asym")

    @classmethod
    def parse(cls, text: str) -> "QuantFormat":
        """'int4-g128-asym', 'int2-g64', 'int8' (per-channel symmetric), 'int4-pc-sym'."""
        m = _FORMAT_NAME.fullmatch(text.strip())
        if not m:
            raise ValueError(f"bad format {text!r} (expected e.g. int4-g128-asym, int2-g64, int8)")
        bits = int(m.group(1))
        group = int(m.group(2)) if m.group(2) else (0 if bits == 8 or "-pc" in text else 128)
        sym = m.group(3) == "sym" if m.group(3) else bits == 8
        return cls(bits, group, sym)

    def groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size) if self.group_size else 1

    def group_len(self, in_features: int) -> int:
        return self.group_size or in_features

    def bits_per_weight(self, in_features: int) -> float:
        """Codes plus 16-bit scales (and 16-bit zeros when asymmetric), averaged over the weights."""
        per_group = 16 * (1 if self.sym else 2)
        return self.bits + per_group * self.groups(in_features) / in_features


# ---------------------------------------------------------------- the quantizer math (round to nearest)

def grouped(w: torch.Tensor, fmt: QuantFormat, fill: float) -> torch.Tensor:
    """[N, K] -> [N, G, g], padding a ragged last group with `fill`."""
    n, k = w.shape
    g = fmt.group_len(k)
    pad = fmt.groups(k) * g - k
    if pad:
        w = F.pad(w, (0, pad), value=fill)
    return w.view(n, -1, g)


def quant_params(w: torch.Tensor, fmt: QuantFormat, clip: torch.Tensor = None):
    """Scales and zeros [N, G] for weight [N, K]. `clip` ([N, G], a max |w| per group, e.g. from the AWQ
    clip search) shrinks the range before it is spread over the codes."""
    w = w.float()
    qmax = 2 ** fmt.bits - 1
    if fmt.sym:
        amax = grouped(w.abs(), fmt, 0.0).amax(-1)
        if clip is not None:
            amax = torch.minimum(amax, clip)
        scales = _fp16_exact((2 * amax / qmax).clamp(min=1e-7))  # GPTQ's symmetric grid: [-2^(b-1), 2^(b-1)-1] steps
        zeros = torch.full_like(scales, 2 ** (fmt.bits - 1))
        return scales, zeros
    lo = grouped(w, fmt, float("inf")).amin(-1)
    hi = grouped(w, fmt, float("-inf")).amax(-1)
    if clip is not None:
        lo, hi = torch.maximum(lo, -clip), torch.minimum(hi, clip)
    scales = _fp16_exact(((hi - lo) / qmax).clamp(min=1e-7))
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    return scales, zeros


def _fp16_exact(scales):
    # Checkpoints store scales in fp16: choose codes against exactly the scales that will be saved.
    return scales.half().float()


def expand_groups(t: torch.Tensor, fmt: QuantFormat, k: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-weight values."""
    return t.repeat_interleave(fmt.group_len(k), dim=1)[:, :k]


def quantize_codes(w, scales, zeros, fmt: QuantFormat) -> torch.Tensor:
    k = w.shape[1]
    q = torch.round(w.float() / expand_groups(scales, fmt, k).float() + expand_groups(zeros, fmt, k).float())
    return q.clamp(0, 2 ** fmt.bits - 1).to(torch.uint8)


def fake_quantize(w, fmt, clip=None):
    """Round-to-nearest quantize then dequantize a float weight (what RTN would store, as floats)."""
    s, z = quant_params(w, fmt, clip)
    q = quantize_codes(w, s, z, fmt).float()
    return (q - expand_groups(z, fmt, w.shape[1])) * expand_groups(s, fmt, w.shape[1])


def check_weight(w: torch.Tensor, name: str):
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight has NaN or Inf values; refusing to quantize")


def rtn_layer(w: torch.Tensor, fmt: QuantFormat) -> "QuantLinear":
    scales, zeros = quant_params(w, fmt)
    return QuantLinear.from_codes(quantize_codes(w, scales, zeros, fmt), scales, zeros, fmt)


# ---------------------------------------------------------------- the module

class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored as packed integer codes + scales (+ zeros).

    Packed mode (default) runs the kernels in kernels/. Fake-quant mode (`train_mode()`) keeps a float
    latent weight and quantizes it on the fly with a straight-through estimator, so QAT trains this very
    module; `pack_latent()` goes back. Scales (and zeros) stay fixed in both modes unless the trainer
    chooses to make `scales` trainable."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        layout = scalar_format(fmt.bits)
        if in_features % layout.codes_per_word:
            raise ValueError(f"in_features={in_features} cannot be packed at {fmt.bits} bits")
        packed_k = in_features // layout.codes_per_word * layout.word_bytes
        # Stored-signed codes (int8) are kept offset to signed int8, the layout the CPU int8 kernel reads.
        self.register_buffer("qweight", torch.zeros(out_features, packed_k,
                                                    dtype=torch.int8 if layout.stored_signed else torch.uint8))
        g = fmt.groups(in_features)
        self.register_buffer("scales", torch.ones(out_features, g))
        self.register_buffer("zeros", None if fmt.sym else torch.zeros(out_features, g))
        self.latent = None

    @classmethod
    def from_codes(cls, codes, scales, zeros, fmt: QuantFormat) -> "QuantLinear":
        m = cls(codes.shape[1], codes.shape[0], fmt)
        m.set_codes(codes, scales, zeros)
        return m

    def set_codes(self, codes, scales, zeros):
        if scalar_format(self.fmt.bits).stored_signed:
            packed = (codes.to(torch.int16) - 2 ** (self.fmt.bits - 1)).to(torch.int8)
        else:
            packed = pack(codes.to(torch.uint8), self.fmt.bits)
        self.qweight = packed.to(self.qweight.device)
        self.scales = scales.to(self.scales)
        if self.zeros is not None:
            self.zeros = zeros.to(self.zeros)

    def group_zeros(self) -> torch.Tensor:
        return self.zeros if self.zeros is not None else torch.full_like(self.scales, 2 ** (self.fmt.bits - 1))

    def codes(self) -> torch.Tensor:
        if scalar_format(self.fmt.bits).stored_signed:
            return (self.qweight.to(torch.int16) + 2 ** (self.fmt.bits - 1)).to(torch.uint8)
        return unpack(self.qweight, self.fmt.bits, self.in_features)

    def float_weight(self, rows=None) -> torch.Tensor:
        """The stored weight as float32 [N, K] (or only `rows`, an index tensor of output rows)."""
        qweight, scales, zeros = self.qweight, self.scales, self.zeros
        if rows is not None:
            qweight, scales, zeros = qweight[rows], scales[rows], None if zeros is None else zeros[rows]
        return dequantize_weight(qweight, scales, zeros, self.fmt.bits, self.fmt.group_size, self.in_features)

    def forward(self, x):
        if self.latent is None:
            return quant_linear(x, self.qweight, self.scales, self.zeros, self.fmt.bits, self.fmt.group_size,
                                self.in_features)
        return F.linear(x, self.fake_quant_weight().to(x.dtype))

    def as_embedding(self) -> "QuantEmbedding":
        """The token embedding of a model whose tied head is this layer (model.Transformer.tie_head calls it)."""
        return QuantEmbedding(self)

    # -- fake quantization (QAT)
    def fake_quant_weight(self) -> torch.Tensor:
        w = self.latent
        k = w.shape[1]
        s = expand_groups(self.scales, self.fmt, k).to(w.dtype)
        z = expand_groups(self.group_zeros(), self.fmt, k).to(w.dtype)
        q = torch.clamp(_round_ste(w / s + z), 0, 2 ** self.fmt.bits - 1)
        return (q - z) * s

    def train_mode(self, train_scales: bool = False):
        """Fake-quant mode: the latent float weight trains, and with `train_scales` the scales too (LSQ-style)."""
        self.latent = nn.Parameter(self.float_weight())
        if train_scales:
            self.scales = nn.Parameter(self.scales)
        return self

    def pack_latent(self):
        """Back to packed codes. Trained scales become fixed again, rounded to the fp16 a checkpoint stores, and
        the codes are chosen against exactly those values."""
        with torch.no_grad():
            if isinstance(self.scales, nn.Parameter):
                scales = _fp16_exact(self.scales.detach())
                del self.scales
                self.register_buffer("scales", scales)
            self.set_codes(quantize_codes(self.latent, self.scales, self.group_zeros(), self.fmt),
                           self.scales, self.zeros)
        self.latent = None
        return self

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, {self.fmt.name}"


def fuse_linears(layers: list):
    """One layer computing what `layers` (sharing their input) compute, outputs concatenated; None when they are not
    all packed QuantLinear of one format or all float Linear of one dtype (e.g. training or wrapped layers).
    Output rows are independent in every kernel, so the fused layer gives each row as the separate one did."""
    first = layers[0]
    if all(type(m) is QuantLinear and m.latent is None and m.fmt == first.fmt and m.in_features == first.in_features
           for m in layers):
        with torch.device("meta"):
            fused = QuantLinear(first.in_features, sum(m.out_features for m in layers), first.fmt)
        for buf in ("qweight", "scales", "zeros"):
            setattr(fused, buf, None if first.zeros is None and buf == "zeros"
                    else torch.cat([getattr(m, buf) for m in layers]))
        return fused
    if all(type(m) is Linear and m.weight.dtype == first.weight.dtype for m in layers):
        with torch.device("meta"):
            fused = Linear(first.in_features, sum(m.out_features for m in layers))
        fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]), requires_grad=False)
        return fused
    return None


def fuse_projections(model) -> int:
    """For inference: q|k|v and gate|up of every block become one layer each, so a decode step reads each input
    once and makes 4 linear calls per block instead of 7. The separate layers are dropped (no second copy of the
    weights); a fused model is for running, not for saving or training. Returns how many layers were fused."""
    fused = 0
    for block in model.layers:
        attn, ffn = block.attention, block.feed_forward
        if attn.wqkv is None and (wqkv := fuse_linears([attn.wq, attn.wk, attn.wv])) is not None:
            attn.wqkv, attn.wq, attn.wk, attn.wv = wqkv, None, None, None
            fused += 1
        if ffn.w13 is None and (w13 := fuse_linears([ffn.w1, ffn.w3])) is not None:
            ffn.w13, ffn.w1, ffn.w3 = w13, None, None
            fused += 1
    return fused


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


class QuantEmbedding(nn.Module):
    """Token embedding read from a quantized tied output head. Packed, only the looked-up rows are dequantized;
    in fake-quant mode (the head has a latent, QAT) it reads the head's fake-quantized latent, so the
    embedding's gradient reaches the latent too."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = [head]  # a list, so the head's buffers are not registered (and saved) twice

    def forward(self, idx):
        head = self.head[0]
        if head.latent is not None:
            return F.embedding(idx, head.fake_quant_weight())
        rows = head.float_weight(idx.flatten())
        return rows.view(*idx.shape, -1).to(head.scales.dtype)


# ---------------------------------------------------------------- recipes and plans

def linear_names(model) -> list:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]


def check_recipe(recipe) -> dict:
    """A recipe's shape: {"default": format, "layers": {pattern: format}, "quantize_output": bool}, every key
    optional, formats parseable (or "float"). ValueError names the field."""
    if not isinstance(recipe, dict):
        raise ValueError(f"a recipe is a JSON object with 'default' and 'layers', got {type(recipe).__name__}")
    unknown = set(recipe) - {"default", "layers", "quantize_output"}
    if unknown:
        raise ValueError(f"unknown recipe fields {sorted(unknown)} (known: default, layers, quantize_output)")
    layers = recipe.get("layers", {})
    if not isinstance(layers, dict):
        raise ValueError("recipe 'layers' must be an object of {pattern: format}")
    if not isinstance(recipe.get("quantize_output", False), bool):
        raise ValueError("recipe 'quantize_output' must be true or false")
    for where, fmt in [("default", recipe.get("default", "float")), *((f"layers.{k}", v) for k, v in layers.items())]:
        if not isinstance(fmt, str):
            raise ValueError(f"recipe {where}: expected a format name such as int4-g128 or float, got {fmt!r}")
        if fmt != "float":
            QuantFormat.parse(fmt)
    return recipe


def read_recipe(path) -> dict:
    """A recipe JSON file, checked (ValueError naming the file and the field)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return check_recipe(read_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None


def resolve_recipe(recipe: dict, names: list) -> dict:
    """The plan a recipe makes for the layers `names`: {layer name: QuantFormat or None (kept float)}.
    recipe: {"default": "int4-g128-asym", "layers": {"pattern": "int8" | "float", ...}}; patterns are
    fnmatch globs over layer names (e.g. "layers.0.*", "*.w2", "output"). Later patterns win."""
    check_recipe(recipe)
    default = recipe.get("default")
    plan = {n: (QuantFormat.parse(default) if default and default != "float" else None) for n in names}
    if "output" in plan and "output" not in recipe.get("layers", {}) and not recipe.get("quantize_output", False):
        plan["output"] = None
    for pattern, fmt in recipe.get("layers", {}).items():
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"recipe pattern {pattern!r} matches no layer (layers look like {names[0]!r})")
        for n in hit:
            plan[n] = None if fmt == "float" else QuantFormat.parse(fmt)
    return plan


def plan_format_names(plan: dict) -> dict:
    """A plan as config.json stores it (under quantization.recipe): {layer name: format name or "float"}."""
    return {n: (f.name if f else "float") for n, f in plan.items()}


def quantized_linear_factory(plan: dict):
    """For checkpoint loading: build QuantLinear where the plan says so, without a float weight."""
    def make(name, in_features, out_features):
        fmt = plan.get(name)
        return QuantLinear(in_features, out_features, fmt) if fmt else float_linear(name, in_features, out_features)
    return make
