"""bitfast against llama.cpp on the same CPU, the same weights and the same text: decode and prefill tokens/s at
each thread count, perplexity and size, each bitfast format beside the llama.cpp type it competes with.

    pip install -r requirements-bench.txt      # llama-cpp-python, built from source (about 15 min on 2 cores)
    python scripts/bench_llamacpp.py --keep checkpoints/bench-llamacpp
    python scripts/bench_llamacpp.py --pairs int4-g128-asym:gptq=Q4_0 --threads 1 --runs 5 --no_perplexity

Both sides start from the default GGUF (SmolLM2-135M-Instruct, Q4_1): bitfast converts it and quantizes the
float weights (scripts/bench_quant.py's checkpoints and perplexity cache, kept in KEEP/bitfast), llama.cpp
re-quantizes it with its own quantizer (llama_model_quantize, allow_requantize; kept in KEEP/llamacpp).
Speed: in one process, pair by pair and run by run interleaved (bitfast, llama.cpp, bitfast, ...), so load from
elsewhere hits both alike; median of --runs. Decode: greedy, --new_tokens after a short chat prompt, wall clock
around the token loop on both sides (bitfast: generate.py's compiled decode step, bf16; llama.cpp: one
llama_decode per token through llama-cpp-python, argmax of its logits). Prefill: a --prefill_tokens prompt of
BoolQ text, wall clock (bitfast: decoding.prefill as generate.py runs it). Perplexity: eval/perplexity.py's
windows on our token ids, fed to both (llama.cpp returns every position's logits). Size: the file each side loads.
"""
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import load_model, load_tokenizer_for
from cli import ArgumentParser, nonempty, positive_int, run
from convert import default_gguf_path, resolve_checkpoint
from decoding import compile_step, decode_one_token, prefill
from eval.data import calibration_batches, corpus_tokens
from fileio import TEMP_TAG, check_output_dir, clean_stale_temps
from scripts.bench_quant import SCORES, build, check_config, is_bench_folder, scores_of

# bitfast config (scripts/bench_quant.py's FORMAT[:METHOD]) = llama.cpp type; the pairs.
DEFAULT_PAIRS = ("float=BF16,int8=Q8_0,int4-g128-asym:gptq=Q4_0,int4-g128-asym:gptq=Q4_K_M,"
                 "int3-g128-asym:gptq=Q3_K_M,int2-g64-asym:gptq=Q2_K")
LLAMA_TYPES = ("BF16", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S",
               "Q2_K")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def pair_list(text: str) -> list:
    pairs = []
    for item in nonempty(text).split(","):
        config, eq, ltype = item.partition("=")
        if not eq or ltype not in LLAMA_TYPES:
            raise ValueError(f"bad pair {item!r}: expected CONFIG=TYPE, TYPE one of {', '.join(LLAMA_TYPES)}")
        pairs.append((check_config(config), ltype))
    return pairs


pair_list.__name__ = "pair list"


def thread_list(text: str) -> list:
    return [positive_int(t) for t in nonempty(text).split(",")]


thread_list.__name__ = "thread counts"


def is_keep_folder(folder: Path) -> bool:
    """An earlier --keep folder: `bitfast` (scripts/bench_quant.py's kind) and `llamacpp` (its GGUF files)."""
    def ours(p: Path) -> bool:
        if p.name == "bitfast":
            return p.is_dir() and is_bench_folder(p)
        return p.name == "llamacpp" and p.is_dir() and all(
            f.suffix == ".gguf" or TEMP_TAG in f.name for f in p.iterdir())
    return all(ours(p) for p in folder.iterdir())


def llamacpp_gguf(source: Path, ltype: str, folder: Path, log) -> Path:
    """The default GGUF re-quantized by llama.cpp to `ltype` (kept from an earlier run when present)."""
    import llama_cpp
    out = folder / f"{ltype}.gguf"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = folder / f".{out.name}{TEMP_TAG}{os.getpid()}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ltype}")
    params.allow_requantize = True
    params.nthread = os.cpu_count()
    log(f"llama.cpp: quantizing to {ltype}")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params) != 0:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"llama.cpp could not quantize {source} to {ltype}")
    tmp.replace(out)
    return out


