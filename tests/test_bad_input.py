"""Bad input to the checkpoint and quantization commands: one line on stderr, exit 2, no traceback, and nothing on
disk changed but the intended output. One test per cause; the fuzz tests mutate our own files field by field."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from checkpoint import is_checkpoint_dir, load_model, read_config, save_checkpoint
from convert import convert_gguf, convert_hf
from fileio import TEMP_TAG
from qlinear import check_recipe
from tests.test_model import TINY, tiny_model
from tests.tiny import finish_gguf, save_tiny

ROOT = Path(__file__).resolve().parent.parent
USER_ERRORS = (ValueError, FileNotFoundError)


def snapshot(folder: Path) -> dict:
    """Every file below `folder` with its bytes: the state a failed command must leave unchanged."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_one_line_error(r, *words):
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and err.count("\n") == 0 and err.startswith("error: "), r.stderr
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tiny_model(), tmp_path_factory.mktemp("tiny") / "ckpt")


def user_folder(root: Path) -> Path:
    d = root / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "data.bin").write_bytes(os.urandom(64))
    return d


# ---------------------------------------------------------------- output paths

def test_quantize_refuses_a_folder_of_someone_elses_files(tmp_path, tiny_ckpt):
    mine = user_folder(tmp_path)
    before = snapshot(tmp_path)
    r = run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", "int8", "--out", str(mine)])
    assert_one_line_error(r, str(mine), "not a bitfast checkpoint")
    assert snapshot(tmp_path) == before


def test_out_dot_deletes_nothing(tmp_path, tiny_ckpt):
    mine = user_folder(tmp_path)
    before = snapshot(tmp_path)
    r = run_cli([str(ROOT / "quantize.py"), "--checkpoint", str(tiny_ckpt), "--mode", "int8", "--out", "."], cwd=mine)
    assert_one_line_error(r, "current folder")
    r = run_cli([str(ROOT / "scripts/convert_gguf.py"), "x.gguf", ".."], cwd=mine / "sub")
    assert_one_line_error(r, "current folder")
    assert snapshot(tmp_path) == before


def test_output_checks_come_before_the_work(tmp_path, tiny_ckpt):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    # A parent that is a file, an output that is a file, the input itself: refused before quantizing.
    for out, words in [(tmp_path / "afile" / "out", ["is a file, not a folder"]),
                       (tmp_path / "afile", ["not a folder"]), (tiny_ckpt, ["is the input"])]:
        r = run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", "int4", "--method", "gptq",
                     "--calib_samples", "1000000", "--out", str(out)])
        assert_one_line_error(r, str(out), *words)
    assert snapshot(tmp_path) == before
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        r = run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", "int8", "--out", str(tmp_path / "ro" / "o")])
        assert_one_line_error(r, "not writable")


def test_our_own_output_is_replaced_atomically_and_stale_temps_go(tmp_path, tiny_ckpt):
    out = tmp_path / "q"
    stale = tmp_path / f".q{TEMP_TAG}999999999-abc"  # a killed run's leftover (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / f".q{TEMP_TAG}1-abc"  # pid 1 is alive: its temp is not ours to remove
    live.mkdir()
    for mode in ("int8", "int4"):
        r = run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", mode, "--out", str(out)])
        assert r.returncode == 0, r.stderr
        assert read_config(out)["quantization"]["recipe"]["layers.0.attention.wq"].startswith(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", live.name])
    assert is_checkpoint_dir(out)
    (out / "README.txt").write_text("a user's note in our folder makes it theirs")
    assert not is_checkpoint_dir(out)


def test_converters_refuse_user_folders_and_leave_nothing_on_failure(tmp_path):
    mine = user_folder(tmp_path)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    before = snapshot(tmp_path)
    assert_one_line_error(run_cli(["scripts/convert_gguf.py", str(tmp_path / "bad.gguf"), str(mine)]), str(mine))
    assert_one_line_error(run_cli(["scripts/convert_gguf.py", str(tmp_path / "bad.gguf"), str(tmp_path / "new")]),
                          "not a readable GGUF")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "mine"]


