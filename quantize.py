"""Weight-only quantization: formats, the one QuantLinear module, RTN / GPTQ / AWQ (+clip) / AWQ+GPTQ, recipes,
and the CLI.

    python quantize.py --mode int4 --groupsize 128 --method gptq --quantize_output --out checkpoints/smollm2-int4-gptq
    python quantize.py --mode int8 --quantize_output --out checkpoints/smollm2-int8
    python quantize.py --mode hybrid --recipe recipe.json --out checkpoints/smollm2-hybrid   # see layer_sensitivity.py

A format is (bits, group size, symmetric?). Codes q are unsigned integers in [0, 2^bits); a weight is
W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]. Symmetric formats fix z = 2^(bits-1) and store no zeros.
When g does not divide the input size the last group of each row is shorter (a ragged group, no padding).
"""
import argparse
import fnmatch
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from fileio import read_json
from kernels.dispatch import dequantize_weight, quant_linear
from kernels.packing import pack, unpack


# ---------------------------------------------------------------- formats

@dataclass(frozen=True)
class QuantFormat:
    bits: int
    group_size: int = 128  # 0: one group per output row (per-channel)
    sym: bool = False

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"unsupported bit width {self.bits} (2, 3, 4 or 8)")
        if self.group_size < 0 or (self.group_size and self.group_size % 8):
            raise ValueError(f"group size {self.group_size} must be 0 (per channel) or a multiple of 8")

    @property
    def name(self) -> str:
        return f"int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "pc") + ("-sym" if self.sym else "-asym")

    @classmethod
    def parse(cls, text: str) -> "QuantFormat":
        """'int4-g128-asym', 'int2-g64', 'int8' (per-channel symmetric), 'int4-pc-sym'."""
        m = re.fullmatch(r"int([2348])(?:-(?:g(\d+)|pc))?(?:-(sym|asym))?", text.strip())
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

def _grouped(w: torch.Tensor, fmt: QuantFormat, fill: float) -> torch.Tensor:
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
        amax = _grouped(w.abs(), fmt, 0.0).amax(-1)
        if clip is not None:
            amax = torch.minimum(amax, clip)
        scales = _fp16_exact((2 * amax / qmax).clamp(min=1e-7))  # GPTQ's symmetric grid: [-2^(b-1), 2^(b-1)-1] steps
        zeros = torch.full_like(scales, 2 ** (fmt.bits - 1))
        return scales, zeros
    lo = _grouped(w, fmt, float("inf")).amin(-1)
    hi = _grouped(w, fmt, float("-inf")).amax(-1)
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


def check_weight(w: torch.Tensor, name: str):
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight has NaN or Inf values; refusing to quantize")


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
        g = fmt.groups(in_features)
        packed_k = in_features if fmt.bits == 8 else in_features * fmt.bits // 8
        if in_features * fmt.bits % 8 or (fmt.bits == 3 and in_features % 8):
            raise ValueError(f"in_features={in_features} cannot be packed at {fmt.bits} bits")
        # 8-bit codes are kept offset to signed int8, the layout the CPU int8 kernel reads.
        self.register_buffer("qweight", torch.zeros(out_features, packed_k,
                                                    dtype=torch.int8 if fmt.bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, g))
        self.register_buffer("zeros", None if fmt.sym else torch.zeros(out_features, g))
        self.latent = None

    @classmethod
    def from_codes(cls, codes, scales, zeros, fmt: QuantFormat) -> "QuantLinear":
        m = cls(codes.shape[1], codes.shape[0], fmt)
        m.set_codes(codes, scales, zeros)
        return m

    def set_codes(self, codes, scales, zeros):
        if self.fmt.bits == 8:
            packed = (codes.to(torch.int16) - 128).to(torch.int8)
        else:
            packed = pack(codes.to(torch.uint8), self.fmt.bits)
        self.qweight = packed.to(self.qweight.device)
        self.scales = scales.to(self.scales)
        if self.zeros is not None:
            self.zeros = zeros.to(self.zeros)

    def group_zeros(self) -> torch.Tensor:
        return self.zeros if self.zeros is not None else torch.full_like(self.scales, 2 ** (self.fmt.bits - 1))

    def codes(self) -> torch.Tensor:
        if self.fmt.bits == 8:
            return (self.qweight.to(torch.int16) + 128).to(torch.uint8)
        return unpack(self.qweight, self.fmt.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.fmt.bits, self.fmt.group_size,
                                 self.in_features)

    def forward(self, x):
        if self.latent is None:
            return quant_linear(x, self.qweight, self.scales, self.zeros, self.fmt.bits, self.fmt.group_size,
                                self.in_features)
        return F.linear(x, self.fake_quant_weight().to(x.dtype))

    # -- fake quantization (QAT)
    def fake_quant_weight(self) -> torch.Tensor:
        w = self.latent
        k = w.shape[1]
        s = expand_groups(self.scales, self.fmt, k).to(w.dtype)
        z = expand_groups(self.group_zeros(), self.fmt, k).to(w.dtype)
        q = torch.clamp(_round_ste(w / s + z), 0, 2 ** self.fmt.bits - 1)
        return (q - z) * s

    def train_mode(self):
        self.latent = nn.Parameter(self.dequantize())
        return self

    def pack_latent(self):
        with torch.no_grad():
            self.set_codes(quantize_codes(self.latent, self.scales, self.group_zeros(), self.fmt),
                           self.scales, self.zeros)
        self.latent = None
        return self

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, {self.fmt.name}"


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


