"""Convert a Hugging Face Llama-family folder (config.json + *.safetensors or pytorch_model*.bin) to a bitfast checkpoint.

    python scripts/convert_hf_checkpoint.py path/to/Llama-3.2-1B-Instruct checkpoints/llama-3.2-1b
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from convert import convert_hf  # noqa: E402
from cli import ArgumentParser, run  # noqa: E402


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("hf_folder")
    p.add_argument("out_dir")
    a = p.parse_args()
    print(f"wrote {convert_hf(a.hf_folder, a.out_dir)}")


if __name__ == "__main__":
    run(main)
