"""Shared by every entry point: device/dtype/thread options, and bad input ending in one clear line and a
non-zero exit instead of a traceback."""
import sys

import torch

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_device_args(p):
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")


def setup_device(args) -> torch.dtype:
    """Apply --threads, check --device, and return the dtype --dtype asks for (or the device's default)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def run(main):
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
