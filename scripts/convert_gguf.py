"""Convert a llama-architecture GGUF file (F32/F16/BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) to a bitfast checkpoint.
Weights are dequantized to float32; the tokenizer inside the GGUF is exported as tokenizer.json.

    python scripts/convert_gguf.py model.Q4_K_M.gguf checkpoints/my-model
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from convert import convert_gguf  # noqa: E402
from cli import ArgumentParser, run  # noqa: E402


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("gguf_file")
    p.add_argument("out_dir")
    a = p.parse_args()
    print(f"wrote {convert_gguf(a.gguf_file, a.out_dir)}")


if __name__ == "__main__":
    run(main)
