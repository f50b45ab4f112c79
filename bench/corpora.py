"""Real English text, one domain per file, for the convergence study (issue 14: each party trains on its own
domain, the centralized run pools them).

    python bench/corpora.py [--out DIR]     # default $PCMOE_CACHE/corpora or ~/.cache/pcmoe/corpora

writes ``<domain>.txt.gz`` for every domain in ``DOMAINS`` and ``manifest.json``. Give a party its domain
with ``data.party_paths``; the engine holds out the last ``data.eval_fraction`` of each file's paragraphs.

Every source is a Debian package of a pinned version, fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into a temporary folder (nothing is installed; a version the archive no longer has stops the run
with one line naming it). Its files are read in sorted order and cleaned by fixed rules (HTML, OSIS and dictd
each to plain paragraphs; code blocks, tables, navigation and footnotes dropped; whitespace normalised; NFC),
and a domain takes whole units (a page, a book, a dictionary entry) in that order until it holds
``max_tokens`` of the project's tokenizer: the same packages give the same bytes. The manifest records each
package's version, .deb sha256, licence (as its copyright file states it, read when the version was pinned)
and the units used, and each domain's bytes, words, paragraphs, tokens and the sha256 of its text and .gz.
"""

import argparse
import fnmatch
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcmoe_engine.config import DataConfig  # noqa: E402
from pcmoe_engine.data import load_tokenizer  # noqa: E402

VOCAB_SIZE = 16384  # the `small` preset's: the study's model
MIN_TOKENS = 5_000_000  # per domain, for the study (issue 14)
MAX_TOKENS = 6_000_000  # per domain: a margin over MIN_TOKENS; keeps the .gz files small enough to carry


@dataclass(frozen=True)
class Source:
    """Part of one Debian package: which files, read how."""
    package: str
    version: str
    licence: str  # as its copyright file states it for these files
    reader: str  # a key of READERS
    root: str  # folder inside the package that the patterns are relative to
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    main: tuple[str, str] | None = None  # html: the (attribute, value) of the element holding a page's prose


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    sources: tuple[Source, ...]
    max_tokens: int = MAX_TOKENS


SPHINX_EXCLUDE = ("_*/*", "genindex*", "py-modindex.html", "search.html")
SPHINX_MAIN = ("role", "main")
SWORD_TESTAMENTS = ("*/ot.?zs", "*/nt.?zs")  # block indexes; Old Testament first
DOMAINS = (
    Domain("kernel", "Linux kernel documentation (admin, core and driver guides), English pages only", (
        Source("linux-doc-6.1", "6.1.192-2", "GPL-2.0; some pages GFDL-1.1-no-invariants-or-later (their SPDX lines)",
               "html", "usr/share/doc/linux-doc-6.1/html",
               ("*.html",), SPHINX_EXCLUDE + ("translations/*",), SPHINX_MAIN),)),
    Domain("manuals", "Python 3.11, PostgreSQL 15 and Django 3.2 manuals: tutorials, guides, references", (
        Source("python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0", "html", "usr/share/doc/python3.11/html",
               ("*.html",), SPHINX_EXCLUDE, SPHINX_MAIN),
        Source("postgresql-doc-15", "15.20-0+deb12u1", "PostgreSQL", "html", "usr/share/doc/postgresql-doc-15/html",
               ("*.html",), ("bookindex.html",)),
        Source("python-django-doc", "3:3.2.25-0+deb12u7", "BSD-3-Clause", "html",
               "usr/share/doc/python-django-doc/html", ("*.html",), SPHINX_EXCLUDE, ("id", "yui-main")))),
    Domain("dictionary", "GCIDE: Webster's Revised Unabridged Dictionary (1913) with WordNet additions", (
        Source("dict-gcide", "0.48.5+nmu2", "GPL-2.0-or-later", "dictd", "usr/share/dictd", ("gcide.index",)),)),
    Domain("scripture", "King James Bible; Matthew Henry's, Scofield's and Spurgeon's commentaries (1706-1917)", (
        Source("sword-text-kjv", "14.3-1", "public-domain", "osis", "usr/share/sword/modules", SWORD_TESTAMENTS),
        Source("sword-comm-mhcc", "2.0-1", "public-domain", "osis", "usr/share/sword/modules", SWORD_TESTAMENTS),
        Source("sword-comm-scofield", "2.1-1", "public-domain", "osis", "usr/share/sword/modules", SWORD_TESTAMENTS),
        Source("sword-comm-tdavid", "2.1-1", "public-domain", "osis", "usr/share/sword/modules", SWORD_TESTAMENTS))),
)


