"""Speculative decoding: a cheap proposer guesses the next k tokens, the model scores all of them in one forward
pass over its static KV cache, and generation keeps the prefix the model agrees with plus one token of the
model's own (sampling.accept_draft). Rejected guesses need no cleanup: the next step writes from the first
rejected position on, and the causal mask hides the stale cache entries until then.

Proposers:
- PromptLookup: the tokens that followed the most recent earlier occurrence, in the prompt or the output, of the
  longest n-gram ending the text. Free to compute; it pays off when the output copies from the input
  (summaries, answers about a document, code edits).
- DraftModel: a smaller or lower-bit model with the same tokenizer (e.g. the int4 version of the target), which
  decodes k tokens on its own KV cache, rolled back like the target's.

Greedy decoding returns exactly plain greedy's tokens; sampling returns exactly the model's distribution.
"""
import torch

from kernels.formats import FEW_ROWS
from sampling import accept_draft, logits_to_probs

# A verify step scores k+1 tokens; up to FEW_ROWS rows it runs the kernels that score exactly like decode, so
# greedy speculation returns plain greedy's tokens. Beyond, a different kernel could change a close argmax.
MAX_SPECULATE_K = FEW_ROWS - 1


def verify(model, tokens, input_pos):
    """The model's logits [S, V] at S consecutive positions of one sequence, written into its cache. Compiled
    with a fixed S (1 + k proposals) this is one graph; on CPU it runs the C++ few-token kernels."""
    return model(tokens, input_pos)[0].float()


class PromptLookup:
    """Proposes the continuation of the longest n-gram (max_ngram down to min_ngram tokens) that ends the text
    and occurred before, taken from its most recent occurrence. An index of every n-gram's latest follower keeps
    each proposal a few dictionary look-ups.

    Adaptive: a proposal the model rejects outright costs a verify step for one token, so after one the lookup
    rests for 1, 2, 4, ... steps (doubling with each further failure, up to max_rest) before proposing again;
    a success resets the rest. Open-ended text, which rarely repeats, then runs at plain decoding speed."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, max_rest: int = 32):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.ngram_sizes = range(max_ngram, min_ngram - 1, -1)
        self.max_rest = max_rest
        self.start([])

    def start(self, tokens: list, model=None):
        """A new prompt: forget the previous text and rest."""
        self.followers = {n: {} for n in self.ngram_sizes}  # n-gram -> index of the token after its latest occurrence
        self.indexed = 0
        self.rest, self.next_rest = 0, 1

    def propose(self, tokens: list, k: int, **sampling):
        for i in range(max(self.indexed, 1), len(tokens)):
            for n in self.ngram_sizes:
                if i >= n:
                    self.followers[n][tuple(tokens[i - n:i])] = i
        self.indexed = len(tokens)
        if self.rest:
            self.rest -= 1
            return [], None
        for n in self.ngram_sizes:
            start = self.followers[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + k], None
        return [], None

    def accepted(self, n: int, tokens: list):
        if n:
            self.next_rest = 1
        else:
            self.rest, self.next_rest = self.next_rest, min(2 * self.next_rest, self.max_rest)


class DraftModel:
    """A draft model proposing k tokens by decoding on its own cache. `step(model, token, input_pos)` gives its
    logits [1, V] for one token (speculative.verify, compiled or not)."""

    def __init__(self, model, step=verify):
        self.model, self.step = model, step
        self.cached = 0  # leading tokens of the current text whose keys/values sit in the draft's cache

    def start(self, tokens: list, model):
        """A new prompt for `model` (the target): size the draft's cache like the model's and prefill the prompt."""
        if self.model.args.vocab_size != model.args.vocab_size:
            raise ValueError(f"draft model has a vocabulary of {self.model.args.vocab_size} tokens, the model "
                             f"{model.args.vocab_size}: a draft must share the model's tokenizer")
        if self.model.max_seq_length != model.max_seq_length:
            self.model.setup_caches(1, model.max_seq_length)
        device = self.model.norm.weight.device
        self.model(torch.tensor([tokens], device=device), torch.arange(len(tokens), device=device))
        self.cached = len(tokens)

    def _feed(self, tokens: list):
        """Feed the tokens the draft has not seen (one, or two after a fully accepted proposal) -> logits [V]."""
        device = self.model.norm.weight.device
        if len(tokens) - self.cached > 1:
            self.model(torch.tensor([tokens[self.cached:-1]], device=device),
                       torch.arange(self.cached, len(tokens) - 1, device=device))
        pos = torch.tensor([len(tokens) - 1], device=device)
        logits = self.step(self.model, torch.tensor([[tokens[-1]]], device=device), pos)[-1]
        self.cached = len(tokens)
        return logits

    def propose(self, tokens: list, k: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
        draft, probs = [], []
        text = list(tokens)
        for _ in range(k):
            logits = self._feed(text)
            if temperature <= 0:
                draft.append(int(logits.argmax()))
            else:
                probs.append(logits_to_probs(logits, temperature, top_k, top_p))
                draft.append(int(torch.multinomial(probs[-1], 1)))
            text.append(draft[-1])
        return draft, (torch.stack(probs) if probs else None)

    def accepted(self, n: int, tokens: list):
        # tokens: the text the proposal continued; the draft cache stays valid through the accepted draft tokens
        self.cached = min(self.cached, len(tokens) + n)


@torch.no_grad()
def speculative_decode(model, proposer, tokens: list, budget: int, emit, *, k: int, verify_fn=verify,
                       decode_fn, **sampling):
    """Continue `tokens` (prompt + output so far; all but the last token are in the model's cache, and the
    proposer has been started on the prompt) by up to `budget` tokens. Each step proposes k tokens and verifies them in one forward (padding a shorter proposal
    to k, so a compiled verify_fn keeps one shape), or, with no proposal or too little room left, decodes one
    token with decode_fn. `emit(new_tokens)` receives each step's tokens and returns True to stop.
    Returns (tokens proposed, tokens accepted)."""
    device = model.norm.weight.device
    proposed = accepted = 0
    while budget > 0:
        pos = len(tokens) - 1
        draft, draft_probs = proposer.propose(tokens, k, **sampling) if budget > k else ([], None)
        if draft:
            draft = draft + [draft[-1]] * (k - len(draft))
            x = torch.tensor([[tokens[-1]] + draft], device=device)
            logits = verify_fn(model, x, torch.arange(pos, pos + k + 1, device=device))
            new = accept_draft(logits, draft, draft_probs, **sampling)
            proposer.accepted(len(new) - 1, tokens)
            proposed, accepted = proposed + k, accepted + len(new) - 1
        else:
            x = torch.tensor([[tokens[-1]]], device=device)
            new = [int(decode_fn(model, x, torch.tensor([pos], device=device), **sampling))]
        new = new[:budget]
        budget -= len(new)
        tokens.extend(new)
        if emit(new):
            break
    return proposed, accepted
