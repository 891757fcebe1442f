"""Quality, size and speed of each quantized format on one model: the table in BENCHMARKS.md.

    python scripts/bench_quant.py                                  # every config, default model
    python scripts/bench_quant.py --configs float,int4-g128-asym:gptq --max_tokens 50000 --no_speed

A config is FORMAT[:METHOD] (METHOD rtn|gptq|awq|awq+gptq, default rtn) or `float`, or `recipe:PATH[:METHOD]` (a hybrid JSON).
Perplexity: eval/perplexity.py's protocol on the BoolQ and LAMBADA evaluation splits; calibration draws from
the BoolQ calibration split (disjoint). Speed: compiled CPU decode, bf16 activations, median of runs.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch

from calibrate import METHODS, quantize_model
from checkpoint import load_model, load_tokenizer_for, read_config, save_quantized
from convert import resolve_checkpoint
from cli import ArgumentParser, nonempty, positive_int, run
from eval.data import calibration_batches, corpus_tokens
from eval.perplexity import perplexity
from fileio import TEMP_TAG, atomic_write, check_output_dir
from decoding import compile_fns, generate
from qlinear import QuantFormat, linear_names, read_recipe, resolve_recipe

DEFAULT_CONFIGS = ("float,int8,int4-g128-asym:rtn,int4-g128-asym:gptq,int4-g128-asym:awq,int4-g64-sym:rtn,"
                   "int3-g128-asym:rtn,int3-g128-asym:gptq,int3-g128-asym:awq,"
                   "int2-g64-asym:rtn,int2-g64-asym:gptq,int2-g64-asym:awq")


SCORES = "perplexity.json"  # in the --keep folder, beside one checkpoint folder per config


def check_config(config: str) -> str:
    """A --configs entry, checked before any work: `float`, FORMAT[:METHOD] or recipe:PATH[:METHOD]."""
    if config == "float":
        return config
    spec, _, method = config.removeprefix("recipe:").partition(":")
    if method and method not in METHODS:
        raise argparse.ArgumentTypeError(f"{config}: unknown method {method!r} ({', '.join(METHODS)})")
    if config.startswith("recipe:"):
        try:
            read_recipe(spec)
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{config}: cannot read the recipe {spec} ({e.strerror})") from None
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{config}: {e}") from None
        return config
    try:
        QuantFormat.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{config}: {e}") from None
    return config


def config_list(text: str) -> list:
    return [check_config(c) for c in nonempty(text).split(",")]


config_list.__name__ = "config list"


def is_bench_folder(folder: Path) -> bool:
    """An earlier --keep folder: the scores, checkpoints this script quantized, and temps of their writes."""
    return all(p.name == SCORES or TEMP_TAG in p.name or kept_quantization(p) is not None for p in folder.iterdir())


def kept_quantization(out: Path):
    """The quantization record of a checkpoint an earlier run left in `out`; None (build it again) when it is
    missing or damaged."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kept = config.get("quantization") if isinstance(config, dict) else None
    return kept if isinstance(kept, dict) and isinstance(kept.get("seconds"), (int, float)) else None


def build(ckpt, config: str, calib, out_dir: Path, quantize_output: bool, log):
    """Quantize the float checkpoint per config into out_dir (reusing a checkpoint a previous run left there);
    returns (the folder to load, seconds the quantization took)."""
    if config == "float":
        return ckpt, 0.0
    out = out_dir / config.replace(":", "_").replace("/", "_")
    hybrid = config.startswith("recipe:")
    spec, _, method = config.removeprefix("recipe:").partition(":")
    method = method or "rtn"
    calibration = f"{calib.shape[0]} x {calib.shape[1]} BoolQ tokens" if method != "rtn" else None
    kept = kept_quantization(out)
    if kept is not None and kept.get("calibration") == calibration:
        return out, kept["seconds"]
    t0 = time.perf_counter()
    model = load_model(ckpt)
    if hybrid:
        recipe = read_recipe(spec)
    else:
        recipe = {"default": QuantFormat.parse(spec).name}
    if quantize_output:  # int8: at 4 bits the tied head/embedding alone costs more perplexity than the body
        recipe["layers"] = {"output": "int8", **recipe.get("layers", {})}
    plan = resolve_recipe(recipe, linear_names(model))
    log(f"quantizing with {method}")
    quantize_model(model, plan, method, calib if calibration else None, log=log)
    seconds = round(time.perf_counter() - t0, 1)
    return save_quantized(model, plan, ckpt, out, {"method": method, "seconds": seconds, "calibration": calibration}), seconds


