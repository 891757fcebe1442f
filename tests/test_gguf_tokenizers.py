"""GGUF tokenizers through the converter: a SentencePiece ('llama') vocabulary against the sentencepiece package
it was trained with and against a Python transcription of llama.cpp's SentencePiece tokenizer; the byte-level BPE
pre-tokenizers llama.cpp names in `tokenizer.ggml.pre` against Hugging Face `tokenizers` running the same regexes."""
import io
import json

import pytest
import regex
import sentencepiece
import tokenizers
from tokenizers import pre_tokenizers

from checkpoint import load_tokenizer_for, read_config
from convert import convert_gguf
from tests.test_bad_input import assert_one_line_error, gguf_fields, gguf_tensors, run_cli, write_gguf
from tests.test_model import tiny_model
from tests.test_tokenizer import HAND_TEXTS, TEXTS, boolq_lines, tiny_bpe  # noqa: F401 (tiny_bpe is a fixture)
from tokenizer import (GGUF_PRE_SPLITS, GGUF_PRE_TOKENIZERS, SentencePieceTokenizer, bpe_tokenizer_from_gguf,
                       sentencepiece_model_pb2, split_isolated)

NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6  # llama.cpp's token types
N_PAD = 3  # llama.cpp pads a vocabulary shorter than the embedding with "[PADi]" tokens

# Whitespace runs, digits, and characters the vocabulary lacks (byte fallback).
SP_TEXTS = ["  two leading", "a   b\t\tc\n\nd ", "12345 678.9 -0.25", "Ünïcödé ß ½ ٣",
            "日本語のテキスト 😀👍🏽", "𝔘𝔫𝔦 \x00\x7f", "<s>x</s> <unk>", " ", ""]


@pytest.fixture(scope="module")
def sp_model() -> sentencepiece.SentencePieceProcessor:
    """A Llama-2-style SentencePiece model (BPE with scores, byte fallback, identity normalizer) trained on BoolQ."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(boolq_lines(2000)), model_writer=model, vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def llama_gguf_fields(sp: sentencepiece.SentencePieceProcessor, **over) -> dict:
    """The tokenizer fields llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece model (its
    _create_vocab_sentencepiece), the vocabulary padded to the embedding with unused [PADi] tokens."""
    n = sp.vocab_size()
    kinds = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(N_PAD)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)] + [-1000.0] * N_PAD,
            "tokenizer.ggml.token_type": kinds + [UNUSED] * N_PAD,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
            "tokenizer.chat_template": "{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}", **over}


def convert_llama_gguf(tmp_path, sp, name="m", drop=(), **over):
    """Convert a tiny llama GGUF carrying `sp`'s vocabulary (fields `drop` left out, `over` replaced)."""
    model = tiny_model(vocab_size=sp.vocab_size() + N_PAD)
    fields = {k: v for k, v in gguf_fields(model).items() if not k.startswith("tokenizer.")}
    fields.update({k: v for k, v in llama_gguf_fields(sp, **over).items() if k not in drop})
    return convert_gguf(write_gguf(tmp_path / f"{name}.gguf", fields, gguf_tensors(model)), tmp_path / name)


@pytest.fixture(scope="module")
def converted(sp_model, tmp_path_factory):
    return convert_llama_gguf(tmp_path_factory.mktemp("gguf_sp"), sp_model)


def test_sentencepiece_gguf_converts_to_the_same_tokenizer(sp_model, converted):
    sp, tok = sp_model, load_tokenizer_for(converted)
    meta = read_config(converted)["tokenizer"]
    assert meta["file"] == "tokenizer.model" and (converted / "tokenizer.model").is_file()
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == sp.vocab_size() + N_PAD
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos, tok.chat_template) == (1, 2, True, False, "llama2")
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    fallback = 0
    for text in [*SP_TEXTS, *TEXTS]:
        ids = sp.encode(text)
        assert tok.encode(text, allow_special=False) == ids, repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)
        fallback += any(sp.is_byte(i) for i in ids)
    assert fallback >= 5  # the texts reach characters outside the vocabulary
    assert tok.encode("<s>Hi</s>", bos=True, eos=True) == [1, 1, *sp.encode("Hi"), 2, 2]


