"""scripts/export.py against the engines' own readers: the Hugging Face folder loaded by transformers (with the
compressed-tensors package) and the GGUF file read back by gguf's reference dequantizers and our GGUF importer,
logits compared with bitfast's; the chat templates rendered by jinja2 against our renderers; bad input."""
import importlib.util
import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch

from calibrate import quantize_model
from checkpoint import load_model, load_tokenizer_for, model_state_for_saving, read_config, save_checkpoint, \
    save_quantized
from cli import run
from convert import convert_gguf, convert_hf, resolve_checkpoint
from decoding import generate
from export_gguf import export_gguf
from export_hf import export_hf
from qlinear import QuantFormat, QuantLinear, expand_groups, linear_names, resolve_recipe
from tests.test_bad_input import assert_one_line_error, run_cli, snapshot, user_folder
from tests.test_model import tiny_model
from tests.tiny import save_tiny
from tokenizer import BYTE_TO_CHAR, GGUF_CONTROL, bpe_tokenizer_json_from_gguf, detect_chat_template, \
    detect_default_system_prompt, jinja_chat_template

ROOT = Path(__file__).resolve().parent.parent
SMALL_VOCAB = 3 + 256 + 5  # small_tokenizer_checkpoint's tokens

LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
TOKENS = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 64, 3, 11], [4, 4, 8, 15, 16, 23, 42, 0, 99, 50]])  # < 101


def quantized_tiny(root, recipe: dict, tokenizer: bool = False, **over):
    """A tiny model saved as a float checkpoint (with `tokenizer`, the small one), then RTN-quantized with
    `recipe`: (float dir, quantized dir)."""
    model = tiny_model(**({"vocab_size": SMALL_VOCAB} if tokenizer else {}), **over)
    src = small_tokenizer_checkpoint(model, root / "float") if tokenizer else save_tiny(model, root / "float")
    plan = resolve_recipe(recipe, linear_names(model))
    quantize_model(model, plan, "rtn", log=lambda s: None)
    return src, save_quantized(model, plan, src, root / "quant", {"method": "rtn"})


