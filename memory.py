"""Where loaded weights live: on CPU, one block of anonymous memory backed by 2 MB transparent huge pages, each
tensor 64-byte aligned; elsewhere, plain copies on the device."""
import mmap

import torch

HUGE_PAGE = 2 << 20


def into_fresh_memory(state: dict, device, dtype) -> dict:
    """The loaded tensors on `device`, floats in `dtype`. On CPU they are copied side by side into one block of
    anonymous memory that asks Linux for 2 MB transparent huge pages. Decode streams every weight once per token,
    and with 4 KB pages each page costs a TLB miss and a restart of the hardware prefetcher. Tensors straight from
    safetensors map the file, at any byte alignment, which the CPU int8/int4 kernels crash on; the copy fixes that."""
    want = {k: dtype if v.is_floating_point() else v.dtype for k, v in state.items()}
    if torch.device(device).type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return {k: v.to(device=device, dtype=want[k], copy=True) for k, v in state.items()}
    first = {}  # tied tensors (embedding and head) appear twice in state: copy them once
    for k, v in state.items():
        first.setdefault(id(v), k)
    nbytes = {k: state[k].numel() * want[k].itemsize for k in first.values()}
    spans = {k: -(-n // 64) * 64 for k, n in nbytes.items()}  # each tensor starts 64-byte aligned
    block = mmap.mmap(-1, sum(spans.values()) + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # shared memory gets no THP
    try:
        block.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without transparent huge pages: 4 KB pages, still one aligned block
        pass
    raw = torch.frombuffer(block, dtype=torch.uint8)  # the tensors keep the block alive
    offset = -raw.data_ptr() % HUGE_PAGE
    copies = {}
    for k, span in spans.items():
        copies[k] = raw[offset:offset + nbytes[k]].view(want[k]).view(state[k].shape).copy_(state[k])
        offset += span
    return {k: copies[first[id(v)]] for k, v in state.items()}
