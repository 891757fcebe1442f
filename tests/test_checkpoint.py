"""Converters against independent references: a tiny random Llama built and run by Hugging Face transformers,
written as a HF folder and as a GGUF file (llama.cpp's layout), must give the same logits through bitfast."""
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from checkpoint import load_model, load_state_dict, read_config, save_checkpoint
from convert import convert_gguf, convert_hf
from memory import HUGE_PAGE
from tests.test_model import tiny_model
from tests.tiny import finish_gguf, save_tiny

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300


def hf_tiny(tmp_path, tie=False, rope_scaling=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_scaling=rope_scaling)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random norms, so a swapped or missing norm shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("tie,rope_scaling", [(False, None), (True, None), (False, {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32})])
def test_hf_conversion_matches_transformers(tmp_path, tie, rope_scaling):
    hf, folder = hf_tiny(tmp_path, tie, rope_scaling)
    ours = load_model(convert_hf(folder, tmp_path / "ours"))
    with torch.no_grad():
        got = ours(TOKENS)
    torch.testing.assert_close(got, hf_logits(hf, TOKENS), rtol=1e-4, atol=1e-4)


def test_hf_pytorch_bin_is_loaded_weights_only(tmp_path):
    hf, folder = hf_tiny(tmp_path)
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    for f in folder.glob("*.safetensors"):
        f.unlink()
    ours = load_model(convert_hf(folder, tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(hf, TOKENS), rtol=1e-4, atol=1e-4)
    # A pickle that would run code is refused.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ValueError, match="weights_only"):
        convert_hf(folder, tmp_path / "bad")


def byte_to_unicode():
    # GPT-2's printable stand-ins for bytes, written out here independently of tokenizer.py.
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's converter does to HF Q/K rows (rotate-half -> interleaved pairs).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, qtype=gguf.GGMLQuantizationType.F32, arch="llama"):
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for a, b in ["th", "he", "in", "er", "an", "re", "on", "at", "en", "nd"]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    tokens += [f"<|extra_{i}|>" for i in range(VOCAB - len(tokens) - 2)] + ["<|im_start|>", "<|im_end|>"]
    types = [1] * (VOCAB - 2) + [3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    names = {"embed_tokens": "token_embd", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
             "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy()
        parts = name.split(".")
        if name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        else:
            gname = f"blk.{parts[2]}.{names[parts[-2]]}.weight"
        if parts[-2] == "q_proj":
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        if parts[-2] == "k_proj":
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype == gguf.GGMLQuantizationType.I8:  # a type gguf cannot dequantize
            w.add_tensor(gname, a.astype(np.int8))
        elif a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    return finish_gguf(w, path)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_conversion_matches_transformers(tmp_path, tie):
    hf, _ = hf_tiny(tmp_path, tie)
    ours = load_model(convert_gguf(write_gguf(tmp_path / "m.gguf", hf), tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), hf_logits(hf, TOKENS), rtol=1e-4, atol=1e-4)
    cfg = read_config(tmp_path / "ours")
    assert cfg["tokenizer"]["file"] == "tokenizer.json" and cfg["model_args"]["tie_embeddings"] == tie


def test_gguf_q8_0_conversion_is_close(tmp_path):
    hf, _ = hf_tiny(tmp_path)
    ours = load_model(convert_gguf(write_gguf(tmp_path / "m.gguf", hf, gguf.GGMLQuantizationType.Q8_0),
                                   tmp_path / "ours"))
    with torch.no_grad():
        got, ref = ours(TOKENS), hf_logits(hf, TOKENS)
    rel = (got - ref).norm() / ref.norm()
    assert 1e-5 < rel < 2e-2  # quantized (not bit-exact) yet the same model


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    hf, folder = hf_tiny(tmp_path)
    ckpt = convert_hf(folder, tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="not a bitfast checkpoint"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a bitfast checkpoint"):
        load_model(folder)  # a HF folder also has config.json
    # Truncated weights.
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="truncated"):
        load_model(ckpt, verify=False)
    # Shapes that disagree with the config.
    ckpt = convert_hf(folder, tmp_path / "ours")
    cfg = read_config(ckpt)
    cfg["model_args"]["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(ckpt)
    # A GGUF of another architecture.
    with pytest.raises(ValueError, match="unsupported GGUF architecture"):
        convert_gguf(write_gguf(tmp_path / "g.gguf", hf, arch="gpt2"), tmp_path / "g")
    assert not (tmp_path / "g").exists()  # nothing half-written
    with pytest.raises(ValueError, match="has type I8"):
        convert_gguf(write_gguf(tmp_path / "i8.gguf", hf, gguf.GGMLQuantizationType.I8), tmp_path / "i8")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "j")


def test_save_checkpoint_is_atomic(tmp_path):
    out = tmp_path / "ckpt"
    save_checkpoint(out, {"a": torch.ones(2)}, {"model_args": {}})
    with pytest.raises(Exception):
        save_checkpoint(out, {"a": torch.ones(2)}, {"model_args": {"bad": object()}})  # not JSON-serializable
    assert load_state_dict(out / "model.safetensors")["a"].tolist() == [1.0, 1.0]  # the old one survives
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_weights_sit_in_one_aligned_block(tmp_path, dtype):
    folder = save_tiny(tiny_model(tie_embeddings=True), tmp_path / "tiny")
    model = load_model(folder, dtype=dtype)
    stored = load_state_dict(folder / "model.safetensors")
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if not n.endswith("_cache")}
    for name, t in tensors.items():  # each one a copy of the file's, converted to dtype
        torch.testing.assert_close(t, stored[name].to(dtype), rtol=0, atol=0)
        assert t.data_ptr() % 64 == 0, name
    assert model.output.weight is model.tok_embeddings.weight  # the tied head is copied once
    blocks = {t.untyped_storage().data_ptr() for t in tensors.values()}
    if sys.platform == "linux":  # one block, its first tensor on a 2 MB page boundary
        assert len(blocks) == 1 and min(t.data_ptr() for t in tensors.values()) % HUGE_PAGE == 0


def test_converter_cli_reports_one_line(tmp_path):
    r = subprocess.run([sys.executable, "scripts/convert_hf_checkpoint.py", str(tmp_path / "missing"),
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no config.json" in r.stderr
