"""Tensor-parallel generation (Megatron-style, after gpt-fast's tp.py): each of the torchrun processes holds a
1/world slice of every block, and all of them run every token.

In each block the query/key/value projections and the FFN's gate and up projections (w1, w3) are split by output
rows ("column-wise"): a process computes its own query and key/value heads, and its own slice of the FFN's hidden
features. The attention output projection (wo) and the FFN's down projection (w2) are split by input features
("row-wise"), so each process's partial output is one all-reduce (a sum) away from the whole: one after the
attention and one after the FFN. The embedding, the norms and the head stay whole on every process, so every
process sees the same logits and picks the same tokens.

Quantized layers split with their rows: codes, scales and zeros of an output row go together; a row-wise split
cuts each row's input features, so the quantization group size must divide a process's share of them.

The model's modules keep their classes; only their tensors and head counts change (model.args then describes one
process's share, which is what setup_caches sizes the KV cache from). Each process loads the whole checkpoint and
keeps its slices: on a GPU the rest is freed; on the CPU the loaded block of memory (memory.py) stays, as the
embedding and norms live in it, so tensor parallelism there buys compute, not memory.
"""
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol

from kernels.packing import packed_size
from model import Transformer
from qlinear import QuantLinear


def check_divides(args, world: int):
    """Heads and FFN width must split evenly over the processes (a key/value head serves whole query groups)."""
    if args.n_head % world or args.n_local_heads % world:
        raise ValueError(f"tensor parallelism over {world} processes needs the query heads ({args.n_head}) and "
                         f"key/value heads ({args.n_local_heads}) to divide by {world}")
    if args.intermediate_size % world:
        raise ValueError(f"tensor parallelism over {world} processes needs the FFN width ({args.intermediate_size}) "
                         f"to divide by {world}")


def shard_linear(linear: nn.Module, name: str, dim: int, rank: int, world: int):
    """Keep this process's slice of a float Linear or a QuantLinear, in place: dim 0 splits the output rows
    (column-wise), dim 1 the input features (row-wise)."""
    if isinstance(linear, QuantLinear):
        _shard_quantized(linear, name, dim, rank, world)
        return
    # [N, K] -> [N/w, K] or [N, K/w]; a copy, not a view, so that on a GPU the whole weight's memory is freed
    weight = linear.weight.detach().chunk(world, dim)[rank].clone(memory_format=torch.contiguous_format)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def _shard_quantized(linear: QuantLinear, name: str, dim: int, rank: int, world: int):
    fmt, k = linear.fmt, linear.in_features
    codes = linear.codes()  # [N, K] unpacked, so the slice does not depend on the packing
    scales, zeros = linear.scales, linear.zeros  # [N, G]
    if dim == 0:
        rows = slice(rank * linear.out_features // world, (rank + 1) * linear.out_features // world)
        codes, scales, zeros = codes[rows], scales[rows], None if zeros is None else zeros[rows]
    else:
        share = k // world
        if fmt.group_size and share % fmt.group_size:
            raise ValueError(f"{name}: its {k} input features split over {world} processes are {share} each, not a "
                             f"multiple of {fmt.name}'s group size {fmt.group_size}; use fewer processes or a "
                             f"checkpoint quantized with a group size that divides {share}")
        try:
            packed_size(share, fmt.bits)
        except ValueError as e:
            raise ValueError(f"{name}: {world} processes would each hold {share} input features: {e}") from None
        codes = codes[:, rank * share:(rank + 1) * share]
        if fmt.group_size:  # per-channel scales cover the whole row: every process keeps them
            groups = slice(rank * share // fmt.group_size, (rank + 1) * share // fmt.group_size)
            scales, zeros = scales[:, groups], None if zeros is None else zeros[:, groups]
    linear.out_features, linear.in_features = codes.shape
    linear.set_codes(codes, scales.contiguous(), None if zeros is None else zeros.contiguous())


def _sum_over_processes(module, inputs, output):
    # funcol's all-reduce is traceable, so a compiled decode step keeps it inside its graph
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def apply_tensor_parallel(model: Transformer, rank: int, world: int) -> Transformer:
    """Split every block of a loaded model over `world` processes (this one is `rank`), in place; the process
    group must be initialized before the model runs. Call before setup_caches."""
    args = model.args
    check_divides(args, world)
    for i, block in enumerate(model.layers):
        attention, ffn = block.attention, block.feed_forward
        prefix = f"layers.{i}."
        for linear, name, dim in [(attention.wq, "attention.wq", 0), (attention.wk, "attention.wk", 0),
                                  (attention.wv, "attention.wv", 0), (attention.wo, "attention.wo", 1),
                                  (ffn.w1, "feed_forward.w1", 0), (ffn.w3, "feed_forward.w3", 0),
                                  (ffn.w2, "feed_forward.w2", 1)]:
            shard_linear(linear, prefix + name, dim, rank, world)
        attention.n_head //= world
        attention.n_local_heads //= world
        attention.register_forward_hook(_sum_over_processes)
        ffn.register_forward_hook(_sum_over_processes)
    model.args = replace(args, n_head=args.n_head // world, n_local_heads=args.n_local_heads // world,
                         intermediate_size=args.intermediate_size // world)
    return model