class QuantEmbedding(nn.Module):
    """Token embedding read from a quantized tied output head: only the looked-up rows are dequantized."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = [head]  # a list, so the head's buffers are not registered (and saved) twice

    def forward(self, idx):
        head, flat = self.head[0], idx.flatten()
        zeros = None if head.zeros is None else head.zeros[flat]
        rows = dequantize_weight(head.qweight[flat], head.scales[flat], zeros, head.fmt.bits, head.fmt.group_size,
                                 head.in_features)
        return rows.view(*idx.shape, -1).to(head.scales.dtype)


# ---------------------------------------------------------------- recipes: which layer gets which format

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


def resolve_recipe(recipe: dict, names: list) -> dict:
    """recipe: {"default": "int4-g128-asym", "layers": {"pattern": "int8" | "float", ...}}; patterns are
    fnmatch globs over layer names (e.g. "layers.0.*", "*.w2", "output"). Later patterns win.
    Returns {layer name: QuantFormat or None (kept float)}."""
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


def recipe_from_plan(plan: dict) -> dict:
    return {n: (f.name if f else "float") for n, f in plan.items()}


# ---------------------------------------------------------------- GPTQ

class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ over calibration activations feeding one linear layer."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.h += x.T @ x


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, damp: float = 0.01, block: int = 128,
                  act_order: bool = False):
    """GPTQ (Frantar et al. 2022): quantize columns one at a time, spreading each column's error over the
    not-yet-quantized columns through the inverse Hessian; lazy updates in blocks of `block` columns.
    Group scales are set from the (error-updated) weights when a group starts; with act_order the columns
    go in order of decreasing Hessian diagonal and groups keep their original columns (static groups)."""
    w = w.double().clone()
    h = h.double().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k, dtype=h.dtype) * damp * torch.diag(h).mean()
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("GPTQ: Hessian is not positive definite even after damping; raise --damp") from None
    g = fmt.group_len(k)
    if act_order:
        scales, zeros = quant_params(w[:, torch.argsort(perm)].float(), fmt)
    else:
        scales = torch.zeros(n, fmt.groups(k))
        zeros = torch.zeros(n, fmt.groups(k))
    q = torch.zeros(n, k, dtype=torch.uint8)
    qmax = 2 ** fmt.bits - 1
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            orig = int(perm[col])
            grp = orig // g
            if not act_order and orig % g == 0:  # as reference GPTQ: the weights as of this block's start
                s, z = quant_params(w[:, col:col + g].float(), QuantFormat(fmt.bits, 0, fmt.sym))
                scales[:, grp], zeros[:, grp] = s[:, 0], z[:, 0]
            s, z = scales[:, grp].double(), zeros[:, grp].double()
            qc = torch.clamp(torch.round(wb[:, i] / s + z), 0, qmax)
            q[:, orig] = qc.to(torch.uint8)
            e = (wb[:, i] - (qc - z) * s) / hb[i, i]
            wb[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, b0:b1] = wb
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q, scales.float(), zeros.float()


# ---------------------------------------------------------------- whole-model quantization

def rtn_layer(w: torch.Tensor, fmt: QuantFormat) -> QuantLinear:
    scales, zeros = quant_params(w, fmt)
    return QuantLinear.from_codes(quantize_codes(w, scales, zeros, fmt), scales, zeros, fmt)


def _set_module(model, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


METHODS = ("rtn", "gptq", "awq", "awq+gptq")


@torch.no_grad()
def quantize_model(model, plan: dict, method: str = "rtn", calib: torch.Tensor = None, damp: float = 0.01,
                   act_order: bool = True, log=print):
    """Replace each planned linear by a QuantLinear, in place. GPTQ runs block by block: calibration
    activations flow through the already-quantized earlier blocks, so memory stays at one block."""
    for name in plan:
        check_weight(model.get_submodule(name).weight, name)
    clips = {}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
    if method != "rtn":
        if calib is None:
            raise ValueError(f"{method} needs calibration tokens")
        clips = _calibrated_model(model, plan, calib, method, damp, act_order, log)
    for name, fmt in plan.items():  # RTN for everything GPTQ did not cover (and the head)
        mod = model.get_submodule(name)
        if fmt is not None and isinstance(mod, nn.Linear):
            _set_module(model, name, rtn_layer(mod.weight.float(), fmt))
    tie_quantized_head(model)
    return clips


def _blockwise(model, calib, quantize_block, log, what):
    """Run calibration tokens block by block; `quantize_block(i, block, x, freqs)` quantizes one block in
    place given its float inputs, then the inputs of the next block come out of the quantized block."""
    from model import precompute_freqs_cis
    x = model.tok_embeddings(calib)
    freqs = precompute_freqs_cis(model.args, calib.shape[1]).to(x.device)
    for i, block in enumerate(model.layers):
        t0 = time.perf_counter()
        quantize_block(i, block, x, freqs)
        for j in range(x.shape[0]):
            x[j:j + 1] = block(x[j:j + 1], freqs, None, None)
        log(f"{what}: block {i + 1}/{len(model.layers)} in {time.perf_counter() - t0:.1f}s")


def _capture_inputs(block, x, freqs, modules: dict, on_input):
    """Run the block over x (one sample at a time) calling on_input(name, activations) for each module."""
    def hook(name):
        def record(module, inputs, output):
            on_input(name, inputs[0])  # returns None: a hook's return value would replace the output
        return record
    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for j in range(x.shape[0]):
            block(x[j:j + 1], freqs, None, None)
    finally:
        for h in hooks:
            h.remove()


def _float_targets(block, plan, prefix):
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and plan.get(prefix + n) is not None}


# ---------------------------------------------------------------- AWQ-style scales + clip search

def fake_quantize(w, fmt, clip=None):
    """Round-to-nearest quantize then dequantize a float weight (what RTN would store, as floats)."""
    s, z = quant_params(w, fmt, clip)
    q = quantize_codes(w, s, z, fmt).float()
    return (q - expand_groups(z, fmt, w.shape[1])) * expand_groups(s, fmt, w.shape[1])


def awq_search_scale(x: torch.Tensor, weights: list, fmts: list, grid: int = 20):
    """Per-input-channel scales s = mean|x|^α (α searched on a grid; α = 0 is plain RTN) that minimise the
    output error of quantizing W·diag(s) and undoing s on the input side (AWQ, Lin et al. 2023)."""
    x = x.float()
    x_mean = x.abs().mean(0)
    ref = [x @ w.T for w in weights]
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for a in range(grid):
        s = x_mean.pow(a / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(((x @ (fake_quantize(w * s, f) / s).T - r) ** 2).mean().item() for w, f, r in zip(weights, fmts, ref))
        if err < best:
            best, best_s = err, s
    return best_s


def awq_search_clip(x: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, steps: int = 20, min_ratio: float = 0.5):
    """Per-group max |w| (shrunk from the group's own max) minimising each group's output error
    (BitDistiller/AWQ clip search). Returns [N, G] clip values for quant_params(clip=...)."""
    x, w = x.float(), w.float()
    xg = _grouped(x, fmt, 0.0)  # [T, G, g]
    wg = _grouped(w, fmt, 0.0)  # [N, G, g]
    amax = wg.abs().amax(-1)  # [N, G]
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    org = torch.einsum("tgk,ngk->tng", xg, wg)
    for i in range(int(steps * (1 - min_ratio)) + 1):
        clip = amax * (1 - i / steps)
        wq = _grouped(fake_quantize(w, fmt, clip), fmt, 0.0)
        err = ((torch.einsum("tgk,ngk->tng", xg, wq) - org) ** 2).mean(0)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def _calibrated_model(model, plan, calib, method, damp, act_order, log, search_tokens: int = 2048):
    """GPTQ, AWQ, or AWQ's scales then GPTQ, block by block. AWQ folds per-channel scales into the op that feeds
    each group of layers (a norm or linear), then searches clips per layer and rounds; GPTQ rounds with error
    compensation from the Hessian of the layer's inputs (after the scales, H' = diag(1/s) H diag(1/s)).
    Returns {layer name: clip [N, G]} (AWQ alone) for QAT to start from."""
    scale_search, error_comp = method in ("awq", "awq+gptq"), method in ("gptq", "awq+gptq")
    clips = {}

    def quantize_block(i, block, x, freqs):
        prefix = f"layers.{i}."
        targets = _float_targets(block, plan, prefix)
        hessians = {n: HessianAccumulator(m.in_features) for n, m in targets.items()}
        seen = {}

        def on_input(n, a):
            a = a.reshape(-1, a.shape[-1])
            if error_comp:
                hessians[n].add(a)
            if scale_search:
                seen.setdefault(n, []).append(a)
        _capture_inputs(block, x, freqs, targets, on_input)
        acts = {}
        g = torch.Generator().manual_seed(i)
        for n, chunks in seen.items():
            a = torch.cat(chunks)
            acts[n] = a[torch.randperm(a.shape[0], generator=g)[:search_tokens]]
        if scale_search:
            for prev, names in _scale_groups(block, targets):
                s = awq_search_scale(acts[names[0]], [targets[n].weight.float() for n in names],
                                     [plan[prefix + n] for n in names])
                with torch.no_grad():
                    prev.weight.div_((s.view(-1, 1) if isinstance(prev, nn.Linear) else s).to(prev.weight.dtype))
                    for n in names:
                        targets[n].weight.mul_(s.to(targets[n].weight.dtype))
                        acts[n] = acts[n] / s
                        if error_comp:
                            hessians[n].h /= torch.outer(s, s).double()
        for n, m in targets.items():
            fmt, w = plan[prefix + n], m.weight.float()
            if error_comp:
                q, sc, z = gptq_quantize(w, hessians[n].h, fmt, damp=damp, act_order=act_order)
            else:
                clip = None if n.endswith(("wq", "wk")) else awq_search_clip(acts[n], w, fmt)  # q/k: softmax absorbs
                sc, z = quant_params(w, fmt, clip)
                q = quantize_codes(w, sc, z, fmt)
                if clip is not None:
                    clips[prefix + n] = clip
            _set_module(block, n, QuantLinear.from_codes(q, sc, z, fmt))
    _blockwise(model, calib, quantize_block, log, method)
    return clips


def _scale_groups(block, targets):
    """(the op whose output feeds the layers, the layers): scaling that op's output by 1/s is exact."""
    att, ff = block.attention, block.feed_forward
    pairs = [(block.attention_norm, ["attention.wq", "attention.wk", "attention.wv"]),
             (block.ffn_norm, ["feed_forward.w1", "feed_forward.w3"]),
             (ff.w3, ["feed_forward.w2"])]
    if att.wv.out_features == att.wo.in_features:  # with GQA, v's outputs do not line up with o's inputs
        pairs.append((att.wv, ["attention.wo"]))
    for prev, names in pairs:
        names = [n for n in names if n in targets]
        if names and not isinstance(prev, QuantLinear):  # a quantized producer cannot absorb the scales
            yield prev, names


