"""From logits to tokens: greedy, temperature / top-k / top-p sampling, and the speculative acceptance rule that
keeps the sampled distribution exactly the model's when a cheaper proposer guesses tokens ahead."""
import torch


def logits_to_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = torch.where(logits < kth, -float("inf"), logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return torch.softmax(logits.float(), dim=-1)


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """logits: [B, V] -> tokens [B, 1]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True).to(torch.int)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    # Exponential-race sampling (argmax of p/Exp(1)) equals multinomial sampling and compiles without a sync.
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(torch.int)


def accept_draft(logits, draft: list, draft_probs=None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None) -> list:
    """The tokens speculative decoding keeps: the accepted prefix of `draft` plus one token of the model's own.

    logits: [k+1, V], the model's logits after each of the k draft tokens' predecessors and after the last draft
    token. draft_probs: [k, V], the distribution each draft token was sampled from; None for a deterministic
    proposer (prompt lookup), whose distribution is one-hot.

    Greedy: the draft tokens that equal the model's argmax, up to the first that does not, then the argmax there.
    Sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x at step i is kept with probability
    min(1, p_i(x) / q_i(x)); at the first rejection the token comes from max(p_i - q_i, 0), renormalized, and
    after k acceptances from p_k. Every emitted token is then distributed exactly as p, whatever q is."""
    k = len(draft)
    d = torch.tensor(draft, device=logits.device, dtype=torch.long)
    if temperature <= 0:
        best = logits.argmax(-1)
        n = int(torch.cumprod((best[:k] == d).int(), 0).sum())
        return draft[:n] + [int(best[n])]
    p = logits_to_probs(logits, temperature, top_k, top_p)
    steps = torch.arange(k, device=logits.device)
    p_x = p[steps, d]
    q_x = draft_probs[steps, d] if draft_probs is not None else torch.ones_like(p_x)
    keep = torch.rand(k, device=logits.device) * q_x < p_x
    n = int(torch.cumprod(keep.int(), 0).sum())
    if n == k:
        rest = p[k]
    elif draft_probs is not None:
        rest = (p[n] - draft_probs[n]).clamp(min=0)
    else:
        rest = p[n].index_fill(0, d[n], 0.0)
    if not rest.sum() > 0:  # only by rounding: a rejection needs p_i(x) < q_i(x), so p_i - q_i has mass
        rest = p[n]
    return draft[:n] + [int(torch.multinomial(rest, 1))]
