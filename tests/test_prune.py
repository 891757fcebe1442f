"""Structured pruning (pruning.py, prune.py) against independent references: the pruned model equals the original
with the removed heads' and channels' output columns zeroed (groups and scores computed here by explicit loops);
gradients and Fisher terms equal float64 central differences of a separate float64 Llama written here; a pruned
checkpoint saves, loads, quantizes and generates; bad input is one line and exit 2; scripts/bench_prune.py's LoRA
recovery lowers the KL to the unpruned model and hands back a merged model with the adapted model's logits."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora
import prune as prune_command
import quantize as quantize_command
from calibrate import quantize_model
from checkpoint import load_model
from cli import run
from decoding import generate
from model import Linear, ModelArgs
from prefill_cache import PrefillCache
from pruning import PruneSettings, choose_kept, gradient_stats, group_importance, prune
from qlinear import QuantFormat, QuantLinear, linear_names
from scripts import bench_prune
from tests.test_model import tiny_model
from tests.tiny import save_tiny

GQA = dict(n_layer=3, n_head=6, n_local_heads=3, dim=48, intermediate_size=40)  # 2 query heads per key/value head
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
           "feed_forward.w2")


def explicit_group_scores(model, i: int, element) -> tuple:
    """([kv heads], [channels]) of block i: element(name) summed over each group, the groups spelled out by hand."""
    block, hd = model.layers[i], model.args.head_dim
    rep = model.args.n_head // model.args.n_local_heads
    s = {n: element(f"layers.{i}.{n}") for n in LINEARS}
    heads = [sum(s["attention.wq"][h * hd:(h + 1) * hd].sum() + s["attention.wo"][:, h * hd:(h + 1) * hd].sum()
                 for h in range(j * rep, (j + 1) * rep))
             + s["attention.wk"][j * hd:(j + 1) * hd].sum() + s["attention.wv"][j * hd:(j + 1) * hd].sum()
             for j in range(block.attention.n_local_heads)]
    channels = [s["feed_forward.w1"][c].sum() + s["feed_forward.w3"][c].sum() + s["feed_forward.w2"][:, c].sum()
                for c in range(block.feed_forward.w1.out_features)]
    return torch.stack(heads), torch.stack(channels)


def zeroed_reference(model, removed_heads: dict, removed_channels: dict):
    """A copy of the model whose removed query heads' wo columns and removed channels' w2 columns are zero."""
    ref = tiny_model(**GQA)
    ref.load_state_dict(model.state_dict())
    hd, rep = model.args.head_dim, model.args.n_head // model.args.n_local_heads
    with torch.no_grad():
        for i, heads in removed_heads.items():
            for j in heads:
                ref.layers[i].attention.wo.weight[:, j * rep * hd:(j + 1) * rep * hd] = 0
        for i, channels in removed_channels.items():
            ref.layers[i].feed_forward.w2.weight[:, channels] = 0
    return ref


@pytest.mark.parametrize("scope", ["block", "global"])
def test_pruned_model_equals_original_with_removed_groups_zeroed(scope):
    model = tiny_model(**GQA)
    pruned, record = prune(model, PruneSettings(0.34, "l1", scope=scope, keep_first=1, channel_multiple=1), log=None)
    scores = {i: explicit_group_scores(model, i, lambda n: model.get_submodule(n).weight.abs()) for i in (1, 2)}
    removed = []
    for kind, per_block in ((0, 3), (1, 40)):  # kv heads (3 per block), channels (40 per block)
        n = round(0.34 * per_block) if scope == "block" else round(0.34 * per_block * 2)
        if scope == "block":
            removed.append({i: scores[i][kind].argsort()[:n].tolist() for i in (1, 2)})
        else:
            order = torch.cat([scores[1][kind], scores[2][kind]]).argsort()[:n].tolist()
            removed.append({i: [o - (i - 1) * per_block for o in order if (o >= per_block) == (i == 2)] for i in (1, 2)})
    ref = zeroed_reference(model, *removed)
    tokens = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
    heads = [3 - len(removed[0][i]) for i in (1, 2)]
    assert pruned.args.layer_n_local_heads == [3, *heads] and pruned.args.layer_n_head == [6, *(2 * h for h in heads)]
    assert pruned.args.layer_intermediate_size == [40, *(40 - len(removed[1][i]) for i in (1, 2))]
    assert record["params_after"] == sum(p.numel() for p in pruned.parameters()) < record["params_before"]
    # Decoding through the per-block KV caches (and the CPU few-query attention) gives the full forward's logits.
    pruned.setup_caches(1, 32)
    with torch.no_grad():
        steps = [pruned(tokens[:1, :12], torch.arange(12))[:, -1]]
        steps += [pruned(tokens[:1, t:t + 1], torch.tensor([t]))[:, -1] for t in range(12, 20)]
        torch.testing.assert_close(torch.stack(steps[:-1], 1), ref(tokens[:1])[:, 11:19], rtol=1e-4, atol=1e-4)


def reference_loss(w: dict, tokens: torch.Tensor, head_dim: int, rope_base: float, eps: float) -> torch.Tensor:
    """A float64 Llama written out here (interleaved RoPE, GQA, SwiGLU): a window's mean next-token loss."""
    t = tokens.numel()
    angles = torch.outer(torch.arange(t, dtype=torch.float64),
                         rope_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]

    def rope(x):  # [T, H, D], pairs (2i, 2i+1) rotate together
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g

    x = w["tok_embeddings.weight"][tokens]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(len({k.split(".")[1] for k in w if k.startswith("layers.")})):
        p = f"layers.{i}."
        h = norm(x, w[p + "attention_norm.weight"])
        q = rope((h @ w[p + "attention.wq.weight"].T).view(t, -1, head_dim))
        k = rope((h @ w[p + "attention.wk.weight"].T).view(t, -1, head_dim))
        v = (h @ w[p + "attention.wv.weight"].T).view(t, -1, head_dim)
        heads = []
        for hq in range(q.shape[1]):
            kv = hq // (q.shape[1] // k.shape[1])
            s = (q[:, hq] @ k[:, kv].T / math.sqrt(head_dim)).masked_fill(~causal, -math.inf)
            heads.append(s.softmax(-1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ w[p + "feed_forward.w1.weight"].T) * (h @ w[p + "feed_forward.w3.weight"].T)) \
            @ w[p + "feed_forward.w2.weight"].T
    logits = norm(x, w["norm.weight"]) @ w["output.weight"].T
    return F.cross_entropy(logits[:-1], tokens[1:])


