"""Which layers can take a low-bit format: quantize one layer at a time (RTN) and measure the perplexity change,
then write a hybrid recipe that meets a bits-per-weight budget with the least predicted loss.

    python scripts/layer_sensitivity.py --low int2-g64-asym --high int4-g128-asym --budget 3.0 --out recipe.json
    python quantize.py --mode hybrid --recipe recipe.json --out checkpoints/smollm2-hybrid

Protocol: the model stays float except the one layer under test; every measurement scores the same tokens
(eval/perplexity.py's windows over the BoolQ calibration split, or --text_file: choosing layers on the text that
benchmarks then score would flatter the recipe). Blocks before the layer under test
are unchanged, so their output is computed once and reused. The predicted loss of a recipe is the sum of the
NLL increases of the layers it puts at --low (layers interact, so it is a ranking, not an exact forecast).

Budget: average bits per weight over the transformer blocks' linear layers, scales and zeros included (the output
head follows the recipe's own rules and is not counted). Layers go to --low in order of least NLL increase per bit
saved until the budget is met, then any the budget no longer needs go back.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
import torch.nn.functional as F

from checkpoint import load_model, load_tokenizer_for, quant_plan, read_config
from convert import resolve_checkpoint
from cli import ArgumentParser, nonempty, positive_float, positive_int, run
from eval.data import corpus_text, load_text_file
from fileio import atomic_write, check_output_file
from decoding import check_token_ids
from qlinear import QuantFormat, fake_quantize, linear_names


@torch.inference_mode()
def block_inputs(model, windows: torch.Tensor) -> list:
    """The float model's hidden state entering each block (and the final norm), for every window."""
    states = [model.tok_embeddings(windows)]
    for i in range(len(model.layers)):
        states.append(model.run_blocks(states[-1], start=i, end=i + 1))
    return states


@torch.inference_mode()
def nll_from(model, start: int, x: torch.Tensor, windows: torch.Tensor) -> float:
    """Mean next-token NLL running blocks start.. on hidden state x."""
    x = model.run_blocks(x, start=start)
    logits = model.output(model.norm(x))[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten()).item()


def layer_sensitivity(model, windows: torch.Tensor, fmt: QuantFormat, names: list, log=print) -> dict:
    """{layer name: NLL increase when only that layer is RTN-quantized to fmt}."""
    states = block_inputs(model, windows)
    base = nll_from(model, len(model.layers), states[-1], windows)
    delta = {}
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        block = int(name.split(".")[1]) if name.startswith("layers.") else len(model.layers)
        original = layer.weight.data
        layer.weight.data = fake_quantize(original.float(), fmt).to(original.dtype)
        try:
            delta[name] = nll_from(model, block, states[block], windows) - base
        finally:
            layer.weight.data = original
        log(f"{i + 1}/{len(names)} {name}: nll {delta[name]:+.5f}")
    return base, delta


def average_bits(shapes: dict, fmt_of) -> float:
    """Bits per weight over the layers {name: (out, in)} with format fmt_of(name), scales and zeros included."""
    bits = sum(n * k * fmt_of(name).bits_per_weight(k) for name, (n, k) in shapes.items())
    return bits / sum(n * k for n, k in shapes.values())


def check_budget(shapes: dict, low: QuantFormat, high: QuantFormat, budget: float):
    if average_bits(shapes, lambda n: high) <= average_bits(shapes, lambda n: low):
        raise ValueError(f"--low {low.name} is not smaller than --high {high.name}")
    floor = average_bits(shapes, lambda n: low)
    if floor > budget:
        raise ValueError(f"budget {budget} bits/weight is below what {low.name} everywhere gives ({floor:.3f})")


def choose_recipe(delta: dict, shapes: dict, low: QuantFormat, high: QuantFormat, budget: float):
    """Start with every layer at `high`; move layers to `low` by least NLL increase per bit saved until the
    average bits per weight is within budget, then return to `high` any that the budget no longer needs.
    Returns (recipe, bits per weight, predicted NLL increase)."""
    check_budget(shapes, low, high, budget)
    saved = {name: n * k * (high.bits_per_weight(k) - low.bits_per_weight(k)) for name, (n, k) in shapes.items()}
    at_low = set()
    for name in sorted(delta, key=lambda n: max(delta[n], 0.0) / saved[n]):
        if average_bits(shapes, lambda n: low if n in at_low else high) <= budget:
            break
        at_low.add(name)
    # Greedy by ratio can overshoot: give back the costliest layers the budget does not need.
    for name in sorted(at_low, key=lambda n: -delta[n]):
        rest = at_low - {name}
        if average_bits(shapes, lambda n, rest=rest: low if n in rest else high) <= budget:
            at_low = rest
    recipe = {"default": high.name, "layers": {name: low.name for name in sorted(at_low, key=_layer_order)}}
    bpw = average_bits(shapes, lambda n: low if n in at_low else high)
    return recipe, bpw, sum(delta[n] for n in at_low)


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[1]), name) if name.startswith("layers.") else (math.inf, name)