class LlamaCpp:
    """One GGUF in llama.cpp (through llama-cpp-python) at a thread count; token ids in, our protocol out."""

    def __init__(self, path: Path, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama
        self.llm = Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                         logits_all=logits_all, verbose=False)

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def decode_tokens_per_s(self, prompt: list, new_tokens: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        token = int(self._last_logits().argmax())
        t = time.perf_counter()
        for _ in range(new_tokens):
            self.llm.eval([token])
            token = int(self._last_logits().argmax())
        return new_tokens / (time.perf_counter() - t)

    def prefill_tokens_per_s(self, prompt: list) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - t)

    def perplexity(self, tokens: torch.Tensor, context: int) -> float:
        windows = tokens.numel() // context
        nll = 0.0
        for w in tokens[:windows * context].view(windows, context):
            self.llm.reset()
            self.llm.eval(w.tolist())
            logits = torch.from_numpy(self.llm.scores[:context - 1].copy())
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        return float(np.exp(nll / (windows * (context - 1))))


class Bitfast:
    """One bitfast checkpoint as generate.py runs it: fused projections, bf16, compiled decode step."""

    def __init__(self, ckpt: Path, max_len: int):
        torch._dynamo.reset()
        self.model = load_model(ckpt, dtype=torch.bfloat16, fuse=True)
        self.model.setup_caches(1, max_len, dtype=torch.bfloat16)
        self.decode_fn = compile_step(decode_one_token, "cpu")

    @torch.inference_mode()
    def decode_tokens_per_s(self, prompt: list, new_tokens: int) -> float:
        ids = torch.tensor([prompt])
        token = prefill(self.model, ids, torch.arange(len(prompt))).view(1, 1)
        t = time.perf_counter()
        for i in range(new_tokens):
            token = self.decode_fn(self.model, token, torch.tensor([len(prompt) + i])).view(1, 1)
        token.item()
        return new_tokens / (time.perf_counter() - t)

    @torch.inference_mode()
    def prefill_tokens_per_s(self, prompt: list) -> float:
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        prefill(self.model, ids, torch.arange(len(prompt))).item()
        return len(prompt) / (time.perf_counter() - t)


