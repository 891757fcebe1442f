"""lm-eval harness adapter: a bitfast model (float or quantized checkpoint) behind `lm_eval.api.model.LM`,
registered as "bitfast". Any lm-eval task runs through it; the offline tasks in eval/tasks/ need no internet.

    # Python
    lm_eval.simple_evaluate(model="bitfast", model_args="checkpoint=checkpoints/smollm2-int4", tasks=[...])
    # the lm_eval command line, with this adapter registered and eval/tasks/ on the include path
    python -m eval.lm_adapter run --model bitfast --model_args checkpoint=checkpoints/smollm2-int4 \\
        --tasks hellaswag_offline,arc_easy_offline --limit 100
    # a LoRA adapter (train_qat.py lora) over the checkpoint it was trained on
    ... --model_args checkpoint=checkpoints/smollm2-int4,adapter=out/lora/adapter

Scoring follows lm-eval's Hugging Face model: a context and continuation are encoded together and split where
the context's tokens end (trailing spaces of the context move to the continuation); an empty context is the
prefix token; inputs longer than `max_length` are cut from the left. Requests are length-sorted and run in
right-padded batches (causal attention: padding after a sequence cannot change its logits); requests whose model
input is identical (a multiple-choice question with one-token answers) share one forward pass.
"""
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import load_model, load_tokenizer_for  # noqa: E402
from convert import resolve_checkpoint  # noqa: E402
from cli import DTYPES  # noqa: E402
from decoding import compile_fns, decode_one_token, generate, prefill  # noqa: E402
from lora import load_adapter  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class _StopGeneration(Exception):
    """Raised by _StopAtStrings once a stop string appears: generate() has no stop-string hook."""


class _StopAtStrings:
    """generate()'s token callback: collects the new tokens, ends generation once the text holds a stop string."""

    def __init__(self, tokenizer, until: list[str]):
        self.tokenizer, self.until, self.ids = tokenizer, until, []

    def __call__(self, token_id: int):
        if token_id in self.tokenizer.stop_ids:
            return
        self.ids.append(token_id)
        if self.until and any(s in self.tokenizer.decode(self.ids) for s in self.until):
            raise _StopGeneration


def _whole(value, name: str, low: int = 1) -> int:
    """A model argument (lm-eval passes them as text) as a whole number >= low."""
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < low or str(n) != str(value).strip():
        raise ValueError(f"model argument {name}: expected a whole number >= {low}, got {value!r}")
    return n


