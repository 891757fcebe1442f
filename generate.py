"""Generate text: prefill the static KV cache, then decode one token at a time (optionally compiled), or several
at a time with speculative decoding; optionally reuse a prompt prefix's keys/values from a prefill cache.

    python generate.py --prompt "Once upon a time" --compile
    python generate.py --chat --prompt "What is the capital of France?"
    python generate.py --chat --compile --prompt_lookup --prompt_file passage_and_question.txt
    python generate.py --chat --compile --draft_checkpoint checkpoints/smollm2-int4 --speculate_k 2
    python generate.py --chat --prefill_cache ~/.cache/bitfast-prefill --prompt_file long_document.txt
"""
import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import load_model, load_tokenizer_for, resolve_checkpoint
from cli import (
    DTYPES,
    ArgumentParser,
    add_device_args,
    nonempty,
    nonneg_float,
    nonneg_int,
    positive_int,
    probability,
    run,
    setup_device,
)
from fileio import check_output_dir
from model import Transformer
from prefill_cache import PrefillCache, check_cache_dir
from profiling import TRACE_NAME, is_profile_dir, profile_decode
from sampling import sample
from speculative import MAX_SPECULATE_K, DraftModel, PromptLookup, speculative_decode, verify

# ---------------------------------------------------------------- prefill and decode

def check_token_ids(ids: torch.Tensor, vocab_size: int, what: str = "the prompt"):
    """Token ids the model can embed: an id past its vocabulary (a tokenizer larger than the model's embedding)
    would otherwise fail deep inside the embedding lookup, or silently on a GPU."""
    if ids.numel() == 0:
        raise ValueError(f"{what} is empty (it encodes to no tokens)")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} has token id {high if high >= vocab_size else low}, outside the model's "
                         f"vocabulary of {vocab_size} tokens: the tokenizer does not belong to this model")


def prefill(model: Transformer, tokens, input_pos, **sampling):
    logits = model(tokens, input_pos)
    return sample(logits[:, -1], **sampling)


def decode_one_token(model: Transformer, token, input_pos, **sampling):
    logits = model(token, input_pos)
    return sample(logits[:, -1], **sampling)


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float
    decode_time: float
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefill cache
    proposed: int = 0  # speculative decoding: draft tokens the model verified
    accepted: int = 0  # ... and kept

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode produced the rest.
        return (self.new_tokens - 1) / self.decode_time if self.new_tokens > 1 and self.decode_time > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, stop_ids=(), on_token=None,
             prefill_fn=prefill, decode_fn=decode_one_token, speculator=None, speculate_k: int = 4,
             verify_fn=verify, prefill_cache: PrefillCache | None = None, **sampling):
    """prompt: [T] token ids. Returns (new token ids [N], GenerationStats). The caller has set up the caches
    (model.setup_caches) large enough for T + max_new_tokens. `on_token(id)` streams each new token.

    speculator: a speculative.PromptLookup or DraftModel proposing speculate_k tokens at a time, checked with
    verify_fn (speculative.verify, or its compiled form). prefill_cache: a PrefillCache to reuse the keys and
    values of a prompt prefix seen before (and to remember this prompt's)."""
    device = prompt.device
    T = prompt.numel()
    check_token_ids(prompt, model.args.vocab_size)
    if T + max_new_tokens > model.max_seq_length:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the context of "
                         f"{model.max_seq_length} tokens")
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.int) if stop_ids else None
    _sync(device)
    t0 = time.perf_counter()
    if prefill_cache is not None:
        token, cached = prefill_cache.prefill(model, prompt, prefill_fn, **sampling)
    else:
        token, cached = prefill_fn(model, prompt.view(1, -1), torch.arange(T, device=device), **sampling), 0
    token = token.clone()
    if speculator is not None:
        speculator.start(prompt.tolist(), model)  # a draft model prefills the prompt too
    _sync(device)
    t1 = time.perf_counter()
    ttft = t1 - t0
    if speculator is None:
        new = _decode(model, token, T, max_new_tokens - 1, stop, on_token, decode_fn, **sampling)
        proposed = accepted = 0
    else:
        new, proposed, accepted = [], 0, 0

        def emit(tokens) -> bool:
            """Keep and stream tokens up to the first stop token; True once one came."""
            for t in tokens:
                new.append(t)
                if on_token is not None:
                    on_token(t)
                if t in stop_ids:
                    return True
            return False

        if not emit([int(token)]):
            proposed, accepted = speculative_decode(model, speculator, prompt.tolist() + new, max_new_tokens - 1,
                                                    emit, k=speculate_k, verify_fn=verify_fn, decode_fn=decode_fn,
                                                    **sampling)
        new = torch.tensor(new, dtype=torch.int, device=device)
    _sync(device)
    decode_time = time.perf_counter() - t1
    if prefill_cache is not None:
        prefill_cache.store(model, prompt)
    return new, GenerationStats(T, new.numel(), ttft, decode_time, cached, proposed, accepted)


