"""eval/lm_adapter.py against independent references: a float64 copy of a tiny random model scoring each
sequence on its own (no padding, no batching, no cache), a greedy float64 decoding loop without a KV cache,
and lm-eval's own evaluator on toy tasks (multiple choice, rolling log-likelihood, generate_until)."""
import copy
import math

import datasets
import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from checkpoint import load_tokenizer_for
from convert import resolve_checkpoint
from eval.lm_adapter import BitfastLM
from model import ModelArgs, Transformer

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, vocab_size=49152, block_size=256,
            tie_embeddings=True)
PAIRS = [("The capital of France is", " Paris"), ("Question: what is two plus two?\nAnswer:", " four, I think."),
         ("A trailing space ", "moves to the continuation"), ("", "An empty context."),
         ("one two three four five six seven eight nine ten eleven twelve", " thirteen fourteen")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer_for(resolve_checkpoint(None))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def reference_loglikelihood(model64, context_ids, continuation_ids, max_length):
    seq = (context_ids + continuation_ids)[-(max_length + 1):]
    with torch.no_grad():
        logprobs = torch.log_softmax(model64(torch.tensor([seq[:-1]]))[0].double(), -1)
    n = len(continuation_ids)
    targets = torch.tensor(seq[-n:])
    picked = logprobs[-n:].gather(-1, targets[:, None])
    return picked.sum().item(), bool((logprobs[-n:].argmax(-1) == targets).all())


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_encode_pair(tiny, tokenizer):
    lm = BitfastLM(model=tiny, tokenizer=tokenizer)
    enc = lambda s: tokenizer.encode(s)  # noqa: E731
    assert lm.encode_pair("The capital of France is", " Paris") == (enc("The capital of France is"), enc(" Paris"))
    # the context's trailing space joins the continuation, as lm-eval's HF model does
    assert lm.encode_pair("A trailing space ", "moves") == (enc("A trailing space"), enc(" moves"))
    assert lm.encode_pair("", "Hi") == ([tokenizer.bos_id], enc("Hi"))


@pytest.mark.parametrize("batch_size,max_length", [(1, 256), (3, 256), (16, 12)])
def test_loglikelihood_matches_float64_reference(tiny, tokenizer, batch_size, max_length):
    lm = BitfastLM(model=tiny, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    model64 = copy.deepcopy(tiny).double()
    got = lm.loglikelihood(requests("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        want, want_greedy = reference_loglikelihood(model64, *lm.encode_pair(context, continuation), max_length)
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert isinstance(got[0][0], float)


def test_shared_inputs_are_scored_once_and_greedy_is_detected(tiny, tokenizer):
    lm = BitfastLM(model=tiny, tokenizer=tokenizer)
    context = tokenizer.encode("Pick a letter:")
    with torch.no_grad():
        best = int(tiny(torch.tensor([context]))[0, -1].argmax())
    pairs = [(context, [best]), (context, [best + 1]), (context, [best + 2])]
    results = lm.score(pairs)
    assert lm.stats["loglikelihood"]["tokens"] == len(context)  # one forward pass for the three one-token answers
    assert [greedy for _, greedy in results] == [True, False, False]
    with torch.no_grad():
        logprobs = torch.log_softmax(copy.deepcopy(tiny).double()(torch.tensor([context]))[0, -1], -1)
    for (_, (token,)), (logprob, _) in zip(pairs, results):
        assert logprob == pytest.approx(logprobs[token].item(), rel=1e-5)


def test_loglikelihood_rolling_matches_windowed_reference(tiny, tokenizer):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness."
    tokens = tokenizer.encode(text)
    model64 = copy.deepcopy(tiny).double()
    full = [tokenizer.bos_id] + tokens
    for max_length in (8, 256):
        lm = BitfastLM(model=tiny, tokenizer=tokenizer, max_length=max_length)
        (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
        # Window k predicts tokens[k*L:(k+1)*L] from the L tokens before its last prediction (lm-eval's scheme:
        # every token scored once, the last window with full context).
        want = 0.0
        for start in range(0, len(tokens), max_length):
            n = min(max_length, len(tokens) - start)
            end = start + n  # index in `full` of the last predicted token
            window = full[max(0, end - max_length):end]
            with torch.no_grad():
                logprobs = torch.log_softmax(model64(torch.tensor([window]))[0].double(), -1)
            want += logprobs[-n:].gather(-1, torch.tensor(full[end - n + 1:end + 1])[:, None]).sum().item()
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-5)


def reference_greedy(model64, ids, max_new, stop_ids):
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model64(torch.tensor([ids]))[0, -1].argmax())
            if token in stop_ids:
                break
            new.append(token)
            ids.append(token)
    return new


def test_generate_until_matches_greedy_reference_and_cuts_at_stop(tiny, tokenizer):
    lm = BitfastLM(model=tiny, tokenizer=tokenizer)
    model64 = copy.deepcopy(tiny).double()
    prompt = "Once upon a time"
    full = tokenizer.decode(reference_greedy(model64, tokenizer.encode(prompt), 12, tokenizer.stop_ids))
    assert len(full) > 8
    stop = full[5:8]
    (cut,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))
    assert cut == full[:full.index(stop)]
    (whole,) = lm.generate_until(requests("generate_until", [(prompt, {"until": ["@@never@@"], "max_gen_toks": 12})]))
    assert whole == full
    assert lm.stats["generate_until"]["tokens"] < 2 * 12  # the first request stopped early


def test_lm_eval_runs_toy_tasks_through_the_adapter(tiny, tokenizer):
    lm = BitfastLM(model=tiny, tokenizer=tokenizer)
    model64 = copy.deepcopy(tiny).double()
    mc_docs = [{"q": "The sky is", "choices": ["blue", "green", "a potato"], "gold": 0},
               {"q": "Two plus two is", "choices": ["four", "five"], "gold": 1},
               {"q": "Cats like to", "choices": ["sleep", "fly", "swim", "bark"], "gold": 0}]
    texts = [{"text": "Short text one."}, {"text": "A second, slightly longer piece of text to score."}]
    gen_docs = [{"prompt": "Hello there", "target": "x"}, {"prompt": "Numbers: 1, 2, 3,", "target": "y"}]
    tasks = [
        {"task": "toy_mc", "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(mc_docs)},
         "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
         "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
         "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        {"task": "toy_rolling", "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(texts)},
         "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
         "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                          "higher_is_better": False}]},
        {"task": "toy_gen", "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(gen_docs)},
         "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
         "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6},
         "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
    ]
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    # multiple choice: accuracy from the float64 reference's best choice ("{{q}}" + " " + choice)
    correct = 0
    for doc in mc_docs:
        scores = [reference_loglikelihood(model64, *lm.encode_pair(doc["q"], " " + c), 256)[0] for c in doc["choices"]]
        correct += scores.index(max(scores)) == doc["gold"]
    assert out["results"]["toy_mc"]["acc,none"] == pytest.approx(correct / len(mc_docs))
    # rolling: word perplexity = exp(-total log-likelihood / total words)
    total = sum(reference_loglikelihood(model64, [tokenizer.bos_id], tokenizer.encode(t["text"]), 256)[0]
                for t in texts)
    words = sum(len(t["text"].split()) for t in texts)
    assert out["results"]["toy_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-5)
    # generate_until: the responses lm-eval recorded are the reference greedy text cut at the first newline
    for sample in out["samples"]["toy_gen"]:
        ids = tokenizer.encode(sample["doc"]["prompt"])
        want = tokenizer.decode(reference_greedy(model64, ids, 6, tokenizer.stop_ids)).split("\n")[0]
        assert sample["resps"] == [[want]]
