"""A party's model outside training: the mean next-token loss of a text (``pcmoe eval``) and sampling
(``pcmoe generate``), from a run folder or a transformers checkpoint folder.

Which model. A transformers folder (a config.json beside its weights: an export with --pool, or any checkpoint
of a family the engine reproduces): the whole model. A run folder: party I's backbone with every party's experts,
at the latest step every party has a checkpoint of, read from the parties' folders in it (runs.py). That works on
one machine, where the run folder holds every party's shard; across sites a party holds only its own, so it
evaluates its pooled export (export.py). Either way the model runs in this one process, as a one-party engine
(every expert local): nothing crosses. Evaluating or sampling through the other parties' experts while their
processes run (each party holding only its own shard) is not implemented: it would need every party to run
forward passes in lockstep with the one sampling, as in training.

The loss, precisely. FILE is read whole (UTF-8) and encoded once with the model's tokenizer (``tokenizers``'
``Tokenizer.encode``, with whatever special tokens its post-processor adds). Window w holds tokens w*L to w*L + L
(L = --seq-len, so consecutive windows share one token); the last window is shorter when the tokens do not fill
it. Each window is one sequence, its context starting afresh at its first token, and each of its tokens after the
first is predicted from those before it: every token of the text but the first is predicted exactly once. The
loss is the mean cross-entropy of those predictions (natural log), the perplexity its exp.

Generation recomputes the whole sequence for each new token (the engine keeps no KV cache): fine for a look at a
model, slow for long outputs. Temperature 0 is greedy; it stops at the model's end-of-text token(s) or after
--max-new-tokens, as transformers' ``generate`` does.
"""

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .data import END_OF_TEXT, encode, read_text
from .hf import checkpoint_files, load_hf_tokenizer, load_party
from .hf_config import read_config
from .model import Backbone
from .protocol import DistributedExperts, ExpertShard, Wire
from .runs import common_step, is_run, read_party

__all__ = ["Model", "load_model", "windows", "window_batches", "summed_cross_entropy", "evaluate", "generate"]


@dataclass
class Model:
    """A whole model, ready to run: ``described`` says what it is (for the JSON output)."""
    backbone: Backbone
    shard: ExpertShard
    tokenizer: Tokenizer
    eos_ids: set[int]
    described: dict
    device: torch.device
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)

    def __post_init__(self):
        self.experts = DistributedExperts(self.shard, Wire())

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.backbone(tokens.to(self.device), self.experts)[0]


def _eos_ids(files: dict[str, str], tokenizer: Tokenizer) -> set[int]:
    """The end-of-text ids transformers' generate stops at: generation_config.json's, else config.json's; for
    the engine's own BPE its <|endoftext|>."""
    for name in ("generation_config.json", "config.json"):
        eos = json.loads(files.get(name, "{}")).get("eos_token_id")
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {eos}
    eos = tokenizer.token_to_id(END_OF_TEXT)
    return set() if eos is None else {eos}


def _run_model(run_dir: Path, party: int, device: torch.device) -> tuple:
    """Party ``party``'s backbone and every party's experts, at the latest step all parties have."""
    parties = read_party(run_dir, party).parties  # checks the folder and --party first
    step = common_step(run_dir, parties)
    saved = [read_party(run_dir, p, step) for p in range(parties)]
    mine = saved[party]
    with torch.device(device):
        shard = ExpertShard(mine.model)  # every expert: the parties' shards side by side
    for other in saved:
        if other.model != mine.model:
            raise ValueError(f"party {other.party}'s checkpoint in {str(run_dir)!r} is of another model than party "
                             f"{party}'s: is it the same run?")
        ids = other.state["expert_ids"]
        for layer in range(len(shard.w_down)):
            shard.w_gate_up[layer].data[ids] = other.state["experts"][f"w_gate_up.{layer}"].to(device)
            shard.w_down[layer].data[ids] = other.state["experts"][f"w_down.{layer}"].to(device)
    described = {"path": str(run_dir), "kind": "run", "party": party, "step": step, "parties": parties,
                 "experts": "every party's, from its checkpoint in the run folder"}
    files = mine.hf_files
    return mine.backbone(device), shard, Tokenizer.from_str(files["tokenizer.json"]), files, described


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu" or (name.split(":")[0] == "cuda" and torch.cuda.is_available()):
        return torch.device(name)
    raise ValueError(f"--device {name}: choose auto, cpu, or cuda / cuda:N where torch sees a GPU")


