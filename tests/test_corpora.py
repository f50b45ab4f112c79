"""bench/corpora.py without the network: each cleaning rule on small inline samples, the dictd and SWORD readers
on files written here, file order, the one-line error for a version the archive lost, and a whole build from a
stand-in package run twice (byte-identical files, the manifest's numbers, the token cap, the engine's split)."""

import gzip
import hashlib
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from bench import corpora
from bench.corpora import (CorporaError, Domain, Source, dictd_number, gcide_to_text, html_to_text, normalise,
                           osis_to_text, read_dictd, read_sword, source_files)
from pcmoe_engine.config import load_config
from pcmoe_engine.data import party_texts


def test_normalise_makes_one_line_paragraphs_separated_by_one_blank_line():
    raw = "  First\r\nparagraph,\t wrapped.\r\n\r\n\n \nSecond: cafe\u0301\x07 \u200bend.\n\n\n"
    assert normalise(raw) == "First paragraph, wrapped.\n\nSecond: caf\u00e9 end.\n"
    assert normalise(normalise(raw)) == normalise(raw)
    assert normalise(" \n\n\t\n") == ""


SPHINX_PAGE = """<!DOCTYPE html><html><head><title>Page</title><script>var x = "<p>no</p>";</script></head><body>
<div class="related" role="navigation"><a href="x.html">next</a></div>
<div class="body" role="main">
  <section id="intro">
  <h1><span class="section-number">1. </span>Intro<a class="headerlink" href="#intro">\u00b6</a></h1>
  <p>Text with <code>inline code</code> &amp; an
  entity.<br/>Same paragraph.</p>
  <div class="highlight"><pre>for x in y:\n\n    print(x)</pre></div>
  <table><tr><td>cell</td></tr></table>
  <div class="toctree-wrapper"><ul><li><a href="a.html">Another page</a></li></ul></div>
  <dl><dt>term</dt><dd><p>its <em>meaning</em><img src="i.png"></p></dd></dl>
  </section>
</div>
<div class="sphinxsidebar"><p>Search</p></div><div class="footer">Copyright</div>
</body></html>"""


def test_html_keeps_the_main_elements_prose_and_drops_code_tables_and_navigation():
    text = html_to_text(SPHINX_PAGE, ("role", "main"))
    assert text == "Intro\n\nText with inline code & an entity. Same paragraph.\n\nterm\n\nits meaning\n"
    assert html_to_text(SPHINX_PAGE, ("id", "absent")) == ""  # a page without the element gives nothing


def test_html_without_a_main_element_keeps_the_body_less_navigation():
    page = ('<html><body><div class="navheader"><table><tr><td>Prev</td></tr></table></div>'
            '<div class="sect1"><h2 class="title">40.4. Example</h2><p>This\n   explains.</p>'
            '<pre class="programlisting">SELECT 1;</pre></div>'
            '<div class="navfooter"><hr/>Home</div></body></html>')
    assert html_to_text(page) == "40.4. Example\n\nThis explains.\n"


def test_osis_keeps_words_and_paragraphs_and_drops_notes_and_tables():
    osis = ('<div type="book" osisID="Gen" sID="g1"/><title type="main">The First Book</title> '
            '<div sID="p1" type="x-p"/><chapter n="1" osisID="Gen.1" sID="Gen.1"/> In the '
            '<w lemma="strong:H7225">beginning</w> God '
            '<transChange type="added">was</transChange>.<note placement="foot"><reference>1.1</reference>Heb. '
            'gloss</note> And<l/>light &amp; dark. <div eID="p1" type="x-p"/><table><row><cell>Outline</cell>'
            '</row></table><div sID="p2" type="x-p"/><hi type="italic">Verse 2.</hi> More.<div eID="p2" type="x-p"/>')
    assert osis_to_text(osis) == "The First Book\n\nIn the beginning God was. And light & dark.\n\nVerse 2. More.\n"


