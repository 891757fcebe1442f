"""Prefill and decode over the static KV cache: one prompt (optionally with a speculator and a prefill cache),
a batch of prompts, and the compiled forms of the fixed-shape steps. generate.py is the command around it."""
import time
from dataclasses import dataclass

import torch

from model import Transformer
from prefill_cache import PrefillCache
from sampling import sample
from speculative import speculative_decode, verify


def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "the prompt"):
    """Token ids the model can embed: an id past its vocabulary (a tokenizer larger than the model's embedding)
    would otherwise fail deep inside the embedding lookup, or silently on a GPU."""
    if ids.numel() == 0:
        raise ValueError(f"{what} is empty (it encodes to no tokens)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} has token id {high if high >= vocab_size else low}, outside the model's "
                         f"vocabulary of {vocab_size} tokens: the tokenizer does not belong to this model")


def prefill(model: Transformer, tokens, input_pos, **sampling):
    logits = model(tokens, input_pos)
    return sample(logits[:, -1], **sampling)


def decode_one_token(model: Transformer, token, input_pos, **sampling):
    logits = model(token, input_pos)
    return sample(logits[:, -1], **sampling)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float
    decode_time: float
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefill cache
    proposed: int = 0  # speculative decoding: draft tokens the model verified
    accepted: int = 0  # ... and kept

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode produced the rest.
        return (self.new_tokens - 1) / self.decode_time if self.new_tokens > 1 and self.decode_time > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, stop_ids=(), on_token=None,
             prefill_fn=prefill, decode_fn=decode_one_token, speculator=None, speculate_k: int = 4,
             verify_fn=verify, prefill_cache: PrefillCache | None = None, **sampling):
    """prompt: [T] token ids. Returns (new token ids [N], GenerationStats). The caller has set up the caches
    (model.setup_caches) large enough for T + max_new_tokens. `on_token(id)` streams each new token.

    speculator: a speculative.PromptLookup or DraftModel proposing speculate_k tokens at a time, checked with
    verify_fn (speculative.verify, or its compiled form). prefill_cache: a PrefillCache to reuse the keys and
    values of a prompt prefix seen before (and to remember this prompt's)."""
    device = prompt.device
    T = prompt.numel()
    check_token_ids(prompt, model.args.vocab_size)
    if T + max_new_tokens > model.max_seq_length:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context of "
                         f"{model.max_seq_length} tokens")
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.int) if stop_ids else None
    _sync(device)
    t0 = time.perf_counter()
    if prefill_cache is not None:
        token, cached = prefill_cache.prefill(model, prompt, prefill_fn, **sampling)
    else:
        token, cached = prefill_fn(model, prompt.view(1, -1), torch.arange(T, device=device), **sampling), 0
    token = token.clone()
    if speculator is not None:
        speculator.start(prompt.tolist(), model)  # a draft model prefills the prompt too
    _sync(device)
    t1 = time.perf_counter()
    ttft = t1 - t0
    if speculator is None:
        new = _decode(model, token, T, max_new_tokens - 1, stop, on_token, decode_fn, **sampling)
        proposed = accepted = 0
    else:
        new, proposed, accepted = [], 0, 0

        def emit(tokens) -> bool:
            """Keep and stream tokens up to the first stop token; True once one came."""
            for t in tokens:
                new.append(t)
                if on_token is not None:
                    on_token(t)
                if t in stop_ids:
                    return True
            return False

        if not emit([int(token)]):
            proposed, accepted = speculative_decode(model, speculator, prompt.tolist() + new, max_new_tokens - 1,
                                                    emit, k=speculate_k, verify_fn=verify_fn, decode_fn=decode_fn,
                                                    **sampling)
        new = torch.tensor(new, dtype=torch.int, device=device)
    _sync(device)
    decode_time = time.perf_counter() - t1
    if prefill_cache is not None:
        prefill_cache.store(model, prompt)
    return new, GenerationStats(T, new.numel(), ttft, decode_time, cached, proposed, accepted)


def _decode(model, token, pos: int, steps: int, stop, on_token, decode_fn, **sampling) -> torch.Tensor:
    """Plain decoding after prefill: `token` sits at position `pos`; at most `steps` more tokens."""
    out = [token]
    input_pos = torch.tensor([pos], device=token.device, dtype=torch.long)
    for _ in range(steps):
        if on_token is not None:
            on_token(int(token))
        if stop is not None and bool((token == stop).any()):
            break
        token = decode_fn(model, token.view(1, 1), input_pos, **sampling).clone()
        out.append(token)
        input_pos += 1
    else:
        if on_token is not None:
            on_token(int(token))
    return torch.cat(out).view(-1)


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, stop_ids=(),
                   decode_fn=decode_one_token, **sampling) -> list:
    """Several prompts (lists of token ids) at once -> each one's new tokens (a list, ending at its first stop
    token). Prompts are right-padded and every row decodes at its own positions, so a row's result is the one
    generate() gives it alone. Sets up the model's caches for the batch when they do not fit."""
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    for p in prompts:
        check_token_ids(torch.tensor(p, dtype=torch.long), model.args.vocab_size)
    device = model.norm.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width, rows = int(lengths.max()), len(prompts)
    if model.max_batch_size != rows or model.max_seq_length < width + max_new_tokens:
        model.setup_caches(rows, width + max_new_tokens)
    tokens = torch.zeros(rows, width, dtype=torch.int, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.int)
    logits = model(tokens, torch.arange(width, device=device))
    token = sample(logits[torch.arange(rows, device=device), lengths - 1], **sampling)
    out, done = [token], torch.zeros(rows, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.int)
    input_pos = lengths.view(rows, 1).clone()
    for _ in range(max_new_tokens - 1):
        done |= torch.isin(token.view(-1), stop)
        if bool(done.all()):
            break
        token = decode_fn(model, token, input_pos, **sampling).clone()
        out.append(token)
        input_pos += 1
    results = []
    for row in torch.cat(out, 1).tolist():
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        results.append(row[:ends[0] + 1] if ends else row)
    return results


def compile_step(fn, device):
    """A fixed-shape step (decode, verify) compiles to one graph thanks to the static cache; on CUDA with CUDA
    graphs (reduce-overhead). Each new shape (another k) gets its own static graph, not a dynamic one.
    On CPU Inductor rounds to bf16 wherever eager would (emulate_precision_casts): otherwise how much of a norm or an
    activation stays in fp32 depends on the fusions it picks for each shape, and a 4-token verify step scores
    tokens differently from decode."""
    if torch.device(device).type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})


def compile_fns(device, compile_prefill: bool = False):
    decode_fn = compile_step(decode_one_token, device)
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return prefill_fn, decode_fn
