"""Where decode time goes: a torch.profiler trace of decode steps and a table of the time per layer type
(linears by weight format, attention, norms and RoPE, sampling, the rest); and the speed report every generation
prints (weights streamed, tokens/s, achieved bandwidth, peak memory).

Layers are labelled with forward hooks, so the model runs eagerly here: a compiled graph fuses layers into
kernels that no longer belong to one of them. The table therefore shows the eager split of the work.
"""
import resource
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from decoding import GenerationStats
from fileio import TEMP_TAG, atomic_write
from model import Attention, KVCache, Linear, RMSNorm, Transformer
from qlinear import QuantLinear
from sampling import sample

TRACE_NAME = "decode_trace.json"  # what generate.py --profile DIR writes in DIR
GROUPS = ("attention", "norms/rope", "sampling", "other")
# Inside an attention layer, the ops that are not the attention itself: apply_rotary_emb's arithmetic.
ROPE_OPS = {"aten::mul", "aten::sub", "aten::add", "aten::stack", "aten::flatten", "aten::type_as", "aten::to",
            "aten::reshape", "aten::select"}


def is_profile_dir(folder: Path) -> bool:
    """An earlier --profile output: nothing in it but the trace (and temps of its writes)."""
    return all(p.name == TRACE_NAME or p.name.startswith(f".{TRACE_NAME}{TEMP_TAG}") for p in Path(folder).iterdir())


def layer_label(module) -> str:
    if isinstance(module, QuantLinear):
        return f"linear {module.fmt.name}"
    if isinstance(module, Linear):
        return f"linear {str(module.weight.dtype).removeprefix('torch.')}"
    if isinstance(module, (Attention, KVCache)):
        return "attention"
    if isinstance(module, RMSNorm):
        return "norm"
    return None


def _label_layers(model):
    """Forward hooks that open a profiler range named after each layer's type; returns their handles."""
    open_ranges = []  # calls nest, so the innermost open range is the one a forward hook closes

    def leave(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        label = layer_label(module)
        if label is None:
            continue

        def enter(module, args, label=label):
            open_ranges.append(record_function(label))
            open_ranges[-1].__enter__()

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


@torch.no_grad()
def profile_decode(model: Transformer, prompt: torch.Tensor, steps: int, trace_path, **sampling) -> str:
    """Prefill `prompt` ([T] tokens), profile `steps` eager decode steps, write a Chrome trace to trace_path and
    return the table. The caller has set up caches for T + steps tokens."""
    T = prompt.numel()
    token = sample(model(prompt.view(1, -1), torch.arange(T, device=prompt.device))[:, -1], **sampling)
    handles = _label_layers(model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for i in range(steps):
                with record_function("decode step"):
                    logits = model(token, torch.tensor([T + i], device=prompt.device))
                    with record_function("sampling"):
                        token = sample(logits[:, -1], **sampling)
            wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    with tempfile.TemporaryDirectory() as tmp:  # the profiler writes only to a path: export, then place atomically
        prof.export_chrome_trace(f"{tmp}/trace.json")
        atomic_write(trace_path, Path(f"{tmp}/trace.json").read_bytes())
    return _table(prof.events(), steps, wall)


def _table(events, steps: int, wall: float) -> str:
    ms, calls = defaultdict(float), defaultdict(int)
    step_ms = 0.0
    for e in events:
        t = e.cpu_time_total / 1000
        if e.name == "decode step":
            step_ms += t
        elif e.name.startswith("linear ") or e.name == "sampling":
            ms[e.name] += t
            calls[e.name] += 1
        elif e.name == "norm":
            ms["norms/rope"] += t
            calls["norms/rope"] += 1
        elif e.name == "attention" and (e.cpu_parent is None or e.cpu_parent.name != "attention"):
            calls["attention"] += 1
            for child in e.cpu_children:  # the layer's own time, less its linears and RoPE arithmetic
                t -= child.cpu_time_total / 1000 if child.name.startswith("linear ") else 0.0
                if child.name in ROPE_OPS:
                    t -= child.cpu_time_total / 1000
                    ms["norms/rope"] += child.cpu_time_total / 1000
            ms["attention"] += t
    ms["other"] = step_ms - sum(ms.values())
    rows = sorted((k for k in ms if k.startswith("linear ")), key=lambda k: -ms[k]) + list(GROUPS)
    header = (f"decode, {steps} eager steps: {wall / steps * 1000:.1f} ms per token "
              f"({step_ms / steps:.1f} ms inside the profiled steps)")
    lines = [header, "| layer type | calls per token | ms per token | share |", "|---|---|---|---|"]
    for k in rows:
        share = 100 * ms[k] / step_ms if step_ms else 0.0
        n = f"{calls[k] / steps:.0f}" if calls[k] else "-"
        lines.append(f"| {k} | {n} | {ms[k] / steps:.2f} | {share:.0f}% |")
    return "\n".join(lines)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step streams (shared tensors counted once; KV caches excluded)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers()
                                          if not n.endswith(("k_cache", "v_cache", "freqs_cis", "causal_mask"))]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def speed_report(stats: GenerationStats, model_bytes: int, device) -> str:
    tps = stats.decode_tokens_per_s
    extra = f" ({stats.cached_tokens} from the prefill cache)" if stats.cached_tokens else ""
    if stats.proposed:
        extra += (f" | speculation kept {stats.accepted} of {stats.proposed} proposed tokens "
                  f"({100 * stats.acceptance_rate:.0f}%)")
    return (f"prompt {stats.prompt_tokens} tok{extra} | time to first token {stats.time_to_first_token * 1000:.1f} ms"
            f" | decode {stats.new_tokens} tok at {tps:.1f} tok/s | model {model_bytes / 1e6:.1f} MB | "
            f"bandwidth {model_bytes * tps / 1e9:.2f} GB/s | peak memory {peak_memory_bytes(device) / 1e9:.2f} GB")
