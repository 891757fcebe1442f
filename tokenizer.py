"""One tokenizer interface over three families:

- SentencePiece `tokenizer.model` (Llama 2, Mistral),
- tiktoken `tokenizer.model` (Llama 3: lines of `base64token rank`),
- GPT-2-style byte-level BPE (SmolLM2, GPT-2, Qwen, HF Llama 3) from a HF `tokenizer.json` or GGUF fields,
  run on tiktoken for speed.

GGUF tokenizers go through `bpe_tokenizer_json_from_gguf`, so a converted checkpoint stores a plain
`tokenizer.json` and both paths share one builder.
"""
import base64
import json
import re
import unicodedata
from pathlib import Path

import regex
import sentencepiece
import tiktoken
from sentencepiece import sentencepiece_model_pb2

from fileio import read_json

# Hugging Face ByteLevel(use_regex=True): the GPT-2 split.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Meta's Llama 3 split (also the Split regex of HF Llama 3 tokenizer.json files).
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# SmolLM2: Digits(individual_digits) then the GPT-2 split within each non-digit run, as one regex.
# `\s+(?=\p{N})` keeps whitespace before a digit whole, as it is when it ends a run ("a  1" -> "a", "  ", "1").
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""

# Meta's Llama 3 special tokens, in order, numbered after the mergeable ranks.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]

# Tokens that end a turn or a document; generation stops on them as well as on eos.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")
CHAT_TEMPLATES = ("chatml", "llama2", "llama3")
MISSING = -1  # rank_ids entry of a byte the byte-level vocab has no token for


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class Tokenizer:
    """What all families share: special tokens, bos/eos/stop ids, chat templates. Subclasses encode and decode.

    `special_tokens` maps each special (or added) token's text to its id; `stop_ids` are eos and the
    end-of-turn tokens the vocab has."""

    def __init__(self, special_tokens: dict[str, int], vocab_size: int, bos_id=None, eos_id=None, add_bos=False,
                 add_eos=False, chat_template=None, default_system_prompt=None):
        if chat_template not in (None, *CHAT_TEMPLATES):
            raise ValueError(f"unknown chat template {chat_template!r}; expected one of {CHAT_TEMPLATES} or None")
        self.special_tokens = special_tokens
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = add_bos  # whether prompts should start with bos (pass it to encode)
        self.add_eos = add_eos  # whether whole documents should end with eos (GGUF add_eos_token; pass it to encode)
        self.chat_template = chat_template
        self.default_system_prompt = default_system_prompt  # used when a conversation has no system message
        ends = {special_tokens[t] for t in END_TOKENS if t in special_tokens}
        self.stop_ids = ends | ({eos_id} if eos_id is not None else set())

    def encode(self, text: str, bos: bool = False, allow_special: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; with allow_special, special-token strings in it become their ids."""
        for wanted, name in ((bos, "bos"), (eos, "eos")):
            if wanted and getattr(self, f"{name}_id") is None:
                raise ValueError(f"this tokenizer has no {name} token")
        ids = self._encode_text(text, allow_special)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _encode_text(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of `ids`; a streaming caller holds back a trailing partial UTF-8 character."""
        raise NotImplementedError

    def _special_text(self, token_id) -> str:
        return next((t for t, i in self.special_tokens.items() if i == token_id), "")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), special tokens as text.

        The leading bos is not part of the text: encode it with `bos=self.add_bos`."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (pass chat_template='chatml'|'llama2'|'llama3')")
        if messages and messages[0]["role"] != "system" and self.default_system_prompt is not None:
            messages = [{"role": "system", "content": self.default_system_prompt}, *messages]
        if self.chat_template == "chatml":
            return render_chatml(messages, add_generation_prompt)
        if self.chat_template == "llama3":
            return render_llama3(messages, add_generation_prompt)
        return render_llama2(messages, self._special_text(self.bos_id), self._special_text(self.eos_id))


