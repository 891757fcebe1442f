"""model.py against independent references: known parameter counts, HF's rope scaling, full-sequence forward."""
import pytest
import torch

from decoding import decode_one_token, generate, prefill
from sampling import sample
from model import CONFIGS, ModelArgs, Transformer, rope_frequencies

TINY = dict(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=96, vocab_size=101, block_size=64)


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **over}))
    with torch.no_grad():
        for p in model.parameters():  # random norms too, so a wrong norm shows
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("name,params", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-3-8b", 8_030_261_248),
    ("llama-3.2-1b", 1_235_814_400), ("mistral-7b", 7_241_732_096), ("tinyllama-1.1b", 1_100_048_384),
    ("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120), ("smollm2-1.7b", 1_711_376_384),
])
def test_named_configs_have_published_parameter_counts(name, params):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == params  # tied weights count once


def test_every_named_config_builds():
    for name in CONFIGS:
        ModelArgs.from_name(name)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("llama-9")


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters
    args = ModelArgs.from_name("llama-3.1-8b")
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=args.rope_base,
                      rope_scaling={"rope_type": "llama3", **args.rope_scaling})
    ref, _ = _compute_llama3_parameters(cfg)
    torch.testing.assert_close(rope_frequencies(args).float(), ref.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(rope_frequencies(ModelArgs(**{**vars(args), "rope_scaling": None})).float(), ref.float())


@pytest.mark.parametrize("over", [{}, {"tie_embeddings": True}, {"rope_scaling": dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)}])
def test_kv_cache_decode_reproduces_full_forward(over):
    model = tiny_model(**over)
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, 32)
        step = [model(tokens[:, :7], torch.arange(7))]  # prefill a chunk, then token by token
        for i in range(7, 20):
            step.append(model(tokens[:, i:i + 1], torch.tensor([i])))
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_verify_sized_steps_on_the_cpu_kernels_reproduce_full_forward():
    """3-8 token steps on the KV cache (speculative verify) run the C++ dense and attention kernels; they must give
    the plain full forward's logits."""
    from kernels.cpu import cpu_kernels_available, cpu_kernels_error
    if not cpu_kernels_available():
        pytest.skip(f"CPU kernels unavailable: {cpu_kernels_error()}")
    model = tiny_model()
    tokens = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, 32)
        steps = [model(tokens[:, :10], torch.arange(10))]
        with torch.profiler.profile() as prof:
            for a, b in [(10, 14), (14, 17), (17, 20)]:
                steps.append(model(tokens[:, a:b], torch.arange(a, b)))
    assert {"bitfast::dense_gemv", "bitfast::few_query_attention"} <= {e.name for e in prof.events()}
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_tied_head_shares_embedding():
    model = tiny_model(tie_embeddings=True)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert sample(logits).item() == 3
    torch.manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2).item() for _ in range(200)}
    assert draws == {2, 3}
    # p = softmax = [.032, .087, .237, .644]: top_p 0.7 keeps {3, 2}; 0.5 keeps {3}
    draws = {sample(logits, temperature=1.0, top_p=0.7).item() for _ in range(200)}
    assert draws == {2, 3}
    assert {sample(logits, temperature=1.0, top_p=0.5).item() for _ in range(50)} == {3}


def test_sampling_frequencies_match_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 1.5, -1.0, 0.0]])
    draws = torch.cat([sample(logits.expand(4000, 4), temperature=1.0) for _ in range(5)]).view(-1)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits.double(), -1)[0], atol=0.01, rtol=0)


def test_generate_greedy_matches_argmax_loop_and_stops():
    model = tiny_model()
    prompt = torch.tensor([3, 14, 15, 92, 65], dtype=torch.int)
    model.setup_caches(1, 32)
    new, stats = generate(model, prompt, 10)
    seq = prompt.view(1, -1).long()
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], 1)
    assert new.tolist() == seq[0, 5:].tolist()
    assert stats.new_tokens == 10 and stats.prompt_tokens == 5
    stop_at = new[3].item()
    first = new.tolist().index(stop_at)
    new2, _ = generate(model, prompt, 10, stop_ids={stop_at})
    assert new2.tolist() == new[:first + 1].tolist()
    with pytest.raises(ValueError, match="exceeds the context"):
        generate(model, prompt, 40)


def test_compiled_decode_equals_eager():
    """fp32: the same tokens; bf16: logits within bf16 tolerance."""
    torch._dynamo.reset()
    model = tiny_model()
    prompt = torch.tensor([5, 6, 7, 8], dtype=torch.int)
    model.setup_caches(1, 32)
    eager, _ = generate(model, prompt, 12)
    compiled_decode = torch.compile(decode_one_token, fullgraph=True)
    compiled, _ = generate(model, prompt, 12, decode_fn=compiled_decode)
    assert compiled.tolist() == eager.tolist()

    model = model.to(torch.bfloat16)
    model.setup_caches(1, 32)
    logits_of = lambda m, t, p: m(t, p)  # noqa: E731
    compiled_logits = torch.compile(logits_of, fullgraph=True)
    with torch.no_grad():
        prefill(model, prompt.view(1, -1), torch.arange(4))
        a = logits_of(model, torch.tensor([[9]]), torch.tensor([4])).float()
        b = compiled_logits(model, torch.tensor([[9]]), torch.tensor([4])).float()
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05 * a.abs().max().item())
