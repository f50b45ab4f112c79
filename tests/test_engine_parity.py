"""The expert gradient's scale (protocol.py): n parties with batches of B sequences equal one centralized party with
the batch of all n x B, fp32 on the CPU, through Party's own step (AdamW, the separate clipping of optim.py).

Each party runs in its own process (gloo over 127.0.0.1); the centralized Party runs in the test's. Every party
starts from the same backbone (party 0's initial one), as the centralized run does, and every expert from its own
seed whatever n; the centralized batch is the parties' batches one after another.

- Each party its own batch ("split"): an owner's expert gradient, its recorded norm and its experts after one
  optimizer step equal the centralized run's for those experts; the mean of the parties' backbone gradients
  equals the centralized backbone's (each party's backbone then steps on its own gradient: its update is its own).
- Every party the same batch ("same"; the centralized batch is n copies): everything equals the centralized run,
  the backbone's gradient, norm and update included.

The load-balancing loss is a product of two batch means (tokens per expert and mean router probability), not a mean
over tokens, so no split of a batch (parties, or gradient accumulation) gives its gradient exactly: the split case
leaves it out (train.aux_loss_coef=0); the router z-loss is a mean over tokens and stays in.
"""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcmoe_engine.cli import free_port
from pcmoe_engine.config import DataConfig, corpus_path, load_config
from pcmoe_engine.data import load_tokenizer, read_text
from pcmoe_engine.optim import clip_grad_norms, grad_bound, grad_norms
from pcmoe_engine.party import Party, initial_backbone
from pcmoe_engine.protocol import ExpertShard
from helpers import end_party

B, SEQ = 2, 16
MODEL = ["model.vocab_size=300", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.num_experts=8", "model.top_k=2", "model.expert_intermediate_size=24",
         "model.shared_intermediate_size=16"]
RUN = ["data.tokenizer_corpus=tinyshakespeare", f"data.seq_len={SEQ}", "train.precision=fp32", "train.device=cpu",
       "train.checkpoints=false", "train.warmup_steps=0", "train.steps=10", "train.grad_clip=0", "train.lr=1e-2"]


