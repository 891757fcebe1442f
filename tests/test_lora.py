"""LoRA / QLoRA (lora.py, qat/lora.py, train_qat.py lora, scripts/merge_lora.py) against independent references:
the float64 formula base + (alpha/r) B A x, a float model holding the quantized base's dequantized weights (for
gradients through the packed base), the adapted model (for merging), the RTN half-step bound and a float64
recomputation (for the reported re-quantization error), an uninterrupted run (for resume) and one process (for
2-process DDP)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cli
import train_qat
from calibrate import quantize_model
from checkpoint import load_model, load_state_dict, load_tokenizer_for, read_config, save_quantized
from eval.data import corpus_documents
from lora import (
    LoRAConfig,
    LoRALinear,
    adapted_layers,
    apply_lora,
    load_adapter,
    merge_lora,
    remove_lora,
    save_adapter,
    target_layers,
)
from model import Linear, ModelArgs, Transformer
from qat.lora import LoRARun, build_lora_student
from qat.runs import checkpoints
from qat.student import plan_for
from qlinear import QuantLinear, expand_groups, plan_format_names
from scripts import merge_lora as merge_script
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = {"n_layer": 2, "n_head": 4, "n_local_heads": 2, "dim": 64, "intermediate_size": 128, "vocab_size": 49152,
        "block_size": 256, "tie_embeddings": True}
TOKENS = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random float model with the default tokenizer, its RTN int4-g32 quantization, a second (other) float
    base, and small training/held-out texts."""
    root = tmp_path_factory.mktemp("lora")
    for name, seed in (("tiny", 0), ("other", 1)):
        torch.manual_seed(seed)
        model = Transformer(ModelArgs(**TINY))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
        save_tiny(model, root / name, tokenizer=True)
    quantized = load_model(root / "tiny")
    plan = plan_for("int4-g32", None, quantized)
    quantize_model(quantized, plan, "rtn", None, log=lambda _: None)
    save_quantized(quantized, plan, root / "tiny", root / "tiny-int4", {"method": "rtn"})
    (root / "train.txt").write_text("\n\n".join(corpus_documents("boolq", "calibration")[:12]))
    (root / "heldout.txt").write_text("\n\n".join(corpus_documents("boolq", "eval")[:3]))
    return root


