"""Structured pruning (LLM-Pruner, Ma et al. 2023): remove whole key/value heads, with the query heads that read
them, and whole FFN channels, ranked by an importance score; what is left is a smaller dense model whose blocks
may differ in size (model.ModelArgs' per-block lists).

A coupled group is what must go together for the block to stay a Llama block:
- attention, one per key/value head j: rows of wk and wv for head j; rows of wq for the query heads that read it
  (query head h reads key/value head h // (n_head / n_local_heads), as SDPA's GQA and the attention kernels
  broadcast); the same columns of wo. SmolLM2-135M (9 query / 3 key/value heads): a key/value head and 3 query heads.
- feed-forward, one per channel c: row c of w1 (gate) and w3 (up), column c of w2 (down).
The groups are read off each block's modules (head counts and shapes), not listed per model, so a GQA, a plain
multi-head or an already pruned block are handled alike.

The ratio is of the prunable parameters: the chosen parts' linear weights (wq, wk, wv, wo and/or w1, w3, w2) in
the blocks not kept. Attention and FFN each lose that fraction, to the nearest whole group. "block" scope removes
it from every pruned block; "global" ranks a kind's groups across all pruned blocks, so blocks lose unequal
shares. FFN widths are then rounded to a multiple of channel_multiple (8 by default: every packed format's word
holds 1, 2, 4 or 8 codes, so the pruned model still quantizes). A pruning that would leave a block without any
key/value head or FFN channel is refused.

Importance of a group: a sum over its weights of an element-wise score (L2: the root of the sum of squares).
  l1 |w|;  l2 w²;  random: one seeded uniform draw per group (the honest baseline);
  taylor |w·g| (first order);  taylor2 ½·w²·F (second order, the diagonal Fisher F = mean over samples of g_s²);
  taylor-mix |w·g − ½·w²·F| (LLM-Pruner's element-wise mix of both).
g is the mean over calibration windows of ∂L_s/∂w, L_s a window's mean next-token loss.

Library code: imports model, never checkpoint.py or an entry script.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from model import Linear, Transformer

CRITERIA = ("l1", "l2", "random", "taylor", "taylor2", "taylor-mix")
GRADIENT_CRITERIA = ("taylor", "taylor2", "taylor-mix")
PARTS = {"attention": ("attention",), "ffn": ("feed_forward",), "both": ("attention", "feed_forward")}
SCOPES = ("block", "global")
GROUP_WHAT = {"attention": "key/value head", "feed_forward": "FFN channel"}


@dataclass
class PruneSettings:
    ratio: float  # fraction of the prunable parameters removed, in [0, 1)
    criterion: str = "taylor"
    parts: str = "both"  # attention | ffn | both
    scope: str = "block"  # block: the ratio in every pruned block; global: ranked across the pruned blocks
    keep_first: int = 0  # blocks left whole at each end (LLM-Pruner keeps the first and last few)
    keep_last: int = 0
    seed: int = 0  # the random criterion's draws
    channel_multiple: int = 8  # FFN widths kept a multiple of this: 8 packs at every bit width (kernels/formats.py)

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        for name, value, known in (("criterion", self.criterion, CRITERIA), ("parts", self.parts, PARTS),
                                   ("scope", self.scope, SCOPES)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r} ({', '.join(known)})")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ValueError(f"keep_first={self.keep_first} and keep_last={self.keep_last} must be >= 0")
        if self.channel_multiple < 1:
            raise ValueError(f"channel_multiple={self.channel_multiple} must be >= 1")


def coupled_groups(block) -> dict:
    """{kind: [(linear name in the block, axis, index [G, k])]}: group j of a kind is, in every listed linear, the
    k rows (axis 0) or columns (axis 1) index[j]."""
    att, ff = block.attention, block.feed_forward
    rep = att.n_head // att.n_local_heads
    kv_rows = torch.arange(att.n_local_heads * att.head_dim).view(att.n_local_heads, att.head_dim)
    q_rows = torch.arange(att.n_head * att.head_dim).view(att.n_local_heads, rep * att.head_dim)  # heads j*rep..
    channels = torch.arange(ff.w1.out_features).view(-1, 1)
    return {"attention": [("attention.wq", 0, q_rows), ("attention.wk", 0, kv_rows), ("attention.wv", 0, kv_rows),
                          ("attention.wo", 1, q_rows)],
            "feed_forward": [("feed_forward.w1", 0, channels), ("feed_forward.w3", 0, channels),
                             ("feed_forward.w2", 1, channels)]}


def gradient_stats(model, samples: torch.Tensor, names: list) -> dict:
    """{linear name: (mean gradient, mean squared gradient)} of each named linear's weight, over the windows in
    samples [N, S], L_s = the window's mean next-token loss. One window's forward and backward at a time: memory is
    the model, two float32 buffers per named weight and one window's activations."""
    weights = {n: model.get_submodule(n).weight for n in names}
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    g = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    g2 = {n: torch.zeros_like(t) for n, t in g.items()}
    try:
        with torch.enable_grad():
            for window in samples:
                window = window.view(1, -1).to(next(iter(weights.values())).device)
                logits = model(window)[0, :-1]
                loss = F.cross_entropy(logits.float(), window[0, 1:])
                for n, grad in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
                    grad = grad.float()
                    g[n] += grad
                    g2[n] += grad * grad
    finally:
        for p, was in trainable.items():
            p.requires_grad_(was)
    return {n: (g[n] / len(samples), g2[n] / len(samples)) for n in names}