class TiktokenTokenizer(Tokenizer):
    """tiktoken does the BPE; `rank_ids` maps its ranks to our ids where they differ (byte-level BPE).

    tiktoken splits with one regex (its pattern). A pre-tokenizer of several regexes in sequence (DeepSeek, Falcon)
    runs all but the last here, as `pre_splits`, and hands tiktoken each piece."""

    def __init__(self, encoding: tiktoken.Encoding, id_bytes: list[bytes], special_tokens: dict[str, int],
                 rank_ids: list[int] | None = None, nfc: bool = False, pre_splits: tuple[str, ...] = (), **kwargs):
        super().__init__(special_tokens, len(id_bytes), **kwargs)
        self.encoding, self.id_bytes, self.rank_ids = encoding, id_bytes, rank_ids
        self.nfc = nfc  # tokenizer.json asks for NFC-normalized input (Qwen)
        self.pre_splits = [regex.compile(p) for p in pre_splits]
        if pre_splits:  # tiktoken takes special tokens out itself when it splits alone
            specials = sorted(special_tokens, key=len, reverse=True)
            self.special_pattern = regex.compile("|".join(map(regex.escape, specials)) or r"(?!)")

    def _encode_text(self, text, allow_special):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.pre_splits:
            ranks = self._encode_pre_split(text, allow_special)
        elif allow_special:
            ranks = self.encoding.encode(text, allowed_special="all", disallowed_special=())
        else:
            ranks = self.encoding.encode_ordinary(text)
        if self.rank_ids is None:
            return ranks
        rank_ids = self.rank_ids
        ids = [rank_ids[r] for r in ranks]
        return [i for i in ids if i != MISSING] if MISSING in ids else ids

    def decode_bytes(self, ids):
        id_bytes = self.id_bytes
        return b"".join([id_bytes[i] for i in ids])

    def _encode_pre_split(self, text: str, allow_special: bool) -> list[int]:
        """tiktoken ranks of `text` split by each of `pre_splits` in turn, special tokens first taken out whole."""
        ranks, at = [], 0
        specials = self.special_pattern.finditer(text) if allow_special else ()
        for match in [*specials, None]:
            pieces = [text[at:match.start() if match else len(text)]]
            for pattern in self.pre_splits:
                pieces = [p for piece in pieces for p in split_isolated(pattern, piece)]
            for piece in pieces:
                ranks.extend(self.encoding.encode_ordinary(piece))
            if match:
                ranks.append(self.encoding.encode_single_token(match.group()))
                at = match.end()
        return ranks