def tie_quantized_head(model):
    if model.args.tie_embeddings and isinstance(model.output, QuantLinear):
        model.tok_embeddings = QuantEmbedding(model.output)


def quantized_linear_factory(plan: dict):
    """For checkpoint loading: build QuantLinear where the recipe says so, without a float weight."""
    from model import float_linear

    def make(name, in_features, out_features):
        fmt = plan.get(name)
        return QuantLinear(in_features, out_features, fmt) if fmt else float_linear(name, in_features, out_features)
    return make


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    from cli import ArgumentParser, nonneg_int, positive_float, positive_int
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="float bitfast checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--mode", default="int4", choices=["int8", "int4", "int3", "int2", "hybrid"])
    p.add_argument("--groupsize", type=nonneg_int, default=128, help="0 = per output channel (int8 always is)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--method", default="rtn", choices=METHODS,
                   help="awq+gptq: AWQ's per-channel scales, then GPTQ's error-compensating rounding")
    p.add_argument("--recipe", help="hybrid: JSON file {default, layers: {pattern: format}}")
    p.add_argument("--quantize_output", nargs="?", const="int8", metavar="FORMAT",
                   help="also quantize the output head (and a tied embedding), at int8 unless a format is given "
                        "(int4 costs this model more perplexity than its whole int4 body)")
    p.add_argument("--calib", default="boolq", help="calibration text: boolq | lambada | a local .txt/.jsonl file")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--calib_seqlen", type=positive_int, default=512)
    p.add_argument("--damp", type=positive_float, default=0.01, help="GPTQ: Hessian dampening, a fraction of its mean diagonal")
    p.add_argument("--act_order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal (default on: on small models the few "
                        "channels with huge activations otherwise absorb everyone's error)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    a = p.parse_args(argv)
    if a.mode == "hybrid" and not a.recipe:
        p.error("--mode hybrid needs --recipe")
    if a.recipe and a.mode != "hybrid":
        p.error("--recipe goes with --mode hybrid")
    try:
        a.recipe_rules = recipe_from_args(a.mode, a.groupsize, bool(a.sym), a.quantize_output, a.recipe)
    except ValueError as e:
        p.error(f"argument {'--recipe' if a.recipe else '--mode/--groupsize/--quantize_output'}: {e}")
    return a


def read_recipe(path) -> dict:
    """A hybrid recipe JSON file, checked (ValueError naming the file and the field)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return check_recipe(read_json(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None


def recipe_from_args(mode: str, groupsize: int, sym: bool, quantize_output: str = None, recipe_path=None) -> dict:
    if mode == "hybrid":
        return read_recipe(recipe_path)
    fmt = QuantFormat(8, 0, True) if mode == "int8" else QuantFormat(int(mode[3:]), groupsize, sym)
    recipe = {"default": fmt.name}
    if quantize_output:
        recipe["layers"] = {"output": QuantFormat.parse(quantize_output).name}
    return recipe


def main(argv=None):
    from checkpoint import check_output_checkpoint, load_model, load_tokenizer_for, read_config, resolve_checkpoint, \
        save_quantized
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ckpt = resolve_checkpoint(a.checkpoint)
    quantized = read_config(ckpt).get("quantization")
    if quantized:
        raise ValueError(f"{ckpt}: is already quantized; quantize its float source "
                         f"({quantized.get('source', 'the float checkpoint it came from')}) instead")
    check_output_checkpoint(a.out, ckpt)
    if a.method != "rtn" and a.calib not in ("boolq", "lambada") and not Path(a.calib).is_file():
        raise ValueError(f"--calib {a.calib}: not boolq, lambada or an existing .txt/.jsonl file")
    model = load_model(ckpt)
    plan = resolve_recipe(a.recipe_rules, linear_names(model))
    calib = None
    if a.method != "rtn":
        from eval.data import calibration_batches
        calib = calibration_batches(load_tokenizer_for(ckpt), a.calib_samples, a.calib_seqlen, a.calib, a.seed)
    t0 = time.perf_counter()
    clips = quantize_model(model, plan, a.method, calib, a.damp, a.act_order, log=lambda s: print(s, file=sys.stderr))
    # AWQ's clip values go beside the checkpoint, for QAT to start from.
    extra = {"awq_clip.safetensors": safetensors.torch.save(clips)} if clips else {}
    out = save_quantized(model, plan, ckpt, a.out, {"method": a.method, "calib": a.calib if calib is not None else None},
                         extra)
    print(f"quantized {sum(f is not None for f in plan.values())} layers with {a.method} in "
          f"{time.perf_counter() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    from cli import run
    run(main)