def test_gcide_entry_becomes_prose():
    entry = ('      A stray quote before the headword.      --Locke.\n'
             'Drain \\Drain\\ (dr[=a]n), v. t. [imp. & p. p. {Drained}\n'
             '   (dr[=a]nd); p. pr. & vb. n. {Draining}.] [AS. drehnigean.]\n'
             '   1. To draw off by degrees; as, Drac[ae]na or ab[a^]te. [Obs.]\n'
             '   [1913 Webster]\n\n'
             '   2. To exhaust. --Bacon.\n'
             '      [1913 Webster +PJC]\n')
    assert gcide_to_text(entry) == (
        "Drain, v. t. [imp. & p. p. Drained (dr\u0101nd); p. pr. & vb. n. Draining.] [AS. drehnigean.] 1. To draw "
        "off by degrees; as, Drac\u00e6na or ab\u0103te. [Obs.]\n\n2. To exhaust. --Bacon.\n")


def test_gzip_is_the_same_at_any_time():
    packed = corpora.gzip_bytes("caf\u00e9\n")
    assert packed[4:8] == bytes(4) and gzip.decompress(packed) == "caf\u00e9\n".encode()


def test_dictd_numbers_are_base64_most_significant_first():
    assert [dictd_number(d) for d in ("A", "B", "/", "BA", "5I", "Fz")] == [0, 1, 63, 64, 3656, 371]


def _dictd_b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = digits[n % 64]
    while n >= 64:
        n //= 64
        out = digits[n % 64] + out
    return out


def test_dictd_reader_gives_each_entry_once_in_data_order(tmp_path):
    entries = ["00-database-info\n   about this dictionary\n", 'Zebra \\Ze"bra\\, n.\n   A striped horse.\n',
               'Apple \\Ap"ple\\, n.\n   A fruit.\n']
    data, index, offset = b"", [], 0
    for word, entry in zip(["00-database-info", "Zebra", "Apple"], entries):
        raw = entry.encode()
        index.append(f"{word}\t{_dictd_b64(offset)}\t{_dictd_b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    index.append(f"zebra\t{_dictd_b64(len(entries[0]))}\t{_dictd_b64(len(entries[1]))}")  # a second headword
    (tmp_path / "d.index").write_text("\n".join(sorted(index)) + "\n")
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(data))
    assert list(read_dictd(tmp_path, "d.index", None)) == [("Zebra", "Zebra, n. A striped horse.\n"),
                                                           ("Apple", "Apple, n. A fruit.\n")]


def _sword_module(folder: Path, testament: str, books: list[str], suffix: str = "b") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index, data = b"", b""
    for book in books:
        block = zlib.compress(book.encode())
        index += struct.pack("<III", len(data), len(block), len(book.encode()))
        data += block
    (folder / f"{testament}.{suffix}zs").write_bytes(index)
    (folder / f"{testament}.{suffix}zz").write_bytes(data)


def test_sword_reader_decompresses_every_block_in_order(tmp_path):
    _sword_module(tmp_path / "texts/kjv", "ot", ['<milestone type="x-importer"/>',
                                                 '<chapter osisID="Gen.1"/>In the beginning.',
                                                 '<chapter osisID="Exod.1"/>Now these.'])
    assert list(read_sword(tmp_path, "texts/kjv/ot.bzs", None)) == [
        ("kjv/0", ""), ("kjv/Gen.1", "In the beginning.\n"), ("kjv/Exod.1", "Now these.\n")]


