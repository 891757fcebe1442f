"""A bitfast checkpoint as a GGUF file for llama.cpp and Ollama (the other direction is convert.convert_gguf).

Tensors keep our names' GGUF counterparts and our interleaved Q/K rows (llama.cpp's own RoPE layout). Norms are
F32; float weights F32, F16 or BF16. A quantized linear becomes the llama.cpp block type whose grid holds its
codes, block by block (32 weights, one fp16 scale d, for Q4_1 also an fp16 offset m), whenever each block of 32
lies inside one of our groups (group size a multiple of 32, or one group per row) and K is a multiple of 32:
- symmetric 2-4 bits (W = (c - 2^(b-1)) s): Q4_0, w = d (q - 8) with d = s, q = c - 2^(b-1) + 8: exact;
- asymmetric 2-4 bits (W = (c - z) s): Q4_1, w = d q + m with d = s, q = c, m = -s z rounded to fp16
  (exact up to that rounding);
- 8 bits whose c - z fits int8 (all symmetric ones): Q8_0, w = d q with d = s, q = c - z: exact.
Everything else is re-quantized from the dequantized weight by gguf's reference quantizers (Q8_0 for 8 bits,
Q4_0 / Q4_1 below) or, where K is not a multiple of 32, written as float. Every 2-D tensor's reconstruction
error against bitfast's own weight is measured on the written bytes (gguf.quants.dequantize) and returned.
"""
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_model, read_config
from convert import _GGUF_NAMES, _rename, open_gguf
from fileio import atomic_file, check_output_file, read_json
from model import ModelArgs, rope_frequencies
from qlinear import QuantLinear, expand_groups
from tokenizer import GGUF_CONTROL, GGUF_USER_DEFINED, gguf_pre_tokenizer, jinja_chat_template, \
    splits_from_pre_tokenizer, token_ids, tokenizer_from_json

FLOAT_TYPES = ("f32", "f16", "bf16")
BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
GGUF_NORMAL, GGUF_UNUSED = 1, 5  # llama.cpp token types
# Our parameter names -> GGUF's, the importer's table (convert._GGUF_NAMES) read the other way.
_OURS_TO_GGUF = [(ours.replace(".", r"\.").replace("{}", r"(\d+)"), g.replace(r"(\d+)", "{}").replace("\\.", "."))
                 for g, ours in _GGUF_NAMES]


@dataclass
class TensorReport:
    """How one 2-D tensor was written: its GGUF type, 'codes' (our codes carried over), 'requantized' or
    'float', and the largest absolute difference from bitfast's weight (and relative to the weight's max)."""
    name: str
    gguf_type: str
    how: str
    max_error: float
    relative_error: float


def gguf_name(ours: str) -> str:
    return _rename(ours, _OURS_TO_GGUF)


def is_bitfast_gguf(path) -> bool:
    """A GGUF file this module wrote (it carries bitfast.source)."""
    try:
        return "bitfast.source" in open_gguf(path).fields
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- weights

def _nibbles(q: np.ndarray) -> np.ndarray:
    """4-bit values [blocks, 32] -> 16 bytes a block: byte j holds q[j] (low nibble) and q[j + 16] (high)."""
    q = q.astype(np.uint8)
    return q[:, :BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def codes_as_blocks(layer: QuantLinear):
    """(GGUF type name, uint8 [N, K / 32 * block bytes]) carrying the layer's codes, or None where no llama.cpp
    block grid holds them (see the module docstring)."""
    fmt, (n, k) = layer.fmt, (layer.out_features, layer.in_features)
    if k % BLOCK or fmt.group_len(k) % BLOCK:
        return None
    codes = layer.codes().to(torch.int32).view(-1, BLOCK).numpy()
    first = lambda t: expand_groups(t.float(), fmt, k)[:, ::BLOCK].reshape(-1).numpy()  # noqa: E731 (per block)
    d, z = first(layer.scales), first(layer.group_zeros())
    if fmt.bits == 8:
        q = codes - z[:, None]
        if not (np.array_equal(z, np.round(z)) and q.min() >= -128 and q.max() <= 127):
            return None
        blocks = np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)
        return "Q8_0", blocks.reshape(n, -1)
    if fmt.sym:
        blocks = np.concatenate([_fp16_bytes(d), _nibbles(codes - 2 ** (fmt.bits - 1) + 8)], axis=1)
        return "Q4_0", blocks.reshape(n, -1)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(-d * z), _nibbles(codes)], axis=1)
    return "Q4_1", blocks.reshape(n, -1)


