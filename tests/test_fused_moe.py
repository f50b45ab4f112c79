import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from csrc_triton import FusedMoE, load_balancing_loss, patch_hf_model
from helpers import TOLERANCE, rel_err


def make_block(family, hidden=48, inter=40, experts=8, top_k=2, norm=True, shared=56):
    if family == "qwen2":
        cfg = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=norm, shared_expert_intermediate_size=shared)
        cls = Qwen2MoeSparseMoeBlock
    elif family == "qwen3":
        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=norm)
        cls = Qwen3MoeSparseMoeBlock
    elif family == "olmoe":
        cfg = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=norm)
        cls = OlmoeSparseMoeBlock
    elif family == "mixtral":
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                            num_experts_per_tok=top_k)
        cls = MixtralSparseMoeBlock
    else:
        cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=experts,
                               num_experts_per_tok=top_k, n_group=4, topk_group=2, n_shared_experts=2,
                               routed_scaling_factor=2.5, norm_topk_prob=norm)
        cls = DeepseekV3MoE
    cfg._experts_implementation = "eager"
    block = cls(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
        for b in block.buffers():
            b.normal_(0, 0.05)
    return block


FAMILIES = ["qwen2", "qwen3", "olmoe", "mixtral", "deepseek_v3"]


def check_from_hf(block, x, tol, ref_dtype=torch.float64):
    """The fused module returns the block's output and the same gradients for x and every parameter.

    On the GPU the reference is the bf16 block itself: it computes the same bf16 router logits, so both
    pick the same experts (an fp64 oracle could flip near-ties, which no tolerance on outputs allows for).
    """
    ref_block = copy.deepcopy(block).to(ref_dtype)
    x_ref = x.detach().to(ref_dtype).requires_grad_()
    ref = ref_block(x_ref)
    fused = FusedMoE.from_hf(block)
    out = fused(x)
    assert out.shape == x.shape
    assert rel_err(out, ref) < tol
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g.to(out.dtype))
    assert rel_err(x.grad, x_ref.grad) < tol
    ref_params = dict(ref_block.named_parameters())
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, ref_params[name].grad) < tol, name


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_matches_block(family, poison):
    torch.manual_seed(0)
    block = make_block(family, top_k=3 if family != "deepseek_v3" else 4)
    x = torch.randn(2, 13, 48, requires_grad=True)
    check_from_hf(block, x, TOLERANCE[torch.float32])


def test_from_hf_shares_parameters():
    block = make_block("qwen2")
    fused = FusedMoE.from_hf(block)
    assert {id(p) for p in fused.parameters()} == {id(p) for p in block.parameters()}
    assert fused.state_dict().keys() == block.state_dict().keys()


def test_patch_hf_model_replaces_blocks_and_keeps_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(make_block("olmoe"), torch.nn.Linear(48, 48), make_block("olmoe"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(1, 5, 48)
    before = model(x).detach()
    assert patch_hf_model(model) == 2
    assert isinstance(model[0], FusedMoE) and isinstance(model[2], FusedMoE)
    after = model(x)
    assert rel_err(after, before) < 1e-5
    weight = model[0].experts.gate_up_proj
    old = weight.detach().clone()
    after.square().mean().backward()
    opt.step()
    assert not torch.equal(weight, old)  # the optimizer built before patching still updates the experts


def test_router_output_feeds_the_aux_loss():
    block = FusedMoE.from_hf(make_block("qwen3", experts=8, top_k=2))
    x = torch.randn(1, 16, 48)
    block(x)
    loss = load_balancing_loss(block.router_output)
    loss.backward()
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family,experts", [("olmoe", "num_experts"), ("qwen2_moe", "num_experts"),
                                             ("qwen3_moe", "num_experts"), ("mixtral", "num_local_experts")])
def test_patched_model_reports_router_logits_and_aux_loss(family, experts):
    """output_router_logits=True on a patched model: the same router logits, aux_loss and aux_loss gradient on
    the routers as transformers' own blocks (with a padding mask, which the loss weighs)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=32, intermediate_size=48,
                                  moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, **{experts: 8})
    reference = AutoModelForCausalLM.from_config(config)
    patched = copy.deepcopy(reference)
    assert patch_hf_model(patched) == 2
    tokens = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    results = []
    for model in (reference, patched):
        out = model(tokens, attention_mask=mask, output_router_logits=True)
        out.aux_loss.backward()
        routers = [layer.mlp.gate.weight.grad for layer in model.model.layers]
        results.append((out.aux_loss, out.router_logits, routers))
    (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = results
    assert len(logits) == len(ref_logits) == 2
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(logits, ref_logits))
    assert rel_err(loss, ref_loss) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))


def test_unsupported_block_and_bad_input_say_what_is_wrong():
    with pytest.raises(ValueError, match="not supported"):
        FusedMoE.from_hf(torch.nn.Linear(4, 4))
    fused = FusedMoE.from_hf(make_block("olmoe"))
    with pytest.raises(ValueError, match=r"input must be \[batch, seq, 48\]"):
        fused(torch.randn(3, 47))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_matches_block_bf16_large(family):
    torch.manual_seed(0)
    block = make_block(family, hidden=1024, inter=704, experts=64, top_k=6 if family != "deepseek_v3" else 8,
                       shared=1408).cuda().bfloat16()
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    check_from_hf(block, x, TOLERANCE[torch.bfloat16], ref_dtype=torch.bfloat16)
