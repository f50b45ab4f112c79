"""Each party's private text shard, the run's tokenizer, and a resumable batch loader.

Text is cut into blocks by size: paragraphs (between blank lines; in Tiny Shakespeare, one speaker's turn), and
any paragraph longer than BLOCK_CHARS cut into pieces at line ends (else sentence ends, else spaces), so plain
lines and paragraphs both work. A shared corpus is split across parties either iid (blocks dealt at random) or
non-iid (contiguous stretches, i.e. different plays and characters); a party may instead bring its own file or
directory (``data.party_paths``). The last ``eval_fraction`` of each party's blocks (at least one) is its
held-out eval split; ``party_tokens`` checks that both parts are long enough for their windows.

The tokenizer (``tokenizer_for``: the one place that picks it) is the checkpoint's when the model starts from
a transformers checkpoint (``model.init_from``), else a tokenizers file given by ``data.tokenizer``, or by
default a byte-level BPE trained with ``tokenizers`` on a public corpus at first use and cached, so nothing
is fetched and no party's private text shapes the shared vocabulary.
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
from .hf import load_hf_tokenizer
from .rng import seeded

__all__ = ["read_text", "blocks", "party_texts", "party_tokens", "tokenizer_for", "load_tokenizer", "encode",
           "Batches", "eval_batches", "BLOCK_CHARS"]

END_OF_TEXT = "<|endoftext|>"
# The longest block, in characters: long enough that Tiny Shakespeare's speeches (3,080 at most) stay whole, short
# enough that a text without blank lines still makes many blocks to deal out and hold out.
BLOCK_CHARS = 4000


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


def _cut(text: str, limit: int) -> int:
    """Where to cut ``text`` before ``limit`` characters: after its last line end, else sentence end, else space."""
    for ends in (("\n",), (". ", "! ", "? "), (" ",)):
        cut = max((i + len(end) for end in ends if (i := text.rfind(end, 1, limit)) > 0), default=0)
        if cut:
            return cut
    return limit


def blocks(text: str, limit: int = BLOCK_CHARS) -> list[str]:
    """``text``'s paragraphs, each one longer than ``limit`` characters cut into pieces of at most ``limit``."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        while len(paragraph) > limit:
            cut = _cut(paragraph, limit)
            out.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            out.append(paragraph)
    return out


def party_texts(cfg: Config, party: int) -> tuple[str, str]:
    """(train text, eval text) of one party: its blocks, the last eval_fraction of them (at least one) held out."""
    d = cfg.data
    if d.party_paths:
        shard = blocks(read_text(d.party_paths[party]))
    else:
        shard = blocks(read_text(corpus_path(d.corpus)))
        if d.split == "iid":
            order = torch.randperm(len(shard), generator=seeded(cfg.train.seed, "split")).tolist()
            shard = [shard[i] for i in order[party::cfg.parties]]
        else:
            per_party = len(shard) // cfg.parties
            shard = shard[party * per_party:(party + 1) * per_party]
    num_eval = max(1, round(len(shard) * d.eval_fraction))
    if len(shard) < 2 * num_eval:
        raise ValueError(f"party {party} has {len(shard)} text block(s) ({sum(map(len, shard)):,} characters): it "
                         f"needs at least {2 * num_eval} to hold out the last {d.eval_fraction:.0%}; give it more text")
    return "\n\n".join(shard[:-num_eval]), "\n\n".join(shard[-num_eval:])


def party_tokens(cfg: Config, party: int, tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train tokens, held-out tokens) of one party, checked to hold at least one batch of train.batch_size windows
    of data.seq_len + 1 tokens and one held-out window; the error says how much text that takes."""
    d, t = cfg.data, cfg.train
    texts = party_texts(cfg, party)
    train, held_out = (encode(tokenizer, text) for text in texts)
    needed = (t.batch_size * d.seq_len + 1, d.seq_len + 1)
    if train.numel() < needed[0] or held_out.numel() < needed[1]:
        chars_per_token = sum(map(len, texts)) / max(1, train.numel() + held_out.numel())
        chars = max(needed[0] / (1 - d.eval_fraction), needed[1] / d.eval_fraction) * chars_per_token
        raise ValueError(f"party {party}'s text makes {train.numel():,} tokens to train on and {held_out.numel():,} "
                         f"held out: it needs {needed[0]:,} (train.batch_size x data.seq_len + 1) and {needed[1]:,} "
                         f"(data.seq_len + 1), about {chars:,.0f} characters in all; add text, or lower data.seq_len, "
                         "train.batch_size (or raise data.eval_fraction)")
    return train, held_out


def _cache_dir(d: DataConfig) -> Path:
    return Path(d.cache_dir or os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe").expanduser()


def tokenizer_for(cfg: Config) -> Tokenizer:
    """The run's tokenizer: the checkpoint's (model.init_from), else data.tokenizer's file if given, else the bundled
    BPE (load_tokenizer). Its ids must fit model.vocab_size."""
    d, vocab_size = cfg.data, cfg.model.vocab_size
    if cfg.model.init_from:
        return load_hf_tokenizer(cfg.model.init_from, vocab_size)
    if not d.tokenizer:
        return load_tokenizer(d, vocab_size)
    try:
        tokenizer = Tokenizer.from_file(str(Path(d.tokenizer).expanduser()))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
        raise ValueError(f"data.tokenizer={d.tokenizer!r} is not a tokenizers tokenizer.json: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"data.tokenizer={d.tokenizer!r} has {tokenizer.get_vocab_size():,} tokens, more than "
                         f"model.vocab_size={vocab_size:,}: set model.vocab_size to at least that")
    return tokenizer


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
    tokenizer.train_from_iterator(blocks(text), trainer)
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