def requantized_type(layer: QuantLinear) -> str:
    """The llama.cpp type nearest a format whose codes no block grid holds."""
    return "Q8_0" if layer.fmt.bits == 8 else "Q4_0" if layer.fmt.sym else "Q4_1"


def _encode(w: torch.Tensor, type_name: str):
    """(GGUF type name, data for GGUFWriter.add_tensor) of a float weight."""
    import gguf
    w = w.detach().float().contiguous().numpy()
    if type_name == "f32":
        return "F32", w
    if type_name == "f16":
        return "F16", w.astype(np.float16)
    name = type_name.upper()
    return name, gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])


def _tensor(name: str, module, float_type: str):
    """(GGUF type name, data, how, bitfast's float weight) for one 2-D weight."""
    if isinstance(module, QuantLinear):
        w = module.float_weight()
        carried = codes_as_blocks(module)
        if carried is not None:
            return (*carried, "codes", w)
        if module.in_features % BLOCK:
            return (*_encode(w, float_type), "float", w)
        return (*_encode(w, requantized_type(module).lower()), "requantized", w)
    return (*_encode(module.weight, float_type), "float", module.weight.detach().float())


def _report(name, type_name, data, how, w) -> TensorReport:
    import gguf
    back = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name]),
                                       dtype=np.float32).reshape(w.shape))
    err = (back - w).abs().max().item()
    return TensorReport(name, type_name, how, err, err / max(w.abs().max().item(), 1e-30))


def _weights(model, float_type: str):
    """[(GGUF name, GGUF type name, data)] and the reports: norms F32, the rest as the module docstring says."""
    tensors, reports = [], []
    args = model.args
    for name, module in model.named_modules():
        if name == "tok_embeddings" and args.tie_embeddings and isinstance(model.output, QuantLinear):
            continue  # the embedding is the quantized head, written as token_embd below
        if name == "output" and args.tie_embeddings:
            module, name = (model.output, "tok_embeddings") if isinstance(model.output, QuantLinear) else (None, None)
        weight = getattr(module, "weight", None) if not isinstance(module, QuantLinear) else None
        if isinstance(weight, torch.nn.Parameter) and weight.dim() == 1:  # a norm
            tensors.append((gguf_name(f"{name}.weight"), "F32", weight.detach().float().numpy()))
        elif isinstance(module, QuantLinear) or isinstance(weight, torch.nn.Parameter):
            type_name, data, how, w = _tensor(name, module, float_type)
            tensors.append((gguf_name(f"{name}.weight"), type_name, data))
            reports.append(_report(gguf_name(f"{name}.weight"), type_name, data, how, w))
    if args.rope_scaling:  # llama.cpp's Llama-3 rope scaling: per-frequency divisors
        unscaled = ModelArgs(**{**vars(args), "rope_scaling": None})
        factors = (rope_frequencies(unscaled) / rope_frequencies(args)).float().numpy()
        tensors.append(("rope_freqs.weight", "F32", factors))
    return tensors, reports


# ---------------------------------------------------------------- tokenizer and metadata

