"""Calibrated quantization: GPTQ, AWQ's scales and clip search, AWQ then GPTQ, and quantize_model, which replaces
a float model's planned linears by QuantLinear (RTN for what no calibration method covers).

Every calibration method runs block by block: calibration activations flow through the already-quantized
earlier blocks (Transformer.run_blocks), so memory stays at one block. A new method is a function that
quantizes one block given the inputs its layers see (see _quantize_block); the block loop is shared.

Library code: imports qlinear and model, never checkpoint.py or an entry script.
"""
import contextlib
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlinear import QuantFormat, QuantLinear, check_weight, fake_quantize, grouped, quant_params, quantize_codes, \
    rtn_layer

METHODS = ("rtn", "gptq", "awq", "awq+gptq")


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


# ---------------------------------------------------------------- AWQ-style scales + clip search

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
    xg = grouped(x, fmt, 0.0)  # [T, G, g]
    wg = grouped(w, fmt, 0.0)  # [N, G, g]
    amax = wg.abs().amax(-1)  # [N, G]
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    org = torch.einsum("tgk,ngk->tng", xg, wg)
    for i in range(int(steps * (1 - min_ratio)) + 1):
        clip = amax * (1 - i / steps)
        wq = grouped(fake_quantize(w, fmt, clip), fmt, 0.0)
        err = ((torch.einsum("tgk,ngk->tng", xg, wq) - org) ** 2).mean(0)  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


# ---------------------------------------------------------------- whole-model quantization

@torch.no_grad()
def quantize_model(model, plan: dict, method: str = "rtn", calib: torch.Tensor = None, damp: float = 0.01,
                   act_order: bool = True, log=print) -> dict:
    """Replace each planned linear by a QuantLinear, in place, and tie a quantized tied head to the embedding.
    Returns {layer name: clip [N, G]}, the clip values AWQ alone chose (empty otherwise), for QAT to start from."""
    for name in plan:
        check_weight(model.get_submodule(name).weight, name)
    clips = {}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} ({', '.join(METHODS)})")
    if method != "rtn":
        if calib is None:
            raise ValueError(f"{method} needs calibration tokens")
        clips = _quantize_blocks_collect_clips(model, plan, calib, method, damp, act_order, log)
    for name, fmt in plan.items():  # RTN for everything GPTQ did not cover (and the head)
        mod = model.get_submodule(name)
        if fmt is not None and isinstance(mod, nn.Linear):
            _set_module(model, name, rtn_layer(mod.weight.float(), fmt))
    model.tie_head()
    return clips


def _set_module(model, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _quantize_blocks_collect_clips(model, plan, calib, method, damp, act_order, log) -> dict:
    """GPTQ, AWQ, or AWQ's scales then GPTQ, block by block: each block is quantized in place given its float
    inputs, then the next block's inputs come out of the quantized block. Returns {layer name: clip [N, G]}
    (AWQ alone; empty otherwise)."""
    clips = {}
    x = model.tok_embeddings(calib)
    for i, block in enumerate(model.layers):
        t0 = time.perf_counter()
        run_block = functools.partial(model.run_blocks, x, start=i, end=i + 1, rows=1)
        clips.update(_quantize_block(block, f"layers.{i}.", run_block, plan, method, damp, act_order, seed=i))
        with _weights_dequantized_once(block):
            x = run_block()
        log(f"{method}: block {i + 1}/{len(model.layers)} in {time.perf_counter() - t0:.1f}s")
    return clips


@contextlib.contextmanager
def _weights_dequantized_once(block):
    """Run the block's QuantLinears (CPU, calibration-sized inputs) as kernels.dispatch does for many rows,
    F.linear(x, dequantized weight), but dequantize each weight once rather than once per sample."""
    layers = [m for m in block.modules() if isinstance(m, QuantLinear) and m.qweight.device.type == "cpu"]
    for m in layers:
        w = m.float_weight()
        m.forward = lambda x, w=w: F.linear(x, w.to(x.dtype))
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _quantize_block(block, prefix, run_block, plan, method, damp, act_order, seed, search_tokens: int = 2048):
    """Quantize one block's planned float linears in place. AWQ folds per-channel scales into the op that feeds
    each group of layers (a norm or linear), then searches clips per layer and rounds; GPTQ rounds with error
    compensation from the Hessian of the layer's inputs (after the scales, H' = diag(1/s) H diag(1/s)).
    Returns the clips AWQ alone chose, by full layer name."""
    scale_search, error_comp = method in ("awq", "awq+gptq"), method in ("gptq", "awq+gptq")
    targets = _float_targets(block, plan, prefix)
    hessians, acts = _capture_inputs(run_block, targets, error_comp, scale_search, search_tokens, seed)
    if scale_search:
        for prev, names in _scale_groups(block, targets):
            s = awq_search_scale(acts[names[0]], [targets[n].weight.float() for n in names],
                                 [plan[prefix + n] for n in names])
            prev.weight.div_((s.view(-1, 1) if isinstance(prev, nn.Linear) else s).to(prev.weight.dtype))
            for n in names:
                targets[n].weight.mul_(s.to(targets[n].weight.dtype))
                acts[n] = acts[n] / s
                if error_comp:
                    hessians[n].h /= torch.outer(s, s).double()
    clips = {}
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
    return clips


def _float_targets(block, plan, prefix):
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and plan.get(prefix + n) is not None}


def _capture_inputs(run_block, modules: dict, hessian: bool, keep: bool, keep_tokens: int, seed: int):
    """Run the block (one sample at a time) and gather what each module sees: ({name: HessianAccumulator} when
    `hessian`, {name: up to keep_tokens of its input rows, a seeded random sample} when `keep`)."""
    hessians = {n: HessianAccumulator(m.in_features) for n, m in modules.items()} if hessian else {}
    seen, shares, last = {}, {}, [None, None]  # last: (input tensor, module that accumulated it)

    def hook(name):
        def record(module, inputs, output):  # returns None: a hook's return value would replace the output
            a = inputs[0].reshape(-1, inputs[0].shape[-1])
            if hessian and inputs[0] is last[0]:  # q/k/v (and w1/w3) read one input: accumulate it once
                shares[name] = last[1]
            elif hessian:
                hessians[name].add(a)
                last[:] = inputs[0], name
            if keep:
                seen.setdefault(name, []).append(a)
        return record
    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        run_block()
    finally:
        for h in hooks:
            h.remove()
    for name, owner in shares.items():
        hessians[name].h, hessians[name].n = hessians[owner].h.clone(), hessians[owner].n
    g = torch.Generator().manual_seed(seed)
    acts = {}
    for n, chunks in seen.items():
        a = torch.cat(chunks)
        acts[n] = a[torch.randperm(a.shape[0], generator=g)[:keep_tokens]]
    return hessians, acts


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
