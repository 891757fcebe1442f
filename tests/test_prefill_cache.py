"""Prefill cache: outputs equal to no cache, reuse of the longest common prefix in memory and across
processes (a new PrefillCache on the same directory), refusal of another model's or dtype's files and of a
folder holding other files, and corrupt files or malformed metadata reported, not used, and rewritten."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from decoding import generate
from prefill_cache import PrefillCache, model_fingerprint
from tests.test_default_model import run_generate
from tests.test_model import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(5), dtype=torch.int)


def with_question(*question):
    return torch.cat([DOC, torch.tensor(question, dtype=torch.int)])


@pytest.fixture
def model():
    m = tiny_model()
    m.setup_caches(1, 64)
    return m


def test_memory_cache_reuses_the_longest_common_prefix_and_changes_nothing(model):
    cache = PrefillCache(model)
    for prompt, reused in [(with_question(1, 2, 3), 0), (with_question(4, 5), 30), (with_question(1, 2, 9), 32),
                           (with_question(1, 2, 3), 32), (DOC[:10], 9)]:
        plain, _ = generate(model, prompt, 12)
        cached, stats = generate(model, prompt, 12, prefill_cache=cache)
        assert cached.tolist() == plain.tolist()
        assert stats.cached_tokens == reused  # never the whole prompt: its last token's logits start decoding


def test_memory_cache_evicts_least_recently_used_beyond_its_budget(model):
    one_prompt = 2 * 2 * 2 * 33 * 16 * 4  # layers x (k, v) x kv heads x tokens x head_dim x fp32 bytes
    cache = PrefillCache(model, max_bytes=2 * one_prompt)
    for first in (1, 2, 1, 3):  # prompt 1 again (a hit refreshes it), then prompt 3 evicts prompt 2
        generate(model, torch.full((33,), first, dtype=torch.int), 4, prefill_cache=cache)
    assert [key[0] for key in cache.entries] == [1, 3]


def test_disk_cache_serves_a_new_process(model, tmp_path):
    prompt = with_question(7, 8)
    plain, _ = generate(model, prompt, 12)
    generate(model, prompt, 12, prefill_cache=PrefillCache(model, tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    fresh = PrefillCache(model, tmp_path)  # nothing in memory: what it reuses comes from the file
    out, stats = generate(model, with_question(7, 9), 12, prefill_cache=fresh)
    assert stats.cached_tokens == 31
    assert out.tolist() == generate(model, with_question(7, 9), 12)[0].tolist()
    out, stats = generate(model, prompt, 12, prefill_cache=PrefillCache(model, tmp_path))
    assert out.tolist() == plain.tolist() and stats.cached_tokens == 31


@pytest.mark.parametrize("other", ["weights", "dtype"])
def test_disk_cache_refuses_another_model_or_dtype(model, tmp_path, other):
    generate(model, with_question(1), 4, prefill_cache=PrefillCache(model, tmp_path))
    stranger = tiny_model(seed=1) if other == "weights" else tiny_model().to(torch.float64)
    stranger.setup_caches(1, 64)
    with pytest.raises(ValueError, match="prefill cache made for another model or dtype"):
        generate(stranger, with_question(1), 4, prefill_cache=PrefillCache(stranger, tmp_path))


def test_fingerprint_tells_models_apart():
    assert model_fingerprint(tiny_model()) == model_fingerprint(tiny_model())
    nudged = tiny_model()
    with torch.no_grad():
        nudged.layers[1].feed_forward.w2.weight[0, 0] += 1.0  # element 0 is always in the sample
    assert model_fingerprint(nudged) != model_fingerprint(tiny_model())
    assert model_fingerprint(tiny_model().bfloat16()) != model_fingerprint(tiny_model())


def flip_byte_near_end(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def garbage_header(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + path.read_bytes()[24:])


@pytest.mark.parametrize("damage", [flip_byte_near_end, truncate, garbage_header])
def test_corrupt_file_is_reported_recomputed_and_rewritten(model, tmp_path, capsys, damage):
    prompt = with_question(3, 1, 4)
    plain, _ = generate(model, prompt, 12)
    generate(model, prompt, 12, prefill_cache=PrefillCache(model, tmp_path))
    (path,) = tmp_path.glob("*.safetensors")
    damage(path)
    out, stats = generate(model, prompt, 12, prefill_cache=PrefillCache(model, tmp_path))
    assert "is corrupt" in capsys.readouterr().err
    assert stats.cached_tokens == 0 and out.tolist() == plain.tolist()
    out, stats = generate(model, prompt, 12, prefill_cache=PrefillCache(model, tmp_path))  # rewritten: used again
    assert stats.cached_tokens == len(prompt) - 1 and out.tolist() == plain.tolist()
    assert "is corrupt" not in capsys.readouterr().err


def rewrite_metadata(path, **changes):
    """Save the entry again with its tensors intact (checksum still right) and some metadata changed."""
    with safe_open(str(path), framework="pt") as f:
        meta, kv = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    path.write_bytes(save(kv, metadata=meta))


@pytest.mark.parametrize("changes", [
    {"tokens": None}, {"tokens": "5"}, {"tokens": '"abc"'}, {"tokens": '{"a": 1}'}, {"tokens": '["x", 2]'},
    {"tokens": "[1.5, 2]"}, {"tokens": "[[1], 2]"}, {"tokens": "[true, 2]"}, {"tokens": "[-1, 2]"},
    {"tokens": "not json"}, {"tokens": "[1, 2, 3]"},  # well formed, but not the tokens the entry was saved for
    {"format": None}, {"sha256": None}, {"sha256": "x"},
])
def test_malformed_metadata_is_a_miss_recomputed_and_rewritten(model, tmp_path, capsys, changes):
    prompt = with_question(2, 7, 1)
    plain, _ = generate(model, prompt, 8)
    generate(model, prompt, 8, prefill_cache=PrefillCache(model, tmp_path))
    (path,) = tmp_path.glob("*.safetensors")
    rewrite_metadata(path, **changes)
    out, stats = generate(model, prompt, 8, prefill_cache=PrefillCache(model, tmp_path))
    assert "is corrupt" in capsys.readouterr().err
    assert stats.cached_tokens == 0 and out.tolist() == plain.tolist()
    out, stats = generate(model, prompt, 8, prefill_cache=PrefillCache(model, tmp_path))  # rewritten: used again
    assert stats.cached_tokens == len(prompt) - 1 and out.tolist() == plain.tolist()


def test_cache_path_that_is_a_file_or_a_folder_of_other_files_is_refused(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        PrefillCache(model, tmp_path / "file")
    with pytest.raises(ValueError, match="not a bitfast prefill cache"):
        PrefillCache(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"] and (tmp_path / "file").read_text() == "x"


def test_cli_second_run_reuses_the_cached_prompt(tmp_path):
    args = ["--chat", "--prompt", "Name three colors.", "--max_new_tokens", "12", "--threads", "1",
            "--prefill_cache", str(tmp_path)]
    first, second = run_generate(*args), run_generate(*args)
    assert first.returncode == second.returncode == 0, second.stderr
    assert "from the prefill cache" in second.stderr and "from the prefill cache" not in first.stderr
    assert second.stdout == first.stdout


def test_cli_cache_path_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_generate("--prefill_cache", str(tmp_path / "file"), "--max_new_tokens", "2")
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr
