import pytest
import torch

from csrc_triton.routed_experts import expert_mlp, expert_mlp_reference, grouped_mlp, grouped_mlp_reference
from csrc_triton.shared_expert import shared_expert_mlp, shared_expert_mlp_reference
from helpers import TOLERANCE, leaf, rel_err
from test_permute import random_ids

# tokens, hidden, intermediate, experts, top_k, experts left empty
SMALL = [(29, 40, 24, 6, 3, (2,)), (17, 32, 48, 4, 1, ()), (40, 24, 16, 8, 8, ()), (33, 16, 16, 3, 1, (0, 2))]
LARGE = [(4096, 2048, 1408, 60, 4, (7, 11)), (2000, 1000, 700, 256, 8, (0,)), (3000, 2048, 768, 128, 8, ())]


def check_expert_mlp(tokens, hidden, inter, experts, k, empty, dtype, device):
    ids = random_ids(tokens, experts, k, empty).to(device)
    x, w, res = torch.randn(tokens, hidden), torch.rand(tokens, k), torch.randn(tokens, hidden)
    wgu, wd = torch.randn(experts, 2 * inter, hidden) / hidden**0.5, torch.randn(experts, hidden, inter) / inter**0.5
    ours = [leaf(x, device, dtype), leaf(w, device), leaf(wgu, device, dtype), leaf(wd, device, dtype),
            leaf(res, device, dtype)]
    # The oracle sees the same (rounded) values, in fp64 (on the GPU there: fp64 GEMMs on the CPU take minutes).
    refs = [leaf(t.detach(), device, torch.float64) for t in ours]
    out = expert_mlp(ours[0], ours[1], ids, ours[2], ours[3], residual=ours[4])
    ref = expert_mlp_reference(refs[0], refs[1], ids.long(), refs[2], refs[3], refs[4])
    assert rel_err(out, ref) < TOLERANCE[dtype]
    g = torch.randn(tokens, hidden, device=device)
    out.backward(g.to(dtype))
    ref.backward(g.double())
    for name, a, b in zip(["x", "weights", "gate_up", "down", "residual"], ours, refs):
        assert rel_err(a.grad, b.grad) < TOLERANCE[dtype], name
    for e in empty:  # an expert that got no token gets exactly zero gradient
        assert ours[2].grad[e].abs().max().item() == 0 and ours[3].grad[e].abs().max().item() == 0


