"""train_qat.py (and qat/) against independent references: float64 KL from its definition, known answers (teacher
confidence, the schedule), an uninterrupted run for resume (in-process stop and a real SIGKILL), a single
process for 2-process DDP, and the fake-quant student for the exported packed checkpoint."""
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qat.loop
import train_qat
from checkpoint import (
    load_model,
    load_state_dict,
    load_tokenizer_for,
    read_config,
)
from eval.data import corpus_documents
from model import ModelArgs, Transformer
from qat.config import RunSettings
from qat.data import step_windows, training_tokens
from qat.loop import kl_terms, lr_at, teacher_confidence
from qat.runs import checkpoints, export_latest, load_params, load_sharded_params
from qat.student import build_student
from qlinear import QuantLinear
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = {"n_layer": 2, "n_head": 4, "n_local_heads": 2, "dim": 64, "intermediate_size": 128, "vocab_size": 49152,
        "block_size": 256, "tie_embeddings": True}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random model carrying the default model's tokenizer, and small training/held-out texts."""
    root = tmp_path_factory.mktemp("qat")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
    save_tiny(model, root / "tiny", tokenizer=True)
    docs = corpus_documents("boolq", "calibration")
    (root / "train.txt").write_text("\n\n".join(docs[:12]))
    (root / "heldout.txt").write_text("\n\n".join(corpus_documents("boolq", "eval")[:3]))
    return root


def train_args(files, run_dir, *extra):
    return train_qat.parse_args([
        "train", "--checkpoint", str(files / "tiny"), "--data", str(files / "train.txt"), "--format", "int2-g32",
        "--seq_len", "32", "--batch_size", "4", "--micro_batch", "2", "--steps", "6", "--warmup", "2", "--lr", "3e-2",
        "--eval_data", str(files / "heldout.txt"), "--eval_every", "3", "--eval_tokens", "256", "--eval_context", "32",
        "--save_every", "2", "--keep_checkpoints", "5", "--run_dir", str(run_dir), "--threads", "1", *extra])


def final_params(run_dir):
    return {k: v for k, v in load_state_dict(checkpoints(Path(run_dir))[-1] / "state.safetensors").items()
            if k.startswith("param/")}


def exported(run_dir):
    return load_state_dict(Path(run_dir) / "model" / "model.safetensors")


