"""Pack unsigned integer weight codes of the scalar bit widths (kernels/formats.py: 2, 3, 4, 8) into bytes along K,
and dequantize them.

Every format is the same little-endian bit stream: code k of a row sits at bits k*bits .. k*bits+bits-1 of that
row's bytes (int4: k=2j low nibble of byte j; int2: 4j+i at bits 2i of byte j; int3: 8 codes per 3-byte
little-endian word, code 8j+i at bits 3i of word j). A "word" is the shortest run of whole bytes holding whole
codes (the table's codes_per_word and word_bytes), so packing and unpacking are shifts on a
[..., words, codes_per_word] view: plain tensor ops that run on any device and trace under torch.compile (no
data-dependent checks in unpack or dequantize_packed). dequantize_packed reads this packed layout only;
kernels.dispatch.dequantize_weight reads QuantLinear's stored layout (8-bit codes offset to signed int8).

W[n, k] ~= (q[n, k] - z[n, k // g]) * s[n, k // g], scales s and zeros z of shape [N, K // g].
"""
import torch

from kernels.formats import scalar_format


def word_layout(bits: int) -> tuple[int, int]:
    """(codes per word, bytes per word) from the format table: int2 (4, 1), int3 (8, 3), int4 (2, 1), int8 (1, 1)."""
    fmt = scalar_format(bits)
    return fmt.codes_per_word, fmt.word_bytes


def packed_size(k: int, bits: int) -> int:
    """Bytes per packed row of k codes (k * bits / 8); k must fill whole words."""
    codes_per_word, word_bytes = word_layout(bits)
    if k <= 0 or k % codes_per_word:
        raise ValueError(f"{bits}-bit packing needs K to be a positive multiple of {codes_per_word}, got K={k}")
    return k // codes_per_word * word_bytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., K] in [0, 2^bits) -> packed uint8 [..., K * bits / 8]."""
    codes_per_word, word_bytes = word_layout(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (K is the last)")
    packed_size(codes.shape[-1], bits)
    if codes.numel():
        low, high = int(codes.min()), int(codes.max())  # python ints: a uint8 tensor compares 256 as 0
        if low < 0 or high >= 1 << bits:
            raise ValueError(f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}], got [{low}, {high}]")
    if codes_per_word == 1 and word_bytes == 1:  # a code per byte
        return codes.to(torch.uint8)
    c = codes.to(torch.int32).unflatten(-1, (-1, codes_per_word))
    shifts = bits * torch.arange(codes_per_word, dtype=torch.int32, device=codes.device)
    word = (c << shifts).sum(-1)  # the codes occupy disjoint bits, so the sum is their bitwise or
    byte_shifts = 8 * torch.arange(word_bytes, dtype=torch.int32, device=codes.device)
    return ((word.unsqueeze(-1) >> byte_shifts) & 255).flatten(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Packed uint8 [..., K * bits / 8] -> uint8 codes [..., K]."""
    codes_per_word, word_bytes = word_layout(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed weights must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != packed_size(k, bits):
        raise ValueError(f"{bits}-bit codes with K={k} pack into {packed_size(k, bits)} bytes per row, "
                         f"got packed shape {tuple(packed.shape)}")
    if codes_per_word == 1 and word_bytes == 1:
        return packed
    b = packed.to(torch.int32).unflatten(-1, (-1, word_bytes))
    word = b[..., 0]
    for i in range(1, word_bytes):  # int3: assemble the 24-bit little-endian word
        word = word | (b[..., i] << (8 * i))
    shifts = bits * torch.arange(codes_per_word, dtype=torch.int32, device=packed.device)
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2).to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return pack(codes, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return unpack(packed, 4, packed.shape[-1] * 2)


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    return pack(codes, 2)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    return unpack(packed, 2, packed.shape[-1] * 4)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    return pack(codes, 3)


def unpack_int3(packed: torch.Tensor) -> torch.Tensor:
    if packed.shape[-1] % 3:
        raise ValueError(f"3-bit packed rows are whole 3-byte words, got {packed.shape[-1]} bytes per row")
    return unpack(packed, 3, packed.shape[-1] // 3 * 8)


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, zeros, bits: int, group_size: int,
               k: int) -> torch.Tensor:
    """float32 [..., K] weights (q - z) * s from packed codes and per-group scales and zeros
    [..., ceil(K / group_size)]; when group_size does not divide K the last group is shorter.
    zeros None means symmetric: z = 2^(bits-1)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    q = unpack(packed, bits, k).float()
    groups = (*q.shape[:-1], -(-k // group_size))
    if scales.shape != groups or (zeros is not None and zeros.shape != groups):
        raise ValueError(f"scales and zeros must have shape {groups}, got {tuple(scales.shape)} and "
                         f"{None if zeros is None else tuple(zeros.shape)}")
    s = scales.float().repeat_interleave(group_size, dim=-1)[..., :k]
    z = 2 ** (bits - 1) if zeros is None else zeros.float().repeat_interleave(group_size, dim=-1)[..., :k]
    return (q - z) * s
