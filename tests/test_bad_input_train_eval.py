"""Bad input to train_qat.py, eval/ and the QAT/eval benchmarks, one test per cause: inputs are only read, outputs
never land on someone else's files, flags are checked at parse time, and what is read is checked. Each failure is
exit status 2 and one `error:` line naming the file or flag, no traceback, and the file system as it was."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_qat
from eval.data import load_text_file
from eval.tasks.ifeval import read_ifeval_prompts
from eval.tasks.safety import read_labels
from fileio import TEMP_TAG
from qat.data import cut_torn_line, training_tokens
from qat.runs import is_run_dir, read_log, read_train_state
from tests.test_train_qat import TINY, files, train_args  # noqa: F401 (files: the tiny model fixture)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = TINY["vocab_size"]


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for a folder)."""
    return {p.relative_to(root): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def run_cli(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line(r, *words):
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: ")
    for w in words:
        assert str(w) in r.stderr, (w, r.stderr)


def one_line_error(call) -> str:
    """The message of the ValueError `call` raises: it must fit on one line."""
    with pytest.raises(ValueError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- inputs are only read

def test_hand_made_jsonl_without_final_newline_is_read_whole_and_left_alone(tmp_path):
    rows = [{"id": 0, "prompt": "a", "completion": "b", "text": "ab", "tokens": [5, 6, 7]},
            {"tokens": [8, 9]}]  # the last row: no newline after it, as editors leave it
    data = tmp_path / "mine.jsonl"
    data.write_bytes("\n".join(json.dumps(r) for r in rows).encode())
    text = tmp_path / "text.jsonl"
    text.write_bytes(b'{"text": "first"}\n{"text": "last"}')
    before = snapshot(tmp_path)
    tokens = training_tokens(str(data), SimpleNamespace(eos_id=2), VOCAB)
    assert tokens.tolist() == [5, 6, 7, 2, 8, 9, 2]
    assert load_text_file(text) == "first\n\nlast"
    assert snapshot(tmp_path) == before
    # A malformed last line of an input is an error, never cut off the file.
    (tmp_path / "cut.jsonl").write_bytes(b'{"tokens": [1]}\n{"tokens": [')
    before = snapshot(tmp_path)
    assert "cut.jsonl, line 2: not valid JSON" in one_line_error(
        lambda: training_tokens(str(tmp_path / "cut.jsonl"), SimpleNamespace(eos_id=2), VOCAB))
    assert snapshot(tmp_path) == before


def test_own_appended_files_lose_only_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 1, "tokens": 8}\n{"step": 2, "tokens": 16}\n{"step": 3, "tok')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert log.read_bytes().endswith(b'"tok')  # reading changes nothing
    cut_torn_line(log)
    assert log.read_bytes() == b'{"step": 1, "tokens": 8}\n{"step": 2, "tokens": 16}\n'
    log.write_bytes(b'{"step": 1, "tokens": 8}')  # complete, only the newline missing: kept
    cut_torn_line(log)
    assert log.read_bytes() == b'{"step": 1, "tokens": 8}\n'


# ---------------------------------------------------------------- outputs never replace someone else's files

@pytest.mark.parametrize("case", ["run_dir", "train_out", "run_dir_under_file", "export_out", "gen_data_out",
                                  "eval_out"])
def test_output_path_holding_user_files_is_refused_before_any_work(files, tmp_path, case):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    (user / "data.jsonl").write_text('{"text": "mine"}\n')
    argv = {
        "run_dir": ["train_qat.py", *train_qat_argv(files, user)],
        "train_out": ["train_qat.py", *train_qat_argv(files, tmp_path / "run", "--out", user)],
        "run_dir_under_file": ["train_qat.py", *train_qat_argv(files, user / "notes.txt" / "run")],
        "export_out": ["train_qat.py", "export", "--run_dir", tmp_path / "run", "--out", user],
        "gen_data_out": ["train_qat.py", "gen-data", "--checkpoint", files / "tiny", "--out", user / "data.jsonl"],
        "eval_out": ["eval/run.py", "--checkpoints", files / "tiny", "--out", user],
    }[case]
    before = snapshot(tmp_path)
    r = run_cli(*argv)
    assert_one_line(r, user)
    assert snapshot(tmp_path) == before
    assert not any(TEMP_TAG in p.name for p in tmp_path.rglob("*"))


def train_qat_argv(files, run_dir, *extra):
    argv = ["train"]
    for k, v in vars(train_args(files, run_dir, *map(str, extra))).items():
        if k != "command" and v not in (None, False):
            argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return argv


def test_run_folder_and_report_predicates_are_precise(files, tmp_path):
    train_qat.train(train_args(files, tmp_path / "run", "--steps", "2", "--eval_every", "0"))
    assert is_run_dir(tmp_path / "run")  # its log, checkpoints, plot and exported model/
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert not is_run_dir(tmp_path / "run")
    with pytest.raises(ValueError, match="not a bitfast QAT run folder"):
        train_qat.train(train_args(files, tmp_path / "run", "--steps", "2", "--eval_every", "0", "--resume"))


# ---------------------------------------------------------------- flags are checked at parse time

@pytest.mark.parametrize("argv,flag", [
    (["train_qat.py", "train", "--seq_len", "0"], "--seq_len"),
    (["train_qat.py", "train", "--lr", "-1"], "--lr"),
    (["train_qat.py", "train", "--batch_size", "6", "--micro_batch", "4"], "--micro_batch"),
    (["train_qat.py", "train", "--format", "int5"], "--format"),
    (["train_qat.py", "train", "--beta", "1.5"], "--beta"),
    (["train_qat.py", "train", "--eval_context", "1"], "--eval_context"),
    (["train_qat.py", "train", "--run_dir", "r", "--out", "."], "--out"),
    (["train_qat.py", "gen-data", "--out", "x.jsonl", "--temperature", "-0.5"], "--temperature"),
    (["train_qat.py", "gen-data", "--out", "x.jsonl", "--top_p", "0"], "--top_p"),
    (["train_qat.py", "gen-data", "--out", ""], "--out"),
    (["eval/run.py", "--limit", "0"], "--limit"),
    (["eval/run.py", "--max_length", "1"], "--max_length"),
    (["eval/perplexity.py", "--context", "1"], "--context"),
    (["eval/perplexity.py", "--corpus", "c4"], "--corpus"),
    (["scripts/bench_qat.py", "--losses", "cakld,mse"], "--losses"),
    (["scripts/bench_eval.py", "--limit", "-3"], "--limit"),
])
def test_bad_flag_is_one_line_before_any_work(argv, flag, tmp_path):
    r = run_cli(*argv)
    assert_one_line(r, flag)


# ---------------------------------------------------------------- what is read is checked

GEN_ROW = {"id": 1, "prompt": "a", "completion": "b", "text": "ab", "tokens": [8, 9]}
# (what changes in the last row, whether the row still trains: its tokens are a list of ids in the vocabulary)
GEN_MUTATIONS = [
    (lambda r: [1, 2], False), (lambda r: 7, False), (lambda r: "row", False), (lambda r: None, False),
    (lambda r: {k: v for k, v in r.items() if k != "tokens"}, False), (lambda r: {**r, "tokens": None}, False),
    (lambda r: {**r, "tokens": "89"}, False), (lambda r: {**r, "tokens": []}, False),
    (lambda r: {**r, "tokens": ["8"]}, False), (lambda r: {**r, "tokens": [8.0]}, False),
    (lambda r: {**r, "tokens": [True]}, False), (lambda r: {**r, "tokens": [-1]}, False),
    (lambda r: {**r, "tokens": [VOCAB]}, False), (lambda r: {**r, "tokens": {"8": 9}}, False),
    (lambda r: {**r, "extra": [1]}, True), (lambda r: {**r, "text": ""}, True), (lambda r: {**r, "id": "x"}, True),
    (lambda r: {k: v for k, v in r.items() if k != "prompt"}, True),
]
TEXT_MUTATIONS = [
    (lambda r: [r], False), (lambda r: 3, False), (lambda r: "text", False), (lambda r: None, False),
    (lambda r: {}, False), (lambda r: {"text": None}, False), (lambda r: {"text": 5}, False),
    (lambda r: {"text": ["x"]}, False), (lambda r: {"text": ""}, True), (lambda r: {**r, "source": 1}, True),
]


@pytest.mark.parametrize("kind", ["gen-data rows", "text rows"])
def test_fuzzed_jsonl_rows_give_a_correct_result_or_one_line_naming_file_and_line(tmp_path, kind):
    first, last, mutations = ({**GEN_ROW, "id": 0, "tokens": [5, 6, 7]}, GEN_ROW, GEN_MUTATIONS) \
        if kind == "gen-data rows" else ({"text": "first"}, {"text": "last"}, TEXT_MUTATIONS)
    read = (lambda p: training_tokens(str(p), SimpleNamespace(eos_id=2), VOCAB).tolist()) \
        if kind == "gen-data rows" else load_text_file
    path = tmp_path / "rows.jsonl"
    for i, (mutate, trains) in enumerate(mutations):
        row = mutate(dict(last))
        content = json.dumps(first) + "\n" + json.dumps(row) + "\n"
        path.write_text(content)
        if trains:
            want = [5, 6, 7, 2, *row["tokens"], 2] if kind == "gen-data rows" else "first\n\n" + row["text"]
            assert read(path) == want, (i, row)
        else:
            assert f"{path}, line 2: " in one_line_error(lambda: read(path)), (i, row)
        assert path.read_text() == content


@pytest.mark.parametrize("row,error", [
    ({"user_input": "hi", "toxicity": 1.0}, None), ({"user_input": "hi", "toxicity": True}, None),
    ({"user_input": "hi", "toxicity": 0, "extra": {}}, None), ({"user_input": "hi", "toxicity": "1"}, "toxicity"),
    ({"user_input": "hi", "toxicity": 2}, "toxicity"), ({"user_input": "hi"}, "toxicity"),
    ({"user_input": "", "toxicity": 0}, "user_input"), ({"user_input": 5, "toxicity": 0}, "user_input"),
    (["hi", 1], "JSON object"), (None, "JSON object"),
])
def test_safety_labels_are_checked(tmp_path, row, error):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"user_input": "ok", "toxicity": 0}) + "\n" + json.dumps(row))
    if error is None:
        assert read_labels(path)[1] == {"user_input": "hi", "toxicity": int(row["toxicity"])}
    else:
        message = one_line_error(lambda: read_labels(path))
        assert f"{path}, line 2: " in message and error in message


