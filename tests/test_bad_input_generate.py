"""Bad input to generate.py and the generation, sensitivity and benchmark scripts (issue 14): exit 2, one line on
stderr naming the flag or file and the problem, no traceback, and nothing on disk changed. One test per cause:
out-of-range flags, unusable prompt files, output paths that are not ours, checkpoints whose parts do not fit.
The cases run in-process through cli.run (the path a script takes after parsing); one case per cause also runs
as a real subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli import run
from fileio import TEMP_TAG
from speculative import MAX_SPECULATE_K
from tests.test_model import tiny_model
from tests.tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_generate  # noqa: E402
import bench_kernels  # noqa: E402
import bench_llamacpp  # noqa: E402
import bench_quant  # noqa: E402
import generate  # noqa: E402
import layer_sensitivity  # noqa: E402

MAINS = {"generate": generate.main, "layer_sensitivity": layer_sensitivity.main, "bench_generate": bench_generate.main,
         "bench_quant": bench_quant.main, "bench_kernels": bench_kernels.main, "bench_llamacpp": bench_llamacpp.main}
SCRIPTS = {"generate": "generate.py", **{name: f"scripts/{name}.py" for name in MAINS if name != "generate"}}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def assert_one_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), (lines[0], words)


def run_inprocess(script, args, capsys):
    with pytest.raises(SystemExit) as stop:
        run(lambda: MAINS[script]([str(a) for a in args]))
    return stop.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints with the default model's tokenizer: one that fits it, one whose embedding is smaller than
    the tokenizer, a draft with another vocabulary, and one whose tokenizer.json was edited into the wrong shape
    (loaded with --skip_checksum, as its checksum no longer matches)."""
    root = tmp_path_factory.mktemp("ckpts")
    found = {"model": save_tiny(tiny_model(vocab_size=49152), root / "model", tokenizer=True),
             "small_vocab": save_tiny(tiny_model(vocab_size=101), root / "small_vocab", tokenizer=True),
             "draft": save_tiny(tiny_model(vocab_size=49216), root / "draft", tokenizer=True),
             "bad_tokenizer": save_tiny(tiny_model(vocab_size=49152), root / "bad_tokenizer", tokenizer=True)}
    tok = found["bad_tokenizer"] / "tokenizer.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "model": ["BPE"]}))
    return found


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, and require it unchanged afterwards."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


