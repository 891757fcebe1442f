"""Merge a LoRA adapter (train_qat.py lora) into the base it was trained on and save a normal checkpoint.

    python scripts/merge_lora.py --checkpoint checkpoints/smollm2 --adapter out/lora/adapter --out checkpoints/merged
    python scripts/merge_lora.py --checkpoint checkpoints/int4 --adapter out/qlora/adapter --method gptq \\
        --out checkpoints/int4-merged

A float base gets W + (alpha / r) * B @ A. A quantized base gets the update added to its dequantized weights, then
each adapted layer is quantized again in its own format: RTN, or GPTQ on --calib text. The error of that
re-quantization (relative Frobenius norm ||Wq - W||_F / ||W||_F and max |Wq - W| against the merged float weights
W, over all adapted layers and the worst layer) is printed and recorded in the merged checkpoint's config.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

from checkpoint import check_output_checkpoint, load_model, load_tokenizer_for
from cli import ArgumentParser, nonempty, positive_int, run
from convert import resolve_checkpoint
from eval.data import calibration_batches
from lora import load_adapter, merge_lora, save_merged


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="the base the adapter was trained on (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, type=nonempty, help="LoRA adapter folder")
    p.add_argument("--out", required=True, type=nonempty, help="merged checkpoint folder")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq"),
                   help="re-quantization of a quantized base's adapted layers")
    p.add_argument("--calib", default="boolq", type=nonempty, help="GPTQ calibration text: boolq | lambada | a file")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--calib_seqlen", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Merge and save; returns the re-quantization error (empty for a float base)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = resolve_checkpoint(args.checkpoint)
    out = check_output_checkpoint(args.out, ckpt, args.adapter)
    model = load_model(ckpt)
    load_adapter(model, args.adapter, ckpt)
    calib = None
    if args.method == "gptq":
        calib = calibration_batches(load_tokenizer_for(ckpt), args.calib_samples, args.calib_seqlen, args.calib,
                                    args.seed)
    error = merge_lora(model, args.method, calib)
    summary = {k: v for k, v in error.items() if k != "layers"}
    if error:
        worst = max(error["layers"], key=lambda n: error["layers"][n]["rel_fro"])
        summary["worst_layer"] = {"name": worst, **error["layers"][worst]}
    save_merged(model, ckpt, out, {"method": f"lora-merge-{args.method}", "adapter": str(args.adapter),
                                   "merge_error": summary})
    print(json.dumps(summary or {"merged": "float base, exact"}))
    print(f"merged {args.adapter} into {ckpt} -> {out}", file=sys.stderr)
    return error


if __name__ == "__main__":
    run(main)