@pytest.mark.parametrize("case", SMALL, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_mlp(case, dtype, device, poison):
    check_expert_mlp(*case, dtype, device)


@pytest.mark.parametrize("hidden", [24, 64], ids=["pointer_loads", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_partial_column_tile(hidden, dtype, device, poison):
    # intermediate 20: the gate-up GEMM's last act tile is partial (BN/2 columns: 8 under the interpreter, 32 or
    # 128 on GPUs), so its gate rows and its up rows (I further down w_gate_up) are masked alike (pointer loads:
    # hidden 24 is no multiple of the K tile) or zero-filled by the [2E, I, H] descriptor (TMA: hidden 64 is)
    check_expert_mlp(21, hidden, 20, 4, 2, (), dtype, device)


def test_every_token_on_one_expert(device, poison):
    tokens, hidden, inter, experts = 37, 32, 24, 5
    ids = torch.full((tokens, 1), 3, dtype=torch.int32, device=device)
    x, wgu, wd = torch.randn(tokens, hidden), torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    w = torch.rand(tokens, 1)
    out = expert_mlp(x.to(device), w.to(device), ids, wgu.to(device), wd.to(device))
    ref = expert_mlp_reference(x.double(), w.double(), ids.cpu().long(), wgu.double(), wd.double())
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_expert_mlp(gated, dtype, device, poison):
    tokens, hidden, inter = 27, 40, 56
    tensors = [torch.randn(tokens, hidden), torch.randn(inter, hidden) / hidden**0.5,
               torch.randn(inter, hidden) / hidden**0.5, torch.randn(hidden, inter) / inter**0.5]
    ours = [leaf(t, device, dtype) for t in tensors]
    gate = [leaf(torch.rand(tokens, 1), device, dtype)] if gated else []
    refs = [leaf(t.detach().cpu(), "cpu", torch.float64) for t in ours + gate]
    out = shared_expert_mlp(*ours, *gate)
    ref = shared_expert_mlp_reference(*refs)
    assert rel_err(out, ref) < TOLERANCE[dtype]
    g = torch.randn(tokens, hidden)
    out.backward(g.to(device, dtype))
    ref.backward(g.double())
    for a, b in zip(ours + gate, refs):
        assert rel_err(a.grad, b.grad) < TOLERANCE[dtype]


def test_grouped_mlp_one_expert_per_row(device, poison):
    rows, hidden, inter, experts = 45, 24, 40, 7
    expert_of_row = torch.randint(0, experts - 1, (rows,), device=device)  # last expert empty
    ours = [leaf(torch.randn(rows, hidden), device), leaf(torch.randn(experts, 2 * inter, hidden) * 0.2, device),
            leaf(torch.randn(experts, hidden, inter) * 0.2, device)]
    refs = [leaf(t.detach().cpu(), "cpu", torch.float64) for t in ours]
    out = grouped_mlp(ours[0], expert_of_row, *ours[1:])
    ref = grouped_mlp_reference(refs[0], expert_of_row.cpu(), *refs[1:])
    assert rel_err(out, ref) < 1e-5
    g = torch.randn(rows, hidden)
    out.backward(g.to(device))
    ref.backward(g.double())
    for a, b in zip(ours, refs):
        assert rel_err(a.grad, b.grad) < 1e-5


def test_persistent_grid_does_not_follow_the_rows(device, monkeypatch):
    """A host's received rows change every step: a persistent kernel whose grid (its compile-time PROGRAMS)
    followed the row count compiled again at each new count (two parties' `small` run stopped at step 7 of 60 in
    its 2 minutes: bench/results/run_h100x2_59b021b.log; the fix, measured: experts_notes/v17_recompile_fix_*.log)."""
    from csrc_triton import _grouped_gemm, routed_experts

    launches = []

    class Recorder:  # the kernel's launches as (name, grid, PROGRAMS)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, grid, kwargs["PROGRAMS"]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module, name in [(_grouped_gemm, "_grouped_gemm_kernel"), (routed_experts, "_gate_up_fwd_kernel")]:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    seen = []
    for rows in (1, 40):  # one expert: one row tile and a few, fewer tiles than programs at one row
        launches.clear()
        x = leaf(torch.randn(rows, 16), device)
        w_gate_up, w_down = leaf(torch.randn(1, 16, 16), device), leaf(torch.randn(1, 16, 8), device)
        grouped_mlp(x, torch.zeros(rows, dtype=torch.long, device=device), w_gate_up, w_down).sum().backward()
        seen.append(sorted(launches))
    assert seen[0] == seen[1] and len(seen[0]) == 4  # gate-up, down, and the backward's two dgrads


def test_empty_input(device):
    out = expert_mlp(torch.randn(0, 16, device=device), torch.rand(0, 2, device=device),
                     torch.zeros(0, 2, dtype=torch.int32, device=device), torch.randn(4, 32, 16, device=device),
                     torch.randn(4, 16, 16, device=device))
    assert out.shape == (0, 16)


def test_mismatched_shapes_say_what_is_wrong():
    with pytest.raises(ValueError, match="does not match w_down"):
        expert_mlp(torch.randn(4, 16), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int32),
                   torch.randn(4, 30, 16), torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="share a dtype"):
        expert_mlp(torch.randn(4, 16), torch.rand(4, 2), torch.zeros(4, 2, dtype=torch.int32),
                   torch.randn(4, 32, 16, dtype=torch.float64), torch.randn(4, 16, 16, dtype=torch.float64))


def test_out_of_range_ids_are_rejected(device):
    """The range check finishes after the experts' kernels are launched (start_id_check), and still raises."""
    x, wgu, wd = (torch.randn(*shape, device=device) for shape in [(3, 16), (4, 32, 16), (4, 16, 16)])
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\), got values in \[-1, 3\]"):
        expert_mlp(x, torch.ones(3, 2, device=device), torch.tensor([[0, 3], [-1, 2], [1, 1]], device=device),
                   wgu, wd)
    with pytest.raises(ValueError, match=r"got values in \[0, 4\]"):
        grouped_mlp(x, torch.tensor([0, 4, 2], device=device), wgu, wd)


@pytest.mark.gpu
def test_route_and_experts_capture_in_a_cuda_graph():
    """route -> expert_mlp, forward and backward, captured in one CUDA graph and replayed on new inputs, gives
    what eager gives: nothing on the way waits for the device (that would fail the capture)."""
    from csrc_triton import route
    torch.manual_seed(0)
    tokens, hidden, inter, experts, k = 512, 256, 128, 16, 4
    leaves = [torch.randn(tokens, experts, device="cuda"), torch.randn(tokens, hidden, device="cuda"),
              torch.randn(experts, 2 * inter, hidden, device="cuda") / hidden**0.5,
              torch.randn(experts, hidden, inter, device="cuda") / inter**0.5]
    leaves = [t.bfloat16().requires_grad_() for t in leaves]
    copies = lambda: [t.detach().clone().requires_grad_() for t in leaves]
    dout = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)

    def step(logits, x, wgu, wd):
        routing = route(logits, k)
        out = expert_mlp(x, routing.weights, routing.expert_ids, wgu, wd)
        out.backward(dout)
        return out

    # Compile and autotune outside the capture, on a side stream as torch.cuda.graph asks, and on copies: the
    # captured leaves' gradient accumulators are then made in the capture, on its stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*copies())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*leaves)
    with torch.no_grad():  # new values in the captured tensors: new routing, new rows
        for t in leaves:
            t.copy_(torch.randn_like(t) * t.float().std())
    graph.replay()
    got = [out] + [t.grad for t in leaves]
    eager = copies()
    want = [step(*eager)] + [t.grad for t in eager]
    for name, a, b in zip(["out", "logits", "x", "gate_up", "down"], got, want):
        assert rel_err(a, b) < 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", LARGE, ids=str)
