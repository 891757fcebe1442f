"""Generate text: prefill the static KV cache, then decode one token at a time (optionally compiled), or several
at a time with speculative decoding; optionally reuse a prompt prefix's keys/values from a prefill cache.

    python generate.py --prompt "Once upon a time" --compile
    python generate.py --chat --prompt "What is the capital of France?"
    python generate.py --chat --compile --prompt_lookup --prompt_file passage_and_question.txt
    python generate.py --chat --compile --draft_checkpoint checkpoints/smollm2-int4 --speculate_k 2
    python generate.py --chat --prefill_cache ~/.cache/bitfast-prefill --prompt_file long_document.txt
    torchrun --nproc-per-node 2 generate.py --chat --prompt "..."   # tensor-parallel over 2 processes (tp.py)
"""
import atexit
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

from checkpoint import load_model, load_tokenizer_for
from lora import load_adapter
from convert import resolve_checkpoint
from cli import (
    DTYPES,
    ArgumentParser,
    add_device_args,
    init_distributed,
    nonempty,
    nonneg_float,
    nonneg_int,
    positive_int,
    probability,
    run,
    setup_device,
)
from decoding import compile_fns, compile_step, decode_one_token, generate, prefill
from fileio import check_output_dir
from prefill_cache import PrefillCache, check_cache_dir
from profiling import TRACE_NAME, is_profile_dir, profile_decode, speed_report, weight_bytes
from speculative import MAX_SPECULATE_K, DraftModel, PromptLookup, verify
from tp import apply_tensor_parallel

class TextStreamer:
    """Prints tokens as they come, holding back bytes until they form whole UTF-8 characters."""

    def __init__(self, tokenizer, stop_ids=(), file=sys.stdout):
        self.tokenizer, self.stop_ids, self.file = tokenizer, set(stop_ids), file
        self.ids, self.printed = [], 0

    def __call__(self, token_id: int):
        if token_id in self.stop_ids:
            return
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            print(text[self.printed:], end="", file=self.file, flush=True)
            self.printed = len(text)


# ---------------------------------------------------------------- CLI

def build_prompt(tokenizer, text: str, chat: bool, history=None):
    if chat:
        messages = (history or []) + [{"role": "user", "content": text}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages), bos=tokenizer.add_bos)
    return tokenizer.encode(text, bos=tokenizer.add_bos, allow_special=False)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=nonempty,
                   help="bitfast checkpoint folder (default: SmolLM2-135M-Instruct, offline)")
    p.add_argument("--prompt", type=nonempty, default="Hello, my name is")
    p.add_argument("--prompt_file", type=nonempty, help="read the prompt from this UTF-8 text file instead")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--interactive", action="store_true", help="chat loop on stdin (implies --chat)")
    p.add_argument("--max_new_tokens", type=positive_int, default=200)
    p.add_argument("--num_samples", type=positive_int, default=1,
                   help="generate this many times (speed: later runs are warm)")
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=positive_int, default=None)
    p.add_argument("--top_p", type=probability, default=None)
    p.add_argument("--seed", type=nonneg_int, default=1234)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    add_device_args(p, bf16_on_capable_cpus=True)
    p.add_argument("--max_seq_length", type=positive_int, default=None,
                   help="KV cache length (default: fits the request)")
    p.add_argument("--adapter", type=nonempty, metavar="DIR",
                   help="LoRA adapter folder (train_qat.py lora) to apply over the checkpoint it was trained on")
    p.add_argument("--skip_checksum", action="store_true",
                   help="load checkpoints whose files no longer match the sha256 their config.json recorded")
    s = p.add_argument_group("faster generation")
    s.add_argument("--prompt_lookup", action="store_true",
                   help="prompt-lookup decoding: propose continuations of n-grams found in the prompt and output")
    s.add_argument("--max_ngram", type=positive_int, default=3, help="prompt lookup: longest n-gram to match")
    s.add_argument("--draft_checkpoint", type=nonempty,
                   help="speculative decoding with this draft model (same tokenizer)")
    s.add_argument("--draft_dtype", default=None, choices=sorted(DTYPES), help="draft dtype (default: --dtype)")
    s.add_argument("--speculate_k", type=positive_int, default=4,
                   help=f"tokens proposed per verify step (at most {MAX_SPECULATE_K})")
    s.add_argument("--prefill_cache", type=nonempty, metavar="DIR",
                   help="reuse the keys/values of prompt prefixes seen before (in memory, and saved in DIR)")
    s.add_argument("--profile", type=nonempty, metavar="DIR",
                   help="profile eager decode: trace in DIR, time per layer type")
    args = p.parse_args(argv)
    if args.prompt_lookup and args.draft_checkpoint:
        p.error("choose one of --prompt_lookup and --draft_checkpoint")
    if args.speculate_k > MAX_SPECULATE_K:
        p.error(f"argument --speculate_k: at most {MAX_SPECULATE_K}, got {args.speculate_k} (a verify step of "
                "k+1 tokens must fit the few-token kernels that score exactly like decode)")
    if args.seed >= 2 ** 63:
        p.error(f"argument --seed: expected a whole number below 2**63, got {args.seed}")
    return args


