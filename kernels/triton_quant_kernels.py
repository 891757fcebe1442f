"""Triton kernels for Y[M, N] = X[M, K] @ W^T with W dequantized on the fly from packed codes (kernels/formats.py).

Imported lazily by kernels/triton_quant.py (so a machine without triton can still import that). Triton decides
between compiling and interpreting (TRITON_INTERPRET=1) when a kernel is defined, i.e. when this module is imported.

Both kernels take K tiles of BLOCK_K codes with BLOCK_K dividing the group size, so a tile has one scale and one
zero per output column. Packed rows (kernels/packing.py) are runs of words of WORD_BYTES bytes holding
CODES_PER_WORD codes each; row_bytes and groups are the row strides of packed and of scales/zeros, passed (not
derived from K) so that Triton sees their divisibility by 16 and vectorizes the loads.
"""
import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def gemv_configs():
    if INTERPRET:  # one config: the interpreter runs every program in Python
        return [triton.Config({"BLOCK_N": 64})]
    return [triton.Config({"BLOCK_N": n}, num_warps=w) for n in (8, 16, 32) for w in (2, 4)]


def gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 64, 4, 4),
                               (16, 64, 4, 4))]


@triton.jit
def load_words(packed_ptr, row_bytes, offs_n, n_mask, word0, WORDS: tl.constexpr, WORD_BYTES: tl.constexpr):
    """int32 [len(offs_n), WORDS]: words word0 .. word0+WORDS-1 of rows offs_n, each packed byte loaded once."""
    ptrs = packed_ptr + offs_n[:, None] * row_bytes + (word0 + tl.arange(0, WORDS))[None, :] * WORD_BYTES
    word = tl.load(ptrs, mask=n_mask[:, None], other=0).to(tl.int32)
    for b in tl.static_range(1, WORD_BYTES):  # int3: the 24-bit little-endian word spans 3 bytes
        word |= tl.load(ptrs + b, mask=n_mask[:, None], other=0).to(tl.int32) << (8 * b)
    return word


@triton.jit
def code_plane(word, c: tl.constexpr, BITS: tl.constexpr):
    """Code c of every word."""
    return (word >> (c * BITS)) & ((1 << BITS) - 1)


@triton.jit
def unpack_words(word, BITS: tl.constexpr, CODES_PER_WORD: tl.constexpr):
    """[R, W] words -> [R, W * CODES_PER_WORD] codes in k order. Interleaving the code planes keeps a word's codes
    in one thread; reshaping a [R, W, CODES_PER_WORD] tensor instead spreads them over threads (in the gemm: about
    twice the registers, and spills)."""
    if CODES_PER_WORD == 1:
        codes = word
    elif CODES_PER_WORD == 2:
        codes = tl.interleave(code_plane(word, 0, BITS), code_plane(word, 1, BITS))
    elif CODES_PER_WORD == 4:
        codes = tl.interleave(tl.interleave(code_plane(word, 0, BITS), code_plane(word, 2, BITS)),
                              tl.interleave(code_plane(word, 1, BITS), code_plane(word, 3, BITS)))
    else:
        tl.static_assert(CODES_PER_WORD == 8)
        codes = tl.interleave(
            tl.interleave(tl.interleave(code_plane(word, 0, BITS), code_plane(word, 4, BITS)),
                          tl.interleave(code_plane(word, 2, BITS), code_plane(word, 6, BITS))),
            tl.interleave(tl.interleave(code_plane(word, 1, BITS), code_plane(word, 5, BITS)),
                          tl.interleave(code_plane(word, 3, BITS), code_plane(word, 7, BITS))))
    return codes


@triton.autotune(configs=gemv_configs(), key=["N", "K", "BITS", "GROUP"])
@triton.jit
def gemv_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, y_ptr, N, K, row_bytes, groups,
                BITS: tl.constexpr, GROUP: tl.constexpr, CODES_PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Decode: a program owns row m and BLOCK_N columns of Y and runs over all of K, reading each packed byte once.
    Everything stays [columns, words], the layout the packed tile is loaded in: code c of every word is one plane,
    multiplied by the x values at k = word * CODES_PER_WORD + c. Per tile s * (x.q - z * sum(x)) takes the zero
    and scale out of the per-code work, and K is summed once at the end. Programs of one column block sit next to
    each other in the grid (m fastest), so for M > 1 the other rows find the weights in L2."""
    WORDS: tl.constexpr = BLOCK_K // CODES_PER_WORD
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        word = load_words(packed_ptr, row_bytes, offs_n, n_mask, k0 // CODES_PER_WORD, WORDS, WORD_BYTES)
        xq = tl.zeros([BLOCK_N, WORDS], dtype=tl.float32)
        x_sum = tl.zeros([WORDS], dtype=tl.float32)
        for c in tl.static_range(CODES_PER_WORD):
            q = code_plane(word, c, BITS).to(tl.float32)
            x = tl.load(x_ptr + m * K + k0 + offs_w * CODES_PER_WORD + c).to(tl.float32)
            xq += x[None, :] * q
            x_sum += x
        s = tl.load(scales_ptr + offs_n * groups + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * groups + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        acc += s[:, None] * (xq - z[:, None] * x_sum[None, :])
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + m * N + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K", "BITS", "GROUP"])
@triton.jit
def gemm_kernel(x_ptr, packed_ptr, scales_ptr, zeros_ptr, y_ptr, M, N, K, row_bytes, groups, M_BUCKET,
                BITS: tl.constexpr, GROUP: tl.constexpr, CODES_PER_WORD: tl.constexpr, WORD_BYTES: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Prefill: dequantize a [BLOCK_N, BLOCK_K] weight tile to x's dtype, then tl.dot. M_BUCKET (a power of two)
    is only the autotune key, so a new prompt length reuses the tuning of its size class."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    # M fastest: neighbouring programs read the same weight tiles, which then come from L2
    offs_m = (pid % grid_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid // grid_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None] * K + k0 + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        if INTERPRET:  # the interpreter holds bf16 as uint16 and its dot would multiply those integers
            x = x.to(tl.float32)
        word = load_words(packed_ptr, row_bytes, offs_n, n_mask, k0 // CODES_PER_WORD, BLOCK_K // CODES_PER_WORD,
                          WORD_BYTES)
        q = unpack_words(word, BITS, CODES_PER_WORD).to(tl.float32)
        s = tl.load(scales_ptr + offs_n * groups + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zeros_ptr + offs_n * groups + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q - z[:, None]) * s[:, None]).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