def element_scores(criterion: str, w: torch.Tensor, stats=None) -> torch.Tensor:
    """The criterion's score of each weight (l2: w², the group's root is taken after summing)."""
    if criterion == "l1":
        return w.abs()
    if criterion == "l2":
        return w * w
    g, fisher = stats
    second = 0.5 * w * w * fisher
    return {"taylor": lambda: (w * g).abs(), "taylor2": lambda: second,
            "taylor-mix": lambda: (w * g - second).abs()}[criterion]()


def group_importance(model, criterion: str, keys: list, stats: dict = None, seed: int = 0) -> dict:
    """{(block index, kind): [G] importance of each coupled group} for the (block, kind) keys."""
    draws = torch.Generator().manual_seed(seed)
    importance = {}
    for i, kind in keys:
        members = coupled_groups(model.layers[i])[kind]
        if criterion == "random":
            importance[(i, kind)] = torch.rand(members[0][2].shape[0], generator=draws, dtype=torch.float64)
            continue
        total = 0
        for name, axis, index in members:
            full = f"layers.{i}.{name}"
            s = element_scores(criterion, model.get_submodule(full).weight.detach().double(),
                               [t.double() for t in stats[full]] if criterion in GRADIENT_CRITERIA else None)
            total = total + (s if axis == 0 else s.T)[index].sum((1, 2))  # [G, k, other] -> [G]
        importance[(i, kind)] = total.sqrt() if criterion == "l2" else total
    return importance


def group_params(block, kind: str) -> int:
    """Weights in one group of this kind in this block."""
    return sum(index.shape[1] * block.get_submodule(name).weight.shape[1 - axis]
               for name, axis, index in coupled_groups(block)[kind])


def choose_kept(importance: dict, sizes: dict, ratio: float, scope: str, multiples: dict = None) -> dict:
    """{(block, kind): sorted indices of the groups kept}: the least important groups go until the removed
    parameters are nearest ratio × the pool's (a pool: one (block, kind), or with global scope one kind in all
    blocks); then each block keeps its most important groups, as many as the nearest multiple of
    multiples[kind] (default 1). ValueError if a block would lose every group of a kind."""
    removed = {key: torch.zeros(len(v), dtype=torch.bool) for key, v in importance.items()}
    if scope == "block":
        pools = [[key] for key in importance]
    else:
        pools = [[key for key in importance if key[1] == kind] for kind in dict.fromkeys(k for _, k in importance)]
    for keys in pools:
        scores = torch.cat([importance[k] for k in keys])
        size = torch.cat([torch.full((len(importance[k]),), float(sizes[k]), dtype=torch.float64) for k in keys])
        owners = [(k, j) for k in keys for j in range(len(importance[k]))]
        order = torch.argsort(scores, stable=True)
        middles = torch.cumsum(size[order], 0) - size[order] / 2  # a group goes if its middle is within the target
        for o in order[:int((middles <= ratio * size.sum()).sum())].tolist():
            key, j = owners[o]
            removed[key][j] = True
    for (i, kind), gone in removed.items():
        if gone.all():
            raise ValueError(f"pruning at ratio {ratio} would remove every {GROUP_WHAT[kind]} of block {i}: lower "
                             "the ratio, rank per block (block scope) or keep that block whole")
    kept = {}
    for key, gone in removed.items():
        m = (multiples or {}).get(key[1], 1)
        n = min(len(gone), max(m, round(int((~gone).sum()) / m) * m))
        kept[key] = torch.argsort(importance[key], stable=True)[len(gone) - n:].sort().values  # ties: as the pools
    return kept


