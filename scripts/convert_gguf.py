"""Convert a llama-architecture GGUF file (F32/F16/BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) to a bitfast checkpoint.
Weights are dequantized to float32; the tokenizer inside the GGUF is exported as tokenizer.model (SentencePiece,
'llama') or tokenizer.json (byte-level BPE, 'gpt2', with the pre-tokenizer `tokenizer.ggml.pre` names).

    python scripts/convert_gguf.py model.Q4_K_M.gguf checkpoints/my-model
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import convert_command  # noqa: E402
from convert import convert_gguf  # noqa: E402

if __name__ == "__main__":
    convert_command(__doc__, convert_gguf, "gguf_file")