def split_isolated(pattern: regex.Pattern, text: str) -> list[str]:
    """`text` cut at `pattern`'s matches, which stand alone, and the runs between them kept (HF Split "Isolated")."""
    pieces, at = [], 0
    for match in pattern.finditer(text):
        if match.start() > at:
            pieces.append(text[at:match.start()])
        if match.end() > match.start():
            pieces.append(match.group())
        at = match.end()
    if at < len(text):
        pieces.append(text[at:])
    return pieces


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its control and unknown pieces (<s>, </s>, <unk>) are the special tokens."""

    def __init__(self, path: Path, bos_id=None, eos_id=None, add_bos=True, **kwargs):
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
        n = sp.vocab_size()
        special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        bos_id = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
        eos_id = eos_id if eos_id is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
        super().__init__(special, n, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, **kwargs)
        self.sp = sp
        self.piece_bytes = [_sp_piece_bytes(sp, i) for i in range(n)]
        # SentencePiece drops the space of the first word's "▁" (its dummy prefix) when decoding; probe for it.
        word = next((i for i in range(n) if sp.id_to_piece(i).startswith("▁") and _sp_is_text(sp, i)), None)
        self.strips_first_space = word is not None and not sp.decode([word]).startswith(" ")
        self.special_pattern = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")

    def _encode_text(self, text, allow_special):
        if not allow_special or not self.special_tokens:
            return self.sp.encode(text)
        ids = []
        for k, part in enumerate(self.special_pattern.split(text)):
            if k % 2:  # split() puts the matched specials at odd positions
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode_bytes(self, ids):
        ids = list(ids)
        data = b"".join([self.piece_bytes[i] for i in ids])
        first = next((i for i in ids if self.piece_bytes[i]), None)
        if self.strips_first_space and first is not None and self.sp.id_to_piece(first).startswith("▁"):
            data = data[1:]
        return data


def _sp_is_text(sp, i) -> bool:
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))


def _sp_piece_bytes(sp, i) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[1:-1], 16)])  # "<0xE4>"
    if sp.is_control(i) or sp.is_unused(i):
        return b""
    if sp.is_unknown(i):
        return " \u2047 ".encode()  # SentencePiece's default surface for <unk>
    return piece.replace("▁", " ").encode()


SP_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# llama.cpp's GGUF token types are SentencePiece's piece types, number for number.
SP_PIECE_TYPES = {SP_PIECE.NORMAL, SP_PIECE.UNKNOWN, SP_PIECE.CONTROL, SP_PIECE.USER_DEFINED, SP_PIECE.UNUSED,
                  SP_PIECE.BYTE}


def sentencepiece_model_from_gguf(tokens: list[str], scores: list[float], token_type: list[int], *, unk_id=None,
                                  bos_id=None, eos_id=None, add_space_prefix=True) -> bytes:
    """A serialized SentencePiece model for a GGUF 'llama' vocabulary (`tokenizer.ggml.*` fields), tokenizing as
    llama.cpp does: BPE that merges the adjacent pair whose joined piece scores highest, no Unicode normalization,
    spaces written as "▁" with one before the text, and bytes outside the vocabulary as their <0xXX> pieces."""
    proto = sentencepiece_model_pb2.ModelProto()
    for i, (token, score, kind) in enumerate(zip(tokens, scores, token_type)):
        if kind not in SP_PIECE_TYPES:
            raise ValueError(f"GGUF token {i} ({token!r}) has type {kind}, not a llama.cpp token type (1-6)")
        proto.pieces.add(piece=token, score=score, type=kind)
    if SP_PIECE.UNKNOWN in token_type:
        unk_id = token_type.index(SP_PIECE.UNKNOWN) if unk_id is None else unk_id
    elif unk_id is not None:  # llama.cpp finds <unk> by its id alone
        proto.pieces[unk_id].type = SP_PIECE.UNKNOWN
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size = spec.BPE, len(tokens)
    spec.byte_fallback = SP_PIECE.BYTE in token_type
    for name, token_id in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id)):
        setattr(spec, f"{name}_id", -1 if token_id is None else token_id)
        if token_id is not None:
            setattr(spec, f"{name}_piece", tokens[token_id])
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.escape_whitespaces = "identity", add_space_prefix, True
    norm.remove_extra_whitespaces = False  # llama.cpp's SentencePiece tokenizer keeps every space
    data = proto.SerializeToString()
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise ValueError(f"GGUF vocabulary is not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
    return data


# ---------------------------------------------------------------- chat templates

def render_chatml(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def render_llama3(messages: list[dict], add_generation_prompt: bool) -> str:
    text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                   for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def render_llama2(messages: list[dict], bos: str, eos: str) -> str:
    """Meta's Llama 2 chat format: [INST] user [/INST] answer </s>, bos before every later [INST].
    The prompt always ends ready for the assistant, so there is no generation prompt to add."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    parts = []
    for i, m in enumerate(messages):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise ValueError("the llama2 chat template needs user/assistant turns alternating, starting with user")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if i % 2:
            parts.append(f" {content.strip()} {eos}")
        else:
            parts.append(f"{bos if i else ''}[INST] {content.strip()} [/INST]")
    return "".join(parts)


def jinja_chat_template(name: str, default_system_prompt: str | None = None) -> str:
    """A Hugging Face / llama.cpp jinja chat template that renders as our `name` template does (the exporters
    write it; detect_chat_template and detect_default_system_prompt read it back)."""
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {CHAT_TEMPLATES}")
    literal = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731 (a jinja string literal)
    prefix = ""
    if default_system_prompt is not None and name == "chatml":  # written out, as SmolLM2's template does
        prefix = ("{%- if messages and messages[0]['role'] != 'system' %}{{ "
                  + literal(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
                  + " }}{%- endif %}")
    elif default_system_prompt is not None:
        prefix = ("{%- if messages and messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', "
                  "'content': " + literal(default_system_prompt) + "}] + messages %}{%- endif %}")
    body = {
        "chatml": "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                  "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
        "llama3": "{%- for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
                  "(m['content'] | trim) + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
                  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
        "llama2": "{%- set system = none %}{%- if messages and messages[0]['role'] == 'system' %}"
                  "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}{%- endif %}"
                  "{%- for m in messages %}{%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] %}"
                  "{{ raise_exception('the llama2 chat template needs user/assistant turns alternating, starting "
                  "with user') }}{%- endif %}{%- set content = m['content'] %}"
                  "{%- if loop.first and system is not none %}"
                  "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{%- endif %}"
                  "{%- if loop.index0 % 2 %}{{ ' ' + (content | trim) + ' ' + eos_token }}"
                  "{%- else %}{{ (bos_token if not loop.first else '') + '[INST] ' + (content | trim) + ' [/INST]' }}"
                  "{%- endif %}{%- endfor %}",
    }[name]
    return prefix + body


def detect_chat_template(jinja: str | None) -> str | None:
    """Our template name for a HF/GGUF jinja chat template, or None if it is none we render."""
    if not jinja:
        return None
    if "<|im_start|>" in jinja:
        return "chatml"
    if "<|start_header_id|>" in jinja:
        return "llama3"
    if "[INST]" in jinja:
        return "llama2"
    return None


def detect_default_system_prompt(jinja: str | None) -> str | None:
    """The literal system message a ChatML jinja template inserts when the conversation has none (SmolLM2)."""
    match = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+?)<\|im_end\|>", jinja or "")
    return match.group(1) if match else None