def _decode(model, token, pos: int, steps: int, stop, on_token, decode_fn, **sampling) -> torch.Tensor:
    """Plain decoding after prefill: `token` sits at position `pos`; at most `steps` more tokens."""
    out = [token]
    input_pos = torch.tensor([pos], device=token.device, dtype=torch.long)
    for _ in range(steps):
        if on_token is not None:
            on_token(int(token))
        if stop is not None and bool((token == stop).any()):
            break
        token = decode_fn(model, token.view(1, 1), input_pos, **sampling).clone()
        out.append(token)
        input_pos += 1
    else:
        if on_token is not None:
            on_token(int(token))
    return torch.cat(out).view(-1)


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, stop_ids=(),
                   decode_fn=decode_one_token, **sampling) -> list:
    """Several prompts (lists of token ids) at once -> each one's new tokens (a list, ending at its first stop
    token). Prompts are right-padded and every row decodes at its own positions, so a row's result is the one
    generate() gives it alone. Sets up the model's caches for the batch when they do not fit."""
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    for p in prompts:
        check_token_ids(torch.tensor(p, dtype=torch.long), model.args.vocab_size)
    device = model.norm.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width, rows = int(lengths.max()), len(prompts)
    if model.max_batch_size != rows or model.max_seq_length < width + max_new_tokens:
        model.setup_caches(rows, width + max_new_tokens)
    tokens = torch.zeros(rows, width, dtype=torch.int, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.int)
    logits = model(tokens, torch.arange(width, device=device))
    token = sample(logits[torch.arange(rows, device=device), lengths - 1], **sampling)
    out, done = [token], torch.zeros(rows, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.int)
    input_pos = lengths.view(rows, 1).clone()
    for _ in range(max_new_tokens - 1):
        done |= torch.isin(token.view(-1), stop)
        if bool(done.all()):
            break
        token = decode_fn(model, token, input_pos, **sampling).clone()
        out.append(token)
        input_pos += 1
    results = []
    for row in torch.cat(out, 1).tolist():
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        results.append(row[:ends[0] + 1] if ends else row)
    return results


def compile_step(fn, device):
    """A fixed-shape step (decode, verify) compiles to one graph thanks to the static cache; on CUDA with CUDA
    graphs (reduce-overhead). Each new shape (another k) gets its own static graph, not a dynamic one.
    On CPU Inductor rounds to bf16 wherever eager would (emulate_precision_casts): otherwise how much of a norm or an
    activation stays in fp32 depends on the fusions it picks for each shape, and a 4-token verify step scores
    tokens differently from decode."""
    if torch.device(device).type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"emulate_precision_casts": True})


def compile_fns(device, compile_prefill: bool = False):
    decode_fn = compile_step(decode_one_token, device)
    prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return prefill_fn, decode_fn


# ---------------------------------------------------------------- reporting

def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step streams (shared tensors counted once; KV caches excluded)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers()
                                          if not n.endswith(("k_cache", "v_cache", "freqs_cis", "causal_mask"))]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peak_memory_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def speed_report(stats: GenerationStats, model_bytes: int, device) -> str:
    tps = stats.decode_tokens_per_s
    extra = f" ({stats.cached_tokens} from the prefill cache)" if stats.cached_tokens else ""
    if stats.proposed:
        extra += (f" | speculation kept {stats.accepted} of {stats.proposed} proposed tokens "
                  f"({100 * stats.acceptance_rate:.0f}%)")
    return (f"prompt {stats.prompt_tokens} tok{extra} | time to first token {stats.time_to_first_token * 1000:.1f} ms"
            f" | decode {stats.new_tokens} tok at {tps:.1f} tok/s | model {model_bytes / 1e6:.1f} MB | "
            f"bandwidth {model_bytes * tps / 1e9:.2f} GB/s | peak memory {peak_memory_bytes(device) / 1e9:.2f} GB")


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
    add_device_args(p)
    p.add_argument("--max_seq_length", type=positive_int, default=None,
                   help="KV cache length (default: fits the request)")
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
    verify = not args.skip_checksum
    if load_tokenizer_for(draft_ckpt, verify).encode(probe) != tokenizer.encode(probe):
        raise ValueError(f"{draft_ckpt}: the draft model's tokenizer differs from the model's")
    draft = load_model(draft_ckpt, device=args.device, dtype=DTYPES[args.draft_dtype] if args.draft_dtype else dtype,
                       verify=verify)
    if draft.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"{draft_ckpt}: the draft model has a vocabulary of {draft.args.vocab_size} tokens, the "
                         f"model {model.args.vocab_size}: a draft must share the model's vocabulary")
    return DraftModel(draft, compile_step(verify, args.device) if args.compile else verify)


def main(argv=None):
    args = parse_args(argv)
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
    model = load_model(ckpt, device=args.device, dtype=dtype, verify=not args.skip_checksum)
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
