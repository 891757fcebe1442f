"""Export a bitfast checkpoint (float or quantized) to the engines users serve with.

    python scripts/export.py --checkpoint checkpoints/smollm2-int4 --to hf exports/smollm2-int4-hf      # transformers, vLLM
    python scripts/export.py --checkpoint checkpoints/smollm2-int4 --to gguf exports/smollm2-int4.gguf  # llama.cpp, Ollama

--to hf writes a Hugging Face folder: plain float weights, or compressed-tensors pack-quantized int4/int8
(export_hf.py). --to gguf writes one GGUF file: our codes carried into Q4_0/Q4_1/Q8_0 blocks where their grid holds
them, re-quantized to the nearest llama.cpp type otherwise, with each tensor's reconstruction error printed
(export_gguf.py). Without a checkpoint the default model (SmolLM2-135M-Instruct) is exported.
"""
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import ArgumentParser, run  # noqa: E402
from convert import resolve_checkpoint  # noqa: E402
from export_gguf import FLOAT_TYPES, export_gguf  # noqa: E402
from export_hf import export_hf  # noqa: E402


def print_gguf_report(reports: list):
    """One line per tensor, then how many went which way."""
    for r in reports:
        print(f"{r.name:32s} {r.gguf_type:5s} {r.how:12s} max |error| {r.max_error:.3g} "
              f"({r.relative_error:.3g} of max |w|)")
    ways = Counter(f"{r.gguf_type} {r.how}" for r in reports)
    print("tensors: " + ", ".join(f"{n} {way}" for way, n in sorted(ways.items())))


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="bitfast checkpoint folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("out", help="output: a folder (--to hf) or a .gguf file (--to gguf)")
    p.add_argument("--to", required=True, choices=["hf", "gguf"])
    p.add_argument("--float_type", choices=FLOAT_TYPES, default="f16",
                   help="gguf: type of the weights that stay float (norms are always f32)")
    a = p.parse_args(argv)
    ckpt = resolve_checkpoint(a.checkpoint)
    if a.to == "hf":
        print(f"wrote {export_hf(ckpt, a.out)}")
        return
    print_gguf_report(export_gguf(ckpt, a.out, a.float_type))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run(main)