@register_model("bitfast")
class BitfastLM(LM):
    """`checkpoint` (default: the default model) is loaded with `device`/`dtype`; tests pass `model` and
    `tokenizer` directly. `batch_size` rows and `max_batch_tokens` padded tokens bound one forward pass;
    `compile` compiles the decode step that generate_until reuses for every request."""

    def __init__(self, checkpoint=None, device=None, dtype=None, batch_size=16, max_batch_size=None,
                 max_length=None, max_batch_tokens=4096, compile=False, model=None, tokenizer=None, adapter=None):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for cuda by default; like its HF model, run on the CPU when there is none.
            if device is not None:
                print(f"no CUDA device: running on the CPU instead of {device}", file=sys.stderr)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            ckpt = resolve_checkpoint(checkpoint)
            dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or torch.float32
            model, tokenizer = load_model(ckpt, device=device, dtype=dtype, fuse=not adapter), load_tokenizer_for(ckpt)
            self.name = ckpt.name
            if adapter:  # a LoRA adapter folder, applied over the checkpoint it was trained on
                load_adapter(model, adapter, ckpt)
                self.name += f"+{Path(adapter).name}"
        else:
            self.name = "model"
        self.model, self.tokenizer = model, tokenizer
        self._device = torch.device(device)
        # lm-eval's "auto" probes memory; a fixed size (max_batch_size, else 16) is predictable on a shared CPU.
        self.batch_size = _whole(max_batch_size or 16, "max_batch_size") if batch_size in (None, "auto") \
            else _whole(batch_size, "batch_size")
        self.max_length = _whole(max_length or min(model.args.block_size, 2048), "max_length", 2)
        if self.max_length > model.args.block_size:
            raise ValueError(f"max_length {self.max_length} exceeds the model's context of {model.args.block_size}")
        self.max_batch_tokens = _whole(max_batch_tokens, "max_batch_tokens")
        self.compile = str(compile).lower() in ("true", "1")
        self._generate_fns = None
        self.stats = defaultdict(lambda: {"requests": 0, "tokens": 0, "seconds": 0.0})

    # ------------------------------------------------------------ tokens

    @property
    def prefix_token_id(self) -> int:
        # Like lm-eval's HF model: bos where the vocabulary has one, else eos.
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def _encode(self, text: str, bos: bool = False) -> list[int]:
        # Special-token text becomes its id, as with HF tokenizers: chat-templated prompts need it.
        return self.tokenizer.encode(text, bos=bos and self.tokenizer.add_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation, bos=True)
        context_ids = self._encode(context, bos=True)
        return context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log-probabilities, whether greedy
        decoding would produce it)."""
        by_input = defaultdict(list)  # model input (context + continuation minus its last token) -> pair indices
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("empty continuation: nothing to score")
            if len(continuation) > self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            by_input[tuple((context + continuation)[-(self.max_length + 1):-1])].append(i)
        inputs = sorted(by_input, key=len, reverse=True)
        results = [None] * len(pairs)
        t0, tokens = time.perf_counter(), 0
        progress = tqdm(total=len(inputs), desc=desc, unit="seq", disable=not sys.stderr.isatty())
        start = 0
        while start < len(inputs):
            width = len(inputs[start])  # longest in the batch: inputs are sorted longest first
            rows = max(1, min(self.batch_size, self.max_batch_tokens // width, len(inputs) - start))
            batch = inputs[start:start + rows]
            ids = torch.zeros(rows, width, dtype=torch.long)
            for b, seq in enumerate(batch):
                ids[b, :len(seq)] = torch.tensor(seq)
            logits = self.model(ids.to(self._device))
            for b, seq in enumerate(batch):
                for i in by_input[seq]:
                    continuation = torch.tensor(pairs[i][1], device=self._device)
                    n = len(continuation)
                    # float32 log-softmax even for a bf16 model: bf16 log-probabilities would bias the sums.
                    logprobs = F.log_softmax(logits[b, len(seq) - n:len(seq)].float(), dim=-1)
                    results[i] = (logprobs.gather(-1, continuation[:, None]).sum().item(),
                                  bool((logprobs.argmax(-1) == continuation).all()))
            tokens += sum(len(seq) for seq in batch)
            start += rows
            progress.update(rows)
            progress.set_postfix(tok_per_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        progress.close()
        self._record(desc, len(pairs), tokens, time.perf_counter() - t0)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = self.score([self.encode_pair(*r.args) for r in requests])
        for r, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Each text's total log-probability, every token scored once from windows of up to max_length
        tokens (lm-eval's rolling windows, the first conditioned on the prefix token)."""
        pairs, owner = [], []
        for n, r in enumerate(requests):
            windows = get_rolling_token_windows(self._encode(r.args[0]), self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score(pairs, desc="loglikelihood_rolling")):
            totals[n] += logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, if asked) generation with generate.py's static-cache loop, one request at a time,
        stopped and cut at the first stop string."""
        if self._generate_fns is None:
            self._generate_fns = compile_fns(self._device) if self.compile else (prefill, decode_one_token)
        prefill_fn, decode_fn = self._generate_fns
        jobs = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if not 0 < max_new < self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be between 1 and max_length={self.max_length}")
            ids = self._encode(context, bos=True)[-(self.max_length - max_new):]
            sampling = {"temperature": float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                        "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}
            jobs.append((ids, max_new, until, sampling))
        # One cache size for the whole call (grown, never shrunk) so a compiled decode graph is reused.
        need = max(len(ids) + max_new for ids, max_new, _, _ in jobs) if jobs else 0
        size = min(self.model.args.block_size, -(-need // 256) * 256)
        if need > size:
            raise ValueError(f"a prompt plus max_gen_toks needs {need} tokens, more than the model's "
                             f"{self.model.args.block_size}")
        if self.model.max_seq_length < size:
            self.model.setup_caches(1, size, device=self._device)
        outputs, t0, tokens = [], time.perf_counter(), 0
        for (ids, max_new, until, sampling), r in zip(
                jobs, tqdm(requests, desc="generate_until", unit="req", disable=not sys.stderr.isatty())):
            collected = _StopAtStrings(self.tokenizer, until)
            prompt = torch.tensor(ids, dtype=torch.int, device=self._device)
            try:
                generate(self.model, prompt, max_new, stop_ids=self.tokenizer.stop_ids, on_token=collected,
                         prefill_fn=prefill_fn, decode_fn=decode_fn, **sampling)
            except _StopGeneration:
                pass
            text = self.tokenizer.decode(collected.ids)
            cut = min([text.find(s) for s in until if s in text], default=len(text))
            outputs.append(text[:cut])
            tokens += len(collected.ids)
            self.cache_hook.add_partial("generate_until", r.args, text[:cut])
        self._record("generate_until", len(requests), tokens, time.perf_counter() - t0)
        return outputs

    # ------------------------------------------------------------ chat templates and bookkeeping

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def chat_template(self, chat_template=False) -> str:
        return self.tokenizer.chat_template or ""

    def _record(self, kind: str, requests: int, tokens: int, seconds: float):
        stats = self.stats[kind]
        stats["requests"] += requests
        stats["tokens"] += tokens
        stats["seconds"] += seconds
        print(f"{kind}: {requests} requests, {tokens} tokens in {seconds:.1f} s "
              f"({tokens / max(seconds, 1e-9):.0f} tok/s)", file=sys.stderr)


def main():
    """The lm_eval command line with the "bitfast" model registered and eval/tasks/ on the task include path."""
    from lm_eval.__main__ import cli_evaluate
    if len(sys.argv) > 1 and "--include_path" not in sys.argv and sys.argv[1] not in ("-h", "--help"):
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