# ---------------------------------------------------------------- flags

@pytest.mark.parametrize("flags,words", [
    (["--calib_samples", "0"], ["--calib_samples", ">= 1"]),
    (["--calib_seqlen", "-5"], ["--calib_seqlen"]),
    (["--groupsize", "-1"], ["--groupsize"]),
    (["--groupsize", "12"], ["multiple of 8"]),
    (["--damp", "0"], ["--damp", "> 0"]),
    (["--damp", "nan"], ["--damp"]),
    (["--threads", "0"], ["--threads"]),
    (["--quantize_output", "int5"], ["bad format"]),
    (["--mode", "int9"], ["--mode"]),
    (["--mode", "int4", "--recipe", "r.json"], ["--recipe goes with --mode hybrid"]),
])
def test_quantize_flags_are_checked_at_parse_time(flags, words):
    r = run_cli(["quantize.py", *flags, "--out", "/nonexistent/never-written"])
    assert_one_line_error(r, *words)


# ---------------------------------------------------------------- what is read: config.json (fuzz)

GOOD_MODEL_ARGS = {**vars(tiny_model().args)}


def config_mutations():
    """(where, mutated config.json) pairs: wrong types, missing keys, extra keys, empty values per field."""
    base = {"model_args": GOOD_MODEL_ARGS, "tokenizer": None, "source": "test"}
    yield "list", []
    yield "string", "model_args"
    yield "empty", {}
    yield "model_args list", {**base, "model_args": [1, 2]}
    for key, value in GOOD_MODEL_ARGS.items():
        for bad in ("9", None, [], {}, -3, 0, 2.5, True, 10**9):
            yield f"model_args.{key}={bad!r}", {**base, "model_args": {**GOOD_MODEL_ARGS, key: bad}}
        yield f"no model_args.{key}", {**base, "model_args": {k: v for k, v in GOOD_MODEL_ARGS.items() if k != key}}
    yield "extra model_args key", {**base, "model_args": {**GOOD_MODEL_ARGS, "n_experts": 8}}
    yield "rope_scaling missing keys", {**base, "model_args": {**GOOD_MODEL_ARGS, "rope_scaling": {"factor": 8.0}}}
    for tok in ([], "tokenizer.json", {"file": 3}, {"file": "../../etc/passwd"}, {"bos_id": "1"},
                {"add_bos": "yes"}, {"file": "tokenizer.json", "extra": 1}, {"chat_template": 5}):
        yield f"tokenizer={tok!r}", {**base, "tokenizer": tok}
    for quant in ([], "int4", {}, {"recipe": []}, {"recipe": {}}, {"recipe": {"output": 4}},
                  {"recipe": {"output": "int5"}}, {"recipe": {"layers.99.attention.wq": "int8"}},
                  {"recipe": {"output": "int8"}}):
        yield f"quantization={quant!r}", {**base, "quantization": quant}
    yield "checksums list", {**base, "checksums": ["x"]}
    yield "checksums wrong", {**base, "checksums": {"model.safetensors": "sha256:00"}}


