"""Perplexity as the GPTQ and AWQ papers measure it: the token stream cut into non-overlapping windows of
`context` tokens, each run on its own (no KV cache, no state carried between windows), next-token NLL
scored at positions 1..context-1 of every window, perplexity = exp(mean NLL). The ragged tail shorter than
one window is dropped. The stream is the evaluation split of a corpus (see eval/data.py) or a user's file,
encoded in one piece, with a leading bos only if the tokenizer adds one to prompts.

    python eval/perplexity.py --corpus boolq --context 2048
    python eval/perplexity.py --checkpoint checkpoints/my-model --text_file notes.txt --max_tokens 50000
    python eval/perplexity.py --checkpoint checkpoints/my-model --adapter out/lora/adapter   # with a LoRA adapter
"""
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import load_model, load_tokenizer_for  # noqa: E402
from convert import resolve_checkpoint  # noqa: E402
import cli  # noqa: E402
from cli import add_device_args, run, setup_device  # noqa: E402
from eval.data import CORPORA, corpus_text, load_text_file  # noqa: E402
from lora import load_adapter  # noqa: E402


# no_grad, not inference_mode: an FSDP-sharded student (train_qat.py --fsdp) gathers its weights into buffers it
# reuses when training goes on, and a tensor made under inference_mode cannot be written outside it.
@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, context: int = 2048, batch_size: int = 1, device=None) -> dict:
    """tokens: [N] ids. Returns {"ppl", "nll" (mean per scored token), "tokens" (scored), "windows"}."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if context > model.args.block_size:
        raise ValueError(f"context of {context} tokens exceeds the model's block_size {model.args.block_size}")
    windows = tokens.numel() // context
    if windows == 0:
        raise ValueError(f"{tokens.numel()} tokens is less than one window of context {context}")
    device = device or next(model.parameters()).device
    stream = tokens[:windows * context].view(windows, context).to(device, torch.long)
    total_nll = 0.0
    for i in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not sys.stderr.isatty()):
        batch = stream[i:i + batch_size]
        logits = model(batch)[:, :-1]
        # float32 log-softmax even for a bf16 model: bf16 rounding of log-probabilities would bias the score.
        total_nll += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    scored = windows * (context - 1)
    nll = total_nll / scored
    return {"ppl": math.exp(nll), "nll": nll, "tokens": scored, "windows": windows}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="bitfast checkpoint folder (default: SmolLM2-135M-Instruct, offline)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--corpus", default="boolq", choices=list(CORPORA),
                        help="its evaluation split (default: boolq)")
    source.add_argument("--text_file", type=cli.nonempty,
                        help="a .txt file, or .jsonl with a \"text\" field per row, evaluated whole")
    p.add_argument("--adapter", type=cli.nonempty, metavar="DIR",
                   help="LoRA adapter folder (train_qat.py lora) applied over the checkpoint it was trained on")
    p.add_argument("--context", type=cli.positive_int, default=2048, help="window length in tokens, at least 2")
    p.add_argument("--batch_size", type=cli.positive_int, default=1, help="windows per forward pass")
    p.add_argument("--max_tokens", type=cli.positive_int, default=None,
                   help="evaluate only the first N tokens of the stream")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.context < 2:
        p.error("argument --context: expected a whole number >= 2 (a window scores its tokens 2..N)")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype = setup_device(args)
    # Read the text first: a bad file or corpus name fails before the model loads.
    if args.text_file:
        text, source = load_text_file(args.text_file), f"{args.text_file} (whole file)"
    else:
        text, source = corpus_text(args.corpus, "eval"), f"{args.corpus} (eval split: odd-indexed documents)"
    ckpt = resolve_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer_for(ckpt)
    tokens = torch.tensor(tokenizer.encode(text, bos=tokenizer.add_bos, allow_special=False), dtype=torch.long)
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
    model = load_model(ckpt, device=args.device, dtype=dtype, fuse=not args.adapter)  # adapted layers stay apart
    if args.adapter:
        load_adapter(model, args.adapter, ckpt)
    t0 = time.perf_counter()
    result = perplexity(model, tokens, args.context, args.batch_size, args.device)
    seconds = time.perf_counter() - t0
    tail = tokens.numel() - result["windows"] * args.context
    print(f"{source} | context {args.context}: {result['windows']} windows, {result['tokens']} tokens scored "
          f"({tail}-token tail dropped) | {str(dtype).removeprefix('torch.')} on {args.device}, {seconds:.1f} s | "
          f"nll {result['nll']:.4f} | perplexity {result['ppl']:.3f}")


if __name__ == "__main__":
    run(main)