def test_gradients_and_scores_match_float64_finite_differences():
    model = tiny_model(n_layer=2, **{k: v for k, v in GQA.items() if k != "n_layer"})
    a = model.args
    samples = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(1))
    names = [f"layers.{i}.{n}" for i in range(2) for n in LINEARS]
    stats = gradient_stats(model, samples, names)
    w = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert abs(reference_loss(w, samples[0], a.head_dim, a.rope_base, a.norm_eps).item()
                   - F.cross_entropy(model(samples[:1])[0, :-1], samples[0, 1:]).item()) < 1e-5
    pick = torch.Generator().manual_seed(2)
    for name in names:
        key, (g, fisher) = name + ".weight", stats[name]
        for _ in range(3):
            r, c = (int(torch.randint(0, n, (1,), generator=pick)) for n in w[key].shape)
            per_sample = []
            for tokens in samples:
                diffs = []
                for step in (1e-5, -1e-5):
                    w[key][r, c] += step
                    diffs.append(reference_loss(w, tokens, a.head_dim, a.rope_base, a.norm_eps))
                    w[key][r, c] -= step
                per_sample.append(((diffs[0] - diffs[1]) / 2e-5).item())
            want_g, want_f = sum(per_sample) / 2, sum(x * x for x in per_sample) / 2
            assert g[r, c].item() == pytest.approx(want_g, rel=2e-3, abs=1e-6), (name, r, c)
            assert fisher[r, c].item() == pytest.approx(want_f, rel=4e-3, abs=1e-9), (name, r, c)
    # Each criterion's group scores: the element-wise formula summed over the groups spelled out by hand.
    formulas = {"l1": lambda W, g, f: W.abs(), "taylor": lambda W, g, f: (W * g).abs(),
                "taylor2": lambda W, g, f: 0.5 * W * W * f, "taylor-mix": lambda W, g, f: (W * g - 0.5 * W * W * f).abs()}
    keys = [(i, kind) for i in range(2) for kind in ("attention", "feed_forward")]
    for criterion, formula in formulas.items():
        got = group_importance(model, criterion, keys, stats)
        for i in range(2):
            heads, channels = explicit_group_scores(
                model, i, lambda n: formula(w[n + ".weight"], *(t.double() for t in stats[n])))
            torch.testing.assert_close(got[(i, "attention")], heads, rtol=1e-9, atol=0)
            torch.testing.assert_close(got[(i, "feed_forward")], channels, rtol=1e-9, atol=0)
    l2 = group_importance(model, "l2", keys)
    torch.testing.assert_close(l2[(1, "attention")], explicit_group_scores(model, 1, lambda n: w[n + ".weight"] ** 2)[0].sqrt())
    random_a, random_b = (group_importance(model, "random", keys, seed=s) for s in (3, 3))
    assert all(torch.equal(random_a[k], random_b[k]) for k in keys)  # seeded