def test_fuzzed_config_json_loads_or_fails_in_one_clear_line(tmp_path, tiny_ckpt):
    """Every mutation of config.json either loads a working model or raises a user error naming the file."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    outcomes = {}
    for where, config in config_mutations():
        (ckpt / "config.json").write_text(json.dumps(config))
        try:
            model = load_model(ckpt)
        except USER_ERRORS as e:
            msg = str(e)
            assert str(ckpt) in msg and "\n" not in msg, (where, msg)
            outcomes[where] = "error"
        else:
            with torch.no_grad():
                assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all(), where
            outcomes[where] = "loaded"
    # The harmless mutations load; each field's wrong types are refused.
    assert outcomes["tokenizer=[]"] == "error" and outcomes["model_args.n_layer='9'"] == "error"
    assert outcomes["model_args.n_layer=1000000000"] == "error"
    assert outcomes["checksums wrong"] == "error"
    assert outcomes["no model_args.rope_base"] == "loaded"  # a default exists
    assert sum(v == "loaded" for v in outcomes.values()) >= 5


def test_a_bad_checkpoint_is_one_line_from_the_cli(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes((tiny_ckpt / "model.safetensors").read_bytes())
    (ckpt / "config.json").write_text(json.dumps({"model_args": {**GOOD_MODEL_ARGS, "n_head": "4"}}))
    r = run_cli(["quantize.py", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "q")])
    assert_one_line_error(r, "config.json", "model_args.n_head", "whole number")
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- recipes (fuzz)

RECIPE_MUTATIONS = [[], "int4", {"default": 4}, {"default": "int5"}, {"layers": []}, {"layers": {"*": 3}},
                    {"layers": {"*": None}}, {"default": "int4", "layer": {}}, {"quantize_output": "yes"},
                    {"default": ""}, {"layers": {"nomatch.*": "int8"}}, {"default": "int4-g128", "layers": {}},
                    {"default": "float", "layers": {"*.w2": "int8"}}]


@pytest.mark.parametrize("recipe", RECIPE_MUTATIONS, ids=[json.dumps(r) for r in RECIPE_MUTATIONS])
def test_fuzzed_recipe_quantizes_or_fails_in_one_clear_line(tmp_path, tiny_ckpt, recipe):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    r = run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", "hybrid", "--recipe", str(path),
                 "--out", str(tmp_path / "q")])
    try:
        check_recipe(recipe)
        valid = "nomatch" not in json.dumps(recipe)
    except ValueError:
        valid = False
    if valid:
        assert r.returncode == 0, r.stderr
        load_model(tmp_path / "q")
    else:
        assert_one_line_error(r, "recipe")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.json"]


# ---------------------------------------------------------------- GGUF metadata (fuzz)

def gguf_fields(model) -> dict:
    a = model.args
    tokens = [f"t{i}" for i in range(a.vocab_size)]
    return {"general.architecture": "llama", "llama.block_count": a.n_layer, "llama.context_length": a.block_size,
            "llama.embedding_length": a.dim, "llama.feed_forward_length": a.intermediate_size,
            "llama.attention.head_count": a.n_head, "llama.attention.head_count_kv": a.n_local_heads,
            "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(tokens),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def write_gguf(path, fields: dict, tensors: dict):
    fields = dict(fields)
    w = gguf.GGUFWriter(str(path), arch=str(fields.pop("general.architecture", "")))  # the writer always sets one
    for key, value in fields.items():
        if isinstance(value, bool):
            kind = gguf.GGUFValueType.BOOL
        elif isinstance(value, int):
            kind = gguf.GGUFValueType.UINT32 if value >= 0 else gguf.GGUFValueType.INT32
        elif isinstance(value, float):
            kind = gguf.GGUFValueType.FLOAT32
        elif isinstance(value, str):
            kind = gguf.GGUFValueType.STRING
        else:
            kind = gguf.GGUFValueType.ARRAY
        w.add_key_value(key, value, kind)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t))
    return finish_gguf(w, path)


GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "attention.wq": "attn_q",
              "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_tensors(model) -> dict:
    """The model's weights under llama.cpp's names (Q/K already in the interleaved layout GGUF keeps)."""
    out = {}
    for k, v in model.state_dict().items():
        parts = k.removesuffix(".weight").split(".")
        if parts[0] == "layers":
            out[f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:])]}.weight"] = v.numpy()
        else:
            out[f"{GGUF_NAMES[parts[0]]}.weight"] = v.numpy()
    return out


def gguf_mutations(fields: dict, tensors: dict):
    yield "valid", fields, tensors
    for key in fields:
        yield f"no {key}", {k: v for k, v in fields.items() if k != key}, tensors
        for bad in ("x", -1, 0, 2.5, [1, 2], ["a"], True):
            if type(bad) is not type(fields[key]):
                yield f"{key}={bad!r}", {**fields, key: bad}, tensors
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"):
        yield f"no tensor {name}", fields, {k: v for k, v in tensors.items() if k != name}
    yield "bos out of range", {**fields, "tokenizer.ggml.bos_token_id": 10**6}, tensors
    yield "more tokens than the embedding", {**fields, "tokenizer.ggml.tokens": [f"t{i}" for i in range(500)],
                                             "tokenizer.ggml.token_type": [1] * 500}, tensors


def test_fuzzed_gguf_metadata_converts_or_fails_in_one_clear_line(tmp_path):
    model = tiny_model()
    fields, tensors = gguf_fields(model), gguf_tensors(model)
    converted = 0
    for i, (where, f, t) in enumerate(gguf_mutations(fields, tensors)):
        path = write_gguf(tmp_path / f"m{i}.gguf", f, t)
        out = tmp_path / f"out{i}"
        try:
            loaded = load_model(convert_gguf(path, out))
        except USER_ERRORS as e:
            assert str(path) in str(e) and "\n" not in str(e), (where, str(e))
            assert not out.exists(), where
        else:
            with torch.no_grad():
                torch.testing.assert_close(loaded(torch.tensor([[1, 2, 3]])), model(torch.tensor([[1, 2, 3]])))
            converted += 1
        path.unlink()
    assert converted >= 3  # the valid file and the keys that have defaults


# ---------------------------------------------------------------- corruption that still parses

def test_flipped_bytes_and_nan_weights_are_refused(tmp_path, tiny_ckpt):
    ckpt = tmp_path / "ckpt"
    save_tiny(tiny_model(), ckpt)
    assert read_config(ckpt)["checksums"]["model.safetensors"].startswith("sha256:")
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-8:] = np.full(2, np.nan, dtype=np.float32).tobytes()  # the last weights become NaN; the file still parses
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_model(ckpt, verify=False)
    r = run_cli(["quantize.py", "--checkpoint", str(ckpt), "--mode", "int8", "--out", str(tmp_path / "q")])
    assert_one_line_error(r, "checksum mismatch", "model.safetensors")


def test_weights_of_the_wrong_dtype_are_refused(tmp_path):
    model = tiny_model()
    state = {k: (v.to(torch.int32) if k == "norm.weight" else v) for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c", state, {"model_args": vars(model.args)})
    with pytest.raises(ValueError, match="norm.weight is stored as torch.int32"):
        load_model(tmp_path / "c")


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path, tiny_ckpt):
    q = tmp_path / "q"
    assert run_cli(["quantize.py", "--checkpoint", str(tiny_ckpt), "--mode", "int8", "--out", str(q)]).returncode == 0
    r = run_cli(["quantize.py", "--checkpoint", str(q), "--mode", "int4", "--out", str(tmp_path / "q2")])
    assert_one_line_error(r, "already quantized")
    assert not (tmp_path / "q2").exists()


def test_legacy_torch_save_file_converts(tmp_path):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tiny_model()
    hf_names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
    parts = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {}
    for k, v in model.state_dict().items():
        if k in hf_names:
            state[hf_names[k]] = v
        elif k.startswith("layers."):
            i, rest = k.split(".")[1], ".".join(k.split(".")[2:-1])
            state[f"model.layers.{i}.{parts[rest]}.weight"] = v
    folder = tmp_path / "hf"
    folder.mkdir()
    cfg.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    loaded = load_model(convert_hf(folder, tmp_path / "ours"))
    assert loaded.args.n_layer == 2 and loaded.args.vocab_size == 101


def test_save_checkpoint_refuses_files_a_checkpoint_never_holds(tmp_path):
    with pytest.raises(ValueError, match="not checkpoint files"):
        save_checkpoint(tmp_path / "c", {"a": torch.ones(1)}, {"model_args": TINY}, {"../evil": b"x"})
    assert list(tmp_path.iterdir()) == []