# ---------------------------------------------------------------- tiktoken (Llama 3) files

def _is_tiktoken_file(path: Path) -> bool:
    with path.open("rb") as f:
        first_line = f.read(512).split(b"\n", 1)[0]
    return re.fullmatch(rb"[A-Za-z0-9+/]+=*[ \t]+\d+\r?", first_line) is not None


def load_tiktoken_model(path: Path, bos_id=None, eos_id=None, add_bos=True, **kwargs) -> TiktokenTokenizer:
    """Meta's Llama 3 `tokenizer.model`: one `base64(token) rank` line per token, then 256 special tokens."""
    ranks = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: expected 'base64token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: token ranks are not 0..{len(ranks) - 1}")
    special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    id_bytes = [*sorted(ranks, key=ranks.get), *(t.encode() for t in special)]
    bos_id = special["<|begin_of_text|>"] if bos_id is None else bos_id
    eos_id = special["<|end_of_text|>"] if eos_id is None else eos_id
    return TiktokenTokenizer(encoding, id_bytes, special, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, **kwargs)


# ---------------------------------------------------------------- byte-level BPE (tokenizer.json, GGUF)

def _token_bytes(token: str, source: str) -> bytes:
    try:
        return bytes([CHAR_TO_BYTE[c] for c in token])
    except KeyError:
        raise ValueError(f"{source}: token {token!r} is not written in the byte-level BPE alphabet") from None


def byte_level_tokenizer(vocab: dict[str, int], merges: list, added: dict[str, int], splits: list[str],
                         source: str, **kwargs) -> TiktokenTokenizer:
    """Byte-level BPE on tiktoken: a merged token's rank is its first merge's position, after the 256 bytes.

    tiktoken then merges the lowest-ranked adjacent pair whose bytes form a token, which is the BPE merge order.
    Added tokens are tiktoken special tokens; `rank_ids` maps tiktoken's ranks back to the vocab's ids.
    `splits` are the pre-tokenizer's regexes in order; tiktoken runs the last."""
    id_bytes = [b""] * (max([*vocab.values(), *added.values()]) + 1)
    for token, i in vocab.items():
        if token not in added:
            id_bytes[i] = _token_bytes(token, source)
    for token, i in added.items():
        id_bytes[i] = token.encode()
    # tiktoken needs every byte; a byte the vocab lacks (SmolLM2 has no \x04 token) maps to MISSING and is
    # dropped from the output, as Hugging Face and llama.cpp drop it.
    ranks = {bytes([b]): b for b in range(256)}
    rank_ids = [vocab.get(BYTE_TO_CHAR[b], MISSING) for b in range(256)]
    for a, b in merges:
        token_id = vocab.get(a + b)
        if token_id is None:
            raise ValueError(f"{source}: merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocab")
        if id_bytes[token_id] not in ranks:
            ranks[id_bytes[token_id]] = len(rank_ids)
            rank_ids.append(token_id)
    special = {token: len(rank_ids) + k for k, token in enumerate(added)}
    rank_ids.extend(added.values())
    encoding = tiktoken.Encoding(source, pat_str=covering_pattern(splits[-1]), mergeable_ranks=ranks,
                                 special_tokens=special)
    return TiktokenTokenizer(encoding, id_bytes, dict(added), rank_ids=rank_ids, pre_splits=tuple(splits[:-1]),
                             **kwargs)


def covering_pattern(pattern: str) -> str:
    """`pattern`, or else a run of text up to where it next matches: the pieces of an "Isolated" split, matches
    and the runs between them, as one regex's matches. tiktoken would drop the runs (llama.cpp writes GPT-2's
    split without its last alternative, the catch-all for whitespace, so a lone newline before a word is a run)."""
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