def test_expert_mlp_large_bf16(case, device):
    check_expert_mlp(*case, torch.bfloat16, device)


def check_grouped_mlp(rows, hidden, inter, experts, empty, dtype, device):
    """grouped_mlp (one expert per row: what an expert host runs on the rows it received) against the fp64
    reference, forward and backward; experts in ``empty`` get no row and exactly zero gradient."""
    gen = torch.Generator().manual_seed(rows)
    used = torch.tensor([e for e in range(experts) if e not in empty])
    expert_of_row = used[torch.randint(0, len(used), (rows,), generator=gen)]
    ours = [leaf(torch.randn(rows, hidden, generator=gen), device, dtype),
            leaf(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5, device, dtype),
            leaf(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5, device, dtype)]
    refs = [leaf(t.detach(), device, torch.float64) for t in ours]
    out = grouped_mlp(ours[0], expert_of_row.to(device), *ours[1:])
    ref = grouped_mlp_reference(refs[0], expert_of_row.to(device), *refs[1:])
    assert out.dtype == dtype and rel_err(out, ref) < TOLERANCE[dtype]
    g = torch.randn(rows, hidden, generator=gen)
    out.backward(g.to(device, dtype))
    ref.backward(g.to(device, torch.float64))
    for name, a, b in zip(["x", "gate_up", "down"], ours, refs):
        assert rel_err(a.grad, b.grad) < TOLERANCE[dtype], name
    for e in empty:
        assert ours[1].grad[e].abs().max().item() == 0 and ours[2].grad[e].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mlp(dtype, device, poison):
    check_grouped_mlp(37, 24, 20, 5, (3,), dtype, device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", LARGE, ids=str)
def test_grouped_mlp_large_bf16(case, device):
    tokens, hidden, inter, experts, top_k, empty = case
    check_grouped_mlp(tokens * top_k, hidden, inter, experts, empty, torch.bfloat16, device)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointer_loads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_gemms_read_by_tma_or_pointers(tma, dtype, device, poison):
    """Each grouped GEMM of the routed experts, both ways of reading its operands, against fp64 per expert. Sizes
    are multiples of the K tile (64 on GPUs), so tma=True takes the TMA path; an expert has more rows than one
    tile and a ragged tail, expert 3 none (its weight gradients must be exactly zero); I is less than a GPU's
    tile, so a tile's gate columns run into the up rows. The persistent grouped GEMM's programs (3 under the
    interpreter) walk several tiles each."""
    from csrc_triton._grouped_gemm import Groups, grouped_gemm, wgrad
    from csrc_triton.permute import plan_routing
    from csrc_triton.routed_experts import gate_up

    tokens, hidden, inter, experts = 150, 128, 64, 5
    ids = random_ids(tokens, experts, 2, empty=(3,)).to(device)
    plan = plan_routing(ids, experts)
    groups = Groups.of(plan, dtype)
    gen = torch.Generator().manual_seed(1)
    new = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)
    x, act, dh, w_down, w_gate_up = new(tokens, hidden), new(2 * tokens, inter), new(2 * tokens, 2 * inter), \
        new(experts, hidden, inter), new(experts, 2 * inter, hidden)
    expert = ids.flatten()[plan.sorted_pair.long()].long()
    x_slot = x[plan.sorted_token.long()]
    f64 = lambda t: t.double()
    out_rows = lambda n: torch.empty(2 * tokens, n, device=device, dtype=dtype)  # NaN-poisoned (the fixture)

    def gemm(a, gather, b, b_strides, n, k):
        out = out_rows(n)
        grouped_gemm(a, groups, gather, b, b_strides, out, n, k, tma)
        return out

    down = gemm(act, False, w_down, (w_down.stride(1), w_down.stride(2)), hidden, inter)  # B[e] is [N, K]
    assert rel_err(down, torch.einsum("si,shi->sh", f64(act), f64(w_down)[expert])) < TOLERANCE[dtype]
    down_dgrad = gemm(x, True, w_down, (w_down.stride(2), w_down.stride(1)), inter, hidden)  # [K, N], gathered A
    assert rel_err(down_dgrad, torch.einsum("sh,shi->si", f64(x_slot), f64(w_down)[expert])) < TOLERANCE[dtype]
    up_dgrad = gemm(dh, False, w_gate_up, (w_gate_up.stride(2), w_gate_up.stride(1)), hidden, 2 * inter)
    assert rel_err(up_dgrad, torch.einsum("sj,sjh->sh", f64(dh), f64(w_gate_up)[expert])) < TOLERANCE[dtype]

    h, swiglu = out_rows(2 * inter), out_rows(inter)  # gate-up: x gathered, gate and up rows of each expert
    gate_up(x, groups, w_gate_up, h, swiglu, tma)
    h_ref = torch.einsum("sh,sjh->sj", f64(x_slot), f64(w_gate_up)[expert])
    assert rel_err(h, h_ref) < TOLERANCE[dtype]
    assert rel_err(swiglu, torch.nn.functional.silu(h_ref[:, :inter]) * h_ref[:, inter:]) < TOLERANCE[dtype]

    dw_down, dw_gate_up = torch.empty_like(w_down), torch.empty_like(w_gate_up)
    wgrad(x, plan.sorted_token, act, None, dw_down, groups, tma)  # A gathered, B plain
    wgrad(dh, None, x, plan.sorted_token, dw_gate_up, groups, tma)  # A plain, B gathered
    per_expert = lambda a, b: torch.stack([f64(a)[expert == e].T @ f64(b)[expert == e] for e in range(experts)])
    assert rel_err(dw_down, per_expert(x_slot, act)) < TOLERANCE[dtype]
    assert rel_err(dw_gate_up, per_expert(dh, x_slot)) < TOLERANCE[dtype]
    assert dw_down[3].abs().max().item() == 0 and dw_gate_up[3].abs().max().item() == 0


