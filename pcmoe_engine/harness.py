"""A model type ``pcmoe`` for EleutherAI's lm-evaluation-harness (the `lm-eval` package: ``pip install
'pcmoe[eval]'``), so the benchmarks run on a party's model:

    pcmoe lm-eval --model pcmoe --model_args path=RUN_OR_EXPORT,party=I --tasks arc_easy,hellaswag

Every argument after ``pcmoe lm-eval`` is lm-eval's own (its `lm-eval run` command line). lm-eval 0.4 finds a model
type only in its own registry, without a plugin entry point, so the bare ``lm_eval`` command cannot see this one:
``pcmoe lm-eval`` registers it (importing this module does) and runs lm-eval's command line. From Python: ``import
pcmoe_engine.harness`` and then ``lm_eval.simple_evaluate(model="pcmoe", model_args="path=...,party=0", ...)``.

model_args: ``path`` (a run folder: party ``party``'s backbone with every party's experts; or a transformers folder
such as a pooled export: inference.load_model), ``party``, ``device`` and ``precision`` (as `pcmoe eval`'s),
``max_length`` (the longest sequence a forward pass gets, default 2048: longer inputs keep their last tokens), and
lm-eval's ``--batch_size`` (a number; sequences per forward pass) and ``--device`` (its default, cuda:0, is the CPU
on a machine without a GPU).

What each request computes, in one process with every expert local (nothing crosses): ``loglikelihood`` scores a
continuation after its context, both encoded with the model's tokenizer as lm-eval's TemplateLM splits them (an
empty context is the end-of-text token), from one forward pass over their last max_length + 1 tokens;
``loglikelihood_rolling`` is lm-eval's rolling windows of max_length tokens (each token predicted once, the first
after the end-of-text token); ``generate_until`` samples with inference.generate (greedy unless the task sets
``do_sample``, then at its ``temperature``; no KV cache, so each new token recomputes the sequence) until one of the task's
``until`` strings, the end-of-text token or ``max_gen_toks`` (default 256), and cuts the text at the first ``until``.
"""

import sys

import lm_eval.models  # noqa: F401  lm-eval's own model types first: it adds them only while its registry is empty
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .inference import generate, load_model

__all__ = ["PCMoELM", "main"]


@register_model("pcmoe")
class PCMoELM(TemplateLM):
    """lm-eval's view of a pcmoe model (the module docstring)."""

    def __init__(self, path: str, party: int | None = None, device: str | None = None, precision: str = "auto",
                 batch_size: int | str = 1, max_length: int = 2048, max_batch_size: int | None = None):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a number of sequences per forward pass (pcmoe does "
                             "not search for one: no 'auto')")
        if int(max_length) < 2:
            raise ValueError(f"max_length={max_length!r} must be at least 2")
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "auto"  # lm-eval passes its default, cuda:0, on a machine without a GPU too
        self.model = load_model(path, None if party is None else int(party), device, precision)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        eos = self.model.eos_ids
        if not eos:
            raise ValueError(f"{path!r}: the model's tokenizer has no end-of-text token (its config.json names no "
                             "eos_token_id): lm-eval conditions on one")
        self._eot = min(eos)
        self._path = str(path)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return self._path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.model.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request, the longest
        first in batches of batch_size (right-padded: a causal model's earlier positions never see the padding)."""
        sequences = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            sequences.append((whole, len(continuation)))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        answers: list[tuple[float, bool] | None] = [None] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(sequences[i][0]) for i in batch) - 1
            inputs = torch.full((len(batch), width), self._eot, dtype=torch.long)
            for row, i in enumerate(batch):
                inputs[row, :len(sequences[i][0]) - 1] = torch.tensor(sequences[i][0][:-1])
            logprobs = F.log_softmax(self.model.logits(inputs).float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                whole, scored = sequences[i]
                length = len(whole) - 1
                targets = torch.tensor(whole[-scored:])
                rows = logprobs[row, length - scored:length]
                answer = (rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all()))
                answers[i] = answer
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (string,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.get("until") or [self.tok_decode([self._eot])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self._eot]

            def stop(new: list[int]) -> bool:
                return any(u in self.tok_decode(new) for u in until)

            new = generate(self.model, ids, max_new, temperature, stop=stop)[len(ids):]
            text = self.tok_decode([t for t in new if t not in self.model.eos_ids])
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str]) -> None:
    """`pcmoe lm-eval ARGS`: lm-eval's command line with the ``pcmoe`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