class CorporaError(Exception):
    """What went wrong and what to do, in one line."""


# --- cleaning ------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def normalise(text: str) -> str:
    """Paragraphs separated by one blank line, each on one line with single spaces; NFC; ends with a newline."""
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")))
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n[ \t\xa0]*\n", text))
    kept = [p for p in paragraphs if p]
    return "\n\n".join(kept) + "\n" if kept else ""


class _HtmlText(HTMLParser):
    """The prose of an HTML page (of the element with attribute ``main`` if given), without code, tables,
    navigation and permalinks; block elements end paragraphs."""

    SKIP_TAGS = {"script", "style", "pre", "table", "head", "nav", "noscript", "svg"}
    SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "navheader", "navfooter", "headerlink", "highlight",
                    "section-number", "toc", "toctree-wrapper", "contents", "viewcode-link"}
    BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
                  "section", "article", "figure", "figcaption", "caption", "hr", "tr", "header", "footer", "main"}

    def __init__(self, main: tuple[str, str] | None):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.main_attr = main
        self.main: list = [None, 0] if main else ["", 1]  # the tag that opened the kept region, its depth
        self.skip: list = [None, 0]  # the tag that opened a skipped region, its depth

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for region in (self.main, self.skip):
            if region[1] and tag == region[0]:
                region[1] += 1
        if not self.main[1]:
            if a.get(self.main_attr[0]) == self.main_attr[1]:
                self.main[:] = [tag, 1]
            return
        if not self.skip[1] and (tag in self.SKIP_TAGS or self.SKIP_CLASSES & set((a.get("class") or "").split())):
            self.skip[:] = [tag, 1]
        self._block(tag)

    def handle_endtag(self, tag):
        self._block(tag)
        for region in (self.skip, self.main):
            if region[1] and tag == region[0]:
                region[1] -= 1

    def handle_startendtag(self, tag, attrs):
        self._block(tag)

    def handle_data(self, data):
        if self.main[1] and not self.skip[1]:
            self.parts.append(data)

    def _block(self, tag):
        if tag in self.BLOCK_TAGS or tag == "br":
            self.parts.append("\n\n" if tag != "br" else "\n")


def html_to_text(page: str, main: tuple[str, str] | None = None) -> str:
    parser = _HtmlText(main)
    parser.feed(page)
    parser.close()
    return normalise("".join(parser.parts))


_OSIS_DROP = re.compile(r"<note\b.*?</note>|<table\b.*?</table>", re.S)
_OSIS_BREAK = re.compile(r"</?(?:div|chapter|title|p|lg|list|item)\b[^>]*>")  # paragraph and section boundaries
_OSIS_SPACE = re.compile(r"<(?:l|lb|milestone)\b[^>]*>")  # line breaks inside a paragraph
_TAG = re.compile(r"<[^>]*>")


def osis_to_text(osis: str) -> str:
    """Plain paragraphs of OSIS (SWORD's markup): notes (cross-references, Strong's glosses) and outline tables
    dropped, words kept, titles their own paragraphs."""
    osis = _OSIS_SPACE.sub(" ", _OSIS_BREAK.sub("\n\n", _OSIS_DROP.sub("", osis)))
    return normalise(html.unescape(_TAG.sub("", osis)))


_GCIDE_SOURCE_LINE = re.compile(r"^[ \t]*\[[^\]\n]*\b(?:Webster|WordNet|PJC|Century|AS|RDH)\b[^\]\n]*\][ \t]*$", re.M)
_GCIDE_PRONUNCIATION = re.compile(r" ?\\[^\\]*\\(?:\s*\([^()]*\))?")  # \Co*ag"u*late\ and a respelling after it
_GCIDE_ENTITY = re.compile(r"\[([=.\"'`~^,-]?)([A-Za-z]{1,5})(\^?)\]")  # [=a] [a^] [ae]: GCIDE's ASCII for letters
_GCIDE_MARKS = {"=": "\u0304", ".": "\u0307", '"': "\u0308", "'": "\u0301", "`": "\u0300", "~": "\u0303",
                "^": "\u0302", ",": "\u0327"}  # "-" marks a vowel in a way Unicode has no mark for: letter only
_GCIDE_NAMED = {"ae": "\u00e6", "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "eth": "\u00f0", "thorn": "\u00fe",
                "ng": "\u014b", "deg": "\u00b0", "root": "\u221a", "imac": "\u012b", "aum": "\u00e4", "asl": "a",
                "add": "a"}


