"""A party's own data: text cut into blocks by size (paragraphs or plain lines), the held-out rule and its errors,
and the tokenizer: the bundled BPE by default, or a tokenizers file (data.tokenizer)."""

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pcmoe_engine.config import corpus_path, load_config
from pcmoe_engine.data import BLOCK_CHARS, blocks, party_texts, party_tokens, read_text, tokenizer_for

# Plain lines, no blank line anywhere: ~280 KB, as in the issue (refused before as "only 1 text blocks").
LINES = "".join(f"Line {i} of a text that has no paragraphs, only lines; it goes on.\n" for i in range(4000))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path_factory.getbasetemp() / "pcmoe-cache"))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_tiny_shakespeare_keeps_its_paragraphs():
    """The default run's data is unchanged: every speech of Tiny Shakespeare is shorter than a block."""
    text = read_text(corpus_path("tinyshakespeare"))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    assert blocks(text) == paragraphs and max(map(len, paragraphs)) < BLOCK_CHARS


def test_long_paragraphs_are_cut_at_line_then_sentence_ends():
    pieces = blocks(LINES)
    line = len(LINES) // 4000 + 1
    assert all(BLOCK_CHARS - line < len(p) <= BLOCK_CHARS for p in pieces[:-1])  # as many whole lines as fit
    assert all(p.startswith("Line ") and p.endswith("it goes on.") for p in pieces)  # whole lines
    prose = "A sentence that ends here. " * 400 + "And the last one"
    pieces = blocks(prose, limit=1000)
    assert all(p.endswith("ends here.") for p in pieces[:-1]) and pieces[-1].endswith("the last one")
    assert [len(p) for p in blocks("x" * 2500, limit=1000)] == [1000, 1000, 500]  # no boundary at all
    for text in (LINES, prose, "short\n\n\n  second  \n\nthird"):  # nothing lost but whitespace
        assert _squash("".join(blocks(text, limit=1000))) == _squash(text)


@pytest.mark.parametrize("split", ["iid", "noniid"])
def test_a_corpus_without_blank_lines_splits_across_parties(tmp_path, split):
    (tmp_path / "lines.txt").write_text(LINES)
    cfg = load_config(None, [f"data.corpus='{tmp_path / 'lines.txt'}'", f"data.split={split}"])
    shards = [party_texts(cfg, p) for p in range(2)]
    lines = [set((train + "\n" + held_out).splitlines()) - {""} for train, held_out in shards]
    assert not lines[0] & lines[1] and len(lines[0] | lines[1]) > 3900
    for train, held_out in shards:
        assert 0.02 * len(train) < len(held_out) < 0.1 * len(train)
    if split == "noniid":  # contiguous stretches: party 0 has the first lines
        assert shards[0][0].startswith("Line 0 ") and shards[1][0].startswith(f"Line {len(lines[0])} ")


def test_own_plain_lines_hold_out_their_last_blocks(tmp_path):
    for p in range(2):
        (tmp_path / f"p{p}.txt").write_text(LINES)
    cfg = load_config(None, [f"data.party_paths=['{tmp_path / 'p0.txt'}', '{tmp_path / 'p1.txt'}']"])
    train, held_out = party_texts(cfg, 0)
    pieces = blocks(LINES)
    held = max(1, round(len(pieces) * cfg.data.eval_fraction))
    assert held_out == "\n\n".join(pieces[-held:]) and held_out.endswith("Line 3999 of a text that has no "
                                                                          "paragraphs, only lines; it goes on.")
    assert train == "\n\n".join(pieces[:-held])
    tokens, held_tokens = party_tokens(cfg, 0, tokenizer_for(cfg))
    assert held_tokens.numel() > cfg.data.seq_len and tokens.numel() > 10 * held_tokens.numel()


@pytest.mark.parametrize("text,message", [
    ("One short line.", "party 0 has 1 text block(s) (15 characters): it needs at least 2"),
    ("\n\n".join(["Some words here."] * 40), "party 0's text makes"),
])
def test_too_little_text_says_how_much_is_needed(tmp_path, text, message):
    for p in range(2):
        (tmp_path / f"p{p}.txt").write_text(text)
    cfg = load_config(None, [f"data.party_paths=['{tmp_path / 'p0.txt'}', '{tmp_path / 'p1.txt'}']"])
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        party_tokens(cfg, 0, tokenizer_for(cfg))
    assert "\n" not in str(info.value)
    if "makes" in message:  # how much text would do: enough for a batch and a held-out window
        needed = int(re.search(r"about ([\d,]+) characters", str(info.value)).group(1).replace(",", ""))
        (tmp_path / "p0.txt").write_text("\n\n".join(["Some words here."] * (needed // 16 + 200)))
        train, held_out = party_tokens(cfg, 0, tokenizer_for(cfg))
        assert train.numel() > cfg.train.batch_size * cfg.data.seq_len and held_out.numel() > cfg.data.seq_len


def _tokenizer_file(path, vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([LINES], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"],
                                                              show_progress=False))
    tokenizer.save(str(path))
    return str(path)


def test_tokenizer_file_replaces_the_bundled_bpe(tmp_path):
    bundled = tokenizer_for(load_config())
    assert bundled.get_vocab_size() == 2048  # the default: the BPE trained on Tiny Shakespeare, vocab_size entries
    path = _tokenizer_file(tmp_path / "tokenizer.json", 300)
    cfg = load_config(None, [f"data.tokenizer='{path}'"])
    tokenizer = tokenizer_for(cfg)
    assert tokenizer.get_vocab_size() <= 300 and tokenizer.to_str() == Tokenizer.from_file(path).to_str()
    assert tokenizer.encode("Line 7 of a text").ids != bundled.encode("Line 7 of a text").ids


@pytest.mark.parametrize("content,message", [
    ("not json", "is not a tokenizers tokenizer.json"),
    (None, "has 3,000 tokens, more than model.vocab_size=2,048: set model.vocab_size to at least that"),
])
def test_bad_tokenizer_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is None:
        _tokenizer_file(path, 3000)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        tokenizer_for(load_config(None, [f"data.tokenizer='{path}'"]))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=re.escape("data.tokenizer='/no/tokenizer.json' is not a file")):
        load_config(None, ["data.tokenizer='/no/tokenizer.json'"])
