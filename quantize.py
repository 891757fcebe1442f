"""Quantize a float checkpoint: the command line over qlinear.py (formats, QuantLinear, recipes) and
calibrate.py (RTN / GPTQ / AWQ (+clip) / AWQ+GPTQ).

    python quantize.py --mode int4 --groupsize 128 --method gptq --quantize_output --out checkpoints/smollm2-int4-gptq
    python quantize.py --mode int8 --quantize_output --out checkpoints/smollm2-int8
    python quantize.py --mode hybrid --recipe recipe.json --out checkpoints/smollm2-hybrid   # see layer_sensitivity.py

A format is (bits, group size, symmetric?). Codes q are unsigned integers in [0, 2^bits); a weight is
W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]. Symmetric formats fix z = 2^(bits-1) and store no zeros.
When g does not divide the input size the last group of each row is shorter (a ragged group, no padding).
"""
import argparse
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

from calibrate import METHODS, quantize_model
from checkpoint import check_output_checkpoint, load_model, load_tokenizer_for, read_config, save_quantized
from convert import resolve_checkpoint
from cli import ArgumentParser, nonneg_int, positive_float, positive_int, run
from eval.data import calibration_batches
from qlinear import QuantFormat, linear_names, read_recipe, resolve_recipe

# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
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


def recipe_from_args(mode: str, groupsize: int, sym: bool, quantize_output: str = None, recipe_path=None) -> dict:
    if mode == "hybrid":
        return read_recipe(recipe_path)
    fmt = QuantFormat(8, 0, True) if mode == "int8" else QuantFormat(int(mode[3:]), groupsize, sym)
    recipe = {"default": fmt.name}
    if quantize_output:
        recipe["layers"] = {"output": QuantFormat.parse(quantize_output).name}
    return recipe


def main(argv=None):
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
    run(main)
