"""`pcmoe lm-eval` (pcmoe_engine/harness.py): lm-evaluation-harness runs its three request types on a pcmoe model,
offline, on task files and data written here; every score equals transformers' own model on the same folder, under
lm-eval's definitions (its context/continuation split, its rolling windows, greedy generation cut at `until`).

A tiny random OLMoE checkpoint with the engine's 300-token BPE; max_length=12 so that contexts are cut and the
rolling windows are several; batch size 2 so that sequences of different lengths share a padded forward pass.
"""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_checkpoint
from pcmoe_engine.cli import main as pcmoe
from pcmoe_engine.config import DataConfig
from pcmoe_engine.data import load_tokenizer

lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval is not installed (pip install 'pcmoe[eval]')")

MAX_LENGTH, MAX_NEW = 12, 6
DOCS = [{"question": "To be or not to", "choices": ["be", "go to the sea", "sing"], "answer": 0,
         "text": "All the world's a stage, and all the men and women merely players.", "prompt": "ROMEO:"},
        {"question": "What light through yonder", "choices": ["window breaks", "door", "sky"], "answer": 1,
         "text": "Now is the winter of our discontent made glorious summer by this sun of York.", "prompt": "JULIET:"}]
TASKS = {
    "pcmoe_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    "pcmoe_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                 "  - metric: word_perplexity\n",
    "pcmoe_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: ' '\ngeneration_kwargs:\n"
                 f"  until: [' ', '\\n']\n  max_gen_toks: {MAX_NEW}\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n",
}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No hub: the datasets of the tasks are local JSON files; caches in the test's folder. Afterwards, lm-eval's
    log handler goes (it holds the stderr pytest captured for this test, closed after it)."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", tmp_path / "hf"),
                        ("PCMOE_CACHE", tmp_path / "pcmoe-cache")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the engine on a CPU runs csrc_triton's references
    logger = logging.getLogger("lm_eval")
    handlers = list(logger.handlers)
    yield
    logger.handlers = handlers
    lm_eval_utils._LOGGING_CONFIGURED = False  # the next run of lm-eval adds a handler on its own stderr


@pytest.fixture
def model_dir(tmp_path, offline):
    directory = tmp_path / "model"
    make_checkpoint("olmoe", directory, eos_token_id=0, pad_token_id=1)
    load_tokenizer(DataConfig(), 300).save(str(directory / "tokenizer.json"))
    return directory


def _tasks(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
              "test_split: test\n")
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{source}{body}")
    return folder


def _samples(out, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])  # resps: str


class Transformers:
    """The oracle: transformers' model and the tokenizer file, scoring as lm-eval defines each request."""

    def __init__(self, folder):
        from tokenizers import Tokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    @torch.no_grad()
    def loglikelihood(self, context: list[int], continuation: list[int]) -> float:
        whole = (context + continuation)[-(MAX_LENGTH + 1):]
        logprobs = self.model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        rows = logprobs[len(whole) - 1 - len(continuation):]
        return rows.gather(1, torch.tensor(continuation)[:, None]).sum().item()

    def choice(self, question: str, choice: str) -> float:
        context = self.encode(question)  # TemplateLM's split: the whole encoded, the context's tokens cut off
        return self.loglikelihood(context, self.encode(f"{question} {choice}")[len(context):])

    def rolling(self, text: str) -> float:
        windows = lm_eval_utils.get_rolling_token_windows(self.encode(text), 0, MAX_LENGTH, context_len=1)
        return sum(self.loglikelihood(*lm_eval_utils.make_disjoint_window(w)) for w in windows)

    @torch.no_grad()
    def greedy(self, prompt: str) -> str:
        ids = self.encode(prompt)[-(MAX_LENGTH - MAX_NEW):]
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=0,
                                  pad_token_id=1)[0, len(ids):].tolist()
        text = self.tokenizer.decode([t for t in out if t != 0])
        for stop in (" ", "\n"):
            text = text.split(stop)[0]
        return text


@pytest.mark.slow
def test_lm_eval_scores_a_model_as_transformers_does(model_dir, tmp_path):
    out = tmp_path / "results"
    pcmoe(["lm-eval", "--model", "pcmoe", "--model_args", f"path={model_dir},max_length={MAX_LENGTH}",
           "--tasks", ",".join(TASKS), "--include_path", str(_tasks(tmp_path)), "--output_path", str(out),
           "--log_samples", "--batch_size", "2", "--device", "cpu"])
    oracle = Transformers(model_dir)
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    mc = _samples(out, "pcmoe_mc")
    expected = [[oracle.choice(d["question"], c) for c in d["choices"]] for d in DOCS]
    for sample, scores in zip(mc, expected, strict=True):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(scores, rel=1e-4, abs=1e-4)
    accuracy = sum(max(range(3), key=s.__getitem__) == d["answer"] for s, d in zip(expected, DOCS)) / len(DOCS)
    assert results["pcmoe_mc"]["acc,none"] == accuracy

    rolling = [oracle.rolling(d["text"]) for d in DOCS]
    assert [float(s["resps"][0][0]) for s in _samples(out, "pcmoe_ppl")] == pytest.approx(rolling, rel=1e-4)
    assert len(oracle.encode(DOCS[0]["text"])) > 2 * MAX_LENGTH  # several windows

    generated = [s["resps"][0][0] for s in _samples(out, "pcmoe_gen")]
    assert generated == [oracle.greedy(d["prompt"]) for d in DOCS]


@pytest.mark.slow
def test_lm_eval_bad_model_args_are_one_line(offline, tmp_path):
    tasks = _tasks(tmp_path)
    for args, message in ((f"path={tmp_path / 'absent'}", "does not exist"),
                          (f"path={tmp_path}", "is neither a run folder")):
        with pytest.raises(SystemExit) as info:
            pcmoe(["lm-eval", "--model", "pcmoe", "--model_args", args, "--tasks", "pcmoe_mc", "--include_path",
                   str(tasks)])
        assert str(info.value.code).startswith("pcmoe: error: ") and message in str(info.value.code)
        assert "\n" not in str(info.value.code)
