"""A bitfast checkpoint as a Hugging Face model folder: transformers loads it, vLLM serves it.

A float checkpoint becomes a plain LlamaForCausalLM folder. A quantized one is written in the compressed-tensors
"pack-quantized" format (the one vLLM's W4A16/W8A16 kernels read):
- config.json's `quantization_config` lists one group per format: num_bits, symmetric, strategy "group"
  (group_size) or "channel", and the exact module names it covers;
- each quantized linear stores weight_packed (int32 [N, ceil(K * bits / 32)]), weight_scale ([N, G]),
  weight_shape and, when asymmetric, weight_zero_point (int32, packed along N: [ceil(N * bits / 32), G]).

compressed-tensors (compressors/pack_quantized/helpers.py) writes each value q in [-2^(b-1), 2^(b-1)) as the
unsigned q + 2^(b-1) at bit i * bits of a little-endian stream of int32 words, and dequantizes
(q - zp) * scale. Our codes c in [0, 2^b) with W = (c - z) * s are that with q = c - 2^(b-1) and
zp = z - 2^(b-1): the stored unsigned values are our codes and zeros themselves, in the same little-endian bit
stream kernels/packing.py writes, padded to whole int32 words. vLLM's kernels take 4 and 8 bits and need the
group size to divide K; the others are refused. A quantized output head is written dequantized (float): vLLM
quantizes no lm_head in this format. Q and K rows go back to the rotate-half order Hugging Face uses.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoint import load_model, read_config
from convert import _HF_NAMES, _rename, interleaved_to_hf
from fileio import atomic_dir, check_output_dir, read_json
from kernels.packing import pack
from qlinear import QuantFormat, QuantLinear
from tokenizer import jinja_chat_template, token_ids

HF_EXPORT_BITS = (4, 8)
# Every file an export folder holds: a folder holding anything else is not ours to replace.
HF_EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json"}
# Our parameter names -> Hugging Face's, the converter's table (convert._HF_NAMES) read the other way.
_OURS_TO_HF = [(ours.replace(".", r"\.").replace("{}", r"(\d+)"), hf.replace(r"(\d+)", "{}").replace("\\.", "."))
               for hf, ours in _HF_NAMES]


def hf_name(ours: str) -> str:
    return _rename(ours, _OURS_TO_HF)


def is_hf_export_dir(folder) -> bool:
    """A folder this module wrote: config.json marked with bitfast_source, and only files an export holds."""
    folder = Path(folder)
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "bitfast_source" in config and all(
        p.name in HF_EXPORT_FILES and p.is_file() for p in folder.iterdir())


def check_hf_format(fmt: QuantFormat, in_features: int, layer: str):
    """ValueError (one line) for a format compressed-tensors' pack-quantized layout cannot carry to vLLM."""
    if fmt.bits not in HF_EXPORT_BITS:
        raise ValueError(f"{layer}: {fmt.name} cannot be exported to compressed-tensors: vLLM's pack-quantized "
                         f"kernels take {' and '.join(map(str, HF_EXPORT_BITS))}-bit weights; export it to GGUF "
                         "(scripts/export.py --to gguf) or quantize at int4/int8")
    if fmt.group_size and in_features % fmt.group_size:
        raise ValueError(f"{layer}: {fmt.name} has a ragged last group (K={in_features} is not a multiple of "
                         f"{fmt.group_size}), which compressed-tensors cannot express; quantize with a group size "
                         f"that divides {in_features}")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [R, C] -> int32 [R, ceil(C * bits / 32)]: kernels/packing.py's little-endian bit stream,
    padded to whole 32-bit words and read as little-endian int32 (compressed-tensors' pack_to_int32 layout)."""
    if sys.byteorder != "little":
        raise ValueError("the compressed-tensors export reads packed bytes as little-endian int32 words")
    cols = codes.shape[1]
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, -(-cols * bits // 32) * 32 // bits - cols))
    return pack(padded, bits).contiguous().view(torch.int32)


def compressed_tensors(layer: QuantLinear, permute=None) -> dict:
    """{suffix: tensor} of one quantized linear in the pack-quantized layout; `permute` reorders output rows."""
    fmt, rows = layer.fmt, permute or (lambda t: t)
    codes, scales = rows(layer.codes()), rows(layer.scales.float())
    out = {"weight_packed": pack_int32(codes, fmt.bits), "weight_scale": scales,
           "weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not fmt.sym:
        zeros = rows(layer.zeros.float())
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() >= 2 ** fmt.bits:
            raise ValueError(f"{fmt.name}: zero points are not integers in [0, {2 ** fmt.bits}); compressed-tensors "
                             "stores integer zero points")
        out["weight_zero_point"] = pack_int32(zeros.to(torch.uint8).T, fmt.bits).T.contiguous()
    return out


def _quantization_config(groups: dict) -> dict:
    """compressed-tensors' quantization_config: one config group per format, naming its modules exactly."""
    config_groups = {}
    for i, (fmt, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].name)):
        weights = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.sym, "dynamic": False,
                   "strategy": "group" if fmt.group_size else "channel", "group_size": fmt.group_size or None,
                   "actorder": None, "observer": "minmax"}
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None}