def read_prompt(args) -> str:
    if not args.prompt_file:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: --prompt_file is not UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read --prompt_file ({e.strerror})") from None
    if not text.strip():
        raise ValueError(f"{path}: --prompt_file is empty")
    return text


def load_speculator(args, model, tokenizer, dtype):
    if args.prompt_lookup:
        return PromptLookup(max_ngram=args.max_ngram)
    if not args.draft_checkpoint:
        return None
    draft_ckpt = resolve_checkpoint(args.draft_checkpoint)
    probe = "The quick brown fox, 3.14 <|im_start|> naïve"
    checksums = not args.skip_checksum
    if load_tokenizer_for(draft_ckpt, checksums).encode(probe) != tokenizer.encode(probe):
        raise ValueError(f"{draft_ckpt}: the draft model's tokenizer differs from the model's")
    draft = load_model(draft_ckpt, device=args.device, dtype=DTYPES[args.draft_dtype] if args.draft_dtype else dtype,
                       verify=checksums, fuse=True)
    if draft.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"{draft_ckpt}: the draft model has a vocabulary of {draft.args.vocab_size} tokens, the "
                         f"model {model.args.vocab_size}: a draft must share the model's vocabulary")
    return DraftModel(draft, compile_step(verify, args.device) if args.compile else verify)


def setup_tensor_parallel(args) -> tuple:
    """Under torchrun every process holds a slice of the model (tp.py) and runs every token; (rank, world size).
    Only rank 0 prints (the others compute the same tokens)."""
    rank, world, args.device = init_distributed(args.device)
    if world == 1:
        return rank, world
    import torch.distributed as dist
    atexit.register(dist.destroy_process_group)
    for flag in ("interactive", "prefill_cache", "profile", "adapter"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} works in one process, not with tensor parallelism (torchrun)")
    if rank:  # the file descriptors, so that everything that holds sys.stdout or sys.stderr writes nowhere too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
    return rank, world


def load_for_running(args, ckpt, dtype, rank: int, world: int):
    """The model as this run uses it: its projections fused, or with the --adapter, or this process's slice."""
    # Layers stay apart with an adapter (the adapted ones cannot fuse) and under tensor parallelism (tp.py splits
    # q, k, v and gate, up one by one).
    model = load_model(ckpt, device=args.device, dtype=dtype, verify=not args.skip_checksum,
                       fuse=not args.adapter and world == 1)
    if args.adapter:
        load_adapter(model, args.adapter, ckpt)
    if world > 1:
        apply_tensor_parallel(model, rank, world)
    return model