@pytest.mark.gpu
def test_hopper_runs_the_warp_specialised_wgrad():
    """On Hopper the bf16 and fp16 wgrads of the tests above and of real widths run _wgrad_hopper's kernel (the
    tests then check it, not the Triton one); fp32, mixed dtypes, widths off 16 and misaligned rows keep the Triton
    kernel."""
    from csrc_triton import _wgrad_hopper
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not a Hopper GPU")
    x, act = (torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for rows, n in ((300, 2048), (600, 768)))
    assert _wgrad_hopper.supports(x, act) and _wgrad_hopper.supports(x[:, :128], act[:, :64])
    assert _wgrad_hopper.supports(x.half(), act.half())
    assert not _wgrad_hopper.supports(x.float(), act.float()) and not _wgrad_hopper.supports(x, act.half())
    assert not _wgrad_hopper.supports(x[:, :1000].contiguous(), act)
    assert not _wgrad_hopper.supports(x.view(-1)[4:4 + 299 * 2048].view(299, 2048), act)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointer_loads"])
def test_wgrad_keeps_an_experts_nan_rows_to_itself(tma, device, poison):
    """A NaN (an overflow in one expert's rows) stays in that expert's weight gradient: an expert's last, partial
    block of rows must not read its neighbour's rows, as a TMA box past its end would (0 x NaN is NaN). Rows of
    each expert are not a multiple of any K tile here (32 or 64 on GPUs, 16 under the interpreter)."""
    from csrc_triton._grouped_gemm import Groups, wgrad
    from csrc_triton.permute import plan_routing

    counts, hidden, inter = [37, 50, 3, 0, 45], 64, 32
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    plan = plan_routing(expert[torch.randperm(len(expert))].int().unsqueeze(1).to(device), len(counts))
    groups = Groups.of(plan, torch.bfloat16)
    slots = len(expert)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(slots, hidden, generator=gen).to(device, torch.bfloat16)
    act, dh = (torch.randn(slots, n, generator=gen).to(device, torch.bfloat16) for n in (inter, 2 * inter))
    nan_expert = 1  # its plain rows follow expert 0's partial block and precede expert 2's three rows
    act[expert.to(device) == nan_expert] = float("nan")
    dh[expert.to(device) == nan_expert] = float("nan")
    x_slot = x[plan.sorted_token.long()]
    dw_down = torch.empty(len(counts), hidden, inter, device=device, dtype=torch.bfloat16)
    dw_gate_up = torch.empty(len(counts), 2 * inter, hidden, device=device, dtype=torch.bfloat16)
    wgrad(x, plan.sorted_token, act, None, dw_down, groups, tma)  # B plain
    wgrad(dh, None, x, plan.sorted_token, dw_gate_up, groups, tma)  # A plain
    for e in range(len(counts)):
        if e == nan_expert:
            assert dw_down[e].isnan().any() and dw_gate_up[e].isnan().any()
            continue
        rows = (expert == e).to(device)
        assert rel_err(dw_down[e], x_slot[rows].double().T @ act[rows].double()) < TOLERANCE[torch.bfloat16], e
        assert rel_err(dw_gate_up[e], dh[rows].double().T @ x_slot[rows].double()) < TOLERANCE[torch.bfloat16], e