FLAGS = [
    ("generate", ["--max_new_tokens", "0"], "--max_new_tokens"),
    ("generate", ["--max_new_tokens", "2.5"], "--max_new_tokens"),
    ("generate", ["--num_samples", "0"], "--num_samples"),
    ("generate", ["--temperature", "-0.5"], "--temperature"),
    ("generate", ["--temperature", "nan"], "--temperature"),
    ("generate", ["--top_k", "0"], "--top_k"),
    ("generate", ["--top_p", "0"], "--top_p"),
    ("generate", ["--top_p", "1.01"], "--top_p"),
    ("generate", ["--max_seq_length", "0"], "--max_seq_length"),
    ("generate", ["--max_ngram", "0"], "--max_ngram"),
    ("generate", ["--speculate_k", "0"], "--speculate_k"),
    ("generate", ["--speculate_k", MAX_SPECULATE_K + 1], "--speculate_k"),
    ("generate", ["--threads", "0"], "--threads"),
    ("generate", ["--device", "tpu"], "--device"),
    ("generate", ["--prompt", ""], "--prompt"),
    ("generate", ["--prompt", " \n"], "--prompt"),
    ("generate", ["--prompt_file", ""], "--prompt_file"),
    ("generate", ["--prefill_cache", ""], "--prefill_cache"),
    ("generate", ["--seed", "-1"], "--seed"),
    ("generate", ["--prompt_lookup", "--draft_checkpoint", "x"], "--prompt_lookup"),
    ("layer_sensitivity", ["--out", "r.json", "--budget", "0"], "--budget"),
    ("layer_sensitivity", ["--out", "r.json", "--context", "1"], "--context"),
    ("layer_sensitivity", ["--out", "r.json", "--context", "128", "--max_tokens", "100"], "--max_tokens"),
    ("layer_sensitivity", ["--out", "r.json", "--low", "int5"], "--low"),
    ("layer_sensitivity", ["--out", "r.json", "--threads", "-2"], "--threads"),
    ("layer_sensitivity", ["--out", ""], "--out"),
    ("bench_generate", ["--k", "0"], "--k"),
    ("bench_generate", ["--k", f"1,{MAX_SPECULATE_K + 1}"], "--k"),
    ("bench_generate", ["--runs", "0"], "--runs"),
    ("bench_generate", ["--device", "tpu"], "--device"),
    ("bench_generate", ["--dtypes", "fp8"], "--dtypes"),
    ("bench_generate", ["--sections", "decode,speed"], "--sections"),
    ("bench_quant", ["--configs", "float,int5"], "--configs"),
    ("bench_quant", ["--configs", "int4-g128:fast"], "--configs"),
    ("bench_quant", ["--configs", "recipe:missing.json"], "--configs"),
    ("bench_quant", ["--context", "1"], "--context"),
    ("bench_quant", ["--calib_samples", "0"], "--calib_samples"),
    ("bench_quant", ["--context", "64", "--max_tokens", "10"], "--max_tokens"),
    ("bench_kernels", ["--bits", "2,5"], "--bits"),
    ("bench_kernels", ["--group_size", "0"], "--group_size"),
    ("bench_kernels", ["--group_size", "100"], "--group_size"),
    ("bench_kernels", ["--repeats", "-1"], "--repeats"),
    ("bench_llamacpp", ["--keep", "k", "--pairs", "int4-g128=Q4_9"], "--pairs"),
    ("bench_llamacpp", ["--keep", "k", "--pairs", "int5=Q4_0"], "--pairs"),
    ("bench_llamacpp", ["--keep", "k", "--threads", "1,0"], "--threads"),
    ("bench_llamacpp", ["--keep", "k", "--context", "64", "--max_tokens", "10"], "--max_tokens"),
]


@pytest.mark.parametrize("script,args,flag", FLAGS)
def test_out_of_range_flags_are_refused_at_parse(in_tmp, capsys, script, args, flag):
    assert_one_line(*run_inprocess(script, args, capsys), flag)
    assert snapshot(in_tmp) == {}


PROMPT_FILES = [("empty.txt", b"", "is empty"), ("blank.txt", b" \n\t\n", "is empty"),
                ("latin1.txt", "café".encode("latin-1"), "not UTF-8"), ("missing.txt", None, "cannot read"),
                ("folder", "folder", "cannot read")]


@pytest.mark.parametrize("name,content,problem", PROMPT_FILES)
def test_unusable_prompt_files_are_refused_before_loading(in_tmp, capsys, name, content, problem):
    if content == "folder":
        (in_tmp / name).mkdir()
    elif content is not None:
        (in_tmp / name).write_bytes(content)
    before = snapshot(in_tmp)
    assert_one_line(*run_inprocess("generate", ["--prompt_file", name], capsys), name, "--prompt_file", problem)
    assert snapshot(in_tmp) == before


def user_files(folder: Path, *names) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_text("a user's file\n")
    return folder


OUTPUTS = [  # (make the user's files in the folder -> args, words of the one line)
    (lambda d: ["--prefill_cache", user_files(d / "cache", "notes.txt")], ["cache", "not a bitfast prefill cache"]),
    (lambda d: ["--prefill_cache", user_files(d, "file") / "file" / "cache"], ["is a file, not a folder"]),
    (lambda d: ["--prefill_cache", user_files(d, "file") / "file"], ["exists and is not a folder"]),
    (lambda d: ["--prefill_cache", "."], ["current folder"]),
    (lambda d: ["--profile", user_files(d / "prof", "decode_trace.json", "mine.txt")], ["not a bitfast profile"]),
    (lambda d: ["--profile", user_files(d, "trace") / "trace"], ["trace: exists and is not a folder"]),
]
SCRIPT_OUTPUTS = [
    ("layer_sensitivity", lambda d: ["--out", user_files(d, "recipe.json") / "recipe.json"],
     ["recipe.json", "not a bitfast hybrid recipe"]),
    ("layer_sensitivity", lambda d: ["--out", user_files(d, "r.sensitivity.json") / "r.json"],
     ["r.sensitivity.json", "not a bitfast sensitivity table"]),
    ("layer_sensitivity", lambda d: ["--out", d], ["is a folder"]),
    ("bench_generate", lambda d: ["--sections", "methods", "--chart", user_files(d, "chart.png") / "chart.png"],
     ["chart.png", "not a bitfast benchmark chart"]),
    ("bench_quant", lambda d: ["--keep", user_files(d / "keep", "thesis.tex")], ["keep", "not a bitfast benchmark"]),
]


