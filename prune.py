"""Structured pruning of a float checkpoint (LLM-Pruner style): the command line over pruning.py.

    python prune.py --ratio 0.2 --criterion taylor --out checkpoints/smollm2-pruned-20
    python prune.py --ratio 0.3 --parts ffn --scope global --criterion l2 --out checkpoints/smollm2-ffn30
    python quantize.py --checkpoint checkpoints/smollm2-pruned-20 --mode int4 --out checkpoints/smollm2-pruned-20-int4

Removes whole key/value heads (with the query heads that share them) and FFN channels from the blocks between
the first --keep_first and the last --keep_last. --ratio is the fraction of those blocks' prunable parameters
(the chosen parts' linear weights) removed; the fraction of the whole model is printed and recorded under
"pruning" in config.json. The result is an ordinary float checkpoint with per-block sizes: generate, quantize,
train_qat and eval read it as any other.
"""
import sys
import time

import torch

from checkpoint import check_output_checkpoint, load_model, load_tokenizer_for, model_state_for_saving, read_config, \
    save_derived
from cli import ArgumentParser, fraction, nonneg_int, positive_int, run
from convert import resolve_checkpoint
from eval.data import calibration_batches
from pruning import CRITERIA, GRADIENT_CRITERIA, PARTS, SCOPES, PruneSettings, prune


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="float bitfast checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--ratio", type=fraction, required=True,
                   help="fraction of the pruned blocks' attention and/or FFN weights to remove, in [0, 1)")
    p.add_argument("--criterion", default="taylor", choices=CRITERIA,
                   help="group importance: l1/l2 magnitude, random (seeded baseline), taylor |w·g|, taylor2 "
                        "(½ w² × diagonal Fisher), taylor-mix |w·g − ½ w² F| (LLM-Pruner's element-wise)")
    p.add_argument("--parts", default="both", choices=list(PARTS), help="what to prune: attention heads, FFN channels")
    p.add_argument("--scope", default="block", choices=SCOPES,
                   help="block: the same ratio in every pruned block; global: groups ranked across blocks")
    p.add_argument("--keep_first", type=nonneg_int, default=4, help="blocks at the start left whole")
    p.add_argument("--keep_last", type=nonneg_int, default=2, help="blocks at the end left whole")
    p.add_argument("--channel_multiple", type=positive_int, default=8,
                   help="FFN widths kept a multiple of this (8: quantizable at every bit width; 1: the exact ratio)")
    p.add_argument("--calib", default="boolq", help="gradient criteria: boolq | lambada | a local .txt/.jsonl file")
    p.add_argument("--calib_samples", type=positive_int, default=10, help="windows for the gradients (one at a time)")
    p.add_argument("--calib_seqlen", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0, help="calibration windows and the random criterion")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = PruneSettings(a.ratio, a.criterion, a.parts, a.scope, a.keep_first, a.keep_last, a.seed,
                              a.channel_multiple)
    ckpt = resolve_checkpoint(a.checkpoint)
    config = read_config(ckpt)
    if config.get("quantization"):
        raise ValueError(f"{ckpt}: is quantized; prune its float source "
                         f"({config['quantization'].get('source', 'the float checkpoint it came from')}), then "
                         "quantize the pruned checkpoint")
    check_output_checkpoint(a.out, ckpt)
    calib = None
    if a.criterion in GRADIENT_CRITERIA:
        calib = calibration_batches(load_tokenizer_for(ckpt), a.calib_samples, a.calib_seqlen, a.calib, a.seed)
    model = load_model(ckpt)
    t0 = time.perf_counter()
    pruned, record = prune(model, settings, calib, log=lambda s: print(s, file=sys.stderr))
    record.update(source=str(ckpt), calib=None if calib is None else f"{a.calib} {a.calib_samples} x {a.calib_seqlen}",
                  seconds=round(time.perf_counter() - t0, 1))
    out = save_derived(model_state_for_saving(pruned.state_dict(), pruned.args), ckpt, a.out,
                       {"model_args": pruned.args.to_dict(), "pruning": record})
    before, after = record["params_before"], record["params_after"]
    print(f"pruned {before:,} -> {after:,} parameters ({1 - after / before:.1%} of the model; "
          + ", ".join(f"{k} {v:.1%}" for k, v in record["removed_fraction"].items())
          + f" of blocks {record['blocks_pruned'][0]}..{record['blocks_pruned'][1] - 1}) with {a.criterion} in "
          f"{record['seconds']:.0f}s -> {out}")


if __name__ == "__main__":
    run(main)
