"""QAT's data: teacher data (the float model continuing corpus prompts, appended to a JSONL file), the training
token stream, its windows and the order steps visit them, and the held-out tokens.

Inputs are read with eval.data's readers and never changed. The two JSONL files QAT appends to itself (gen-data's
output, a run's log.jsonl) can end in a line torn by a killed run: only that line is dropped."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from decoding import generate_batch
from eval.data import CORPORA, corpus_text, load_text_file, read_jsonl
from fileio import atomic_write

GEN_DATA_TEXT = ("prompt", "completion", "text")


def log_err(msg):
    print(msg, file=sys.stderr, flush=True)


def source_text(source: str, split: str) -> str:
    """A corpus's split (calibration for training, eval for scoring), or a user's .txt/.jsonl file, whole."""
    return corpus_text(source, split) if source in CORPORA else load_text_file(source)


# ---------------------------------------------------------------- our own appended JSONL files

def _complete_lines(path: Path) -> tuple:
    """(complete lines, torn last line or b"") of our own JSONL file. A last line without its newline that parses
    is complete (written whole, killed before the newline); one that does not parse is torn."""
    lines = path.read_bytes().split(b"\n")
    last = lines.pop()
    if last.strip():
        try:
            json.loads(last)
            return lines + [last], b""
        except ValueError:
            return lines, last
    return lines, b""


def read_own_jsonl(path: Path) -> list:
    """(line number, row) of a JSONL file QAT appends to, a torn last line left out; the file is unchanged.
    (A user's JSONL input is read with eval.data.read_jsonl, which keeps and checks every line.)"""
    rows = []
    for n, line in enumerate(_complete_lines(path)[0], 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError as e:  # also UnicodeDecodeError
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from None
    return rows


def cut_torn_line(path: Path):
    """Before appending to our own JSONL file: drop a torn last line and end the file with a newline."""
    lines, torn = _complete_lines(path)
    whole = b"".join(line + b"\n" for line in lines)
    if torn or whole != path.read_bytes():
        atomic_write(path, whole)


def is_token_list(tokens, vocab_size: int) -> bool:
    return isinstance(tokens, list) and bool(tokens) and all(type(t) is int and 0 <= t < vocab_size for t in tokens)


def is_gen_data_file(path: Path) -> bool:
    """Whether every complete line is a gen-data row: only such a file is continued by gen-data."""
    try:
        rows = read_own_jsonl(path)
    except ValueError:
        return False
    return all(isinstance(r, dict) and type(r.get("id")) is int and is_token_list(r.get("tokens"), float("inf"))
               and all(isinstance(r.get(k), str) for k in GEN_DATA_TEXT) for _, r in rows)


# ---------------------------------------------------------------- teacher data

def prompt_batches(tokenizer, source: str, count: int, prompt_tokens: int, chat: bool, batch_size: int) -> list:
    """[[(id, prompt ids), ...], ...]: the first `count` paragraphs of the source as prompts, batched so each
    batch shares one prompt length (no padding). Plain prompts are a paragraph's first `prompt_tokens` tokens
    (shorter paragraphs are skipped); chat prompts wrap a whole paragraph of at most that many tokens."""
    paragraphs = [p.strip() for p in source_text(source, "calibration").split("\n\n") if p.strip()]
    prompts = []
    for text in paragraphs:
        ids = tokenizer.encode(text, allow_special=False)
        if chat and len(ids) <= prompt_tokens:
            prompts.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                                            bos=tokenizer.add_bos))
        elif not chat and len(ids) >= prompt_tokens:
            prompts.append(([tokenizer.bos_id] if tokenizer.add_bos else []) + ids[:prompt_tokens])
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(f"{source}: no paragraph fits --prompt_tokens {prompt_tokens}")
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append((i, ids))
    return [group[j:j + batch_size] for _, group in sorted(by_length.items()) for j in range(0, len(group), batch_size)]


def written_rows(out: Path, batches: list) -> dict:
    """{id: row} of the rows an earlier gen-data wrote to `out`, checked against this run's prompts."""
    done = {row["id"]: row for _, row in read_own_jsonl(out)} if out.exists() else {}
    prompts = {i: ids for batch in batches for i, ids in batch}
    for i, row in done.items():
        if i not in prompts or row["tokens"][:len(prompts[i])] != prompts[i]:
            raise ValueError(f"{out}: record {i} was written with another source or prompt settings; "
                             "use a new --out or the original settings")
    return done