def llama_cpp_spm_encode(text: str, token_ids: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's llm_tokenizer_spm, transcribed: spaces become "▁", one is put before the text; the adjacent
    pair whose joined text is the highest-scoring token (the leftmost on a tie) merges until none is a token;
    a symbol that is no token is written as its UTF-8 bytes' <0xXX> tokens."""
    if not text:
        return []
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        pairs = [(scores[token_ids[a + b]], -k) for k, (a, b) in enumerate(zip(symbols, symbols[1:]))
                 if a + b in token_ids]
        if not pairs:
            break
        k = -max(pairs)[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
    ids = []
    for s in symbols:
        ids.extend([token_ids[s]] if s in token_ids else [token_ids[f"<0x{b:02X}>"] for b in s.encode()])
    return ids


def test_sentencepiece_gguf_tokenizes_as_llama_cpp(sp_model, converted):
    fields = llama_gguf_fields(sp_model)
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    token_ids = {t: i for i, t in enumerate(tokens)}
    tok = load_tokenizer_for(converted)
    sentences = [t for t in boolq_lines() if len(t) < 300][:100]  # the transcription is quadratic in the length
    for text in [*SP_TEXTS, *HAND_TEXTS, *sentences]:
        assert tok.encode(text, allow_special=False) == llama_cpp_spm_encode(text, token_ids, scores), repr(text)


def test_sentencepiece_gguf_defaults_are_llama_cpps(sp_model, tmp_path):
    # No add_bos/add_eos flags and no special ids: bos added, <unk> 0, <s> 1, </s> 2.
    drop = [f"tokenizer.ggml.{k}" for k in ("add_bos_token", "add_eos_token", "bos_token_id", "eos_token_id",
                                            "unknown_token_id")]
    tok = load_tokenizer_for(convert_llama_gguf(tmp_path, sp_model, drop=drop))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    assert tok.encode("hello there", bos=tok.add_bos) == [1, *sp_model.encode("hello there")]


def test_sentencepiece_gguf_without_space_prefix(sp_model, tmp_path):
    """add_space_prefix=false: the reference is the trained model with SentencePiece's add_dummy_prefix off."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp_model.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    ref = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ckpt = convert_llama_gguf(tmp_path, sp_model, **{"tokenizer.ggml.add_space_prefix": False,
                                                     "tokenizer.ggml.add_eos_token": True})
    tok = load_tokenizer_for(ckpt)
    assert tok.add_eos and ref.encode("Hello world") != sp_model.encode("Hello world")
    for text in [*SP_TEXTS, *HAND_TEXTS]:
        ids = ref.encode(text)
        assert tok.encode(text, allow_special=False) == ids and tok.decode(ids) == ref.decode(ids), repr(text)


@pytest.mark.parametrize("over,words", [
    ({"tokenizer.ggml.token_type": [1] * 5}, ["5 tokenizer.ggml.token_type entries"]),
    ({"tokenizer.ggml.scores": [0.5]}, ["1 tokenizer.ggml.scores entries"]),
    ({"tokenizer.ggml.unknown_token_id": 10 ** 6}, ["unknown_token_id"]),
    ({"tokenizer.ggml.add_bos_token": 1}, ["add_bos_token", "true or false"]),
])
def test_bad_sentencepiece_gguf_metadata_is_one_clear_error(sp_model, tmp_path, over, words):
    with pytest.raises(ValueError) as e:
        convert_llama_gguf(tmp_path, sp_model, **over)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "m").exists()


def test_sentencepiece_gguf_token_type_outside_llama_cpps_is_refused(sp_model, tmp_path):
    types = llama_gguf_fields(sp_model)["tokenizer.ggml.token_type"]
    with pytest.raises(ValueError, match=r"GGUF token 7 .* has type 9, not a llama.cpp token type"):
        convert_llama_gguf(tmp_path, sp_model, **{"tokenizer.ggml.token_type": [*types[:7], 9, *types[8:]]})


# ---------------------------------------------------------------- byte-level BPE pre-tokenizers

def hf_pre_tokenizer(splits) -> pre_tokenizers.PreTokenizer:
    """Hugging Face's own Split steps for the regexes, then the byte-level alphabet."""
    return pre_tokenizers.Sequence([*(pre_tokenizers.Split(tokenizers.Regex(p), behavior="isolated") for p in splits),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_NAMES = [names[0] for names, _ in GGUF_PRE_SPLITS]  # one name per distinct pre-tokenizer


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_gguf_pre_tokenizers_match_hf_split_steps(tiny_bpe, pre):
    vocab = tiny_bpe["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tiny_bpe["added_tokens"]}
    ours = bpe_tokenizer_from_gguf(tokens, [" ".join(m) for m in tiny_bpe["model"]["merges"]],
                                   [CONTROL if t in special else NORMAL for t in tokens], pre)
    hf = tokenizers.Tokenizer.from_str(json.dumps(tiny_bpe))
    hf.pre_tokenizer = hf_pre_tokenizer(GGUF_PRE_TOKENIZERS[pre])
    texts = [*TEXTS, "x = 1234567; y=[a|b]^2 + $c~d`e", "Text.\r\n\r\n  \n end  ",
             "\u2126mega \u212aelvin \u212bngstr\u00f6m \u1f7d \u1fd3"]  # letters NFC would replace
    for text, ref in zip(texts, hf.encode_batch(texts)):
        assert ours.encode(text) == ref.ids, (pre, text)


def test_sequential_splits_by_hand():
    pieces = ["ab 12 三四!? \n x"]
    for p in GGUF_PRE_TOKENIZERS["deepseek-coder"]:
        pieces = [q for piece in pieces for q in split_isolated(regex.compile(p), piece)]
    assert pieces == ["ab", " ", "1", "2", " ", "三四", "!?", " ", "\n", " x"]
    pieces = ["1234567,8"]
    for p in GGUF_PRE_TOKENIZERS["falcon"]:
        pieces = [q for piece in pieces for q in split_isolated(regex.compile(p), piece)]
    assert pieces == ["123", "456", "7", ",", "8"]


def test_unknown_gguf_pre_tokenizer_is_one_line_from_the_cli(tmp_path):
    model = tiny_model()
    path = write_gguf(tmp_path / "m.gguf", {**gguf_fields(model), "tokenizer.ggml.pre": "kimi-k2"},
                      gguf_tensors(model))
    r = run_cli(["scripts/convert_gguf.py", str(path), str(tmp_path / "out")])
    assert_one_line_error(r, str(path), "GGUF pre-tokenizer 'kimi-k2' is not supported", "llama-bpe", "deepseek-llm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("tekken", True), ("gpt-2", False), ("qwen2", False)])
def test_gguf_bpe_adds_bos_by_default_as_llama_cpp_does(tmp_path, pre, add_bos):
    model = tiny_model()
    path = write_gguf(tmp_path / "m.gguf", {**gguf_fields(model), "tokenizer.ggml.pre": pre}, gguf_tensors(model))
    tok = load_tokenizer_for(convert_gguf(path, tmp_path / "out"))
    assert (tok.add_bos, tok.bos_id, tok.add_eos) == (add_bos, 1, False)