def small_tokenizer_checkpoint(model, out):
    """Save `model` (vocab_size=SMALL_VOCAB) with a small byte-level BPE tokenizer.json: three ChatML specials, the
    256 bytes and a few merges, pre-tokenized as SmolLM2's (a GGUF of the real 49152-token vocab takes seconds to
    read back)."""
    alphabet = [BYTE_TO_CHAR[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *(m.replace(" ", "") for m in merges)]
    data = bpe_tokenizer_json_from_gguf(tokens, merges, [GGUF_CONTROL] * 3 + [1] * (len(tokens) - 3), "smollm")
    meta = {"file": "tokenizer.json", "bos_id": 1, "eos_id": 2, "add_bos": False, "chat_template": "chatml",
            "default_system_prompt": "You are a helpful AI assistant"}
    save_checkpoint(out, model_state_for_saving(model.state_dict(), model.args),
                    {"model_args": vars(model.args), "tokenizer": meta}, {"tokenizer.json": json.dumps(data)})
    return out


def export_command(argv, capsys) -> tuple:
    """scripts/export.py's main under cli.run, in this process: (exit code, stdout, stderr)."""
    spec = importlib.util.spec_from_file_location("export_command", ROOT / "scripts" / "export.py")
    command = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(command)
    capsys.readouterr()
    try:
        run(lambda: command.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def logits(ckpt) -> torch.Tensor:
    with torch.no_grad():
        return load_model(ckpt)(TOKENS)


def hf_logits(folder, dequantize: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        return model(TOKENS).logits


# ---------------------------------------------------------------- Hugging Face / compressed-tensors

@pytest.mark.parametrize("tie", [False, True])
def test_hf_float_export_matches_bitfast_and_converts_back(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie, rope_scaling=LLAMA3_ROPE)
    ckpt = save_tiny(model, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(hf_logits(out), logits(ckpt), atol=1e-4, rtol=1e-4)
    back = load_model(convert_hf(out, tmp_path / "back"))  # our importer undoes the Q/K permutation exactly
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# (recipe, load through transformers' dequantize path, tied embeddings). Asymmetric exports take that path: compressed-tensors 0.20
# cannot build packed zero points on the meta device (llm-compressor #1618); it applies one scheme to every dense
# layer, so the mixed-format case is symmetric.
HF_CASES = {
    "int4-g32-sym": ({"default": "int4-g32-sym"}, False, False),
    "int8-pc-sym+tied-int8-head": ({"default": "int8", "quantize_output": True}, False, True),
    "hybrid-sym": ({"default": "int4-g32-sym", "layers": {"*.wq": "int8", "*.w2": "int4-g96-sym",
                                                           "*.wv": "int8-g32-sym", "output": "int4-pc-sym"}}, False, False),
    "int4-g32-asym": ({"default": "int4-g32-asym"}, True, True),
    "int4-pc-asym": ({"default": "int4-pc-asym"}, True, False),
    "int8-g32-asym+int4-head": ({"default": "int8-g32-asym", "layers": {"output": "int4-g32-asym"}}, True, False),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_quantized_export_matches_bitfast(tmp_path, case):
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from safetensors.torch import load_file
    recipe, dequantize, tie = HF_CASES[case]
    _, ckpt = quantized_tiny(tmp_path, recipe, tie_embeddings=tie)
    out = export_hf(ckpt, tmp_path / "hf")
    torch.testing.assert_close(hf_logits(out, dequantize), logits(ckpt), atol=1e-4, rtol=1e-4)
    # the layout, read by compressed-tensors' own unpacker: our codes and zeros, offset to signed
    tensors, layer = load_file(out / "model.safetensors"), load_model(ckpt).layers[0].attention.wv
    fmt = layer.fmt
    codes = unpack_from_int32(tensors["model.layers.0.self_attn.v_proj.weight_packed"], fmt.bits,
                              tensors["model.layers.0.self_attn.v_proj.weight_shape"])
    assert torch.equal(codes.int() + 2 ** (fmt.bits - 1), layer.codes().int())
    if not fmt.sym:
        zeros = unpack_from_int32(tensors["model.layers.0.self_attn.v_proj.weight_zero_point"], fmt.bits,
                                  layer.scales.shape, packed_dim=0)
        assert torch.equal(zeros.float() + 2 ** (fmt.bits - 1), layer.zeros.float())
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    body = [recipe["default"], *(f for k, f in recipe.get("layers", {}).items() if k != "output")]
    assert {QuantFormat(g["weights"]["num_bits"], g["weights"]["group_size"] or 0, g["weights"]["symmetric"])
            for g in groups.values()} == set(map(QuantFormat.parse, body))
    assert ("lm_head.weight" in tensors) != tie and "lm_head.weight_packed" not in tensors  # a head is float


def test_hf_export_carries_the_tokenizer_and_chat_template(tmp_path):
    from transformers import AutoTokenizer
    model = tiny_model(vocab_size=49152, tie_embeddings=True)
    ckpt = save_tiny(model, tmp_path / "ckpt", tokenizer=True)
    out = export_hf(ckpt, tmp_path / "hf")
    theirs, ours = AutoTokenizer.from_pretrained(out), load_tokenizer_for(ckpt)
    text = "Hello world! 12345 naïve   spaces\n<|im_start|>user"
    assert theirs.encode(text, add_special_tokens=True) == ours.encode(text, bos=ours.add_bos)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (ours.bos_id, ours.eos_id)


@pytest.mark.parametrize("name", ["chatml", "llama3", "llama2"])
def test_jinja_chat_templates_render_as_ours(name):
    from tokenizer import Tokenizer
    for system in (None, "Be brief."):
        template = jinja_chat_template(name, system)
        assert detect_chat_template(template) == name
        if name == "chatml":
            assert detect_default_system_prompt(template) == system
        ours = Tokenizer({}, 10, chat_template=name, default_system_prompt=system)
        ours._special_text = lambda i: {1: "<s>", 2: "</s>"}[i]
        ours.bos_id, ours.eos_id = 1, 2
        for messages in ([{"role": "user", "content": " hi "}],
                         [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": " b "}, {"role": "user", "content": "c"}]):
            rendered = jinja2.Environment().from_string(template).render(
                messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
            assert rendered == ours.apply_chat_template(messages), (name, system, messages)


@pytest.mark.parametrize("fmt,words", [("int3-g32-asym", ["int3-g32-asym", "4 and 8-bit"]),
                                       ("int4-g64-asym", ["ragged", "K=96"])])
def test_hf_export_refuses_what_compressed_tensors_cannot_express(tmp_path, capsys, fmt, words):
    _, ckpt = quantized_tiny(tmp_path, {"default": fmt})
    before = snapshot(tmp_path)
    code, _, err = export_command(["--checkpoint", str(ckpt), "--to", "hf", str(tmp_path / "hf")], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words), err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- GGUF

def test_gguf_export_carries_q8_0_and_q4_0_codes_exactly(tmp_path, capsys):
    recipe = {"default": "int4-g32-sym", "layers": {"*.wq": "int8", "*.w2": "int2-g32-sym", "*.wv": "int3-pc-sym",
                                                    "output": "int8-g64-sym"}}
    _, ckpt = quantized_tiny(tmp_path, recipe, tokenizer=True, tie_embeddings=True)
    code, out, err = export_command(["--checkpoint", str(ckpt), "--to", "gguf", str(tmp_path / "m.gguf")], capsys)
    assert code == 0, err
    lines = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[:-2]}
    assert lines["token_embd.weight"] == ["Q8_0", "codes", "max"] and "output.weight" not in lines  # tied
    assert lines["blk.0.attn_q.weight"][:2] == ["Q8_0", "codes"] and lines["blk.1.ffn_down.weight"][0] == "Q4_0"
    assert all(" max |error| 0 (0 of max |w|)" in line for line in out.splitlines()[:-2] if " codes " in line)
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    torch.testing.assert_close(logits(back), logits(ckpt), atol=1e-5, rtol=1e-5)
    for k, v in read_config(ckpt)["tokenizer"].items():
        if k != "file":  # the chat template and its default system prompt came back through the jinja text
            assert read_config(back)["tokenizer"][k] == v, k
    text = "hello world, 2024! <|im_start|>user"
    assert load_tokenizer_for(back).encode(text) == load_tokenizer_for(ckpt).encode(text)


def test_gguf_export_q4_1_is_our_grid_with_the_offset_in_fp16(tmp_path):
    _, ckpt = quantized_tiny(tmp_path, {"default": "int4-g32-asym", "layers": {"*.w1": "int2-g64-asym"}},
                             tokenizer=True)
    reports = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    assert {(r.gguf_type, r.how) for r in reports} == {("Q4_1", "codes"), ("F32", "float")}
    ours, back = load_model(ckpt), load_model(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"))
    for name in linear_names(ours):
        layer = ours.get_submodule(name)
        if isinstance(layer, QuantLinear):  # Q4_1: w = d q + m with d = s, q = c, m = -s z rounded to fp16
            s = expand_groups(layer.scales.double(), layer.fmt, layer.in_features)
            z = expand_groups(layer.zeros.double(), layer.fmt, layer.in_features)
            expected = s * layer.codes().double() + (-s * z).half().double()
            assert torch.equal(back.get_submodule(name).weight.double(), expected), name
    ours_logits = logits(ckpt)
    assert (logits(tmp_path / "back") - ours_logits).abs().max() < 0.01 * ours_logits.abs().max()


def test_gguf_export_requantizes_other_grids_and_reports_the_error(tmp_path):
    recipe = {"default": "int4-g16-asym", "layers": {"*.wq": "int8-g32-asym", "*.wk": "int3-g24-sym"}}
    _, ckpt = quantized_tiny(tmp_path, recipe, tokenizer=True)
    reports = {r.name: r for r in export_gguf(ckpt, tmp_path / "m.gguf", "bf16")}
    ours, back = load_model(ckpt), load_model(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"))
    for gguf_name, name, kind in [("blk.0.attn_q.weight", "layers.0.attention.wq", "Q8_0"),
                                  ("blk.0.attn_k.weight", "layers.0.attention.wk", "Q4_0"),
                                  ("blk.1.ffn_up.weight", "layers.1.feed_forward.w3", "Q4_1")]:
        report, w = reports[gguf_name], ours.get_submodule(name).float_weight()
        err = (back.get_submodule(name).weight - w).abs().max().item()
        assert (report.gguf_type, report.how) == (kind, "requantized")
        assert report.max_error == pytest.approx(err, rel=1e-6) and err > 0
        # gguf's reference quantizers per block of 32: Q8_0 rounds to max/127 steps, Q4_1 to (max - min)/15,
        # Q4_0 to max/8 (its largest positive values clip to 7/8 of the max: a whole step)
        blocks = w.view(-1, 32)
        bound = {"Q8_0": blocks.abs().amax(1) / 254, "Q4_0": blocks.abs().amax(1) / 8,
                 "Q4_1": (blocks.amax(1) - blocks.amin(1)) / 30}[kind]
        assert err <= bound.max().item() * 1.01 + 1e-3
    assert reports["token_embd.weight"].gguf_type == "BF16"
    assert 0 < reports["token_embd.weight"].relative_error <= 2 ** -8  # bf16 keeps 8 significant bits


def test_gguf_float_export_round_trips_exactly(tmp_path):
    model = tiny_model(vocab_size=SMALL_VOCAB, rope_scaling=LLAMA3_ROPE, head_dim=32)
    ckpt = small_tokenizer_checkpoint(model, tmp_path / "ckpt")
    assert all(r.max_error == 0 for r in export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    back = load_model(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"))
    assert {**vars(back.args), "norm_eps": 0} == {**vars(model.args), "norm_eps": 0}
    assert back.args.norm_eps == np.float32(model.args.norm_eps)  # GGUF stores it as float32
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    half = export_gguf(ckpt, tmp_path / "half.gguf", "f16")
    assert {r.gguf_type for r in half} == {"F16"} and all(0 < r.relative_error <= 2 ** -11 for r in half)


# ---------------------------------------------------------------- bad input

def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    ckpt = save_tiny(tiny_model(), tmp_path / "ckpt")
    mine = user_folder(tmp_path)
    (tmp_path / "theirs.gguf").write_bytes(b"GGUF not ours")
    before = snapshot(tmp_path)
    cases = [(["--checkpoint", str(mine), "--to", "hf", str(tmp_path / "new")], ["not a bitfast checkpoint"]),
             (["--checkpoint", str(ckpt), "--to", "gguf", str(tmp_path / "theirs.gguf")], ["refusing to overwrite"]),
             (["--checkpoint", str(ckpt), "--to", "gguf", str(tmp_path / "new.gguf")], ["tokenizer.json"]),
             (["--checkpoint", str(ckpt), "--to", "hf", str(ckpt)], ["is the input"])]
    for args, words in cases:
        code, _, err = export_command(args, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert all(w in err for w in words), (words, err)
    # the command itself, end to end: one line on stderr, exit 2, no traceback
    assert_one_line_error(run_cli(["scripts/export.py", "--checkpoint", str(ckpt), "--to", "hf", str(mine)]),
                          "not a bitfast Hugging Face export")
    assert snapshot(tmp_path) == before
    # an earlier export is ours to replace
    export_hf(ckpt, tmp_path / "hf")
    assert export_command(["--checkpoint", str(ckpt), "--to", "hf", str(tmp_path / "hf")], capsys)[0] == 0
    assert np.isfinite(hf_logits(tmp_path / "hf").numpy()).all()


# ---------------------------------------------------------------- the default model, end to end

def greedy(model, prompt: list, steps: int) -> list:
    """`steps` greedy tokens after `prompt` (no stop token: every step is compared)."""
    model.setup_caches(1, len(prompt) + steps)
    return generate(model, torch.tensor(prompt), steps)[0].tolist()


def llama_cpp_greedy(path, prompt: list, steps: int) -> list:
    """llama.cpp's own greedy decode of GGUF file `path`: the argmax of its logits after each token fed."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_threads=1, logits_all=False, verbose=False)
    out = []
    llm.eval(prompt)
    for _ in range(steps):
        out.append(int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax()))
        llm.eval(out[-1:])
    return out


def test_gguf_int8_export_of_default_model_decodes_as_bitfast(tmp_path, one_thread):
    src = resolve_checkpoint(None)
    model = load_model(src)
    plan = resolve_recipe({"default": "int8", "quantize_output": True}, linear_names(model))
    quantize_model(model, plan, "rtn", log=lambda s: None)
    ckpt = save_quantized(model, plan, src, tmp_path / "int8", {"method": "rtn"})
    reports = export_gguf(ckpt, tmp_path / "m.gguf", "f32")
    # every linear weight and the tied head: our int8 codes as Q8_0 blocks, nothing requantized
    assert {(r.gguf_type, r.how) for r in reports} == {("Q8_0", "codes")} and len(reports) == 7 * model.args.n_layer + 1
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back")
    tok, gguf_tok = load_tokenizer_for(ckpt), load_tokenizer_for(back)
    text = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    prompt = tok.encode(text, bos=tok.add_bos)
    assert gguf_tok.encode(text, bos=gguf_tok.add_bos) == prompt
    steps = 24
    ours = greedy(load_model(ckpt), prompt, steps)
    assert greedy(load_model(back), prompt, steps) == ours
    assert gguf_tok.decode(ours) == tok.decode(ours)
    # llama.cpp rounds activations to 8 bits in its Q8_0 dot products, so its argmax may leave ours where two
    # tokens' logits are close: the first 8 must agree (on this prompt its first 17 of 24 do)
    theirs = llama_cpp_greedy(tmp_path / "m.gguf", prompt, steps)
    agree = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), steps)
    assert theirs[:8] == ours[:8], f"llama.cpp agrees on the first {agree} of {steps} tokens"
    print(f"llama.cpp agrees on the first {agree} of {steps} tokens")
