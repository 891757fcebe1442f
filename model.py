"""One Llama-family transformer: GQA, RoPE (with Llama-3 scaling), RMSNorm, SwiGLU, static KV cache.

Rotary embeddings use the interleaved (Meta / GGUF) layout: pairs (2i, 2i+1) of each head rotate together.
Hugging Face checkpoints store Q/K permuted for the rotate-half layout; the converter undoes that.
"""
import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import cpu as cpu_kernels
from kernels.dispatch import dense_gemv_fits, few_query_attention_fits
from kernels.formats import FEW_ROWS


@dataclass
class ModelArgs:
    block_size: int = 2048  # longest context the rope table and KV cache can hold
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 11008
    n_local_heads: int = -1  # key/value heads (GQA); -1 means n_head
    head_dim: int = -1  # -1 means dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_scaling: Optional[dict] = field(default=None)  # Llama-3.1 style: factor, low/high_freq_factor, original_max_position_embeddings
    # Per-block sizes of a structurally pruned model (prune.py), one entry per block; None: the uniform value above.
    layer_n_head: Optional[list] = None
    layer_n_local_heads: Optional[list] = None
    layer_intermediate_size: Optional[list] = None

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("n_local_heads", "head_dim"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (or -1 for the default)")
        if not (self.rope_base > 0 and self.norm_eps > 0):
            raise ValueError(f"rope_base={self.rope_base} and norm_eps={self.norm_eps} must be > 0")
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")
        if self.head_dim % 2 or self.head_dim < 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.rope_scaling is not None:
            keys = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if set(self.rope_scaling) != keys or not all(_is_number(v) and v > 0 for v in self.rope_scaling.values()):
                raise ValueError(f"rope_scaling must map {sorted(keys)} to positive numbers, got {self.rope_scaling}")
        for name in PER_BLOCK_FIELDS:
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.n_layer or not all(_is_int(v) and v >= 1 for v in sizes)):
                raise ValueError(f"{name} must list n_layer={self.n_layer} whole numbers >= 1, got {sizes}")
        if any(getattr(self, name) is not None for name in PER_BLOCK_FIELDS):  # (their lengths are n_layer)
            for i in range(self.n_layer):
                self.for_block(i)  # each block's head counts must agree (GQA)

    def for_block(self, i: int) -> "ModelArgs":
        """The arguments of block i: its own head counts and FFN width (a pruned model's differ per block), as
        uniform values. head_dim is already resolved, so it stays the model's."""
        if all(getattr(self, name) is None for name in PER_BLOCK_FIELDS):
            return self
        n_head = self.layer_n_head[i] if self.layer_n_head else self.n_head
        n_local_heads = self.layer_n_local_heads[i] if self.layer_n_local_heads else self.n_local_heads
        intermediate_size = self.layer_intermediate_size[i] if self.layer_intermediate_size else self.intermediate_size
        try:
            return replace(self, n_head=n_head, n_local_heads=n_local_heads, intermediate_size=intermediate_size,
                           layer_n_head=None, layer_n_local_heads=None, layer_intermediate_size=None)
        except ValueError as e:
            raise ValueError(f"block {i}: {e}") from None

    def to_dict(self) -> dict:
        """The stored form (config.json's model_args): a uniform model stores no per-block lists, so its config
        and fingerprint read as before pruning existed."""
        return {k: v for k, v in vars(self).items() if not (k in PER_BLOCK_FIELDS and v is None)}

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """From a stored config (config.json's model_args): every field of the right type and range."""
        if not isinstance(d, dict):
            raise ValueError(f"model_args must be an object, got {type(d).__name__}")
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(kinds)
        if unknown:
            raise ValueError(f"unknown ModelArgs fields: {sorted(unknown)}")
        for name, v in d.items():
            ok = {int: _is_int(v), float: _is_number(v), bool: isinstance(v, bool),
                  Optional[list]: v is None or isinstance(v, list) and all(_is_int(x) for x in v)}.get(
                kinds[name], v is None or isinstance(v, dict))
            if not ok:
                expected = {int: "a whole number", float: "a number", bool: "true or false",
                            Optional[list]: "a list of whole numbers or null"}.get(kinds[name], "an object or null")
                raise ValueError(f"model_args.{name}: expected {expected}, got {v!r}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"model_args: {e}") from None


PER_BLOCK_FIELDS = ("layer_n_head", "layer_n_local_heads", "layer_intermediate_size")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_LLAMA31_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_ROPE = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

CONFIGS = {
    "llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, intermediate_size=11008, block_size=4096),
    "llama-2-13b": dict(n_layer=40, n_head=40, dim=5120, intermediate_size=13824, block_size=4096),
    "llama-2-70b": dict(n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, block_size=4096),
    "llama-3-8b": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256,
                       rope_base=500000.0, block_size=8192),
    "llama-3-70b": dict(n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, vocab_size=128256,
                        rope_base=500000.0, block_size=8192),
    "llama-3.1-8b": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256,
                         rope_base=500000.0, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "llama-3.1-70b": dict(n_layer=80, n_head=64, n_local_heads=8, dim=8192, intermediate_size=28672, vocab_size=128256,
                          rope_base=500000.0, block_size=131072, rope_scaling=_LLAMA31_ROPE),
    "llama-3.2-1b": dict(n_layer=16, n_head=32, n_local_heads=8, dim=2048, intermediate_size=8192, vocab_size=128256,
                         rope_base=500000.0, block_size=131072, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    "llama-3.2-3b": dict(n_layer=28, n_head=24, n_local_heads=8, dim=3072, intermediate_size=8192, vocab_size=128256,
                         rope_base=500000.0, block_size=131072, rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    "mistral-7b": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, block_size=32768,
                       rope_base=1000000.0),
    "tinyllama-1.1b": dict(n_layer=22, n_head=32, n_local_heads=4, dim=2048, intermediate_size=5632, block_size=2048),
    "smollm2-135m": dict(n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000.0, block_size=8192, tie_embeddings=True),
    "smollm2-360m": dict(n_layer=32, n_head=15, n_local_heads=5, dim=960, intermediate_size=2560, vocab_size=49152,
                         rope_base=100000.0, block_size=8192, tie_embeddings=True),
    "smollm2-1.7b": dict(n_layer=24, n_head=32, n_local_heads=32, dim=2048, intermediate_size=8192, vocab_size=49152,
                         rope_base=130000.0, block_size=8192, tie_embeddings=True),
}


def few_tokens_on_compiled_cpu(x: torch.Tensor) -> bool:
    """Up to FEW_ROWS tokens per forward (decode, speculative verify, small batches): the fused CPU path."""
    return x.device.type == "cpu" and x.shape[:-1].numel() <= FEW_ROWS and torch.compiler.is_compiling()


class Linear(nn.Linear):
    """nn.Linear without bias, with faster CPU paths for a few tokens (decode, speculative verify)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if dense_gemv_fits(x, self.weight):
            # C++ (kernels/cpu_dense.cpp) for 1-8 tokens (decode, speculative verify): stays near the memory bound
            # at 4 tokens where the loop below turns compute-bound, and sums each token alike at any count.
            return cpu_kernels.dense_gemv(x, self.weight)
        if few_tokens_on_compiled_cpu(x):  # no C++ kernels (not built, or fp16)
            # One multiply-and-sum per token: Inductor fuses them into one vectorized loop that reads each weight
            # row once for all tokens, faster than its matrix-multiply call at batch 1 (and far faster at 2-8
            # rows on CPUs where MKL takes a slow path).
            # x is stored once first: left to itself Inductor inlines x's producer (RMSNorm, SiLU * gate) into
            # this loop and recomputes it for every weight row, once per row and per token.
            import torch._inductor.inductor_prims  # noqa: F401 (registers the prim; imported already when compiling)
            w, rows = self.weight.float(), x.float().reshape(-1, x.shape[-1])
            rows = torch.ops.prims.inductor_force_stride_order(rows, rows.stride())
            y = torch.stack([(w * rows[i]).sum(-1) for i in range(rows.shape[0])])
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        return F.linear(x, self.weight)


def float_linear(name: str, in_features: int, out_features: int) -> nn.Module:
    """The one place a float linear layer is made; quantized models pass qlinear.quantized_linear_factory."""
    return Linear(in_features, out_features)


class KVCache(nn.Module):
    """Preallocated keys/values, written in place so decode keeps fixed shapes (one compiled graph)."""

    def __init__(self, batch_size, max_seq_length, n_heads, head_dim, dtype):
        super().__init__()
        shape = (batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: [S], or [B, S] when each row has its own positions; k, v: [B, H, S, D]
        if input_pos.dim() == 1:
            self.k_cache[:, :, input_pos] = k
            self.v_cache[:, :, input_pos] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
            self.k_cache[rows, :, input_pos] = k.transpose(1, 2)
            self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache, self.v_cache


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, linear: Callable[[str, int, int], nn.Module] = float_linear):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args.for_block(i), i, linear) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = linear("output", args.dim, args.vocab_size)
        self.tie_head()
        self.max_batch_size = -1
        self.max_seq_length = -1

    def tie_head(self):
        """The one place a tied head is tied to the embedding (a no-op for untied models; safe to repeat, e.g.
        after load_state_dict(assign=True) or after the head is replaced). A float head shares the embedding's
        weight; a quantized head (one with `as_embedding()`, qlinear.QuantLinear) becomes the embedding, which
        then reads the head's codes."""
        if not self.args.tie_embeddings:
            return
        if isinstance(self.output, Linear):
            self.output.weight = self.tok_embeddings.weight
        elif hasattr(self.output, "as_embedding"):
            self.tok_embeddings = self.output.as_embedding()

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: Optional[int] = None,
                   rows: Optional[int] = None) -> torch.Tensor:
        """Hidden states x [B, S, dim] through blocks start..end-1 (end None: to the last block), one causal
        pass without the KV cache, as forward() runs them without input_pos. rows: run that many rows of x at a
        time (calibration runs one sample at a time, so its memory and forward hooks see one sample each)."""
        freqs = precompute_freqs_cis(self.args, x.shape[1]).to(x.device)
        for block in self.layers[start:end]:
            if rows is None:
                x = block(x, freqs=freqs, mask=None, input_pos=None)
                continue
            out = torch.empty_like(x)
            for j in range(0, x.shape[0], rows):
                out[j:j + rows] = block(x[j:j + rows], freqs=freqs, mask=None, input_pos=None)
            x = out
        return x

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None, device=None):
        if max_seq_length > self.args.block_size:
            raise ValueError(f"context of {max_seq_length} tokens exceeds the model's block_size {self.args.block_size}")
        dtype = dtype or self.norm.weight.dtype  # norms stay float even when everything else is quantized
        device = device or self.norm.weight.device
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, layer.attention.n_local_heads,
                                               layer.attention.head_dim, dtype).to(device)
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.args, max_seq_length).to(device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx: [B, S] tokens. With input_pos attention reads and writes the KV cache: [S] positions shared by
        all rows, or [B, S] (rows of different lengths in batched generation). Without it, a plain causal
        forward over the whole sequence (training, scoring)."""
        if input_pos is None:
            seq = idx.shape[1]
            freqs = precompute_freqs_cis(self.args, seq).to(idx.device)
            mask = None
        else:
            freqs = self.freqs_cis[input_pos]
            mask = self.causal_mask[input_pos].view(-1, 1, idx.shape[1], self.max_seq_length)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        return self.output(self.norm(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, i: int, linear):
        super().__init__()
        self.attention = Attention(args, f"layers.{i}.attention", linear)
        self.feed_forward = FeedForward(args, f"layers.{i}.feed_forward", linear)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, name: str, linear):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.wq = linear(f"{name}.wq", args.dim, args.n_head * args.head_dim)
        self.wk = linear(f"{name}.wk", args.dim, args.n_local_heads * args.head_dim)
        self.wv = linear(f"{name}.wv", args.dim, args.n_local_heads * args.head_dim)
        self.wo = linear(f"{name}.wo", args.n_head * args.head_dim, args.dim)
        self.wqkv: Optional[nn.Module] = None  # wq|wk|wv as one layer, set for inference by qlinear.fuse_projections
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, freqs, mask, input_pos):
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            kv_size = self.n_local_heads * self.head_dim
            q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if few_query_attention_fits(q, k, input_pos):
            # C++ (kernels/cpu_attention.cpp): reads only the visible cache positions; the causal mask is implied
            y = cpu_kernels.few_query_attention(q, k, v, input_pos)
        elif few_tokens_on_compiled_cpu(x):  # the C++ kernels could not be built
            y = few_query_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).contiguous().view(bsz, seqlen, self.n_head * self.head_dim)
        return self.wo(y)


def few_query_attention(q, k, v, mask):
    """Attention of a few query tokens, as multiply-and-sum reductions that Inductor fuses into a few
    vectorized loops (SDPA's CPU kernel costs more than the math at this size). GQA by broadcasting, no copies."""
    b, h, s, d = q.shape
    kv_heads = k.shape[1]
    q = q.view(b, kv_heads, h // kv_heads, s, 1, d).float()
    scores = (q * k.view(b, kv_heads, 1, 1, -1, d).float()).sum(-1) / math.sqrt(d)  # [b, kv, rep, s, S]
    scores = scores.masked_fill(~mask.view(mask.shape[0], 1, 1, s, -1), -float("inf"))
    p = scores.softmax(-1)
    y = (p.unsqueeze(-1) * v.view(b, kv_heads, 1, 1, -1, d).float()).sum(-2)  # [b, kv, rep, s, d]
    return y.view(b, h, s, d).to(v.dtype)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, name: str, linear):
        super().__init__()
        self.w1 = linear(f"{name}.w1", args.dim, args.intermediate_size)  # gate
        self.w3 = linear(f"{name}.w3", args.dim, args.intermediate_size)  # up
        self.w2 = linear(f"{name}.w2", args.intermediate_size, args.dim)  # down
        self.w13: Optional[nn.Module] = None  # w1|w3 as one layer, set for inference by qlinear.fuse_projections

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair inverse frequencies, with Llama-3.1 scaling (stretch long wavelengths, keep short ones)."""
    inv = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if not s:
        return inv
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inv / s["factor"] + smooth * inv
    return torch.where(wavelen > low_wavelen, inv / s["factor"], torch.where(wavelen < high_wavelen, inv, blended))


def precompute_freqs_cis(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """[seq_len, head_dim/2, 2] cos/sin table (real-valued so it compiles everywhere)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), rope_frequencies(args))
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D]; freqs: [S, D/2, 2] or [B, S, D/2, 2]; rotate adjacent pairs in fp32.
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(-1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)