IFEVAL_ROW = {"key": 7, "prompt": "List things.", "instruction_id_list": ["detectable_format:number_bullet_lists"],
              "kwargs": [{"num_bullets": 3}]}


@pytest.mark.parametrize("change,error", [
    ({}, None), ({"kwargs": [{"num_bullets": None}]}, None), ({"extra": 1}, None),
    ({"kwargs": [{"num_bullets": "three"}]}, "kwargs"), ({"kwargs": [{"bullets": 3}]}, "kwargs"),
    ({"kwargs": [{}, {}]}, "kwargs"), ({"kwargs": {"num_bullets": 3}}, "kwargs"),
    ({"instruction_id_list": []}, "instruction_id_list"), ({"instruction_id_list": ["nope"]}, "nope"),
    ({"prompt": ""}, "prompt"), ({"prompt": ["x"]}, "prompt"), ({"key": "seven"}, "key"),
])
def test_ifeval_prompts_are_checked_against_their_instruction_checkers(tmp_path, change, error):
    path = tmp_path / "input_data.jsonl"
    path.write_text(json.dumps({**IFEVAL_ROW, **change}) + "\n")
    if error is None:
        assert read_ifeval_prompts(path)[0]["prompt"] == IFEVAL_ROW["prompt"]
    else:
        message = one_line_error(lambda: read_ifeval_prompts(path))
        assert f"{path}, line 1: " in message and error in message


