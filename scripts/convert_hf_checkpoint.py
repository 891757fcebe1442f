"""Convert a Hugging Face Llama-family folder (config.json + *.safetensors or pytorch_model*.bin) to a bitfast checkpoint.

    python scripts/convert_hf_checkpoint.py path/to/Llama-3.2-1B-Instruct checkpoints/llama-3.2-1b
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import convert_command  # noqa: E402
from convert import convert_hf  # noqa: E402

if __name__ == "__main__":
    convert_command(__doc__, convert_hf, "hf_folder")
