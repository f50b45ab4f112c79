"""Each party's private text shard, the shared offline tokenizer, and a resumable batch loader.

Text is cut into blocks at blank lines (in Tiny Shakespeare: one speaker's turn). A shared corpus is split
across parties either iid (blocks dealt at random) or non-iid (contiguous stretches, i.e. different plays and
characters); a party may instead bring its own file or directory (``data.party_paths``). The last
``eval_fraction`` of each party's blocks is its held-out eval split.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on a public corpus at first use and cached, so
nothing is fetched and no party's private text shapes the shared vocabulary.
"""

import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import Config, DataConfig, corpus_path
from .rng import seeded

__all__ = ["read_text", "party_texts", "load_tokenizer", "encode", "Batches", "eval_batches"]

END_OF_TEXT = "<|endoftext|>"


def read_text(path: str | os.PathLike) -> str:
    """A text file (optionally .gz) or every file under a directory, in sorted order."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{str(path)!r} holds no files: give a text file or a directory of text files")
    return "\n\n".join(_utf8_text(f) for f in files)


def _utf8_text(path: Path) -> str:
    """A file's text, refused in one line if it is not UTF-8 text: nothing is trained on bytes silently replaced."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read {str(path)!r} ({e}): fix or remove it") from None
    if b"\0" in data:
        raise ValueError(f"{str(path)!r} is a binary file (it holds NUL bytes), not text: remove it from the data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
                         "convert it (e.g. iconv -t UTF-8) or remove it from the data") from None


def _blocks(text: str) -> list[str]:
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def party_texts(cfg: Config, party: int) -> tuple[str, str]:
    """(train text, eval text) of one party."""
    d = cfg.data
    if d.party_paths:
        blocks = _blocks(read_text(d.party_paths[party]))
    else:
        blocks = _blocks(read_text(corpus_path(d.corpus)))
        if d.split == "iid":
            order = torch.randperm(len(blocks), generator=seeded(cfg.train.seed, "split")).tolist()
            blocks = [blocks[i] for i in order[party::cfg.parties]]
        else:
            per_party = len(blocks) // cfg.parties
            blocks = blocks[party * per_party:(party + 1) * per_party]
    num_eval = max(1, round(len(blocks) * d.eval_fraction))
    if len(blocks) < 2 * num_eval:
        raise ValueError(f"party {party} has only {len(blocks)} text blocks: give it more text")
    return "\n\n".join(blocks[:-num_eval]), "\n\n".join(blocks[-num_eval:])


def _cache_dir(d: DataConfig) -> Path:
    return Path(d.cache_dir or os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe").expanduser()


def load_tokenizer(d: DataConfig, vocab_size: int) -> Tokenizer:
    """The byte-level BPE of ``d.tokenizer_corpus`` with ``vocab_size`` entries at most, trained once and cached."""
    text = read_text(corpus_path(d.tokenizer_corpus))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = _cache_dir(d) / f"bpe-{digest}-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_blocks(text), trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parties may train it at once: whole files only
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)


class Batches:
    """Random windows of ``seq_len + 1`` tokens, each window once per epoch; the position is checkpointed."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: tuple):
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows < batch_size:
            raise ValueError(f"{tokens.numel()} tokens make {self.num_windows} windows of {seq_len}: fewer than "
                             f"one batch of {batch_size}; lower data.seq_len or train.batch_size, or add text")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> torch.Tensor:
        return torch.randperm(self.num_windows, generator=seeded(*self.seed, self.epoch))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both [batch_size, seq_len]."""
        if self.cursor + self.batch_size > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._shuffle()
        starts = self._order[self.cursor:self.cursor + self.batch_size] * self.seq_len
        self.cursor += self.batch_size
        windows = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._shuffle()


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, count: int):
    """The first ``count`` batches of consecutive windows (wrapping around), the same at every evaluation."""
    num_windows = (tokens.numel() - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"the eval split has {tokens.numel()} tokens, less than one window of {seq_len}: raise "
                         "data.eval_fraction or lower data.seq_len")
    for b in range(count):
        starts = (torch.arange(b * batch_size, (b + 1) * batch_size) % num_windows) * seq_len
        windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]
        yield windows[:, :-1], windows[:, 1:]