def _rows_of(tokenizer, batch: list, continuations: list, done: dict) -> list:
    """The JSONL lines of a batch's new records (those not written before)."""
    lines = []
    for (i, p), new in zip(batch, continuations):
        if i in done:
            continue
        completion = [t for t in new if t not in tokenizer.stop_ids]
        lines.append(json.dumps({"id": i, "prompt": tokenizer.decode(p), "completion": tokenizer.decode(completion),
                                 "text": tokenizer.decode(p + completion), "tokens": p + new}) + "\n")
    return lines


def write_teacher_data(model, tokenizer, batches: list, done: dict, out: Path, max_new_tokens: int, seed: int,
                       sampling: dict) -> int:
    """Continue every batch that holds a prompt not in `done`, appending its new records to `out` (fsynced per
    batch, so a killed run loses at most a torn line). Returns the number of new tokens."""
    todo = [(b, batch) for b, batch in enumerate(batches) if any(i not in done for i, _ in batch)]
    n_prompts = sum(len(batch) for batch in batches)
    log_err(f"gen-data: {n_prompts} prompts, {n_prompts - len(done)} to generate in {len(todo)} batches -> {out}")
    t0, new_tokens = time.perf_counter(), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        cut_torn_line(out)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="batch", desc="gen-data") as bar:
        for b, batch in todo:
            torch.manual_seed(seed * 1_000_003 + b)  # per batch: a resumed run samples what the first would have
            rows = generate_batch(model, [p for _, p in batch], max_new_tokens, stop_ids=tokenizer.stop_ids,
                                  **sampling)
            new_tokens += sum(len(new) for (i, _), new in zip(batch, rows) if i not in done)
            f.write("".join(_rows_of(tokenizer, batch, rows, done)))
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    log_err(f"gen-data: wrote {new_tokens} new tokens in {time.perf_counter() - t0:.0f} s")
    return new_tokens


# ---------------------------------------------------------------- training and held-out tokens

def training_tokens(source: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """One token stream: gen-data rows (a .jsonl whose rows carry "tokens": their exact token ids, eos-terminated),
    or text from a corpus's calibration split or a user's file."""
    path = Path(source)
    if source not in CORPORA and path.suffix == ".jsonl" and path.is_file():
        rows = read_jsonl(path)
        if any("tokens" in row for _, row in rows):
            eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
            ids = []
            for line, row in rows:
                tokens = row.get("tokens")
                if not is_token_list(tokens, vocab_size):
                    raise ValueError(f"{path}, line {line}: expected \"tokens\", a non-empty list of token ids "
                                     f"from 0 to {vocab_size - 1} (the model's vocabulary), like gen-data writes")
                ids += tokens + (eos if tokens[-len(eos):] != eos else [])
            return torch.tensor(ids, dtype=torch.long)
    return torch.tensor(tokenizer.encode(source_text(source, "calibration"), allow_special=False), dtype=torch.long)


def make_windows(tokens: torch.Tensor, seq_len: int, source) -> torch.Tensor:
    """Non-overlapping [W, seq_len + 1] windows (inputs and their next-token labels)."""
    n = tokens.numel() // (seq_len + 1)
    if n == 0:
        raise ValueError(f"{source}: {tokens.numel()} tokens, fewer than one training window of {seq_len + 1}")
    return tokens[:n * (seq_len + 1)].view(n, seq_len + 1)


def step_windows(step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the windows a global step trains on: a fresh seeded shuffle each epoch, partial batch dropped.
    A pure function of the step, so the data position is the step."""
    per_epoch = n_windows // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


def held_out_tokens(tokenizer, source: str, n_tokens: int, context: int) -> torch.Tensor:
    """The first `n_tokens` tokens of the held-out text (a corpus's eval split, or a file): at least one window."""
    text = source_text(source, "eval")
    tokens = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos, allow_special=False))[:n_tokens]
    if tokens.numel() < context:
        raise ValueError(f"{source}: {tokens.numel()} held-out tokens (--eval_tokens {n_tokens}), fewer than one "
                         f"--eval_context window of {context}")
    return tokens