def test_bad_rows_through_the_command_lines(files, tmp_path):
    data = tmp_path / "teacher.jsonl"
    data.write_text(json.dumps(GEN_ROW) + "\n" + json.dumps({**GEN_ROW, "tokens": [1, VOCAB + 5]}))
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"user_input": "hi", "toxicity": 0}\n["hi", 0]\n')
    before = snapshot(tmp_path)
    assert_one_line(run_cli("train_qat.py", *train_qat_argv(files, tmp_path / "run", "--data", data)),
                    f"{data}, line 2", "vocabulary")
    assert_one_line(run_cli("eval/run.py", "--checkpoints", files / "tiny", "--tasks", "safety_offline",
                            "--safety_data", labels, "--out", tmp_path / "report"), f"{labels}, line 2")
    assert snapshot(tmp_path) == before


STATE_MUTATIONS = [
    (lambda m: [m], "JSON object"), (lambda m: {k: v for k, v in m.items() if k != "step"}, "'step'"),
    (lambda m: {**m, "step": "2"}, "'step'"), (lambda m: {**m, "step": 3}, "'step'"),
    (lambda m: {**m, "beta": "high"}, "'beta'"), (lambda m: {**m, "beta": 2}, "'beta'"),
    (lambda m: {**m, "data_hash": 5}, "'data_hash'"), (lambda m: {**m, "param_groups": {}}, "'param_groups'"),
    (lambda m: {**m, "param_groups": [1]}, "'param_groups'"), (lambda m: {**m, "config": []}, "'config'"),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "'config'"),
    (lambda m: {**m, "config": {k: v for k, v in m["config"].items() if k != "lr"}}, "'lr'"),
    (lambda m: {**m, "config": {**m["config"], "lr": "fast"}}, "'lr'"),
    (lambda m: {**m, "config": {**m["config"], "lr": -1}}, "'lr'"),
    (lambda m: {**m, "config": {**m["config"], "calib_samples": 1.5}}, "'calib_samples'"),
    (lambda m: {**m, "config": {**m["config"], "seed": True}}, "'seed'"),
    (lambda m: {**m, "config": {**m["config"], "train_scales": "yes"}}, "'train_scales'"),
    (lambda m: {**m, "config": {**m["config"], "loss": "mse"}}, "'loss'"),
    (lambda m: {**m, "config": {**m["config"], "format": 4}}, "'format'"),
    (lambda m: {**m, "extra": 1, "config": {**m["config"], "extra": None}}, None),
]


