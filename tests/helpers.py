import torch
import torch.distributed as dist

from pcmoe_engine.faults import exit_now

# ||out - ref|| / ||ref|| bounds per operand dtype (fp32 operands go through IEEE fp32 dots).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double().to(out.device)
    assert torch.isfinite(out).all(), "output has NaN/Inf (an unwritten or poisoned element)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_()


def end_party() -> None:
    """How a test's party process (torch.multiprocessing.spawn) ends once its results are written: its process group
    destroyed, then ``exit_now``, as `pcmoe train`'s stopped parties leave. Twice in three CI runs a finished party
    aborted at its end (SIGABRT, "terminate called without an active exception"), never in about 370 runs of the
    same tests outside the full suite; PYTHONFAULTHANDLER (conftest.py) shows where, should one abort again."""
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_now(0)


def poisoned_empty(real_empty):
    """torch.empty that fills floats with NaN and integers with -1, so an unwritten element cannot pass."""

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    return empty


# Tiny transformers checkpoints of each family the engine reproduces (pcmoe_engine/hf_config.py), with the options
# each may use: tied embeddings, dense layers (by list and by step), an explicit head size, attention biases.
BASE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2)
FAMILIES = {
    "olmoe": dict(num_experts=8, intermediate_size=24, norm_topk_prob=False, tie_word_embeddings=True),
    "qwen2_moe": dict(num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      intermediate_size=40, num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=16, intermediate_size=40, num_hidden_layers=4,
                      decoder_sparse_step=2, head_dim=12, attention_bias=True),
    "mixtral": dict(num_local_experts=8, intermediate_size=24, head_dim=12),
}


def make_checkpoint(family: str, directory, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM  # only the tests that make checkpoints pay for it

    torch.manual_seed(len(family))
    config = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return model