def _gcide_letter(m: re.Match) -> str:
    mark, letters, breve = m.groups()
    if not (mark or breve):
        return _GCIDE_NAMED.get(letters, m.group(0))  # [Obs.], [L.] and other labels stay
    if len(letters) > 2:
        return m.group(0)
    return "".join(c + ("\u0306" if breve else _GCIDE_MARKS.get(mark, "")) for c in letters)


def gcide_to_text(entry: str) -> str:
    """A dictd entry of GCIDE as prose: from its headword line on, its source marks ("[1913 Webster]") and
    pronunciation keys dropped, its ASCII letter codes ([=a], [ae]) as Unicode, cross-reference braces removed."""
    headword = re.search(r"^\S", entry, re.M)
    entry = _GCIDE_SOURCE_LINE.sub("", entry[headword.start() if headword else 0:])
    entry = _GCIDE_ENTITY.sub(_gcide_letter, _GCIDE_PRONUNCIATION.sub("", entry))
    return normalise(entry.replace("{", "").replace("}", ""))


# --- readers: a package folder -> (unit name, text) in a fixed order ----------------------------------------

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(digits: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    n = 0
    for c in digits:
        n = n * 64 + _B64[c]
    return n


def read_html(root: Path, name: str, source: Source) -> Iterator[tuple[str, str]]:
    yield name, html_to_text((root / name).read_text(encoding="utf-8", errors="replace"), source.main)


def read_dictd(root: Path, name: str, source: Source) -> Iterator[tuple[str, str]]:
    """Every entry of a dictd dictionary once, in the order of its data file; the 00-database-* entries (the
    dictionary's own description) skipped."""
    index = root / name
    data = gzip.decompress(index.with_name(index.name.replace(".index", ".dict.dz")).read_bytes())
    entries = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, size = line.split("\t")[:3]
        if not word.startswith("00-"):
            entries.setdefault((dictd_number(offset), dictd_number(size)), word)
    for (offset, size), word in sorted(entries.items()):
        yield word, gcide_to_text(data[offset:offset + size].decode("utf-8", errors="replace"))


def read_sword(root: Path, name: str, source: Source) -> Iterator[tuple[str, str]]:
    """A compressed SWORD module (zText/zCom): ``*.?zs`` holds (offset, size, uncompressed size) of each zlib
    block of ``*.?zz``; a block is a book or a chapter, in canonical order."""
    index = root / name
    data = index.with_suffix(index.suffix[:-1] + "z").read_bytes()
    blocks = index.read_bytes()
    for i in range(0, len(blocks), 12):
        offset, size, _ = struct.unpack("<III", blocks[i:i + 12])
        osis = zlib.decompress(data[offset:offset + size]).decode("utf-8", errors="replace")
        ref = re.search(r'osisID="([^"]+)"', osis)
        yield f"{index.parent.name}/{ref.group(1) if ref else i // 12}", osis_to_text(osis)


READERS: dict[str, Callable[[Path, str, Source], Iterator[tuple[str, str]]]] = {
    "html": read_html, "dictd": read_dictd, "osis": read_sword}


def source_files(root: Path, source: Source) -> list[str]:
    """The files a source reads, relative to its root: by include pattern, then in sorted (code point) order."""
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kept = [n for n in names if not any(fnmatch.fnmatch(n, g) for g in source.exclude)]
    return [n for g in source.include for n in kept if fnmatch.fnmatch(n, g)]


# --- fetching -----------------------------------------------------------------------------------------------

def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorporaError(f"{cmd[0]} not found: run this on a Debian machine (bookworm) that reaches Debian's "
                           "archive") from None


def fetch(source: Source, workdir: Path) -> tuple[Path, str]:
    """The package unpacked under ``workdir`` and the sha256 of its .deb."""
    result = _run("apt-get", "download", "-q", f"{source.package}={source.version}", cwd=workdir)
    debs = sorted(workdir.glob(f"{source.package}_*.deb"))
    if result.returncode or not debs:
        known = _run("apt-cache", "madison", source.package).stdout.split("\n")
        versions = sorted({line.split("|")[1].strip() for line in known if line.count("|") >= 2})
        if source.version in versions:
            raise CorporaError(f"apt-get download {source.package}={source.version} failed: "
                               f"{(result.stderr.strip().splitlines() or ['no message'])[-1]}")
        raise CorporaError(
            f"Debian's archive has no {source.package}={source.version} (it has: {', '.join(versions) or 'none'}): "
            f"run `apt-get update`; if still missing, set that Source's version in bench/corpora.py's DOMAINS to one "
            f"listed (the outputs will change) and record the new numbers in bench/README.md")
    deb = debs[0]
    unpacked = workdir / source.package
    if (result := _run("dpkg-deb", "-x", str(deb), str(unpacked))).returncode:
        raise CorporaError(f"dpkg-deb could not unpack {deb.name}: {result.stderr.strip()}")
    return unpacked, hashlib.sha256(deb.read_bytes()).hexdigest()


# --- building -----------------------------------------------------------------------------------------------

def gzip_bytes(text: str) -> bytes:
    """Deterministic gzip: no name, no timestamp."""
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def build_domain(domain: Domain, workdir: Path, tokenizer) -> tuple[str, int, list[dict]]:
    """The domain's text (whole units in source order until max_tokens), the sum of its units' token counts,
    and what each source gave."""
    texts, records, total = [], [], 0
    for source in domain.sources:
        if total >= domain.max_tokens:
            break
        unpacked, deb_sha256 = fetch(source, workdir)
        root = unpacked / source.root
        files = source_files(root, source)
        if not files:
            raise CorporaError(f"{source.package} {source.version} has no files matching {source.include} under "
                               f"{source.root}: the package's layout changed; update its Source in DOMAINS")
        used_files, units, last_unit = [], 0, ""
        for name in files:
            if total >= domain.max_tokens:
                break
            used_files.append(name)
            for unit, text in READERS[source.reader](root, name, source):
                if total >= domain.max_tokens:
                    break
                if text:
                    texts.append(text)
                    total += len(tokenizer.encode(text).ids)
                    units, last_unit = units + 1, unit
        records.append(dict(package=source.package, version=source.version, deb_sha256=deb_sha256,
                            licence=source.licence, copyright_file=f"usr/share/doc/{source.package}/copyright",
                            reader=source.reader, root=source.root, include=list(source.include),
                            exclude=list(source.exclude), files_available=len(files), files_used=used_files,
                            units_used=units, last_unit=last_unit))
        shutil.rmtree(unpacked)
    return "\n".join(texts), total, records


def text_stats(text: str, tokenizer) -> dict:
    return dict(bytes=len(text.encode("utf-8")), words=len(text.split()), paragraphs=text.count("\n\n") + 1,
                tokens=len(tokenizer.encode(text).ids))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(out: Path, vocab_size: int = VOCAB_SIZE, domains: tuple[Domain, ...] = DOMAINS) -> dict:
    tokenizer = load_tokenizer(DataConfig(), vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # an interrupted run leaves no manifest beside new files
    manifest = dict(command="python bench/corpora.py", tokenizer=dict(
        made_by="pcmoe_engine.data.load_tokenizer(DataConfig(), vocab_size)", corpus=DataConfig().tokenizer_corpus,
        vocab_size=vocab_size, sha256=hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        tokenizers_version=tokenizers.__version__), domains={})
    for domain in domains:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pcmoe-corpora-") as tmp:
            text, unit_tokens, sources = build_domain(domain, Path(tmp), tokenizer)
        stats = text_stats(text, tokenizer)
        if stats["tokens"] < MIN_TOKENS:
            print(f"warning: {domain.name} has {stats['tokens']:,} tokens, fewer than the study's {MIN_TOKENS:,}",
                  file=sys.stderr)
        packed = gzip_bytes(text)
        write_atomic(out / f"{domain.name}.txt.gz", packed)
        manifest["domains"][domain.name] = dict(
            description=domain.description, file=f"{domain.name}.txt.gz", **stats, gz_bytes=len(packed),
            text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
            gz_sha256=hashlib.sha256(packed).hexdigest(), max_tokens=domain.max_tokens,
            capped=unit_tokens >= domain.max_tokens, sources=sources)
        print(f"{domain.name}: {stats['tokens']:,} tokens, {stats['bytes']:,} bytes, {stats['words']:,} words, "
              f"{len(packed) / 2**20:.1f} MiB gz ({time.perf_counter() - start:.0f} s)", flush=True)
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest


def default_out() -> Path:
    return Path(os.environ.get("PCMOE_CACHE") or Path.home() / ".cache" / "pcmoe").expanduser() / "corpora"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out(), help="folder for <domain>.txt.gz and manifest.json")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="of the tokenizer that counts tokens")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        build(args.out, args.vocab_size)
    except CorporaError as e:
        sys.exit(f"pcmoe: error: {e}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