def prune_model(model, kept: dict) -> Transformer:
    """A new model with only the kept groups ({(block, kind): group indices}); the rest of the state is shared."""
    state = model.state_dict()
    for (i, kind), groups in kept.items():
        for name, axis, index in coupled_groups(model.layers[i])[kind]:
            key = f"layers.{i}.{name}.weight"
            state[key] = state[key].index_select(axis, index[groups].flatten().to(state[key].device))
    sizes = {"layer_n_head": [], "layer_n_local_heads": [], "layer_intermediate_size": []}
    for i, block in enumerate(model.layers):
        kv_heads = block.attention.n_local_heads
        if (i, "attention") in kept:
            kv_heads = len(kept[(i, "attention")])
        sizes["layer_n_head"].append(kv_heads * (block.attention.n_head // block.attention.n_local_heads))
        sizes["layer_n_local_heads"].append(kv_heads)
        sizes["layer_intermediate_size"].append(state[f"layers.{i}.feed_forward.w1.weight"].shape[0])
    uniform = {"layer_n_head": model.args.n_head, "layer_n_local_heads": model.args.n_local_heads,
               "layer_intermediate_size": model.args.intermediate_size}
    args = replace(model.args, **{k: None if all(v == uniform[k] for v in vs) else vs for k, vs in sizes.items()})
    with torch.device("meta"):
        pruned = Transformer(args)
    pruned.load_state_dict(state, assign=True)
    pruned.tie_head()
    return pruned.eval()


def pruned_keys(model, s: PruneSettings) -> list:
    """(block index, kind) of every group kind the settings prune."""
    n_layer = len(model.layers)
    blocks = range(s.keep_first, n_layer - s.keep_last)
    if not blocks:
        raise ValueError(f"keeping the first {s.keep_first} and last {s.keep_last} of {n_layer} blocks leaves "
                         "none to prune")
    return [(i, kind) for i in blocks for kind in PARTS[s.parts]]


def prunable_linears(model, s: PruneSettings) -> list:
    """Names of the linears the settings prune (float ones: a quantized layer cannot be sliced)."""
    names = [f"layers.{i}.{n}" for i, kind in pruned_keys(model, s) for n, _, _ in coupled_groups(model.layers[i])[kind]]
    for n in names:
        if type(model.get_submodule(n)) is not Linear:
            raise ValueError(f"{n} is not a float linear layer: prune a float model (then quantize the result)")
    return names


def prune(model, s: PruneSettings, calib: torch.Tensor = None, log=print, stats: dict = None) -> tuple:
    """Score the coupled groups of the blocks not kept and remove the least important. calib [N, S]: token windows
    for the gradient criteria, or stats: gradient_stats over prunable_linears computed before (a benchmark reuses
    them across ratios). Returns (the pruned model, a record of what was done). The input model is unchanged."""
    keys, names = pruned_keys(model, s), prunable_linears(model, s)
    blocks = range(keys[0][0], keys[-1][0] + 1)
    sizes = {(i, kind): group_params(model.layers[i], kind) for i, kind in keys}
    counts = {(i, kind): coupled_groups(model.layers[i])[kind][0][2].shape[0] for i, kind in keys}
    multiples = {"feed_forward": s.channel_multiple}
    if s.scope == "block":  # how many go from each block does not depend on the scores: refuse before scoring
        choose_kept({k: torch.zeros(c) for k, c in counts.items()}, sizes, s.ratio, s.scope, multiples)
    if s.criterion in GRADIENT_CRITERIA and stats is None:
        if calib is None:
            raise ValueError(f"criterion {s.criterion} needs calibration windows")
        log(f"gradients over {calib.shape[0]} windows of {calib.shape[1]} tokens")
        stats = gradient_stats(model, calib, names)
    kept = choose_kept(group_importance(model, s.criterion, keys, stats, s.seed), sizes, s.ratio, s.scope, multiples)
    pruned = prune_model(model, kept)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    removed = {kind: sum(sizes[k] * (counts[k] - len(kept[k])) for k in keys if k[1] == kind) /
               sum(sizes[k] * counts[k] for k in keys if k[1] == kind) for kind in PARTS[s.parts]}
    record = {**vars(s), "blocks_pruned": [blocks.start, blocks.stop], "params_before": before,
              "params_after": after, "removed_fraction": {k: round(v, 6) for k, v in removed.items()}}
    return pruned, record