def speeds(ours: Bitfast, theirs: LlamaCpp, prompt: list, long_prompt: list, new_tokens: int, runs: int) -> dict:
    """Medians of interleaved runs (one warm-up each): {side: (decode tok/s, prefill tok/s)}."""
    got = {"bitfast": ([], []), "llama.cpp": ([], [])}
    for i in range(runs + 1):
        for side, engine in (("bitfast", ours), ("llama.cpp", theirs)):
            decode, pre = engine.decode_tokens_per_s(prompt, new_tokens), engine.prefill_tokens_per_s(long_prompt)
            if i:  # the first round compiles and warms caches
                got[side][0].append(decode)
                got[side][1].append(pre)
    return {side: (statistics.median(d), statistics.median(p)) for side, (d, p) in got.items()}


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=pair_list, default=DEFAULT_PAIRS, help=f"CONFIG=TYPE,... (default {DEFAULT_PAIRS})")
    p.add_argument("--threads", type=thread_list, default="1,2", help="thread counts, comma separated")
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--new_tokens", type=positive_int, default=128)
    p.add_argument("--prefill_tokens", type=positive_int, default=512)
    p.add_argument("--context", type=positive_int, default=2048, help="perplexity window")
    p.add_argument("--max_tokens", type=positive_int, default=16384, help="perplexity: tokens per text")
    p.add_argument("--no_perplexity", action="store_true")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--calib_seqlen", type=positive_int, default=512)
    p.add_argument("--keep", type=nonempty, required=True,
                   help="folder for both sides' quantized models and bitfast's perplexities; a rerun reuses them")
    a = p.parse_args(argv)
    if a.max_tokens < a.context:
        p.error(f"argument --max_tokens: {a.max_tokens} tokens is less than one window of --context {a.context}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("llama-cpp-python is not installed: pip install -r requirements-bench.txt")
    benchmark(a, check_output_dir(a.keep, is_keep_folder, "benchmark folder"))


def benchmark(a, keep: Path):
    ckpt, gguf = resolve_checkpoint(None), default_gguf_path()
    tok = load_tokenizer_for(ckpt)
    def log(msg):  # progress on stderr, so stdout stays the tables
        print(f"  {msg}", file=sys.stderr, flush=True)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    texts = {name: corpus_tokens(tok, name, max_tokens=a.max_tokens) for name in ("boolq", "lambada")}
    long_prompt = corpus_tokens(tok, "boolq", max_tokens=a.prefill_tokens).tolist()
    calib = calibration_batches(tok, a.calib_samples, a.calib_seqlen, "boolq", seed=0)
    max_len = -(-(max(len(prompt) + a.new_tokens, a.prefill_tokens) + 1) // 64) * 64
    print(f"bitfast vs llama.cpp (llama-cpp-python {__import__('llama_cpp').__version__}) | {gguf.name} | decode "
          f"{a.new_tokens} tokens after a {len(prompt)}-token prompt, prefill {a.prefill_tokens} tokens, median of "
          f"{a.runs} interleaved runs | perplexity: context {a.context}, {a.max_tokens} tokens per text | "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    rows = []
    for config, ltype in a.pairs:
        torch.set_num_threads(os.cpu_count())
        (keep / "bitfast").mkdir(parents=True, exist_ok=True)
        ours_ckpt, _ = build(ckpt, config, calib, keep / "bitfast", True, log)
        theirs = llamacpp_gguf(gguf, ltype, keep / "llamacpp", log)
        quality = {}
        if not a.no_perplexity:
            log(f"perplexity: bitfast {config}, llama.cpp {ltype}")
            quality["bitfast"] = scores_of(ours_ckpt, texts, a.context, keep / "bitfast" / SCORES)
            engine = LlamaCpp(theirs, os.cpu_count(), a.context, logits_all=True)
            quality["llama.cpp"] = {n: engine.perplexity(t, a.context) for n, t in texts.items()}
            del engine
        for threads in a.threads:
            log(f"speed at {threads} thread(s): bitfast {config} vs llama.cpp {ltype}")
            torch.set_num_threads(threads)
            got = speeds(Bitfast(ours_ckpt, max_len), LlamaCpp(theirs, threads, max_len), prompt, long_prompt,
                         a.new_tokens, a.runs)
            rows.append((config, ltype, threads, got, quality,
                         (Path(ours_ckpt) / "model.safetensors").stat().st_size / 1e6, theirs.stat().st_size / 1e6))
    print_table(rows)


def print_table(rows):
    print("\n| bitfast | llama.cpp | threads | decode tok/s (ours / theirs) | ratio | prefill tok/s (ours / theirs) | "
          "ratio | size MB (ours / theirs) | ppl BoolQ (ours / theirs) | ppl LAMBADA (ours / theirs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config, ltype, threads, got, quality, our_mb, their_mb in rows:
        (od, op), (td, tp) = got["bitfast"], got["llama.cpp"]
        ppl = [f"{quality['bitfast'][n]:.2f} / {quality['llama.cpp'][n]:.2f}" if quality else "" for n in ("boolq", "lambada")]
        print(f"| {config} | {ltype} | {threads} | {od:.1f} / {td:.1f} | {od / td:.2f}x | {op:.0f} / {tp:.0f} | "
              f"{op / tp:.2f}x | {our_mb:.1f} / {their_mb:.1f} | {ppl[0]} | {ppl[1]} |", flush=True)


if __name__ == "__main__":
    run(main)