def json_object_with(path: Path, keys: set) -> bool:
    """Whether `path` holds a JSON object with these keys: how an earlier output of ours is told from a user's file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and keys <= set(data)


def quant_format(text: str) -> QuantFormat:
    try:
        return QuantFormat.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=nonempty, help="float bitfast checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--low", type=quant_format, default="int2-g64-asym",
                   help="the low-bit format each layer is tested at")
    p.add_argument("--high", type=quant_format, default="int4-g128-asym",
                   help="the format of layers the recipe keeps out of --low")
    p.add_argument("--budget", type=positive_float, default=3.0, help="average bits per weight of the blocks' linears")
    p.add_argument("--text_file", type=nonempty, help="score this .txt/.jsonl instead of the BoolQ calibration split")
    p.add_argument("--context", type=positive_int, default=512)
    p.add_argument("--max_tokens", type=positive_int, default=4096)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--skip_checksum", action="store_true",
                   help="load a checkpoint whose files no longer match the sha256 its config.json recorded")
    p.add_argument("--out", type=nonempty, required=True,
                   help="hybrid recipe JSON to write (the ranked table goes beside it)")
    a = p.parse_args(argv)
    low, high = a.low, a.high
    if a.context < 2:
        p.error("argument --context: at least 2 tokens (each window predicts its tokens after the first)")
    if a.max_tokens < a.context:
        p.error(f"argument --max_tokens: {a.max_tokens} tokens is less than one window of --context {a.context}")
    # Both outputs are checked before the long part; each may only replace an earlier one of its kind.
    out = check_output_file(a.out, lambda f: json_object_with(f, {"default", "layers"}), "hybrid recipe")
    table = check_output_file(out.with_suffix(".sensitivity.json"),
                              lambda f: json_object_with(f, {"base_nll", "delta_nll"}), "sensitivity table")
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.checkpoint)
    if quant_plan(read_config(ckpt)):
        raise ValueError(f"{ckpt}: sensitivity is measured on a float checkpoint")
    model = load_model(ckpt, verify=not a.skip_checksum)
    names = [n for n in linear_names(model) if n.startswith("layers.")]
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    check_budget(shapes, low, high, a.budget)  # before the long part
    text = load_text_file(a.text_file) if a.text_file else corpus_text("boolq", "calibration")
    tok = load_tokenizer_for(ckpt, verify=not a.skip_checksum)
    ids = torch.tensor(tok.encode(text, bos=tok.add_bos, allow_special=False))[:a.max_tokens]
    check_token_ids(ids, model.args.vocab_size, a.text_file or "the BoolQ calibration text")
    n_windows = ids.numel() // a.context
    if n_windows == 0:
        raise ValueError(f"{ids.numel()} tokens is less than one window of context {a.context}")
    windows = ids[:n_windows * a.context].view(n_windows, a.context)
    t0 = time.perf_counter()
    base, delta = layer_sensitivity(model, windows, low, names, log=lambda s: print(s, file=sys.stderr))
    recipe, bpw, predicted = choose_recipe(delta, shapes, low, high, a.budget)
    ranked = sorted(delta.items(), key=lambda kv: -kv[1])
    print(f"{ckpt} | {len(names)} layers one at a time at {low.name} (RTN) | {windows.numel()} tokens, context "
          f"{a.context} | float nll {base:.4f} (ppl {math.exp(base):.3f}) | {time.perf_counter() - t0:.0f} s")
    print("\n| rank | layer | Δ nll | ppl | kept at " + high.name + " |\n|---|---|---|---|---|")
    kept = set(delta) - set(recipe["layers"])
    for r, (name, d) in enumerate(ranked, 1):
        print(f"| {r} | {name} | {d:+.5f} | {math.exp(base + d):.3f} | {'yes' if name in kept else ''} |")
    print(f"\nrecipe: {len(recipe['layers'])} of {len(names)} layers at {low.name}, the rest at {high.name}: "
          f"{bpw:.3f} bits/weight (budget {a.budget}); predicted Δ nll {predicted:+.4f} -> {out}")
    atomic_write(out, json.dumps(recipe, indent=2))
    atomic_write(table, json.dumps({"checkpoint": str(ckpt), "format": low.name, "tokens": windows.numel(),
                                    "context": a.context, "base_nll": base, "delta_nll": delta}, indent=2))


if __name__ == "__main__":
    run(main)
