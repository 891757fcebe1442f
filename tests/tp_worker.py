"""Run by tests/test_tp.py under torchrun: each checkpoint split over the processes (tp.py); rank 0 saves the
logits of a plain forward, of a cached prefill and decode, and greedy tokens, for the test to compare with one
process."""
import sys

import torch

from checkpoint import load_model
from cli import init_distributed
from decoding import generate
from tp import apply_tensor_parallel

PROMPT = torch.tensor([3, 141, 59, 26, 53, 58, 97, 93, 238, 46, 26, 43])  # any ids of the tiny vocabulary


def outputs(model) -> dict:
    """What the test compares: plain-forward logits, cached prefill + one decode step's logits, greedy tokens."""
    with torch.no_grad():
        plain = model(PROMPT[None])
        model.setup_caches(1, 64)
        prefill = model(PROMPT[None], torch.arange(len(PROMPT)))
        decode = model(PROMPT[None, :1], torch.tensor([len(PROMPT)]))
    tokens, _ = generate(model, PROMPT, 16, temperature=0)
    return {"plain": plain, "prefill": prefill, "decode": decode, "tokens": tokens}


def main(out, checkpoints):
    torch.set_num_threads(1)
    rank, world, _ = init_distributed("cpu")
    results = {ckpt: outputs(apply_tensor_parallel(load_model(ckpt), rank, world)) for ckpt in checkpoints}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