class FixedBatch:
    """Batches.next(), always the same batch."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def next(self):
        return self.tokens[:, :-1], self.tokens[:, 1:]


def _config(corpus, tmp_path, parties: int, batch_size: int, aux: float):
    return load_config(None, [*MODEL, *RUN, f"parties={parties}", f"data.corpus={corpus}",
                              f"train.batch_size={batch_size}", f"train.aux_loss_coef={aux}",
                              f"train.out_dir={tmp_path}"])


def _batch(rank: int, same: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11 if same else 11 + rank)
    return torch.randint(0, 300, (B, SEQ + 1), generator=gen)


def _run(cfg, rank: int, batch: torch.Tensor) -> dict:
    """One Party on ``batch``: its gradients (one forward and backward), then one optimizer step's record and
    weights."""
    party = Party(cfg, rank)
    party.load_backbone(initial_backbone(cfg, 0).state_dict())
    party.batches = FixedBatch(batch)
    party.forward_backward(*party.batches.next())
    grads = {f"{part}.{name}": p.grad.clone() for part, module in (("backbone", party.backbone), ("experts", party.shard))
             for name, p in module.named_parameters()}
    party.optimizer.zero_grad(set_to_none=True)
    record = party.step()
    weights = {f"{part}.{name}": p.detach().clone() for part, module in (("backbone", party.backbone),
                                                                         ("experts", party.shard))
               for name, p in module.named_parameters()}
    return {"grads": grads, "record": record, "weights": weights, "expert_ids": party.shard.expert_ids}


def _party(rank, parties, port, corpus, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=parties)
    result = {}
    for case, aux in (("split", 0.0), ("same", 0.01)):
        result[case] = _run(_config(corpus, out_dir, parties, B, aux), rank, _batch(rank, case == "same"))
    torch.save(result, os.path.join(out_dir, f"party{rank}.pt"))
    end_party()


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


def _stepped_close(a, b, grad, what):
    """Weights after one AdamW step: an element moves by about lr x g / (|g| + eps), so where |g| is near eps (1e-8)
    the order of fp32 sums decides its step; equal (as _close) where |g| > 100 eps, within the step (lr) elsewhere."""
    sure = grad.abs() > 1e-6
    _close(a[sure], b[sure], what)
    assert (a - b).abs().max() <= 1e-2, what  # lr: every element moves at most about that far


def _expert(state: dict, key: str, expert: int, ids: list[int]) -> torch.Tensor:
    """Expert ``expert``'s slice of an experts.<w>.<layer> tensor held by a shard of ``ids``."""
    return state[key][ids.index(expert)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(read_text(corpus_path("tinyshakespeare"))[:20_000])
    return path


@pytest.fixture(autouse=True)
def _cpu(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine on a CPU runs csrc_triton's references


@pytest.mark.slow
@pytest.mark.parametrize("parties", [2, 3])  # 3: 8 experts split 3, 3, 2
def test_n_parties_equal_the_centralized_run_at_n_times_the_batch(parties, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    load_tokenizer(DataConfig(), 300)  # trained once here, read from the cache by the parties
    mp.spawn(_party, args=(parties, free_port(), str(corpus), str(tmp_path)), nprocs=parties)
    results = [torch.load(tmp_path / f"party{p}.pt", weights_only=False) for p in range(parties)]
    all_experts = list(range(8))

    for case, aux in (("split", 0.0), ("same", 0.01)):
        batch = torch.cat([_batch(rank, case == "same") for rank in range(parties)])
        central = _run(_config(corpus, tmp_path, 1, parties * B, aux), 0, batch)
        runs = [r[case] for r in results]

        # Experts: gradient and update of the centralized run, whatever the split.
        for r in runs:
            for key in (k for k in r["grads"] if k.startswith("experts.")):
                for expert in r["expert_ids"]:
                    where = f"{case}, expert {expert} {key}"
                    _close(_expert(r["grads"], key, expert, r["expert_ids"]),
                           _expert(central["grads"], key, expert, all_experts), f"{where} gradient")
                    _stepped_close(_expert(r["weights"], key, expert, r["expert_ids"]),
                                   _expert(central["weights"], key, expert, all_experts),
                                   _expert(central["grads"], key, expert, all_experts), f"{where} after a step")
        # The shards' norms make up the whole expert set's norm: each is of the mean gradient (not n x it).
        shards = math.sqrt(sum(r["record"]["expert_grad_norm"] ** 2 for r in runs))
        assert math.isclose(shards, central["record"]["expert_grad_norm"], rel_tol=1e-5)

        backbone = [k for k in central["grads"] if k.startswith("backbone.")]
        if case == "split":  # the centralized backbone's gradient is the mean of the parties'
            for key in backbone:
                _close(sum(r["grads"][key] for r in runs) / parties, central["grads"][key], f"split: {key} gradient")
        else:  # the same batch everywhere: every party's backbone is the centralized one, step and all
            for r in runs:
                assert math.isclose(r["record"]["grad_norm"], central["record"]["grad_norm"], rel_tol=1e-5)
                assert math.isclose(r["record"]["loss"], central["record"]["loss"], rel_tol=1e-6)
                for key in backbone:
                    _close(r["grads"][key], central["grads"][key], f"same: {key} gradient")
                    _stepped_close(r["weights"][key], central["weights"][key], central["grads"][key],
                                   f"same: {key} after a step")


def test_backbone_and_shard_are_clipped_to_their_own_bounds(tmp_path):
    """grad_clip bounds the backbone; a shard of 3 of 8 experts gets grad_clip x sqrt(3/8); 0 is off. Each set is
    clipped to its own bound, whatever the other's norm."""
    cfg = load_config(None, [*MODEL, "parties=3", "train.grad_clip=0.5", f"train.out_dir={tmp_path}"])
    shard = ExpertShard(cfg.model, 0, 3)
    assert shard.expert_ids == [0, 3, 6]
    assert grad_bound(cfg, torch.nn.Linear(2, 2)) == 0.5
    assert math.isclose(grad_bound(cfg, shard), 0.5 * math.sqrt(3 / 8))
    off = load_config(None, [*MODEL, "parties=3", "train.grad_clip=0", f"train.out_dir={tmp_path}"])
    assert grad_bound(off, shard) == math.inf

    big, small = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(9))
    big.grad, small.grad = torch.full((4,), 10.0), torch.full((9,), 0.01)  # norms 20 and 0.03
    norms = grad_norms([[big], [small]])
    torch.testing.assert_close(norms, torch.tensor([20.0, 0.03]))
    clip_grad_norms([([big], 1.0), ([small], 0.5)], norms)
    torch.testing.assert_close(big.grad.norm(), torch.tensor(1.0))  # clipped to its bound
    torch.testing.assert_close(small.grad, torch.full((9,), 0.01))  # under its own bound: left alone