def random_adapters(model, seed: int = 0):
    """Non-zero B (a fresh adapter's B is zero, which would hide every bug in the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted_layers(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)


def adapted(ckpt, targets=("layers.*",), rank=4, alpha=8.0, seed=0):
    model = load_model(ckpt)
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(rank, alpha, 0.0, targets))
    random_adapters(model, seed)
    return model


def dense_weight(base) -> torch.Tensor:
    return base.float_weight() if isinstance(base, QuantLinear) else base.weight.detach().float()


# ---------------------------------------------------------------- the module

@pytest.mark.parametrize("base", ["tiny", "tiny-int4"])
def test_forward_equals_base_plus_scaled_update_in_float64(files, base):
    model = adapted(files / base, alpha=12.0)
    layer = model.layers[1].feed_forward.w2
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear if base == "tiny-int4" else Linear)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    w, a, b = dense_weight(layer.base).double(), layer.lora_a.double(), layer.lora_b.double()
    want = x.double() @ w.T + (12.0 / 4) * (x.double() @ a.T) @ b.T
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # A fresh adapter (B = 0) leaves the model's logits as they were; removing it restores the base modules.
    fresh = load_model(files / base)
    with torch.no_grad():
        before = fresh(TOKENS)
        apply_lora(fresh, LoRAConfig(4, 8.0))
        assert torch.equal(fresh(TOKENS), before)
        remove_lora(fresh)
    assert not adapted_layers(fresh) and torch.equal(fresh(TOKENS), before)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(4, 8.0))


def test_targets_are_globs_or_regexes_and_must_name_a_layer(files):
    model = load_model(files / "tiny")
    assert target_layers(model, ["layers.*.attention.wq"]) == ["layers.0.attention.wq", "layers.1.attention.wq"]
    assert target_layers(model, [r"re:layers\.1\.feed_forward\.w[13]"]) == ["layers.1.feed_forward.w1",
                                                                            "layers.1.feed_forward.w3"]
    with pytest.raises(ValueError, match="names no linear layer"):
        target_layers(model, ["layers.*.attention.wq", "blocks.*"])
    with pytest.raises(ValueError, match="tied to the token embedding"):
        target_layers(model, ["output"])


@pytest.mark.parametrize("base", ["tiny", "tiny-int4"])
def test_only_adapters_get_gradients_and_they_match_a_float_reference(files, base):
    """Through the packed quantized base the adapters' gradients equal those of a float model holding the
    dequantized weights: the backward through QuantLinear is right without a float copy being kept."""
    model = adapted(files / base)
    reference = load_model(files / "tiny")
    with torch.no_grad():
        for name, m in adapted_layers(model).items():
            reference.get_submodule(name).weight.copy_(dense_weight(m.base))
    apply_lora(reference, LoRAConfig(4, 8.0))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    grads = {}
    for name, m in (("model", model), ("reference", reference)):
        F.cross_entropy(m(TOKENS[:, :-1]).flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(grads["model"]) and trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 14  # A and B of the 7 linears of each of the 2 blocks
    assert all(g.abs().sum() > 0 for g in grads["model"].values())
    assert not any(isinstance(b, torch.Tensor) and b.requires_grad for b in model.buffers())
    for n, g in grads["model"].items():
        torch.testing.assert_close(g, grads["reference"][n], rtol=1e-4, atol=1e-6, msg=n)


# ---------------------------------------------------------------- merging

def test_merge_into_float_base_gives_the_adapted_logits(files):
    model = adapted(files / "tiny")
    with torch.no_grad():
        want = model(TOKENS)
        assert merge_lora(model) == {}
        got = model(TOKENS)
    assert not adapted_layers(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_merge_into_quantized_base_requantizes_and_reports_its_error(files, method):
    model = adapted(files / "tiny-int4")
    merged_float = {n: (dense_weight(m.base).double() + m.scale * m.lora_b.double() @ m.lora_a.double())
                    for n, m in adapted_layers(model).items()}
    calib = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(2))
    error = merge_lora(model, method, calib if method == "gptq" else None)
    diff_sq = ref_sq = 0.0
    for name, w in merged_float.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.fmt.name == "int4-g32-asym"
        d = layer.float_weight().double() - w
        assert error["layers"][name]["rel_fro"] == pytest.approx((d.norm() / w.norm()).item(), rel=1e-9)
        assert error["layers"][name]["max_abs"] == pytest.approx(d.abs().max().item(), rel=1e-9)
        assert d.abs().max() <= error["max_abs"] + 1e-12
        if method == "rtn":  # round to nearest: within half a step of each weight's own group
            half_step = expand_groups(layer.scales.double(), layer.fmt, layer.in_features) / 2
            assert (d.abs() <= half_step * (1 + 1e-6) + 1e-7).all(), name
        diff_sq, ref_sq = diff_sq + d.square().sum().item(), ref_sq + w.square().sum().item()
    assert set(error["layers"]) == set(merged_float)
    assert error["rel_fro"] == pytest.approx((diff_sq / ref_sq) ** 0.5, rel=1e-9)
    assert 0 < error["rel_fro"] < 0.2


def test_merge_script_writes_a_loadable_checkpoint_and_records_the_error(files, tmp_path):
    model = adapted(files / "tiny-int4")
    save_adapter(model, LoRAConfig(4, 8.0), files / "tiny-int4", tmp_path / "adapter")
    error = merge_script.main(["--checkpoint", str(files / "tiny-int4"), "--adapter", str(tmp_path / "adapter"),
                               "--out", str(tmp_path / "merged")])
    config = read_config(tmp_path / "merged")
    assert config["quantization"]["merge_error"]["rel_fro"] == error["rel_fro"]
    assert config["quantization"]["recipe"] == read_config(files / "tiny-int4")["quantization"]["recipe"]
    reference = adapted(files / "tiny-int4")
    merge_lora(reference)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "merged")(TOKENS), reference(TOKENS))


# ---------------------------------------------------------------- adapter folders

def test_saved_adapter_loads_to_identical_logits(files, tmp_path):
    model = adapted(files / "tiny-int4", targets=("layers.*.attention.w[qv]", "re:layers\\.1\\..*w2"), alpha=6.0)
    save_adapter(model, LoRAConfig(4, 6.0, 0.0, ("layers.*.attention.w[qv]", "re:layers\\.1\\..*w2")),
                 files / "tiny-int4", tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 6.0 and meta["layers"] == [
        "layers.0.attention.wq", "layers.0.attention.wv", "layers.1.attention.wq", "layers.1.attention.wv",
        "layers.1.feed_forward.w2"]
    assert meta["base_fingerprint"] == read_config(files / "tiny-int4")["checksums"]["model.safetensors"]
    loaded = load_model(files / "tiny-int4")
    load_adapter(loaded, tmp_path / "adapter", files / "tiny-int4")
    assert not loaded.layers[0].attention.wq.training  # dropout off at inference
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


def run_cli(*args):
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_adapter_for_another_base_is_refused_in_one_line(files, tmp_path):
    model = adapted(files / "tiny")
    save_adapter(model, LoRAConfig(4, 8.0), files / "tiny", tmp_path / "adapter")
    r = run_cli("generate.py", "--checkpoint", str(files / "other"), "--adapter", str(tmp_path / "adapter"),
                "--max_new_tokens", "2", "--threads", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "trained on another base" in r.stderr
    with pytest.raises(ValueError, match="trained on another base"):
        load_adapter(load_model(files / "tiny-int4"), tmp_path / "adapter", files / "tiny-int4")


# ---------------------------------------------------------------- training

def lora_args(files, run_dir, *extra):
    return ["lora", "--checkpoint", str(files / "tiny-int4"), "--data", str(files / "train.txt"), "--seq_len", "32",
            "--batch_size", "4", "--micro_batch", "2", "--steps", "6", "--warmup", "1", "--lr", "2e-2",
            "--eval_data", str(files / "heldout.txt"), "--eval_every", "0", "--eval_context", "32", "--save_every", "2",
            "--keep_checkpoints", "5", "--rank", "4", "--alpha", "8", "--run_dir", str(run_dir), "--threads", "1",
            *extra]


def train_lora(files, run_dir, *extra) -> dict:
    return train_qat.train(train_qat.parse_args(lora_args(files, run_dir, *extra)))


def final_params(run_dir):
    return {k: v for k, v in load_state_dict(checkpoints(Path(run_dir))[-1] / "state.safetensors").items()
            if k.startswith("param/")}


def training_loss(files, adapter=None) -> float:
    """Mean cross-entropy of the quantized base (with the adapter) over the first training windows."""
    model = load_model(files / "tiny-int4")
    if adapter:
        load_adapter(model, adapter, files / "tiny-int4")
    ids = torch.tensor(load_tokenizer_for(files / "tiny-int4").encode((files / "train.txt").read_text()))
    windows = ids[:16 * 33].view(16, 33)
    with torch.no_grad():
        return F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()


def test_qlora_student_is_the_packed_base_plus_adapters(files):
    """No float copy of a quantized weight: what trains is the adapters, what is stored is the packed base."""
    student, plan, teacher = build_lora_student(LoRARun(LoRAConfig(4, 8.0), None), files / "tiny-int4", "ce")
    assert teacher is None and student.training
    assert plan_format_names(plan) == read_config(files / "tiny-int4")["quantization"]["recipe"]
    layers = adapted_layers(student)
    assert len(layers) == 14 and all(isinstance(m.base, QuantLinear) and m.base.latent is None
                                     for m in layers.values())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert trainable == sum(m.lora_a.numel() + m.lora_b.numel() for m in layers.values())
    float_tensors = {n for n, t in student.state_dict().items() if t.is_floating_point() and t.dim() == 2
                     and not n.endswith(("scales", "zeros", "lora_a", "lora_b"))}
    assert float_tensors == {"tok_embeddings.weight", "output.weight"}  # the tied head the plan keeps float: one
    assert student.output.weight is student.tok_embeddings.weight


def test_qlora_run_lowers_the_loss_and_resumes_to_the_same_adapter(files, tmp_path):
    summary = train_lora(files, tmp_path / "whole", "--dropout", "0.1")
    assert summary["finished"]
    assert training_loss(files, tmp_path / "whole" / "adapter") < training_loss(files) - 0.3
    assert set(final_params(tmp_path / "whole")) == {f"param/{n}.lora_{p}" for n in
                                                     json.loads((tmp_path / "whole" / "adapter" / "adapter.json")
                                                                .read_text())["layers"] for p in "ab"}
    assert not train_lora(files, tmp_path / "part", "--dropout", "0.1", "--stop_after", "3")["finished"]
    train_lora(files, tmp_path / "part", "--dropout", "0.1", "--resume")
    for a, b in ((final_params(tmp_path / "part"), final_params(tmp_path / "whole")),
                 (load_state_dict(tmp_path / "part" / "adapter" / "adapter.safetensors"),
                  load_state_dict(tmp_path / "whole" / "adapter" / "adapter.safetensors"))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other LoRA settings"):
        train_lora(files, tmp_path / "part", "--dropout", "0.1", "--rank", "8", "--resume")
    # export of the latest checkpoint: the adapter the finished run saved
    train_qat.main(["export", "--run_dir", str(tmp_path / "part"), "--out", str(tmp_path / "exported")])
    a, b = (load_state_dict(p / "adapter.safetensors") for p in (tmp_path / "exported", tmp_path / "whole" / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_from_another_teacher(files, tmp_path):
    """Recovery: the student (the quantized base) learns towards a different float teacher."""
    train_lora(files, tmp_path / "run", "--loss", "fkl", "--teacher", str(files / "other"), "--steps", "4")
    config = json.loads((tmp_path / "run" / "step-000004" / "state.json").read_text())
    assert config["lora"]["teacher"] == str(files / "other") and config["config"]["loss"] == "fkl"
    teacher, student = load_model(files / "other"), load_model(files / "tiny-int4")
    with torch.no_grad():
        target = F.log_softmax(teacher(TOKENS), -1)
        kl = lambda m: F.kl_div(F.log_softmax(m(TOKENS), -1), target, log_target=True, reduction="batchmean")
        before = kl(student).item()
        load_adapter(student, tmp_path / "run" / "adapter", files / "tiny-int4")
        assert kl(student).item() < before


def test_two_gloo_processes_equal_one_process(files, tmp_path):
    train_lora(files, tmp_path / "single", "--micro_batch", "1")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train_qat.py",
                *lora_args(files, tmp_path / "ddp", "--micro_batch", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es) x 2 micro-batch(es)" in r.stderr
    a, b = final_params(tmp_path / "ddp"), final_params(tmp_path / "single")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.parametrize("extra, message", [
    (["--targets", "blocks.*"], "LoRA target 'blocks.*' names no linear layer"),
    (["--format", "int3"], "--format is a QAT flag"),
    (["--dropout", "1"], "--dropout: expected a number in [0, 1)"),
])
def test_bad_lora_flags_are_one_line_and_exit_2(files, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train_qat.main(lora_args(files, tmp_path / "run", *extra)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_lm_eval_adapter_applies_an_adapter_given_in_model_args(files, tmp_path):
    from eval.lm_adapter import BitfastLM
    model = adapted(files / "tiny-int4")
    save_adapter(model, LoRAConfig(4, 8.0), files / "tiny-int4", tmp_path / "adapter")
    lm = BitfastLM(checkpoint=str(files / "tiny-int4"), device="cpu", adapter=str(tmp_path / "adapter"))
    assert lm.name == "tiny-int4+adapter"
    with torch.no_grad():
        assert torch.equal(lm.model(TOKENS), model(TOKENS))
