"""eval/run.py end to end on tiny random checkpoints (a float one and its int8 copy), and its bad-input
handling: one `error:` line naming the file (and line), exit status 2, no report written."""
import json

import pytest
import torch

from calibrate import quantize_model
from checkpoint import (
    save_quantized,
)
from cli import run
from eval.report import write_report
from eval.run import main
from model import ModelArgs, Transformer
from qlinear import linear_names, resolve_recipe
from tests.tiny import save_tiny

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, vocab_size=49152, block_size=512,
            tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny random float checkpoint with the default model's tokenizer, and its int8 copy."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY)).eval()
    save_tiny(model, root / "tiny-float", tokenizer=True)
    plan = resolve_recipe({"default": "int8"}, linear_names(model))
    quantize_model(model, plan, "rtn", log=lambda s: None)
    save_quantized(model, plan, root / "tiny-float", root / "tiny-int8", {"method": "rtn"})
    return root / "tiny-float", root / "tiny-int8"


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run(lambda: main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err[-1]


def test_report_for_float_and_int8(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "report"
    main(["--checkpoints", *map(str, tiny_checkpoints), "--tasks", "arc_easy_offline,safety_offline",
          "--limit", "3", "--threads", "1", "--bootstrap_iters", "10", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["checkpoints"]] == ["tiny-float", "tiny-int8"]
    float_ckpt, int8_ckpt = report["checkpoints"]
    assert int8_ckpt["size_mb"] < float_ckpt["size_mb"]  # (the float embedding dominates a tiny model)
    arc = float_ckpt["tasks"]["arc_easy_offline"]
    assert list(arc["metrics"]) == ["acc_norm", "acc"]  # the headline metric first
    assert arc["samples"] == 3 and 0 <= arc["metrics"]["acc"]["value"] <= 1
    assert arc["metrics"]["acc"]["stderr"] is not None and arc["tokens"] > 0
    assert set(float_ckpt["tasks"]["safety_offline"]["metrics"]) == {"accuracy", "precision", "recall", "f1",
                                                                     "unparsed"}
    table = (out / "report.md").read_text().splitlines()
    assert table[0] == "| task | metric | tiny-float | tiny-int8 |"
    assert any(line.startswith("| arc_easy_offline | acc_norm | ") for line in table)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content,extra,message", [
    (None, ["--tasks", "no_such_task"], "error: unknown task 'no_such_task'; offline tasks:"),
    (None, ["--tasks", "safety_offline", "--safety_data", "MISSING"], "MISSING: no such file"),
    ("", ["--tasks", "safety_offline"], "labels.jsonl: no rows in file"),
    ('{"user_input": "hi", "toxicity": 0}\n{"user_input": "oops"\n', ["--tasks", "safety_offline"],
     "labels.jsonl, line 2: not valid JSON"),
    ('{"user_input": "hi", "toxicity": "yes"}\n', ["--tasks", "safety_offline"],
     "labels.jsonl, line 1: expected \"toxicity\" to be 0 or 1"),
    ('{"prompt": "Hi", "instruction_id_list": ["punctuation:no_comma"]}\n', ["--tasks", "ifeval_offline"],
     "labels.jsonl, line 1: expected \"kwargs\""),
])
def test_bad_input_one_line_exit_2_no_report(tmp_path, capsys, content, extra, message):
    labels = tmp_path / "labels.jsonl"
    data = []
    if content is not None:
        labels.write_text(content)
        data = ["--ifeval_data" if "ifeval_offline" in extra else "--safety_data", str(labels)]
    missing = [str(tmp_path / "MISSING") if a == "MISSING" else a for a in extra]
    code, last = run_main([*missing, *data, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "out").exists()


def test_report_files_and_perplexity_panel(tmp_path):
    def ckpt(name, size, acc, ppl):
        return {"name": name, "path": name, "size_mb": size, "tasks": {
            "arc": {"metrics": {"acc": {"value": acc, "stderr": 0.01}}, "samples": 10, "seconds": 1.0,
                    "tokens": 100, "tokens_per_s": 100.0},
            "lambada": {"metrics": {"perplexity": {"value": ppl, "stderr": None}}, "samples": 10, "seconds": 1.0,
                        "tokens": 100, "tokens_per_s": 100.0}}}
    run_info = {"limit": 10, "checkpoints": [ckpt("float", 538.1, 0.6, 20.0), ckpt("int4", 72.0, 0.5, 25.0)]}
    paths = write_report(run_info, tmp_path)
    assert json.loads(paths["json"].read_text()) == run_info
    table = paths["markdown"].read_text()
    assert "| arc | acc | 0.6000 ± 0.0100 | 0.5000 ± 0.0100 |" in table
    assert "| lambada | perplexity | 20.0000 | 25.0000 |" in table
    assert "| | weights MB | 538.1 | 72.0 |" in table
    assert paths["plot"].stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "report.png"]  # no temp files
