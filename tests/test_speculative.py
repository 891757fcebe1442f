"""Speculative decoding against plain decoding: greedy outputs token for token, and the sampling acceptance rule
against exact distributions (chi-square on a tiny vocabulary, with a wrong rule as a control the test catches)."""
import pytest
import torch

from decoding import compile_step, decode_one_token, generate
from sampling import accept_draft, logits_to_probs
from speculative import DraftModel, PromptLookup, speculative_decode, verify
from tests.test_default_model import run_generate
from tests.test_model import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

def prompts(n, length=12, vocab=101, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g, dtype=torch.int) for _ in range(n)]


def repetitive_prompt():
    # A prompt that repeats itself, so that lookup proposals are often right (and sometimes wrong).
    return torch.tensor([5, 17, 42, 8, 99, 23, 5, 17, 42, 8, 99, 23, 5, 17, 42, 8, 61, 3, 5, 17], dtype=torch.int)


def lookup_proposal(tokens, k, max_ngram=3, min_ngram=2):
    lookup = PromptLookup(max_ngram=max_ngram, min_ngram=min_ngram)
    lookup.start(tokens)
    return lookup.propose(tokens, k)


def test_prompt_lookup_proposes_the_continuation_of_the_longest_match():
    assert lookup_proposal([1, 2, 3, 9, 9, 2, 3, 7, 1, 2, 3], 4) == ([9, 9, 2, 3], None)  # [1, 2, 3] at 0
    assert lookup_proposal([4, 5, 2, 3, 8, 2, 3], 2) == ([8, 2], None)  # the most recent [2, 3] wins
    assert lookup_proposal([4, 5, 6, 5, 7, 6], 2, min_ngram=1) == ([5, 7], None)  # no 2-gram; "6" was followed by 5
    assert lookup_proposal([4, 5, 6, 5, 7, 6], 2) == ([], None)  # single tokens do not count by default
    assert lookup_proposal([4, 5, 6], 2) == ([], None)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup(max_ngram=2, min_ngram=3)


