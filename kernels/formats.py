"""The weight formats bitfast stores and which kernel serves each: one table, read by the packing code, the kernel
dispatch, the Triton wrapper and the quantized-format parser, so a new format is a row here plus its kernels.

Today every row is a scalar format: each weight is one unsigned code of `bits` bits, dequantized as
(q - z) * s per group (kernels/packing.py). Codes pack little-endian along K into "words", the shortest run of
whole bytes holding whole codes. The next kinds (vector codebooks, lookup-table layouts) become further tables
or rows of their own dataclass next to ScalarFormat; nothing below assumes every format is scalar except
SCALAR_FORMATS' own readers.

This module imports nothing heavy (no torch), so anything may import it, the C++ build included.
"""
from dataclasses import dataclass
from typing import Optional

# "A few rows": up to this many rows of x (decode, a speculative verify step, small batches) take the few-row
# kernels: the CPU GEMV kernels (quant_gemv, dense_gemv, few_query_attention, built with this as
# BITFAST_MAX_ROWS), the Triton GEMV, and model.py's fused CPU path. A verify step scores speculate_k + 1 rows,
# so speculative decoding is bit-identical to plain decode only up to speculate_k = FEW_ROWS - 1.
FEW_ROWS = 8


@dataclass(frozen=True)
class ScalarFormat:
    """One scalar bit width: how its codes are stored and which kernels take them.

    codes_per_word, word_bytes: packed layout, codes_per_word codes in each little-endian word of word_bytes bytes.
    stored_signed: QuantLinear keeps the codes as int8 q - 2^(bits-1) (one code per byte) instead of packed uint8.
    cpu_gemv: kernels/cpu_quant.cpp's quant_gemv serves it (few rows, CPU).
    triton_group_multiple: the Triton kernels (kernels/triton_quant.py) take the packed layout when the group size
      divides K and is a multiple of this (a K tile has one scale; tl.dot needs 16); None: no Triton kernel.
    """
    bits: int
    codes_per_word: int
    word_bytes: int
    stored_signed: bool = False
    cpu_gemv: bool = True
    triton_group_multiple: Optional[int] = 16

    def triton_fits(self, k: int, group_size: int) -> bool:
        """Whether the Triton kernels take QuantLinear's stored weights of this format at this K and group size
        (0 = one group per row): the packed layout (not stored_signed) in the kernels' tiling."""
        m = self.triton_group_multiple
        g = group_size or k
        return not self.stored_signed and m is not None and g > 0 and k % g == 0 and g % m == 0


SCALAR_FORMATS: dict[int, ScalarFormat] = {f.bits: f for f in (
    ScalarFormat(2, codes_per_word=4, word_bytes=1),
    ScalarFormat(3, codes_per_word=8, word_bytes=3),
    ScalarFormat(4, codes_per_word=2, word_bytes=1),
    ScalarFormat(8, codes_per_word=1, word_bytes=1, stored_signed=True),
)}
SCALAR_BITS = tuple(SCALAR_FORMATS)  # (2, 3, 4, 8)


def scalar_format(bits: int) -> ScalarFormat:
    """The table row for `bits`; ValueError naming the widths there are."""
    try:
        return SCALAR_FORMATS[bits]
    except (KeyError, TypeError):
        raise ValueError(f"bits must be one of {SCALAR_BITS}, got {bits}") from None