def scores_of(folder, texts: dict, context: int, cache: Path) -> dict:
    """Perplexity per text, remembered in `cache` (JSON) so a rerun does not score a kept checkpoint again."""
    seen = read_scores(cache)
    weights = Path(folder) / "model.safetensors"  # its time: a checkpoint quantized again is scored again
    key = f"{weights.resolve()}@{weights.stat().st_mtime_ns}|{context}|" + ",".join(f"{n}:{t.numel()}" for n, t in texts.items())
    entry = seen.get(key)
    if not (isinstance(entry, dict) and set(entry) == set(texts)
            and all(isinstance(v, (int, float)) for v in entry.values())):
        model = load_model(folder)
        seen[key] = {n: perplexity(model, t, context)["ppl"] for n, t in texts.items()}
        atomic_write(cache, json.dumps(seen, indent=1))
    return seen[key]


def read_scores(cache: Path) -> dict:
    """{key: {text: perplexity}} remembered by earlier runs; a damaged file of ours is scored again."""
    try:
        seen = json.loads(cache.read_text()) if cache.is_file() else {}
    except ValueError:
        seen = None
    if not isinstance(seen, dict):
        print(f"warning: {cache} is damaged; the checkpoints are scored again", file=sys.stderr)
        return {}
    return seen


def decode_speed(ckpt, prompt, new_tokens, runs) -> float:
    """Median compiled decode tokens/s over `runs` (after a compiling run)."""
    torch._dynamo.reset()
    model = load_model(ckpt, dtype=torch.bfloat16, fuse=True)
    model.setup_caches(1, -(-(prompt.numel() + new_tokens) // 64) * 64, dtype=torch.bfloat16)
    prefill_fn, decode_fn = compile_fns("cpu")
    speeds = [generate(model, prompt, new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)[1].decode_tokens_per_s
              for _ in range(runs + 1)]  # the first run compiles
    return statistics.median(speeds[1:])


def greedy_answer(ckpt, prompt, new_tokens, tok) -> str:
    model = load_model(ckpt, dtype=torch.bfloat16, fuse=True)
    model.setup_caches(1, prompt.numel() + new_tokens, dtype=torch.bfloat16)
    answer, _ = generate(model, prompt, new_tokens, stop_ids=tok.stop_ids)
    return tok.decode([t for t in answer.tolist() if t not in tok.stop_ids])


def layout(ckpt) -> str:
    """The per-layer formats: checkpoints that share them (RTN / GPTQ / AWQ of one format) decode at one speed."""
    return json.dumps((read_config(ckpt).get("quantization") or {}).get("recipe"), sort_keys=True)


def bits_per_weight(ckpt) -> float:
    recipe = (read_config(ckpt).get("quantization") or {}).get("recipe")
    if not recipe:
        return 32.0
    model = load_model(ckpt)
    total = bits = 0
    for name in linear_names(model):
        m = model.get_submodule(name)
        n, k = m.out_features, m.in_features
        fmt = QuantFormat.parse(recipe[name]) if recipe.get(name, "float") != "float" else None
        bits += n * k * (fmt.bits_per_weight(k) if fmt else 32)
        total += n * k
    return bits / total


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=nonempty)
    p.add_argument("--configs", type=config_list, default=DEFAULT_CONFIGS)
    p.add_argument("--context", type=positive_int, default=2048)
    p.add_argument("--max_tokens", type=positive_int, default=None, help="tokens per text (default: whole eval split)")
    p.add_argument("--calib_samples", type=positive_int, default=128)
    p.add_argument("--calib_seqlen", type=positive_int, default=512)
    p.add_argument("--no_quantize_output", action="store_true", help="keep the output head (and tied embedding) float")
    p.add_argument("--no_speed", action="store_true")
    p.add_argument("--threads", type=positive_int, default=1, help="threads for the decode-speed runs")
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--new_tokens", type=positive_int, default=128)
    p.add_argument("--prompt", type=nonempty, default="What is the capital of France?",
                   help="chat prompt for the decode-speed runs; each model's greedy answer is printed after the table")
    p.add_argument("--keep", type=nonempty,
                   help="folder to keep the quantized checkpoints and their perplexities in (default: a temp folder, "
                        "removed at the end); a rerun reuses them and measures only what is missing, and speed")
    a = p.parse_args(argv)
    if a.context < 2:
        p.error("argument --context: at least 2 tokens (each window predicts its tokens after the first)")
    if a.max_tokens is not None and a.max_tokens < a.context:
        p.error(f"argument --max_tokens: {a.max_tokens} tokens is less than one window of --context {a.context}")
    if a.keep:
        benchmark(a, check_output_dir(a.keep, is_bench_folder, "benchmark folder"))
        return
    with tempfile.TemporaryDirectory(prefix="bitfast-bench-") as tmp:
        benchmark(a, Path(tmp))


def benchmark(a, out_root: Path):
    ckpt = resolve_checkpoint(a.checkpoint)
    tok = load_tokenizer_for(ckpt)
    texts = {name: corpus_tokens(tok, name, max_tokens=a.max_tokens) for name in ("boolq", "lambada")}
    calib = calibration_batches(tok, a.calib_samples, a.calib_seqlen, "boolq", seed=0)
    prompt = torch.tensor(tok.encode(tok.apply_chat_template([{"role": "user", "content": a.prompt}])),
                          dtype=torch.int)
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"model {ckpt} | perplexity: context {a.context}, tokens scored: "
          + ", ".join(f"{n} {(t.numel() // a.context) * (a.context - 1)}" for n, t in texts.items())
          + f" | calibration: {a.calib_samples} x {a.calib_seqlen} BoolQ tokens | decode: compiled, bf16, "
          f"{a.threads} thread(s), {a.new_tokens} tokens, median of {a.runs}, measured once per layout (RTN, GPTQ and AWQ "
          f"of one format run the same kernels) | output head quantized: {not a.no_quantize_output} | "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    answers, speeds = {}, {}
    print("\n| config | bits/weight (linears) | size MB | ppl BoolQ | ppl LAMBADA | decode tok/s | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for config in a.configs:
        def log(msg, config=config):  # progress on stderr, so stdout stays the table
            print(f"  {config}: {msg}", file=sys.stderr, flush=True)
        torch.set_num_threads(os.cpu_count())  # quantizing and scoring use every core; decode uses --threads
        q, qtime = build(ckpt, config, calib, out_root, not a.no_quantize_output, log)
        log("perplexity on " + ", ".join(texts))
        ppl = scores_of(q, texts, a.context, out_root / SCORES)
        size = (Path(q) / "model.safetensors").stat().st_size / 1e6
        speed = ""
        if not a.no_speed:
            torch.set_num_threads(a.threads)
            formats = layout(q)
            if formats not in speeds:
                log(f"decode speed (compile, then {a.runs} runs)")
                speeds[formats] = decode_speed(q, prompt, a.new_tokens, a.runs)
            speed = f"{speeds[formats]:.1f}"
            answers[config] = greedy_answer(q, prompt, a.new_tokens, tok)
        print(f"| {config} | {bits_per_weight(q):.2f} | {size:.1f} | {ppl['boolq']:.3f} | {ppl['lambada']:.3f} | "
              f"{speed} | {qtime:.0f} |", flush=True)
    if answers:
        print(f"\ngreedy answers to {a.prompt!r}:")
    for config, answer in answers.items():
        print(f"  {config}: {answer.strip()!r}")


if __name__ == "__main__":
    run(main)