def test_prompt_lookup_rests_longer_after_each_rejection():
    lookup = PromptLookup(min_ngram=1, max_rest=4)
    tokens = [1, 2, 1, 2, 1]
    lookup.start(tokens)
    pattern = []
    for _ in range(12):
        draft, _ = lookup.propose(tokens, 2)
        pattern.append(bool(draft))
        if draft:
            lookup.accepted(0, tokens)
    # proposes, rests 1, proposes, rests 2, proposes, rests 4, proposes, rests 4 (the cap) ...
    assert pattern == [True, False, True, False, False, True] + [False] * 4 + [True, False]
    lookup.start(tokens)
    assert lookup.propose(tokens, 2)[0]
    lookup.accepted(0, tokens)
    assert not lookup.propose(tokens, 2)[0] and lookup.propose(tokens, 2)[0]
    lookup.accepted(2, tokens)  # a success: no rest, and the next failure rests 1 step again
    assert lookup.propose(tokens, 2)[0]
    lookup.accepted(0, tokens)
    assert not lookup.propose(tokens, 2)[0] and lookup.propose(tokens, 2)[0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prompt_lookup_greedy_equals_plain_greedy(k):
    model = tiny_model()
    model.setup_caches(1, 64)
    total_proposed = total_accepted = 0
    for prompt in prompts(3) + [repetitive_prompt()]:
        plain, _ = generate(model, prompt, 40)
        fast, stats = generate(model, prompt, 40, speculator=PromptLookup(min_ngram=1), speculate_k=k)
        assert fast.tolist() == plain.tolist()
        total_proposed, total_accepted = total_proposed + stats.proposed, total_accepted + stats.accepted
    assert 0 < total_accepted < total_proposed  # both branches of the acceptance were exercised


@pytest.mark.parametrize("draft_args", [{"seed": 0}, {"seed": 1}, {"seed": 2, "n_layer": 1}])
def test_draft_model_greedy_equals_plain_greedy(draft_args):
    model = tiny_model()
    model.setup_caches(1, 64)
    draft = DraftModel(tiny_model(**draft_args))
    for prompt in prompts(3):
        plain, _ = generate(model, prompt, 40)
        fast, stats = generate(model, prompt, 40, speculator=draft, speculate_k=3)
        assert fast.tolist() == plain.tolist()
        if draft_args["seed"] == 0:  # the model drafting for itself: every proposal is kept
            assert stats.accepted == stats.proposed > 0


def test_stop_token_inside_an_accepted_run_ends_generation():
    model = tiny_model()
    model.setup_caches(1, 64)
    prompt = repetitive_prompt()
    plain, _ = generate(model, prompt, 40)
    stop = plain.tolist()[9]
    expected = plain.tolist()[:plain.tolist().index(stop) + 1]
    for speculator in (PromptLookup(), DraftModel(tiny_model())):
        streamed = []
        fast, _ = generate(model, prompt, 40, stop_ids=[stop], on_token=streamed.append, speculator=speculator,
                           speculate_k=4)
        assert fast.tolist() == expected == streamed


def test_compiled_verify_and_draft_equal_plain_greedy():
    """The compiled path: the C++ few-token CPU kernels for verify (k+1 = 4 tokens) and decode."""
    torch._dynamo.reset()
    model = tiny_model()
    model.setup_caches(1, 64)
    decode_fn, verify_fn = compile_step(decode_one_token, "cpu"), compile_step(verify, "cpu")
    draft = DraftModel(tiny_model(seed=0), compile_step(verify, "cpu"))
    with torch.no_grad():
        x, pos = torch.tensor([[3, 1, 4, 1]]), torch.arange(20, 24)
        model(torch.arange(20).view(1, -1), torch.arange(20))
        eager = verify(model, x, pos)
        torch.testing.assert_close(verify_fn(model, x, pos), eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())
    for prompt in prompts(2) + [repetitive_prompt()]:
        plain, _ = generate(model, prompt, 40)
        for speculator in (PromptLookup(), draft):
            fast, _ = generate(model, prompt, 40, speculator=speculator, speculate_k=3, decode_fn=decode_fn,
                               verify_fn=verify_fn)
            assert fast.tolist() == plain.tolist()


def test_compiled_bf16_verify_scores_each_token_as_decode_does():
    """bf16, compiled: a 4-token verify step gives every token bit for bit the logits that decode gives it (one
    kernel for any row count, Inductor rounding as eager does), so speculative greedy output equals plain greedy."""
    torch._dynamo.reset()
    model = tiny_model().to(torch.bfloat16)
    model.setup_caches(1, 64, dtype=torch.bfloat16)
    decode_fn, verify_fn = compile_step(verify, "cpu"), compile_step(verify, "cpu")
    tokens = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(tokens[:, :20], torch.arange(20))
        together = verify_fn(model, tokens[:, 20:], torch.arange(20, 24))
        alone = torch.cat([decode_fn(model, tokens[:, i:i + 1], torch.arange(i, i + 1)) for i in range(20, 24)])
    assert torch.equal(together, alone)


# ---------------------------------------------------------------- the sampling acceptance rule

def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# 99.9th percentile of chi-square with 15 degrees of freedom (16 cells): a correct rule fails 1 run in 1000.
CHI2_15_999 = 37.70


def run_speculation(rule, logits, draft_probs, deterministic_draft, trials, seed=0):
    """Counts of the first two emitted tokens when a context-free "model" (logits[i] at position i) is
    decoded speculatively, drafting k = 3 tokens per step from draft_probs (or always the same tokens)."""
    torch.manual_seed(seed)
    V = logits.shape[-1]
    counts = torch.zeros(V * V)
    for _ in range(trials):
        out = []
        while len(out) < 2:
            i = len(out)
            if deterministic_draft:
                draft, q = [(i + 1) % V, 2, 0], None
            else:
                q = draft_probs[i:i + 3]
                draft = [int(torch.multinomial(row, 1)) for row in q]
            out += rule(logits[i:i + 4], draft, q, temperature=1.0)
        counts[out[0] * V + out[1]] += 1
    return counts


def resample_from_p(logits, draft, draft_probs, temperature):
    """A wrong rule for the control: on rejection it samples from p instead of the residual max(p - q, 0)."""
    p = logits_to_probs(logits, temperature)
    for i, x in enumerate(draft):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if float(torch.rand(())) * q_x >= p[i, x]:
            return draft[:i] + [int(torch.multinomial(p[i], 1))]
    return draft + [int(torch.multinomial(p[len(draft)], 1))]


@pytest.mark.parametrize("deterministic_draft", [True, False])
def test_acceptance_rule_preserves_the_distribution(deterministic_draft):
    g = torch.Generator().manual_seed(7)
    V = 4
    logits = torch.randn(6, V, generator=g) * 1.5
    draft_probs = torch.softmax(torch.randn(6, V, generator=g) * 1.5, -1)
    p = torch.softmax(logits, -1)
    exact = torch.outer(p[0], p[1]).flatten()  # the context-free model's joint law of two tokens
    counts = run_speculation(accept_draft, logits, draft_probs, deterministic_draft, trials=6000)
    assert chi_square(counts, exact) < CHI2_15_999
    wrong = run_speculation(resample_from_p, logits, draft_probs, deterministic_draft, trials=6000)
    assert chi_square(wrong, exact) > 3 * CHI2_15_999  # the control: the test tells a wrong rule apart


def test_acceptance_rule_respects_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)
    torch.manual_seed(0)
    for _ in range(200):
        kept = accept_draft(logits, [0, 1], None, temperature=1.0, top_k=2)
        assert kept[0] in (2, 3)  # tokens 0 and 1 have probability 0 under top_k=2: never kept, never drawn