def test_malformed_run_state_is_one_line_on_resume_and_export(files, tmp_path):
    run_dir = tmp_path / "run"
    train_qat.train(train_args(files, run_dir, "--stop_after", "2", "--eval_every", "0"))
    ckpt = run_dir / "step-000002"
    good = json.loads((ckpt / "state.json").read_text())
    for mutate, field in STATE_MUTATIONS:
        (ckpt / "state.json").write_text(json.dumps(mutate(json.loads(json.dumps(good)))))
        if field is None:
            assert read_train_state(ckpt)[0]["step"] == 2
        else:
            message = one_line_error(lambda: read_train_state(ckpt))
            assert f"{ckpt / 'state.json'}: " in message and field in message
    (ckpt / "state.json").write_text(json.dumps({**good, "config": {**good["config"], "seq_len": "32"}}))
    before = snapshot(tmp_path)
    assert_one_line(run_cli("train_qat.py", *train_qat_argv(files, run_dir, "--resume")), "state.json", "seq_len")
    assert_one_line(run_cli("train_qat.py", "export", "--run_dir", run_dir, "--out", tmp_path / "exported"),
                    "state.json", "seq_len")
    assert snapshot(tmp_path) == before
    (ckpt / "state.json").write_text(json.dumps(good))
    with open(run_dir / "log.jsonl", "a") as f:  # a hand-edited log: a row that is not a log row
        f.write('["step", 3]\n{"step": 4, "tokens": 1}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line \d+: not a log row"):
        train_qat.train(train_args(files, run_dir, "--eval_every", "0", "--resume"))
