"""Shared by every entry point: the argument parser, checked numeric flags, device/dtype/thread options, and bad
input ending in one clear line and exit 2 instead of a traceback.

Validation happens at the edges (flags here, files where they are read) and raises ValueError with the file or
flag and what was expected; `run` turns only those user errors into one line, so a bug still shows its traceback."""
import argparse
import os
import sys
from pathlib import Path

import torch

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (`error: argument --x: ...`) and exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _number(kind, low=None, low_open=False, high=None, what="", high_open=False):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if low is not None and (v < low or (low_open and v == low)) or high is not None and (
                v > high or (high_open and v == high)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, what="a whole number >= 1")
nonneg_int = _number(int, 0, what="a whole number >= 0")
positive_float = _number(float, 0.0, low_open=True, what="a number > 0")
nonneg_float = _number(float, 0.0, what="a number >= 0")
probability = _number(float, 0.0, low_open=True, high=1.0, what="a number in (0, 1]")
fraction = _number(float, 0.0, high=1.0, high_open=True, what="a number in [0, 1)")


def nonempty(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


nonempty.__name__ = "non-empty value"


def device(text):
    """cpu, cuda or cuda:N, available on this machine."""
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda or cuda:N)") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda or cuda:N)")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


device.__name__ = "device"


def add_device_args(p, bf16_on_capable_cpus: bool = False):
    """--device, --dtype, --threads. With `bf16_on_capable_cpus` (running a model, not training or scoring it)
    the CPU default is bfloat16 where the CPU computes it natively (cpu_has_native_bf16)."""
    cpu_default = "bfloat16 on CPUs with AVX512-BF16 or AMX, else float32" if bf16_on_capable_cpus else "float32"
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help=f"default: bfloat16 on CUDA, {cpu_default} on CPU")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    p.set_defaults(bf16_on_capable_cpus=bf16_on_capable_cpus)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16): then bf16 halves the bytes each
    decode step streams at no cost in speed; elsewhere bf16 math is emulated and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to ask cheaply, keep float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup_device(args) -> torch.dtype:
    """Apply --threads and return the dtype --dtype asks for (or the device's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype:
        return DTYPES[args.dtype]
    if args.device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if getattr(args, "bf16_on_capable_cpus", False) and cpu_has_native_bf16() else torch.float32


def init_distributed(device: str) -> tuple:
    """(rank, world size, device) under torchrun (a gloo process group on CPU, nccl on CUDA with one GPU per
    process); (0, 1, device) otherwise."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def run(main):
    try:
        return main()
    except USER_ERRORS as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def convert_command(doc: str, convert, source: str):
    """The converter commands (scripts/convert_*.py): `SOURCE OUT_DIR` -> a bitfast checkpoint folder."""
    def main():
        p = ArgumentParser(description=doc)
        p.add_argument(source)
        p.add_argument("out_dir")
        a = p.parse_args()
        print(f"wrote {convert(getattr(a, source), a.out_dir)}")
    run(main)