def gguf_tokenizer_fields(path: Path, vocab_size: int) -> dict:
    """tokenizer.ggml.* values of a byte-level BPE tokenizer.json: tokens (padded to the embedding's rows, as
    llama.cpp's converter pads), token types, merges, and the pre-tokenizer name that splits text alike."""
    data = read_json(path)
    tokenizer_from_json(data, str(path))  # the checks our loader makes (BPE, alphabet, merges)
    if data.get("normalizer") is not None:
        raise ValueError(f"{path}: a tokenizer with a normalizer cannot be written to GGUF (llama.cpp's 'gpt2' "
                         "tokenizer has none)")
    splits = splits_from_pre_tokenizer(data.get("pre_tokenizer"), str(path))
    pre = next((p for p in ("smollm", "gpt-2", "llama-bpe")
                if splits_from_pre_tokenizer(gguf_pre_tokenizer(p), p) == splits), None)
    if pre is None:
        raise ValueError(f"{path}: its pre-tokenizer matches none llama.cpp knows that bitfast can name "
                         "(smollm, gpt-2, llama-bpe)")
    ids = token_ids(data, str(path))
    special = {t["content"] for t in data.get("added_tokens") or [] if t.get("special")}
    added = {t["content"] for t in data.get("added_tokens") or []}
    size = max(vocab_size, max(ids.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [GGUF_UNUSED] * size
    for token, i in ids.items():
        tokens[i] = token
        types[i] = GGUF_CONTROL if token in special else GGUF_USER_DEFINED if token in added else GGUF_NORMAL
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def _write_metadata(writer, args: ModelArgs, tok_meta: dict, tok: dict, name: str, source):
    writer.add_name(name)
    writer.add_string("bitfast.source", str(source))  # marks the file as ours, so a later export may replace it
    writer.add_context_length(args.block_size)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layer)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.n_head)
    writer.add_head_count_kv(args.n_local_heads)
    writer.add_rope_dimension_count(args.head_dim)
    if args.head_dim != args.dim // args.n_head:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    writer.add_rope_freq_base(args.rope_base)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id)):
        if tok_meta.get(key) is not None:
            add(tok_meta[key])
    writer.add_add_bos_token(bool(tok_meta.get("add_bos")))
    if tok_meta.get("chat_template"):
        writer.add_chat_template(jinja_chat_template(tok_meta["chat_template"], tok_meta.get("default_system_prompt")))


def _file_type(tensors) -> int:
    """llama.cpp's general.file_type: the type holding the most weights."""
    import gguf
    counts = Counter()
    for _, type_name, data in tensors:
        if data.ndim == 2:
            counts[type_name] += data.size
    kinds = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
             "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}
    return int(gguf.LlamaFileType[kinds[counts.most_common(1)[0][0]]])


def export_gguf(ckpt, out_path, float_type: str = "f16") -> list:
    """Write checkpoint folder `ckpt` as GGUF file `out_path` (checked first, written atomically); returns a
    TensorReport per 2-D tensor."""
    import gguf
    ckpt, out_path = Path(ckpt), Path(out_path)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float type {float_type!r}: expected one of {', '.join(FLOAT_TYPES)}")
    config = read_config(ckpt)
    check_output_file(out_path, is_bitfast_gguf, "GGUF file")
    tok_meta = config.get("tokenizer") or {}
    if tok_meta.get("file") != "tokenizer.json":
        raise ValueError(f"{ckpt}: GGUF export needs a byte-level BPE tokenizer.json in the checkpoint (it has "
                         f"{tok_meta.get('file') or 'none'}); llama.cpp cannot run a model without its tokenizer")
    args = ModelArgs.from_dict(config["model_args"])
    tok = gguf_tokenizer_fields(ckpt / "tokenizer.json", args.vocab_size)
    if len(tok["tokens"]) != args.vocab_size:
        raise ValueError(f"{ckpt}: the tokenizer has {len(tok['tokens'])} tokens, the model's embedding "
                         f"{args.vocab_size} rows; llama.cpp needs one row per token")
    model = load_model(ckpt)
    with torch.no_grad():
        tensors, reports = _weights(model, float_type)
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _write_metadata(writer, args, tok_meta, tok, ckpt.name, ckpt)
        writer.add_file_type(_file_type(tensors))
        for name, type_name, data in tensors:
            raw = None if type_name in ("F32", "F16") else gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return reports