def _hf_state(model) -> tuple:
    """(HF state dict, {QuantFormat: [module names]}) of a loaded bitfast model."""
    args = model.args
    state, groups = {}, defaultdict(list)
    heads = {"attention.wq": args.n_head, "attention.wk": args.n_local_heads}
    for name, module in model.named_modules():
        if name == "output" and args.tie_embeddings:
            continue  # the tied head is the embedding, written below
        head_count = next((n for k, n in heads.items() if name.endswith(k)), None)
        permute = (lambda t, n=head_count: interleaved_to_hf(t, n, args.head_dim)) if head_count else None
        if isinstance(module, QuantLinear) and name != "output":
            check_hf_format(module.fmt, module.in_features, name)
            prefix = hf_name(f"{name}.weight")[:-len(".weight")]
            state.update({f"{prefix}.{k}": v for k, v in compressed_tensors(module, permute).items()})
            groups[module.fmt].append(prefix)
        elif isinstance(module, QuantLinear):  # an untied quantized head: written dequantized
            state["lm_head.weight"] = module.float_weight()
        elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter) and name != "tok_embeddings":
            w = module.weight.detach().float()
            state[hf_name(f"{name}.weight")] = permute(w) if permute else w
    head = model.output
    state["model.embed_tokens.weight"] = (head.float_weight() if isinstance(head, QuantLinear) and
                                          args.tie_embeddings else model.tok_embeddings.weight.detach().float())
    return state, dict(groups)


def _hf_config(args, tok_meta: dict, groups: dict, source) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.intermediate_size, "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head, "num_key_value_heads": args.n_local_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "max_position_embeddings": args.block_size, "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base, "tie_word_embeddings": args.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32",
        "rope_scaling": {**args.rope_scaling, "rope_type": "llama3"} if args.rope_scaling else None,
        "bos_token_id": tok_meta.get("bos_id"), "eos_token_id": tok_meta.get("eos_id"),
        "bitfast_source": str(source),  # marks the folder as ours, so a later export may replace it
    }
    if groups:
        config["quantization_config"] = _quantization_config(groups)
    return config


def hf_tokenizer_files(ckpt: Path, tok_meta: dict) -> dict:
    """tokenizer.json as stored, and a tokenizer_config.json with bos/eos and the chat template as jinja."""
    name = tok_meta.get("file")
    if name is None:
        return {}
    if name != "tokenizer.json":
        raise ValueError(f"{ckpt}: the tokenizer is {name}; the Hugging Face export carries tokenizer.json "
                         "(byte-level BPE) tokenizers only")
    data = (ckpt / name).read_bytes()
    text_of = {i: t for t, i in token_ids(json.loads(data), str(ckpt / name)).items()}
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "add_bos_token": bool(tok_meta.get("add_bos")),
            "bos_token": text_of.get(tok_meta.get("bos_id")), "eos_token": text_of.get(tok_meta.get("eos_id"))}
    if tok_meta.get("chat_template"):
        tcfg["chat_template"] = jinja_chat_template(tok_meta["chat_template"], tok_meta.get("default_system_prompt"))
    return {"tokenizer.json": data, "tokenizer_config.json": json.dumps(tcfg, indent=2, ensure_ascii=False)}


def export_hf(ckpt, out_dir) -> Path:
    """Write checkpoint folder `ckpt` as a Hugging Face model folder `out_dir` (checked first, written atomically)."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    config = read_config(ckpt)
    if out_dir.exists() and out_dir.resolve() == ckpt.resolve():
        raise ValueError(f"{out_dir}: is the input checkpoint; write the export to another folder")
    check_output_dir(out_dir, is_hf_export_dir, "Hugging Face export")
    tok_meta = config.get("tokenizer") or {}
    files = hf_tokenizer_files(ckpt, tok_meta)
    model = load_model(ckpt)
    with torch.no_grad():
        state, groups = _hf_state(model)
    hf_config = _hf_config(model.args, tok_meta, groups, ckpt)
    generation = {"bos_token_id": tok_meta.get("bos_id"), "eos_token_id": tok_meta.get("eos_id")}
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, data in {**files, "config.json": json.dumps(hf_config, indent=2),
                           "generation_config.json": json.dumps(generation, indent=2)}.items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return out_dir