def run_command(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a command run as its __main__ would run it."""
    capsys.readouterr()
    try:
        run(lambda: main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny(tiny_model(vocab_size=49152, block_size=128, **GQA), tmp_path_factory.mktemp("tiny") / "ckpt",
                     tokenizer=True)


def test_pruned_checkpoint_loads_quantizes_and_generates(tmp_path, tiny_ckpt, capsys):
    out, q = tmp_path / "pruned", tmp_path / "pruned-int4"
    code, err = run_command(prune_command.main, ["--checkpoint", str(tiny_ckpt), "--ratio", "0.3", "--scope", "global",
                                                 "--keep_first", "1", "--keep_last", "0", "--calib_samples", "2",
                                                 "--calib_seqlen", "16", "--out", str(out)], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["pruning"]["criterion"] == "taylor" and config["pruning"]["calib"] == "boolq 2 x 16"
    model = load_model(out)
    sizes = config["model_args"]["layer_intermediate_size"]
    # 30% of the pruned blocks' 80 channels go, each block's width then rounded to a multiple of 8
    assert [b.feed_forward.w2.in_features for b in model.layers] == sizes and sizes[0] == 40
    assert all(n % 8 == 0 for n in sizes) and abs(sum(sizes[1:]) - 56) <= 8 and sizes[1:] != [40, 40]
    assert [b.attention.wq.out_features for b in model.layers] == [8 * h for h in config["model_args"]["layer_n_head"]]
    code, err = run_command(quantize_command.main, ["--checkpoint", str(out), "--mode", "int4", "--groupsize", "32",
                                                    "--out", str(q)], capsys)
    assert code == 0, err
    quantized = load_model(q)
    assert isinstance(quantized.layers[2].feed_forward.w2, QuantLinear)
    prompt = torch.tensor([1, 5, 9, 200, 7])
    quantized.setup_caches(1, 16)
    new, _ = generate(quantized, prompt, 6)
    seq = prompt.tolist()  # greedy by full forwards, no cache: the same tokens
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(quantized(torch.tensor([seq]))[0, -1].argmax()))
    assert new.tolist() == seq[5:]
    # GPTQ calibrates the pruned blocks too
    gptq = load_model(out)
    plan = {n: QuantFormat(4, 16, False) for n in linear_names(gptq) if n != "output"}
    quantize_model(gptq, plan, "gptq", torch.randint(0, 49152, (2, 16)), log=lambda s: None)
    assert isinstance(gptq.layers[1].attention.wo, QuantLinear)


def user_folder(root: Path) -> Path:
    d = root / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    return d


@pytest.mark.parametrize("case,words", [
    ("ratio 1", ("--ratio", "[0, 1)")), ("ratio -0.1", ("--ratio", "[0, 1)")),
    ("every head", ("every key/value head of block 1",)), ("quantized", ("is quantized",)),
    ("someone's folder", ("not a bitfast checkpoint",)), ("all blocks kept", ("leaves none to prune",)),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_ckpt, capsys, case, words):
    out, src = tmp_path / "out", tiny_ckpt
    args = {"ratio 1": ["--ratio", "1.0"], "ratio -0.1": ["--ratio", "-0.1"],
            "every head": ["--ratio", "0.9", "--keep_first", "1", "--keep_last", "0"],
            "all blocks kept": ["--ratio", "0.2", "--keep_first", "2", "--keep_last", "1"]}.get(case, ["--ratio", "0.2"])
    if case == "quantized":
        src = tmp_path / "q"
        assert run_command(quantize_command.main, ["--checkpoint", str(tiny_ckpt), "--mode", "int8", "--out", str(src)],
                           capsys)[0] == 0
    if case == "someone's folder":
        out = user_folder(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = run_command(prune_command.main, ["--checkpoint", str(src), "--criterion", "l2", *args, "--out", str(out)],
                            capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_ffn_widths_round_to_the_channel_multiple_keeping_the_most_important():
    scores = torch.randperm(40, generator=torch.Generator().manual_seed(0)).double()
    kept = choose_kept({(0, "feed_forward"): scores}, {(0, "feed_forward"): 3}, 0.34, "block", {"feed_forward": 8})
    assert kept[(0, "feed_forward")].tolist() == sorted(scores.argsort()[-24:].tolist())  # 26 kept -> 24
    kept = choose_kept({(0, "feed_forward"): scores}, {(0, "feed_forward"): 3}, 0.34, "block")
    assert kept[(0, "feed_forward")].tolist() == sorted(scores.argsort()[-26:].tolist())


@pytest.mark.parametrize("over,words", [
    ({"layer_n_head": [6, 6]}, "layer_n_head must list n_layer=3"),
    ({"layer_n_head": [6, 4, 6]}, "block 1: n_head=4 is not a multiple of n_local_heads=3"),
    ({"layer_intermediate_size": [40, 0, 40]}, "whole numbers >= 1"),
    ({"layer_n_local_heads": [3, 1.5, 3]}, "model_args.layer_n_local_heads: expected a list of whole numbers"),
])
def test_per_block_sizes_are_validated(over, words):
    with pytest.raises(ValueError, match=words):
        ModelArgs.from_dict({**tiny_model(**GQA).args.to_dict(), **over})
    assert "layer_n_head" not in tiny_model(**GQA).args.to_dict()  # a uniform model stores no lists


def test_prefill_cache_on_disk_serves_a_pruned_model(tmp_path):
    """Blocks with different key/value head counts: the cache file's per-block shapes are accepted and reused."""
    pruned, _ = prune(tiny_model(**GQA), PruneSettings(0.34, "l1", keep_first=1, channel_multiple=1), log=None)
    assert len({b.attention.n_local_heads for b in pruned.layers}) == 2
    pruned.setup_caches(1, 48)
    prompt = torch.randint(0, 101, (20,), generator=torch.Generator().manual_seed(3), dtype=torch.int)
    plain, _ = generate(pruned, prompt, 8)
    generate(pruned, prompt, 8, prefill_cache=PrefillCache(pruned, tmp_path))
    out, stats = generate(pruned, prompt, 8, prefill_cache=PrefillCache(pruned, tmp_path))
    assert stats.cached_tokens == 19 and out.tolist() == plain.tolist()


def forward_kl(teacher_logits, student_logits) -> float:
    """Mean over tokens of KL(teacher || student), in float64."""
    lt, ls = F.log_softmax(teacher_logits.double(), -1), F.log_softmax(student_logits.double(), -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean().item()


def test_lora_recovery_lowers_the_kl_to_the_teacher_and_returns_the_merged_model(monkeypatch):
    teacher = tiny_model(**GQA)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned, _ = prune(teacher, PruneSettings(0.5, "l2", keep_first=1, channel_multiple=1), log=None)
    pruned_state = {k: v.clone() for k, v in pruned.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    windows, held_out = torch.randint(0, 101, (16, 17), generator=g), torch.randint(0, 101, (4, 16), generator=g)
    adapted = {}

    def merge_recording_the_adapted_logits(model):  # the adapted model's logits, just before its merge
        assert len(lora.adapted_layers(model)) == 3 * len(LINEARS)
        with torch.no_grad():
            adapted["logits"] = model(held_out)
        return lora.merge_lora(model)

    monkeypatch.setattr(bench_prune, "merge_lora", merge_recording_the_adapted_logits)
    logs = []
    recovered = bench_prune.lora_recovery(pruned, teacher, windows, lora.LoRAConfig(4, 8.0), steps=30, batch=4,
                                          lr=1e-2, log=logs.append)
    with torch.no_grad():
        x = windows[:, :-1]  # the KL the training lowers: over its own windows
        kl_before, kl_after = forward_kl(teacher(x), pruned(x)), forward_kl(teacher(x), recovered(x))
        after = recovered(held_out)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after, logs)
    # merged: plain float linears of the pruned shapes, no adapter left, the adapted model's logits
    assert not lora.adapted_layers(recovered) and all(type(recovered.get_submodule(f"layers.{i}.{n}")) is Linear
                                                      for i in range(3) for n in LINEARS)
    assert recovered.args == pruned.args and not any(p.requires_grad for p in recovered.parameters())
    torch.testing.assert_close(after, adapted["logits"], rtol=1e-4, atol=1e-4)
    # the teacher and the pruned model it shares tensors with are unchanged
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, pruned_state[k]) for k, v in pruned.state_dict().items())
