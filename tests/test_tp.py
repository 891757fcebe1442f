"""Tensor-parallel generation (tp.py) against one process: two gloo processes under torchrun give the logits and
greedy tokens of the unsplit model, float and quantized (int8 per-channel, int4 grouped with zeros); generate.py
under torchrun prints what it prints alone; head counts or group sizes that do not split fail in one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calibrate import quantize_model
from checkpoint import load_model, save_quantized
from model import ModelArgs, Transformer
from qlinear import linear_names, resolve_recipe
from tests.tiny import save_tiny
from tests.tp_worker import outputs
from tp import apply_tensor_parallel, check_divides

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=256, block_size=128,
            tie_embeddings=True)
FORMATS = ("float", "int8", "int4-g32")


def tiny_checkpoints(root: Path, formats=FORMATS, **overrides) -> dict:
    """{format: checkpoint folder}: a tiny random float model and its RTN copies."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    folders = {"float": save_tiny(model, root / "float", tokenizer=overrides.get("vocab_size") == 49152)}
    for fmt in formats[1:]:
        quantized = load_model(folders["float"])
        plan = resolve_recipe({"default": fmt}, linear_names(quantized))
        quantize_model(quantized, plan, "rtn", log=lambda s: None)
        folders[fmt] = save_quantized(quantized, plan, folders["float"], root / fmt, {"method": "rtn"})
    return folders


def torchrun(*argv, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *argv]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_give_the_logits_and_tokens_of_one(tmp_path, one_thread):
    folders = tiny_checkpoints(tmp_path)
    torchrun("tests/tp_worker.py", str(tmp_path / "out.pt"), *map(str, folders.values()))
    split = torch.load(tmp_path / "out.pt", weights_only=True)
    for fmt, folder in folders.items():
        want, got = outputs(load_model(folder)), split[str(folder)]
        for key in ("plain", "prefill", "decode"):
            scale = want[key].abs().max().item()
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-5 * scale, msg=f"{fmt} {key}")
        assert torch.equal(got["tokens"], want["tokens"]), fmt


def test_generate_under_torchrun_prints_what_one_process_prints(tmp_path):
    folder = tiny_checkpoints(tmp_path, ("float", "int4-g32"), vocab_size=49152)["int4-g32"]
    argv = ["generate.py", "--checkpoint", str(folder), "--prompt", "The capital of France", "--max_new_tokens",
            "12", "--threads", "1", "--dtype", "float32"]  # bf16 would round the split sums differently
    alone = subprocess.run([sys.executable, *argv], check=True, cwd=ROOT, capture_output=True, text=True)
    split = torchrun(*argv)
    assert split.stdout == alone.stdout and len(alone.stdout) > len("The capital of France")


def test_heads_that_do_not_split_fail_in_one_line(tmp_path):
    smollm2 = ModelArgs.from_name("smollm2-135m")  # 9 query heads, 3 key/value heads
    check_divides(smollm2, 3)
    with pytest.raises(ValueError, match=r"query heads \(9\) and key/value heads \(3\) to divide by 2"):
        check_divides(smollm2, 2)
    folder = tiny_checkpoints(tmp_path, ("float",), n_head=6, n_local_heads=3, dim=96,
                              vocab_size=49152)["float"]
    r = torchrun("generate.py", "--checkpoint", str(folder), "--max_new_tokens", "4", check=False)
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr  # torchrun's report of the processes that failed
    assert r.stderr.count("Traceback") == 1  # torchrun's own, not one of ours
    assert r.stderr.count("error: tensor parallelism over 2 processes needs the query heads (6) and key/value heads "
                          "(3) to divide by 2\n") == 1  # rank 0's line


def test_row_split_of_a_quantized_layer_needs_whole_groups(tmp_path):
    model = load_model(tiny_checkpoints(tmp_path, ("float", "int4-g32"), n_head=8, n_local_heads=4)["int4-g32"])
    with pytest.raises(ValueError, match=r"layers.0.attention.wo: its 64 input features split over 4 processes are "
                                         r"16 each, not a multiple of int4-g32-asym's group size 32"):
        apply_tensor_parallel(model, 0, 4)