def main(argv=None):
    args = parse_args(argv)
    rank, world = setup_tensor_parallel(args)
    dtype = setup_device(args)
    torch.manual_seed(args.seed)
    prompt_text = read_prompt(args)
    # Output folders are checked before the model loads, so a bad one costs nothing.
    if args.prefill_cache:
        check_cache_dir(args.prefill_cache)
    if args.profile:
        check_output_dir(args.profile, is_profile_dir, "profile")
    ckpt = resolve_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer_for(ckpt, verify=not args.skip_checksum)
    model = load_for_running(args, ckpt, dtype, rank, world)
    if args.max_seq_length and args.max_seq_length > model.args.block_size:
        raise ValueError(f"--max_seq_length {args.max_seq_length} exceeds the model's context of "
                         f"{model.args.block_size} tokens")
    model_bytes = weight_bytes(model)
    chat = args.chat or args.interactive
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    prefill_fn, decode_fn = compile_fns(args.device, args.compile_prefill) if args.compile else (prefill, decode_one_token)
    speculator = load_speculator(args, model, tokenizer, dtype)
    verify_fn = compile_step(verify, args.device) if args.compile and speculator else verify
    accel = {"speculator": speculator, "speculate_k": args.speculate_k, "verify_fn": verify_fn}
    cache = PrefillCache(model, args.prefill_cache) if args.prefill_cache else None
    stop_ids = tokenizer.stop_ids
    warmed = False

    def one_turn(text, history):
        nonlocal warmed
        ids = build_prompt(tokenizer, text, chat, history)
        need = len(ids) + args.max_new_tokens
        context = args.max_seq_length or model.args.block_size
        if need > context:
            raise ValueError(f"prompt of {len(ids)} tokens + {args.max_new_tokens} new tokens exceeds the context "
                             f"of {context} tokens" + (" (--max_seq_length)" if args.max_seq_length else ""))
        size = args.max_seq_length or min(model.args.block_size, -(-need // 256) * 256)
        if model.max_seq_length != size:
            model.setup_caches(1, size, dtype=dtype, device=args.device)
        prompt = torch.tensor(ids, dtype=torch.int, device=args.device)
        if args.compile and not warmed:  # compile outside the timed run, so the speed report is honest
            t0 = time.perf_counter()
            generate(model, prompt, min(2 * args.speculate_k + 2, args.max_new_tokens), prefill_fn=prefill_fn,
                     decode_fn=decode_fn, **accel, **sampling)
            k1 = args.speculate_k + 1
            if speculator is not None and k1 <= size:  # a shorter context never has room to verify k tokens
                with torch.no_grad():  # as generate runs it: a graph traced with gradients on is another graph
                    verify_fn(model, torch.zeros(1, k1, dtype=torch.int, device=args.device),
                              torch.arange(k1, device=args.device))
            print(f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            warmed = True
        streamer = TextStreamer(tokenizer, stop_ids)
        new, stats = generate(model, prompt, args.max_new_tokens, stop_ids=stop_ids, on_token=streamer,
                              prefill_fn=prefill_fn, decode_fn=decode_fn, prefill_cache=cache, **accel, **sampling)
        print()
        print(speed_report(stats, model_bytes, args.device), file=sys.stderr)
        if args.profile:
            trace = Path(args.profile) / TRACE_NAME
            print(profile_decode(model, prompt, min(args.max_new_tokens, 32), trace, **sampling), file=sys.stderr)
            print(f"trace written to {trace} (chrome://tracing, ui.perfetto.dev)", file=sys.stderr)
        return tokenizer.decode([t for t in new.tolist() if t not in stop_ids])

    if not args.interactive:
        if not chat:
            print(prompt_text, end="", flush=True)
        for _ in range(args.num_samples):
            one_turn(prompt_text, None)
        return
    history = []
    print("interactive chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        with contextlib.suppress(EOFError):
            text = input("> ").strip()
            if text:
                reply = one_turn(text, history)
                history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
                continue
        return


if __name__ == "__main__":
    run(main)