def load_model(path, party: int | None = None, device: str = "auto", precision: str = "auto") -> Model:
    """The model at ``path`` (a run folder: party ``party``'s, default 0; or a transformers folder) on ``device``
    (auto: a GPU if there is one), under ``precision`` (auto: bf16 autocast on a GPU, else fp32)."""
    path = Path(path).expanduser()
    device = _device(device)
    if not path.exists():
        raise ValueError(f"{str(path)!r} does not exist: give a run folder (train.out_dir/train.name) or a "
                         "transformers checkpoint folder")
    if (path / "config.json").is_file():
        if party is not None:
            raise ValueError(f"--party is for a run folder; {str(path)!r} is a transformers checkpoint (one model): "
                             "drop --party")
        cfg = read_config(path)
        tokenizer = load_hf_tokenizer(path, cfg.vocab_size)
        backbone, shard = load_party(path, cfg, 0, 1, device)
        files = checkpoint_files(path)
        described = {"path": str(path), "kind": "transformers", "family": cfg.family}
    elif is_run(path):
        backbone, shard, tokenizer, files, described = _run_model(path, party or 0, device)
    else:
        raise ValueError(f"{str(path)!r} is neither a run folder (party<i>/ folders) nor a transformers checkpoint "
                         "folder (config.json): give the folder `pcmoe train` or `pcmoe export` wrote")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    described.update(device=str(device), precision="bf16" if bf16 else "fp32")
    backbone.eval()
    return Model(backbone, shard, tokenizer, _eos_ids(files, tokenizer), described, device,
                 torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())


def windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Windows of at most ``seq_len + 1`` tokens, every ``seq_len`` tokens (the module docstring)."""
    return [tokens[start:start + seq_len + 1] for start in range(0, tokens.numel() - 1, seq_len)]


def window_batches(tokens: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """The windows stacked ``batch_size`` at a time ([batch, seq_len + 1] each); the short last one alone."""
    pieces = windows(tokens, seq_len)
    short = [w[None] for w in pieces if w.numel() != seq_len + 1]
    full = [w for w in pieces if w.numel() == seq_len + 1]
    return [torch.stack(full[i:i + batch_size]) for i in range(0, len(full), batch_size)] + short


def summed_cross_entropy(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """The summed next-token cross-entropy of a batch of windows, from the logits of all but their last token."""
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()


@torch.no_grad()
def evaluate(model: Model, text_file, seq_len: int, batch_size: int) -> dict:
    """The mean next-token cross-entropy of ``text_file`` and its perplexity, with what was evaluated."""
    tokens = encode(model.tokenizer, read_text(text_file))
    if tokens.numel() < 2:
        raise ValueError(f"{str(text_file)!r} encodes to {tokens.numel()} token(s): give a text of at least two")
    total, count = 0.0, 0
    for batch in window_batches(tokens, seq_len, batch_size):
        batch = batch.to(model.device)
        total += summed_cross_entropy(model.logits(batch[:, :-1]), batch)
        count += batch[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "windows": len(windows(tokens, seq_len)),
            "seq_len": seq_len, "text": str(text_file), "model": model.described}


@torch.no_grad()
def generate(model: Model, ids: list[int], max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
             stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """``ids`` followed by up to ``max_new_tokens`` sampled ones (greedy at temperature 0), up to and including
    the first end-of-text token, or the first after which ``stop(the new tokens)`` is true."""
    if not ids:
        raise ValueError("the prompt encodes to no tokens: give a longer --prompt")
    generator = torch.Generator(model.device).manual_seed(seed)
    tokens = torch.tensor([ids], device=model.device)
    for _ in range(max_new_tokens):
        logits = model.logits(tokens)[0, -1].float()
        if temperature == 0:
            token = logits.argmax()
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[0]
        tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
        if token.item() in model.eos_ids or (stop is not None and stop(tokens[0, len(ids):].tolist())):
            break
    return tokens[0].tolist()
