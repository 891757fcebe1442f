"""Quantization-aware training by self-distillation (BitDistiller): the float model teaches its own quantized copy.

    python train_qat.py gen-data --out data/teacher.jsonl --count 256        # the teacher continues corpus prompts
    python train_qat.py train --data data/teacher.jsonl --format int2-g64 --init awq --run_dir out/qat
    python train_qat.py train ... --resume                                    # continue from the latest checkpoint
    torchrun --nproc-per-node=2 train_qat.py train ...                        # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc-per-node=2 train_qat.py train --fsdp ...                 # FSDP2: student and AdamW sharded
    python train_qat.py export --run_dir out/qat --out checkpoints/qat        # pack a run's latest checkpoint
    python train_qat.py lora --checkpoint checkpoints/int4 --data my.jsonl --rank 16 --run_dir out/lora  # QLoRA

The student is the model with its planned linears as QuantLinear in fake-quant mode: float latent weights,
rounded on the fly with a straight-through estimator against the scales and zeros of a PTQ result (RTN, GPTQ or
AWQ+clip computed here, or any quantized checkpoint). The latents and the norms train; the scales stay fixed
unless --train_scales. The teacher is the float model, frozen; its logits are computed on the fly.
Losses: CAKLD = beta * reverse KL + (1 - beta) * forward KL with beta the teacher's mean token confidence
(its mean top-1 probability on the training data, as BitDistiller), forward KL, reverse KL, cross-entropy.

A run folder holds log.jsonl (every step; periodic held-out perplexity), step-NNNNNN/ checkpoints (trainable
tensors, optimizer, RNG, data position; written to a temp folder and renamed), curves.png, and the exported
packed checkpoint (model/ unless --out), which generate.py and eval/ load with no extra flags.

`lora` trains LoRA adapters (lora.py) over the --checkpoint as it is, float or quantized (QLoRA), with the same
loop, losses (cross-entropy by default; distillation from --teacher), resume and DDP; it saves an adapter folder
(adapter/ unless --out) that generate.py --adapter and eval/ load, or scripts/merge_lora.py merges.
"""
from pathlib import Path

import cli
from checkpoint import is_checkpoint_dir, load_model, load_tokenizer_for
from convert import resolve_checkpoint
from cli import add_device_args, run, setup_device
from fileio import check_output_dir, check_output_file
from lora import is_adapter_dir
from qat.config import RunOptions, RunSettings, add_train_flags
from qat.data import is_gen_data_file, prompt_batches, write_teacher_data, written_rows
from qat.lora import LoRARun, add_lora_flags, check_lora_flags
from qat.loop import train as train_run
from qat.runs import export_latest

# This file is the command line; the work is done by qat/: config (the train flags, RunSettings, RunOptions), data
# (teacher data, training tokens, windows), student (the fake-quant student and its export), loop (losses, schedule,
# step, evaluation, a whole run), runs (the run folder: checkpoints, state.json, log, plot, resume, export).


def gen_data(args):
    """The float model continues corpus prompts; an existing output file is continued where it stopped."""
    out = check_output_file(args.out, is_gen_data_file, "gen-data file")
    dtype = setup_device(args)
    ckpt = resolve_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer_for(ckpt)
    batches = prompt_batches(tokenizer, args.source, args.count, args.prompt_tokens, args.chat, args.batch_size)
    done = written_rows(out, batches)
    model = load_model(ckpt, device=args.device, dtype=dtype)
    if max(len(ids) for batch in batches for _, ids in batch) + args.max_new_tokens > model.args.block_size:
        raise ValueError(f"prompt + --max_new_tokens exceeds the model's context of {model.args.block_size} tokens")
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    write_teacher_data(model, tokenizer, batches, done, out, args.max_new_tokens, args.seed, sampling)


def train(args) -> dict:
    """Train (or resume) a run from the parsed train flags; returns the run's summary."""
    dtype = setup_device(args)
    flags = vars(args)
    lora = LoRARun.from_flags(flags) if args.command == "lora" else None
    return train_run(RunSettings.from_flags(flags), RunOptions.from_flags(flags), flags, args.device, dtype, lora)


def export_run(args):
    """Pack the latest checkpoint of a run (finished or not) into a quantized checkpoint (a LoRA run: an adapter)."""
    out = check_output_dir(args.out, lambda p: is_checkpoint_dir(p) or is_adapter_dir(p), "checkpoint")
    print(f"exported {export_latest(Path(args.run_dir), out)} -> {out}")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gen-data", help="the float model continues prompts from a corpus; appends to a JSONL file")
    g.add_argument("--checkpoint", help="float bitfast checkpoint (default: SmolLM2-135M-Instruct)")
    g.add_argument("--source", default="boolq", type=cli.nonempty,
                   help="boolq | lambada (calibration split) | a .txt/.jsonl file")
    g.add_argument("--out", required=True, type=cli.nonempty,
                   help="JSONL file; an existing one is continued where it stopped")
    g.add_argument("--count", type=cli.positive_int, default=256, help="number of prompts")
    g.add_argument("--prompt_tokens", type=cli.positive_int, default=64,
                   help="prompt length (chat: longest paragraph)")
    g.add_argument("--chat", action="store_true", help="wrap each paragraph as a user message in the chat template")
    g.add_argument("--max_new_tokens", type=cli.positive_int, default=256)
    g.add_argument("--temperature", type=cli.nonneg_float, default=0.7, help="0: greedy")
    g.add_argument("--top_k", type=cli.positive_int, default=None)
    g.add_argument("--top_p", type=cli.probability, default=None)
    g.add_argument("--batch_size", type=cli.positive_int, default=16, help="prompts decoded together")
    g.add_argument("--seed", type=cli.nonneg_int, default=42)
    add_device_args(g)

    t = add_train_flags(sub.add_parser("train", help="quantization-aware training of the student against the "
                                                     "float teacher"))

    lo = add_lora_flags(add_train_flags(sub.add_parser(
        "lora", help="train LoRA adapters over a frozen float or quantized checkpoint (QLoRA)")))

    e = sub.add_parser("export", help="pack a run's latest checkpoint into a quantized checkpoint (or adapter)")
    e.add_argument("--run_dir", required=True, type=cli.nonempty)
    e.add_argument("--out", required=True, type=cli.nonempty)

    args = p.parse_args(argv)
    if args.command in ("train", "lora"):
        check_train_flags(t if args.command == "train" else lo, args)
    if args.command == "lora":
        check_lora_flags(lo, args)
    return args


def check_train_flags(t, args):
    """What one flag's type cannot check: ranges and flags that must agree."""
    if args.beta is not None and args.beta > 1:
        t.error(f"argument --beta: expected a number in [0, 1], got {args.beta}")
    if args.batch_size % args.micro_batch:
        t.error(f"--batch_size {args.batch_size} is not a multiple of --micro_batch {args.micro_batch}")
    if args.eval_context < 2:
        t.error("argument --eval_context: expected a whole number >= 2 (a window scores tokens 2..N)")
    run_dir = Path(args.run_dir).resolve()
    if args.out and (Path(args.out).resolve() == run_dir or Path(args.out).resolve() in run_dir.parents):
        t.error(f"--out {args.out} would replace the run folder {args.run_dir}; name another folder")


def main(argv=None):
    args = parse_args(argv)
    {"gen-data": gen_data, "train": train, "lora": train, "export": export_run}[args.command](args)


if __name__ == "__main__":
    run(main)
