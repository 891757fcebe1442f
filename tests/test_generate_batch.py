"""Batched generation: each row of a right-padded batch, decoding at its own positions, gives what generate()
gives that prompt alone (eager, and compiled through the C++ few-token CPU kernels)."""
import pytest
import torch

from decoding import compile_step, decode_one_token, generate, generate_batch
from tests.test_model import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 17, 42], [9, 1, 30, 77, 12, 64, 3, 8, 50, 2], [60, 61, 62, 63, 64, 65]]


def one_by_one(model, prompts, max_new_tokens, stop_ids=()):
    results = []
    for p in prompts:
        model.setup_caches(1, 64)
        results.append(generate(model, torch.tensor(p, dtype=torch.int), max_new_tokens, stop_ids=stop_ids)[0].tolist())
    return results


def test_batch_equals_one_prompt_at_a_time():
    model = tiny_model()
    expected = one_by_one(model, PROMPTS, 20)
    assert generate_batch(model, PROMPTS, 20) == expected
    stop = expected[1][4]  # rows end at their first stop token, at different steps
    assert generate_batch(model, PROMPTS, 20, stop_ids=[stop]) == one_by_one(model, PROMPTS, 20, [stop])


def test_compiled_batch_equals_one_prompt_at_a_time():
    torch._dynamo.reset()
    model = tiny_model()
    expected = one_by_one(model, PROMPTS, 16)
    assert generate_batch(model, PROMPTS, 16, decode_fn=compile_step(decode_one_token, "cpu")) == expected


def test_rows_at_their_own_positions_match_separate_forwards():
    model = tiny_model()
    tokens = torch.randint(0, 101, (2, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.setup_caches(2, 32)
        model(torch.arange(24).view(2, 12) % 101, torch.arange(12))
        batched = model(tokens, torch.tensor([[5], [11]]))  # row 0 continues after 5 tokens, row 1 after 11
        singles = []
        for row, n in enumerate((5, 11)):
            model.setup_caches(1, 32)
            model((torch.arange(24).view(2, 12) % 101)[row:row + 1, :n], torch.arange(n))
            singles.append(model(tokens[row:row + 1], torch.tensor([n])))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_bad_batches_are_errors():
    with pytest.raises(ValueError, match="prompt is empty"):
        generate_batch(tiny_model(), [[1, 2], []], 4)
    with pytest.raises(ValueError, match="token id 101, outside the model's vocabulary of 101"):
        generate_batch(tiny_model(), [[1, 2], [101]], 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        generate_batch(tiny_model(), [], 4)