def _split_pre_tokenizer(*patterns: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns),
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _gpt2_pre_tokenizer() -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _smollm_pre_tokenizer() -> dict:
    return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _gpt2_pre_tokenizer()]}


JSON_KINDS = {dict: "an object", list: "a list", str: "text", int: "a whole number", bool: "true or false"}


def _field(data, path: str, kind, source: str, at: str = ""):
    """The field at `path` ("model.vocab", "single.0.id": keys, and list indices as numbers) of `data`, itself at
    `at` in the file, which must be of type `kind` (int excludes bool); else a ValueError naming file and field."""
    name = re.sub(r"\.(\d+)", r"[\1]", f"{at}.{path}" if at else path)
    value = data
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise ValueError(f"{source}: missing field {name}")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{source}: field {name} must be {JSON_KINDS[kind]}, got {json.dumps(value)[:60]}")
    return value


def splits_from_pre_tokenizer(pre: dict | None, source: str) -> list[str]:
    """The regexes, applied in turn, equivalent to a tokenizer.json `pre_tokenizer` we support: ByteLevel with
    its regex (GPT-2), Digits then ByteLevel (SmolLM2), or Split ("Isolated") steps then ByteLevel without one."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if isinstance(steps, list) and steps and all(isinstance(s, dict) for s in steps):
        kinds = [s.get("type") for s in steps]
        if not any(s.get("add_prefix_space") for s in steps):
            if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
                return [GPT2_PATTERN]
            if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
                    and steps[1].get("use_regex", True)):
                return [SMOLLM_PATTERN]
            splits = [s.get("pattern") for s in steps[:-1]]
            if (len(steps) > 1 and kinds == ["Split"] * len(splits) + ["ByteLevel"]
                    and all(isinstance(p, dict) and isinstance(p.get("Regex"), str) for p in splits)
                    and all(s.get("behavior") == "Isolated" and not s.get("invert") for s in steps[:-1])
                    and not steps[-1].get("use_regex", True)):
                return [p["Regex"] for p in splits]
    raise ValueError(f"{source}: unsupported pre-tokenizer {json.dumps(pre)[:300]}")


def _bos_from_post_processor(post, source: str) -> int | None:
    """The bos id a TemplateProcessing post-processor prepends (HF Llama 3 files), else None."""
    sequence = isinstance(post, dict) and post.get("type") == "Sequence"
    steps = _field(post, "processors", list, source, "post_processor") if sequence else [post]
    for i, step in enumerate(steps):
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            at = f"post_processor.processors.{i}" if sequence else "post_processor"
            first = _field(step, "single.0", dict, source, at)
            if "SpecialToken" in first:
                name = _field(first, "SpecialToken.id", str, source, f"{at}.single.0")
                specials = _field(step, "special_tokens", dict, source, at)
                return _field(specials.get(name), "ids.0", int, source, f"{at}.special_tokens.{name}")
    return None


def _vocab(model: dict, source: str) -> dict[str, int]:
    vocab = _field(model, "vocab", dict, source, "model")
    if not vocab:
        raise ValueError(f"{source}: field model.vocab is empty")
    for token, i in vocab.items():
        if type(i) is not int or i < 0:
            raise ValueError(f"{source}: field model.vocab[{token!r}] must be a token id (a whole number >= 0), "
                             f"got {json.dumps(i)[:60]}")
    return vocab


def _merges(model: dict, source: str) -> list:
    """Merges as written in either tokenizer.json style: "a b" or ["a", "b"]."""
    merges = []
    for i, m in enumerate(_field(model, "merges", list, source, "model")):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
            raise ValueError(f"{source}: field model.merges[{i}] must be \"a b\" or [\"a\", \"b\"], "
                             f"got {json.dumps(m)[:60]}")
        merges.append(pair)
    return merges


def _added_tokens(data: dict, source: str) -> dict[str, int]:
    tokens = data.get("added_tokens") or []
    if not isinstance(tokens, list):
        raise ValueError(f"{source}: field added_tokens must be a list, got {json.dumps(tokens)[:60]}")
    added = {}
    for i, t in enumerate(tokens):
        content = _field(t, "content", str, source, f"added_tokens.{i}")
        token_id = _field(t, "id", int, source, f"added_tokens.{i}")
        if not content or token_id < 0:
            raise ValueError(f"{source}: field added_tokens[{i}] needs a non-empty content and an id >= 0, "
                             f"got {content!r} and {token_id}")
        added[content] = token_id
    return added


def token_ids(data: dict, source: str) -> dict[str, int]:
    """Every token of a parsed tokenizer.json by its text: model.vocab, then added_tokens (which win), checked."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return {**_vocab(_field(data, "model", dict, source), source), **_added_tokens(data, source)}