def test_source_files_follow_the_include_patterns_then_sorted_order(tmp_path):
    for name in ("b/nt.bzs", "a/nt.bzs", "a/ot.bzs", "b/ot.bzs", "a/ot.bzz", "_static/x.html", "B.html", "a.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    sword = Source("p", "1", "l", "osis", "", corpora.SWORD_TESTAMENTS)
    assert source_files(tmp_path, sword) == ["a/ot.bzs", "b/ot.bzs", "a/nt.bzs", "b/nt.bzs"]
    html = Source("p", "1", "l", "html", "", ("*.html",), corpora.SPHINX_EXCLUDE)
    assert source_files(tmp_path, html) == ["B.html", "a.html"]


def test_a_version_the_archive_lost_stops_with_one_line_naming_what_to_change(monkeypatch, tmp_path):
    def run(*cmd, cwd=None):
        if cmd[0] == "apt-get":
            return subprocess.CompletedProcess(cmd, 100, "", "E: Version '1.0-1' for 'pkg' was not found")
        return subprocess.CompletedProcess(cmd, 0, " pkg | 1.0-2 | http://deb.debian.org/debian bookworm/main\n", "")

    monkeypatch.setattr(corpora, "_run", run)
    with pytest.raises(CorporaError) as e:
        corpora.fetch(Source("pkg", "1.0-1", "MIT", "html", "", ("*.html",)), tmp_path)
    message = str(e.value)
    assert "\n" not in message and "pkg=1.0-1" in message and "it has: 1.0-2" in message and "DOMAINS" in message

    monkeypatch.setattr(corpora, "build", lambda out, vocab: corpora.fetch(Source("pkg", "1.0-1", "", "", "", ()),
                                                                             tmp_path))
    with pytest.raises(SystemExit) as e:
        corpora.main(["--out", str(tmp_path)])
    assert str(e.value).startswith("pcmoe: error: Debian's archive has no pkg=1.0-1")


PAGES = {f"p{i:02d}.html": f'<div role="main"><h1>Page {i}</h1><p>{"The quick brown fox jumps over a dog. " * 20}'
                           f'</p><p>Second paragraph {i}, done.</p></div>' for i in range(12)}


@pytest.fixture
def stand_in_package(monkeypatch, tmp_path):
    """``fetch`` unpacks a package of 12 HTML pages and reports a fixed .deb digest."""
    package = tmp_path / "package"
    for name, page in PAGES.items():
        (package / "html" / name).parent.mkdir(parents=True, exist_ok=True)
        (package / "html" / name).write_text(page)

    def fetch(source, workdir):
        shutil.copytree(package, workdir / source.package)
        return workdir / source.package, "0" * 64

    monkeypatch.setattr(corpora, "fetch", fetch)
    monkeypatch.setenv("PCMOE_CACHE", str(tmp_path / "cache"))
    source = Source("docs", "1.0-1", "MIT", "html", "html", ("*.html",), (), ("role", "main"))
    return Domain("docs", "stand-in docs", (source,), max_tokens=10**9), Domain("capped", "capped", (source,), 500)


def test_build_twice_gives_identical_files_and_a_manifest_of_their_numbers(stand_in_package, tmp_path):
    whole, capped = stand_in_package
    first = corpora.build(tmp_path / "one", 512, (whole, capped))
    corpora.build(tmp_path / "two", 512, (whole, capped))
    for name in ("docs.txt.gz", "capped.txt.gz", "manifest.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name

    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest == first and manifest["tokenizer"]["vocab_size"] == 512
    docs = manifest["domains"]["docs"]
    packed = (tmp_path / "one" / "docs.txt.gz").read_bytes()
    text = gzip.decompress(packed).decode()
    assert docs["gz_sha256"] == hashlib.sha256(packed).hexdigest() and docs["gz_bytes"] == len(packed)
    assert docs["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and docs["bytes"] == len(text.encode())
    assert docs["words"] == len(text.split()) and docs["paragraphs"] == 36 and not docs["capped"]
    assert text.startswith("Page 0\n\nThe quick brown fox") and text.endswith("Second paragraph 11, done.\n")
    assert docs["sources"][0]["files_used"] == sorted(PAGES) and docs["sources"][0]["licence"] == "MIT"

    cut = manifest["domains"]["capped"]  # whole pages until 500 tokens: fewer pages, the first ones
    used = cut["sources"][0]["files_used"]
    assert cut["capped"] and 0 < len(used) < len(PAGES) and used == sorted(PAGES)[:len(used)]
    assert cut["sources"][0]["last_unit"] == used[-1] and cut["paragraphs"] == 3 * len(used)

    cfg = load_config(None, ["parties=2", f"data.party_paths=['{tmp_path / 'one' / 'docs.txt.gz'}', "
                                          f"'{tmp_path / 'one' / 'capped.txt.gz'}']"])
    train, held_out = party_texts(cfg, 0)  # the engine reads the file and holds out its last paragraphs
    assert held_out.endswith("Second paragraph 11, done.") and train.startswith("Page 0")