def test_sampled_prompt_lookup_matches_the_model_distribution():
    """End to end on a tiny model: the first two sampled tokens with prompt lookup follow the model's exact
    joint distribution (computed by enumeration)."""
    model = tiny_model(vocab_size=4, n_layer=1)
    model.setup_caches(1, 32)
    prompt = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1], dtype=torch.int)
    with torch.no_grad():
        p1 = torch.softmax(model(prompt.view(1, -1).long())[0, -1], -1)
        exact = torch.cat([p1[a] * torch.softmax(model(torch.cat([prompt, torch.tensor([a])]).view(1, -1).long())
                                                  [0, -1], -1) for a in range(4)])
    torch.manual_seed(0)
    counts = torch.zeros(16)
    lookup = PromptLookup(max_ngram=2)
    for _ in range(1500):
        out = []

        def emit(new, out=out):
            out.extend(new)
            return len(out) >= 2

        first = int(generate(model, prompt, 1, temperature=1.0)[0])
        out.append(first)
        lookup.start(prompt.tolist())
        speculative_decode(model, lookup, prompt.tolist() + [first], 8, emit, k=3, decode_fn=decode_one_token,
                           temperature=1.0)
        counts[out[0] * 4 + out[1]] += 1
    assert chi_square(counts, exact) < CHI2_15_999


# ---------------------------------------------------------------- the default model

def test_default_model_greedy_is_unchanged_by_prompt_lookup_and_a_bf16_draft():
    from checkpoint import load_model, load_tokenizer_for
    from convert import resolve_checkpoint
    ckpt = resolve_checkpoint(None)
    tok = load_tokenizer_for(ckpt)
    model = load_model(ckpt)
    text = ("Passage: The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
            "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
            "\n\nQuestion: who is the Eiffel Tower named after? Quote the passage.")
    prompt = torch.tensor(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}])), dtype=torch.int)
    model.setup_caches(1, 256)
    plain, _ = generate(model, prompt, 40)
    lookup, stats = generate(model, prompt, 40, speculator=PromptLookup(), speculate_k=3)
    assert lookup.tolist() == plain.tolist() and stats.accepted > 0
    drafted, stats = generate(model, prompt, 40, speculator=DraftModel(load_model(ckpt, dtype=torch.bfloat16)),
                              speculate_k=3)
    assert drafted.tolist() == plain.tolist() and stats.accepted > stats.proposed / 2
    assert "Gustave Eiffel" in tok.decode(plain.tolist())


def test_cli_prompt_lookup_prints_the_same_text_and_its_acceptance():
    args = ["--chat", "--prompt", "Repeat exactly: the cat sat on the mat, the cat sat on the mat.",
            "--max_new_tokens", "24", "--threads", "1"]
    plain, fast = run_generate(*args), run_generate(*args, "--prompt_lookup", "--speculate_k", "2", "--compile")
    assert plain.returncode == fast.returncode == 0, fast.stderr
    assert fast.stdout == plain.stdout and "speculation kept" in fast.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt_lookup", "--draft_checkpoint", "x"], "choose one"),
    (["--speculate_k", "0"], "argument --speculate_k"),
    (["--draft_checkpoint", "/nonexistent"], "not a bitfast checkpoint"),
    (["--prompt_file", "/nonexistent"], "cannot read --prompt_file"),
])
def test_cli_bad_speculation_input_is_one_clear_line(args, message):
    r = run_generate(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