def tokenizer_from_json(data: dict, source: str, bos_id=None, eos_id=None, add_bos=None, **kwargs) -> TiktokenTokenizer:
    """A byte-level BPE tokenizer from a parsed HF tokenizer.json. bos defaults to what its post-processor adds."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    model = _field(data, "model", dict, source)
    if model.get("type") != "BPE":
        raise ValueError(f"{source}: tokenizer model {model.get('type')!r} is not supported "
                         "(bitfast reads byte-level BPE)")
    normalizer = data.get("normalizer")
    if normalizer not in (None, {"type": "NFC"}):
        raise ValueError(f"{source}: unsupported normalizer {json.dumps(normalizer)[:200]}")
    splits = splits_from_pre_tokenizer(data.get("pre_tokenizer"), source)
    vocab, merges, added = _vocab(model, source), _merges(model, source), _added_tokens(data, source)
    # Ids are dense in every tokenizer.json we know; a larger one is damage, and would size the id table.
    if max([*vocab.values(), *added.values()]) >= len(vocab) + len(added):
        raise ValueError(f"{source}: token ids go up to {max([*vocab.values(), *added.values()])}, past the "
                         f"{len(vocab)} vocab and {len(added)} added tokens")
    template_bos = _bos_from_post_processor(data.get("post_processor"), source)
    bos_id = template_bos if bos_id is None else bos_id
    add_bos = template_bos is not None if add_bos is None else add_bos
    return byte_level_tokenizer(vocab, merges, added, splits, source, nfc=normalizer is not None,
                                bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, **kwargs)


# llama.cpp's byte-level BPE pre-tokenizers (llama-vocab.cpp): the regexes each applies in turn, by the
# `tokenizer.ggml.pre` names that select it. Where llama.cpp rewrote a tokenizer.json regex for its own regex
# engine, this keeps the tokenizer.json original it was rewritten from.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
CJK_RUN = "[一-龥ࠀ-一가-퟿]+"
FINNISH_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"
# Tekken (Mistral Nemo) and o200k (GPT-4o, Llama 4): a word is its capitals then its lower-case letters.
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
                 r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
GGUF_PRE_SPLITS = [
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4", "gigachat", "a.x-4.0", "mellum",
      "granite-docling", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de"), (GPT2_SPLIT,)),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (r"\p{N}", GPT2_SPLIT)),
    ((*LLAMA3_PRE_NAMES, "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"), (LLAMA3_PATTERN,)),
    (("qwen2", "deepseek-r1-qwen", "kormo", "megrez", "stablelm2", "hunyuan", "grok-2"), (QWEN2_PATTERN,)),
    (("deepseek-llm",), (
        r"[\r\n]",
        # \u escapes: these letters have canonical equivalents that text tools silently substitute.
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼ"
        "ℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", CJK_RUN, r"\p{N}+")),
    (("deepseek-coder",), (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_RUN, r"\p{N}")),
    (("deepseek-v3", "hunyuan-dense"), (
        r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
        r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
    (("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT, "[0-9][0-9][0-9]")),
    (("default",), (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]")),
    (("poro-chat", "bloom", "gpt3-finnish"), (FINNISH_SPLIT,)),
    (("viking",), (FINNISH_SPLIT, r"\p{N}")),
    (("tekken",), (TEKKEN_PATTERN,)),
    (("gpt-4o", "llama4", "minimax-m2"), (O200K_PATTERN,)),
    (("seed-coder",), (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+",)),
]
GGUF_PRE_TOKENIZERS = {name: splits for names, splits in GGUF_PRE_SPLITS for name in names}
# Pre-tokenizers llama.cpp runs with ignore_merges (a piece that is a token is that token, as in tiktoken) and
# with bos added when the GGUF does not say (`tokenizer.ggml.add_bos_token`).
GGUF_PRE_LLAMA3_STYLE = {*LLAMA3_PRE_NAMES, "tekken"}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types that are added tokens


def gguf_pre_tokenizer(pre) -> dict:
    """The tokenizer.json `pre_tokenizer` for a GGUF `tokenizer.ggml.pre` name, as Hugging Face writes it."""
    if not isinstance(pre, str) or pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(GGUF_PRE_TOKENIZERS)})")
    splits = GGUF_PRE_TOKENIZERS[pre]
    if splits == (GPT2_SPLIT,):
        return _gpt2_pre_tokenizer()
    if splits == (r"\p{N}", GPT2_SPLIT):
        return _smollm_pre_tokenizer()
    return _split_pre_tokenizer(*splits)


def bpe_tokenizer_json_from_gguf(tokens: list[str], merges: list[str], token_type: list[int], pre: str) -> dict:
    """A HF tokenizer.json (as a dict) for GGUF byte-level BPE data (`tokenizer.ggml.*` fields)."""
    pre_tokenizer = gguf_pre_tokenizer(pre)
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocab has duplicate tokens; it cannot be written as tokenizer.json")
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": kind == GGUF_CONTROL}
             for i, (token, kind) in enumerate(zip(tokens, token_type)) if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in GGUF_PRE_LLAMA3_STYLE,
                  "vocab": vocab, "merges": list(merges)},
    }


def bpe_tokenizer_from_gguf(tokens: list[str], merges: list[str], token_type: list[int], pre: str,
                            bos_token_id=None, eos_token_id=None, add_bos=False, chat_template=None,
                            default_system_prompt=None) -> TiktokenTokenizer:
    """The tokenizer for GGUF `tokenizer.ggml.*` fields (named as in GGUF), via the tokenizer.json we export."""
    data = bpe_tokenizer_json_from_gguf(tokens, merges, token_type, pre)
    return tokenizer_from_json(data, "GGUF tokenizer", bos_id=bos_token_id, eos_id=eos_token_id, add_bos=add_bos,
                               chat_template=chat_template, default_system_prompt=default_system_prompt)


def tokenizer_from_gguf(reader) -> TiktokenTokenizer:
    """The tokenizer stored in a `gguf.GGUFReader`'s metadata, chat template included."""
    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (bitfast reads byte-level BPE 'gpt2')")
    template, pre = field("tokenizer.chat_template"), field("tokenizer.ggml.pre")
    return bpe_tokenizer_from_gguf(
        field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges"), field("tokenizer.ggml.token_type"),
        pre, bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        add_bos=bool(field("tokenizer.ggml.add_bos_token", isinstance(pre, str) and pre in GGUF_PRE_LLAMA3_STYLE)),
        chat_template=detect_chat_template(template), default_system_prompt=detect_default_system_prompt(template))


