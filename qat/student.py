"""The student: the float model with its planned linears as QuantLinear in fake-quant mode (float latent weights,
rounded on the fly with a straight-through estimator against the scales and zeros of a PTQ result), and its export
to a normal packed checkpoint."""
from calibrate import quantize_model
from checkpoint import load_model, quant_plan, read_config, save_quantized
from eval.data import calibration_batches
from model import RMSNorm, Transformer
from qat.config import INIT_METHODS, RunSettings
from qlinear import QuantFormat, QuantLinear, linear_names, quantized_linear_factory, read_recipe, resolve_recipe


def plan_for(fmt: str, recipe_path, model) -> dict:
    """{linear name: QuantFormat or None}: the recipe file's, or `fmt` for every linear but the head."""
    recipe = read_recipe(recipe_path) if recipe_path else {"default": QuantFormat.parse(fmt).name}
    return resolve_recipe(recipe, linear_names(model))


def _ptq_start(s: RunSettings, float_ckpt, tokenizer) -> tuple:
    """(model, plan): the float model quantized here by --init rtn|gptq|awq, or the quantized --init checkpoint."""
    if s.init in INIT_METHODS:
        model = load_model(float_ckpt)
        plan = plan_for(s.format, s.recipe, model)
        calib = None if s.init == "rtn" else calibration_batches(tokenizer, s.calib_samples, s.calib_seqlen,
                                                                  s.calib, s.seed)
        quantize_model(model, plan, s.init, calib, log=lambda _: None)
        return model, plan
    config = read_config(s.init)
    plan = quant_plan(config)
    if not plan:
        raise ValueError(f"--init {s.init} is a float checkpoint; give a quantized one, or rtn|gptq|awq")
    if config["model_args"] != read_config(float_ckpt)["model_args"]:
        raise ValueError(f"--init {s.init} is not a quantization of {float_ckpt} (model arguments differ)")
    return load_model(s.init), plan


def build_student(s: RunSettings, float_ckpt, tokenizer) -> tuple:
    """The PTQ starting point in fake-quant mode, on the CPU: the latents and the norms train (and the scales with
    train_scales). A quantized tied head's embedding (qlinear.QuantEmbedding) reads the head's fake-quantized latent
    while it trains. Returns (model, plan)."""
    model, plan = _ptq_start(s, float_ckpt, tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.train_mode(train_scales=s.train_scales)
        elif isinstance(m, RMSNorm):
            m.weight.requires_grad_(True)
    return model, plan


def checkpoint_activations(model):
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        forward = block.forward
        block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=False)


def shard_student(model):
    """FSDP2 over the process group: each block is one unit (its latents, scales and norms gathered for its
    forward and backward, resharded after), the root holds the rest (embedding, head, final norm). Gradients are
    reduce-scattered, so each process keeps only its shard of them and of the optimizer state.
    The shards are gathered in float32 even in a bf16 run (no bf16 MixedPrecisionPolicy): a bf16 latent rounds to
    other codes than the float32 latent the export packs (int8: up to half a code step); the matmuls still run in
    bf16 under the run's autocast, as in a run of one process."""
    from torch.distributed.fsdp import fully_shard
    for block in model.layers:
        fully_shard(block)
    return fully_shard(model)


def gathered_student(model, plan: dict, train_scales: bool):
    """All processes: gather an FSDP-sharded student's whole state onto rank 0, which gets an unsharded copy of
    the student to export (the others get None)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    whole = Transformer(model.args, quantized_linear_factory(plan))
    for m in whole.modules():
        if isinstance(m, QuantLinear):
            m.train_mode(train_scales=train_scales)
    whole.load_state_dict(state)
    return whole


def export(model, plan, float_ckpt, out, info):
    """Pack the latents into codes (in place) and save a normal quantized checkpoint."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.latent is not None:
            m.pack_latent()
    model.tie_head()
    return save_quantized(model, plan, float_ckpt, out, info)