def assert_same_tensors(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            torch.testing.assert_close(a[k].float(), b[k].float(), **tol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- losses, schedule, data order

def test_kl_terms_and_losses_match_float64_definitions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    ps, pt = s.double().softmax(-1), t.double().softmax(-1)
    fkl = (pt * (pt.log() - ps.log())).sum(-1)  # KL(teacher || student)
    rkl = (ps * (ps.log() - pt.log())).sum(-1)
    forward, reverse = kl_terms(s, t)
    torch.testing.assert_close(forward.double(), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reverse.double(), rkl, rtol=1e-5, atol=1e-6)
    beta = 0.3
    cases = {"fkl": fkl.mean(), "rkl": rkl.mean(), "cakld": (beta * rkl + (1 - beta) * fkl).mean(),
             "ce": -ps.log().gather(-1, labels.unsqueeze(-1)).mean()}
    for kind, want in cases.items():
        assert qat.loop.loss_fn(kind, s, t, labels, beta).item() == pytest.approx(want.item(), rel=1e-5), kind
    assert qat.loop.loss_fn("fkl", s, s, labels, beta).item() == pytest.approx(0, abs=1e-6)


def test_teacher_confidence_is_mean_top1_probability():
    probs = torch.tensor([0.5, 0.25, 0.25])
    teacher = lambda x: probs.log().expand(*x.shape, 3)  # every position's top-1 probability is 0.5
    windows = torch.zeros(3, 9, dtype=torch.long)
    conf = teacher_confidence(teacher, windows, 2, "cpu", contextlib.nullcontext)
    assert conf == pytest.approx(0.5)


def test_schedule_warms_up_then_follows_cosine():
    a = {"lr": 1e-3, "min_lr": 1e-4, "warmup": 4, "steps": 14}
    assert [lr_at(s, **a) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(9, **a) == pytest.approx(5.5e-4)  # half-way through the decay: the mean of lr and min_lr
    assert lr_at(14, **a) == pytest.approx(1e-4)


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    batches = [step_windows(s, 10, 3, seed=1) for s in range(6)]  # 3 steps per epoch, 1 window dropped
    for epoch in (batches[:3], batches[3:]):
        seen = torch.cat(epoch).tolist()
        assert len(set(seen)) == 9 and max(seen) < 10
    assert not torch.equal(torch.cat(batches[:3]), torch.cat(batches[3:]))
    assert torch.equal(step_windows(4, 10, 3, seed=1), batches[4])


# ---------------------------------------------------------------- runs

def test_run_logs_checkpoints_and_exports_a_loadable_model(files, tmp_path):
    summary = train_qat.train(train_args(files, tmp_path / "run"))
    assert summary["finished"] and summary["tokens"] == 6 * 4 * 32
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_ppl" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["tok_s"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0 for r in steps)
    # Distillation moved the student towards the teacher on held-out text.
    args = train_args(files, tmp_path / "run")
    start, _ = build_student(RunSettings.from_flags(vars(args)), files / "tiny", None)
    tokens = torch.tensor(load_tokenizer_for(files / "tiny").encode((files / "heldout.txt").read_text()))[None, :200]
    with torch.no_grad():
        teacher = load_model(files / "tiny")(tokens)
        kl = {name: kl_terms(m(tokens), teacher)[0].mean().item()
              for name, m in [("start", start), ("trained", load_model(tmp_path / "run" / "model"))]}
    assert kl["trained"] < 0.95 * kl["start"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert [p.name for p in checkpoints(tmp_path / "run")] == [f"step-00000{i}" for i in (2, 4, 6)]
    config = read_config(tmp_path / "run" / "model")
    assert config["quantization"]["recipe"]["layers.0.attention.wq"] == "int2-g32-asym"
    assert config["quantization"]["method"] == "qat-cakld"


@pytest.mark.parametrize("int8_head_and_scales", [False, True])
def test_exported_packed_model_equals_the_trained_fake_quant_student(files, tmp_path, int8_head_and_scales):
    extra = []
    if int8_head_and_scales:  # a quantized tied head (its embedding follows it) and trained scales
        recipe = tmp_path / "recipe.json"
        recipe.write_text(json.dumps({"default": "int2-g32", "layers": {"output": "int8"}}))
        extra = ["--recipe", str(recipe), "--train_scales"]
    args = train_args(files, tmp_path / "run", "--eval_every", "0", *extra)
    train_qat.train(args)
    student, _ = build_student(RunSettings.from_flags(vars(args)), files / "tiny", None)
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    tensors = load_state_dict(checkpoints(tmp_path / "run")[-1] / "state.safetensors")
    load_params(tensors, params, tmp_path / "run")
    if int8_head_and_scales:  # the export rounds trained scales to the fp16 a checkpoint stores; do the same to the reference
        with torch.no_grad():
            for n, p in params.items():
                if n.endswith("scales"):
                    p.copy_(p.half().float())
    packed = load_model(tmp_path / "run" / "model")
    assert isinstance(packed.output, QuantLinear) == int8_head_and_scales
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = student(tokens), packed(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_stopped_and_resumed_run_reaches_the_same_weights(files, tmp_path):
    train_qat.train(train_args(files, tmp_path / "whole"))
    part = train_args(files, tmp_path / "part", "--stop_after", "3")
    assert not train_qat.train(part)["finished"]
    # As if killed between checkpoints: step 3's checkpoint never landed, its log rows did (and a torn line).
    (tmp_path / "part" / "step-000003").rename(tmp_path / "part" / ".step-000003.tmp")
    with open(tmp_path / "part" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')
    train_qat.train(train_args(files, tmp_path / "part", "--resume"))
    assert_same_tensors(final_params(tmp_path / "part"), final_params(tmp_path / "whole"))
    assert_same_tensors(exported(tmp_path / "part"), exported(tmp_path / "whole"))
    drop_time = lambda path: [{k: v for k, v in json.loads(x).items() if k not in ("tok_s", "time", "eval_s")}
                              for x in (path / "log.jsonl").read_text().splitlines()]
    assert drop_time(tmp_path / "part") == drop_time(tmp_path / "whole")
    assert not list((tmp_path / "part").glob(".step-*"))


def cli_train_command(files, run_dir, *extra):
    args = train_args(files, run_dir, *extra)
    cmd = ["train"]
    for k, v in vars(args).items():
        if k == "command" or v is None or v is False:
            continue
        cmd += [f"--{k}"] + ([] if v is True else [str(v)])
    return cmd


def test_run_killed_by_sigkill_resumes_to_the_same_weights(files, tmp_path):
    slow = ["--steps", "20", "--eval_every", "0"]
    train_qat.train(train_args(files, tmp_path / "whole", *slow))
    proc = subprocess.Popen([sys.executable, "train_qat.py", *cli_train_command(files, tmp_path / "killed", *slow)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "step-000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reached = checkpoints(tmp_path / "killed")
    assert reached and reached[-1].name < "step-000020"  # killed mid-run
    train_qat.train(train_args(files, tmp_path / "killed", *slow, "--resume"))
    assert_same_tensors(final_params(tmp_path / "killed"), final_params(tmp_path / "whole"))
    assert_same_tensors(exported(tmp_path / "killed"), exported(tmp_path / "whole"))


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(files, tmp_path):
    train_qat.train(train_args(files, tmp_path / "single", "--micro_batch", "1", "--eval_every", "0"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train_qat.py",
           *cli_train_command(files, tmp_path / "ddp", "--micro_batch", "1", "--eval_every", "0")]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es) x 2 micro-batch(es)" in r.stderr
    assert_same_tensors(final_params(tmp_path / "ddp"), final_params(tmp_path / "single"), rtol=0, atol=2e-5)


def torchrun(files, run_dir, *extra, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train_qat.py",
           *cli_train_command(files, run_dir, *extra)]
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


def sharded_params(files, run_dir):
    """The trainable tensors of a run's latest (sharded) checkpoint, whole, named as final_params names them."""
    student, _ = build_student(RunSettings.from_flags(vars(train_args(files, run_dir))), files / "tiny", None)
    load_sharded_params(student, checkpoints(Path(run_dir))[-1])
    return {f"param/{n}": p.detach() for n, p in student.named_parameters() if p.requires_grad}


def test_fsdp_two_processes_equal_one_process_and_resume_exactly(files, tmp_path):
    fsdp = ["--micro_batch", "1", "--fsdp", "--activation_checkpointing"]
    train_qat.train(train_args(files, tmp_path / "single", "--micro_batch", "1", "--eval_every", "0"))
    torchrun(files, tmp_path / "whole", *fsdp)  # evaluates at steps 0, 3, 6 with every process
    shards = sorted(p.name for p in checkpoints(tmp_path / "whole")[-1].iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]
    whole = sharded_params(files, tmp_path / "whole")
    assert_same_tensors(whole, final_params(tmp_path / "single"), rtol=0, atol=2e-5)
    evals = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval_ppl" in r] == [0, 3, 6]
    # The export at the end of the run (rank 0 packs the gathered shards) = one process packing the checkpoint.
    export_latest(tmp_path / "whole", tmp_path / "exported")
    assert_same_tensors(exported(tmp_path / "whole"), load_state_dict(tmp_path / "exported" / "model.safetensors"))

    torchrun(files, tmp_path / "part", *fsdp, "--stop_after", "3")
    # As if killed while writing step 3: only its temp folder exists.
    (tmp_path / "part" / "step-000003").rename(tmp_path / "part" / ".step-000003.tmp")
    shutil.copytree(tmp_path / "part", tmp_path / "one")
    torchrun(files, tmp_path / "part", *fsdp, "--resume")
    assert_same_tensors(sharded_params(files, tmp_path / "part"), whole)
    assert_same_tensors(exported(tmp_path / "part"), exported(tmp_path / "whole"))
    # Another world size: one process reads the two processes' shards whole and goes on.
    train_qat.train(train_args(files, tmp_path / "one", *fsdp, "--resume"))
    assert_same_tensors(sharded_params(files, tmp_path / "one"), whole, rtol=0, atol=2e-5)
    # A run of whole-tensor checkpoints cannot go on sharded: one line, exit 2, nothing written.
    before = sorted((tmp_path / "single").rglob("*"))
    r = torchrun(files, tmp_path / "single", *fsdp, "--resume", check=False)
    assert "exitcode  : 2" in r.stderr and "written without --fsdp): resume it without --fsdp" in r.stderr
    assert sorted((tmp_path / "single").rglob("*")) == before
    shard = checkpoints(tmp_path / "whole")[-1] / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="sharded checkpoint is damaged or does not match"):
        train_qat.train(train_args(files, tmp_path / "whole", *fsdp, "--resume"))


# ---------------------------------------------------------------- teacher data

def test_gen_data_continues_an_interrupted_file_to_the_same_records(files, tmp_path):
    def gen(out, count):
        train_qat.main(["gen-data", "--checkpoint", str(files / "tiny"), "--source", str(files / "train.txt"),
                        "--out", str(out), "--count", str(count), "--prompt_tokens", "8", "--max_new_tokens", "12",
                        "--batch_size", "3", "--threads", "1"])
        return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}

    whole = gen(tmp_path / "whole.jsonl", 7)
    assert sorted(whole) == list(range(7))
    assert all(len(r["tokens"]) <= 8 + 12 and r["text"].startswith(r["prompt"]) for r in whole.values())
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:4]) + lines[4][:15])  # killed mid-line, mid-batch
    assert gen(tmp_path / "cut.jsonl", 7) == whole
    tokens = training_tokens(str(tmp_path / "cut.jsonl"), load_tokenizer_for(files / "tiny"), TINY["vocab_size"])
    assert tokens.numel() >= sum(len(r["tokens"]) for r in whole.values())
    with pytest.raises(ValueError, match="another source or prompt settings"):
        train_qat.main(["gen-data", "--checkpoint", str(files / "tiny"), "--source", str(files / "heldout.txt"),
                        "--out", str(tmp_path / "whole.jsonl"), "--count", "7", "--prompt_tokens", "8"])


# ---------------------------------------------------------------- bad input

def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    train_qat.train(train_args(files, tmp_path / "clean", "--stop_after", "2", "--eval_every", "0"))
    calls = []
    real = qat.loop.loss_fn

    def poisoned(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 5 else loss  # step 3, first micro-batch

    monkeypatch.setattr(qat.loop, "loss_fn", poisoned)
    with pytest.raises(ValueError, match=r"loss is nan .* at step 3.*step-000002"):
        train_qat.train(train_args(files, tmp_path / "run", "--eval_every", "0"))
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-000002"]
    assert_same_tensors(final_params(tmp_path / "run"), final_params(tmp_path / "clean"))
    assert not (tmp_path / "run" / "model").exists()


def test_bad_resume_checkpoints_and_settings_fail_clearly(files, tmp_path):
    train_qat.train(train_args(files, tmp_path / "run", "--stop_after", "2", "--eval_every", "0"))
    with pytest.raises(ValueError, match="pass --resume"):
        train_qat.train(train_args(files, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"other settings: --lr"):
        train_qat.train(train_args(files, tmp_path / "run", "--resume", "--lr", "1e-3"))
    state = tmp_path / "run" / "step-000002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        train_qat.train(train_args(files, tmp_path / "run", "--resume"))
    (state.parent / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON"):
        train_qat.train(train_args(files, tmp_path / "run", "--resume"))


def test_empty_or_too_small_data_fails_clearly(files, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no text in file"):
        train_qat.train(train_args(files, tmp_path / "a", "--data", str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("Just a few words.")
    with pytest.raises(ValueError, match="fewer than one training window"):
        train_qat.train(train_args(files, tmp_path / "b", "--data", str(tmp_path / "short.txt")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_unknown_layer_in_recipe_is_one_clear_line(files, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"default": "int2-g32", "layers": {"blocks.*": "int8"}}))
    r = subprocess.run([sys.executable, "train_qat.py", *cli_train_command(files, tmp_path / "run", "--recipe", str(recipe))],
                       check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "matches no layer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()