# ---------------------------------------------------------------- entry point

def load_tokenizer(path: str | Path, *, bos_id=None, eos_id=None, add_bos=None, add_eos=None, chat_template=None,
                   default_system_prompt=None) -> Tokenizer:
    """Load `tokenizer.json` (byte-level BPE) or `tokenizer.model` (tiktoken or SentencePiece).

    The keyword arguments are what a checkpoint stores beside the file; None keeps the file's own value
    (SentencePiece and tiktoken files know their bos/eos, tokenizer.json only a bos its post-processor adds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    kwargs = dict(bos_id=bos_id, eos_id=eos_id, chat_template=chat_template,
                  default_system_prompt=default_system_prompt)
    kinds = {"bos_id": int, "eos_id": int, "chat_template": str, "default_system_prompt": str}
    for name, value in [*kwargs.items(), ("add_bos", add_bos), ("add_eos", add_eos)]:
        if value is not None and type(value) is not kinds.get(name, bool):
            raise ValueError(f"{path}: the checkpoint's tokenizer setting {name} must be "
                             f"{JSON_KINDS[kinds.get(name, bool)]} or null, got {value!r:.60}")
    kwargs["add_eos"] = bool(add_eos)
    if path.suffix == ".json":
        tok = tokenizer_from_json(read_json(path), str(path), add_bos=add_bos, **kwargs)
    else:
        add_bos = True if add_bos is None else add_bos  # Llama 2/3 prompts start with bos
        load = load_tiktoken_model if _is_tiktoken_file(path) else SentencePieceTokenizer
        tok = load(path, add_bos=add_bos, **kwargs)
    for name in ("bos_id", "eos_id"):
        if getattr(tok, name) is not None and not 0 <= getattr(tok, name) < tok.vocab_size:
            raise ValueError(f"{path}: {name} {getattr(tok, name)} is not a token id of its "
                             f"{tok.vocab_size}-token vocabulary")
    return tok