@pytest.mark.parametrize("script,make,words", [("generate", m, w) for m, w in OUTPUTS] + SCRIPT_OUTPUTS)
def test_output_paths_that_are_not_ours_are_refused_before_the_work(in_tmp, capsys, script, make, words):
    args = make(in_tmp)
    before = snapshot(in_tmp)
    assert_one_line(*run_inprocess(script, args, capsys), *words)
    assert snapshot(in_tmp) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder_is_refused(in_tmp, capsys):
    locked = user_files(in_tmp / "locked")
    locked.chmod(0o500)
    try:
        assert_one_line(*run_inprocess("generate", ["--prefill_cache", locked / "cache"], capsys), "not writable")
    finally:
        locked.chmod(0o700)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("ckpt,args,words", [
    ("small_vocab", ["--prompt", "Hello world"], ["token id", "outside the model's vocabulary of 101 tokens"]),
    ("model", ["--draft_checkpoint", "draft"], ["draft", "vocabulary of 49216 tokens", "49152"]),
    ("model", ["--max_seq_length", "4"], ["exceeds the context of 4 tokens (--max_seq_length)"]),
    ("model", ["--max_seq_length", "65"], ["--max_seq_length 65 exceeds the model's context of 64 tokens"]),
    ("model", ["--max_new_tokens", "64"], ["exceeds the context of 64 tokens"]),
    ("bad_tokenizer", [], ["bad_tokenizer/tokenizer.json", "checksum mismatch", "--skip_checksum"]),
    ("bad_tokenizer", ["--skip_checksum"], ["bad_tokenizer/tokenizer.json", "field model must be an object"]),
])
def test_checkpoint_parts_that_do_not_fit_are_clear_errors(ckpts, in_tmp, capsys, ckpt, args, words):
    args = [ckpts[a] if a in ckpts else a for a in args]
    before = snapshot(ckpts[ckpt].parent)
    assert_one_line(*run_inprocess("generate", ["--checkpoint", ckpts[ckpt], "--max_new_tokens", "4", *args],
                                   capsys), *words)
    assert snapshot(ckpts[ckpt].parent) == before and snapshot(in_tmp) == {}


@pytest.mark.parametrize("cause", ["flag", "script flag", "prompt file", "output folder", "vocabulary", "tokenizer"])
def test_each_cause_is_one_line_from_the_real_command(ckpts, tmp_path, cause):
    (tmp_path / "empty.txt").write_text("\n")
    user_files(tmp_path / "cache", "notes.txt")
    script, args, words = {
        "flag": ("generate", ["--temperature", "-1"], ["--temperature"]),
        "script flag": ("bench_kernels", ["--group_size", "100"], ["--group_size"]),
        "prompt file": ("generate", ["--prompt_file", tmp_path / "empty.txt"], ["empty.txt", "is empty"]),
        "output folder": ("generate", ["--prefill_cache", tmp_path / "cache"], ["not a bitfast prefill cache"]),
        "vocabulary": ("generate", ["--checkpoint", ckpts["small_vocab"], "--max_new_tokens", "2"], ["token id"]),
        "tokenizer": ("generate", ["--checkpoint", ckpts["bad_tokenizer"], "--skip_checksum"],
                      ["field model must be an object"]),
    }[cause]
    before = snapshot(tmp_path), snapshot(ckpts["model"].parent)
    r = subprocess.run([sys.executable, SCRIPTS[script], *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert_one_line(r.returncode, r.stderr, *words)
    assert (snapshot(tmp_path), snapshot(ckpts["model"].parent)) == before
    assert not [p for p in ROOT.iterdir() if TEMP_TAG in p.name]
