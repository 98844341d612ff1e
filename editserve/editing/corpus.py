"""Text corpora for covariance statistics.

Default: the English Wikipedia excerpt shipped inside the gensim 4.4.0 wheel (206 pages),
fetched once with ``pip download`` (only the wheel, no install), wiki markup stripped by
`strip_wiki_markup`, cached as plain text under ``$EDITSERVE_HOME/corpora/``. Any text file,
or folder of ``.txt``/``.md`` files, can be used instead.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from editserve.atomicfile import publish
from editserve.config import cache_dir
from editserve.errors import DataError

log = logging.getLogger(__name__)

GENSIM_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_NAME = "enwiki-gensim-4.4.0"


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://\S+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_ENTITY = {"&nbsp;": " ", "&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&ndash;": "–", "&mdash;": "—"}


def strip_wiki_markup(markup: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, tags and link syntax removed."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    for _ in range(10):  # nested templates, innermost first
        new = _TEMPLATE.sub("", text)
        if new == text:
            break
        text = new
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1.", text)
    text = _QUOTES.sub("", text)
    text = _LIST.sub("", text)
    for entity, char in _ENTITY.items():
        text = text.replace(entity, char)
    lines = [ln.strip() for ln in text.splitlines()]
    paragraphs = [ln for ln in lines if len(ln) > 40 and not ln.startswith(("|", "!", "{", "}"))]
    return "\n".join(paragraphs)


def _wiki_pages(xml_bytes: bytes) -> list[str]:
    pages = []
    for _event, elem in ET.iterparse(__import__("io").BytesIO(xml_bytes)):
        if elem.tag.endswith("}text") or elem.tag == "text":
            if elem.text and not elem.text.lstrip().lower().startswith("#redirect"):
                pages.append(elem.text)
            elem.clear()
    return pages


def default_corpus() -> Corpus:
    """The stripped Wikipedia excerpt, downloaded (wheel only) and converted on first use."""
    out = cache_dir("corpora") / f"{DEFAULT_NAME}.txt"
    if not out.exists():
        with tempfile.TemporaryDirectory() as tmp:
            log.info("fetching %s wheel for its Wikipedia excerpt (one time)", GENSIM_WHEEL)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, GENSIM_WHEEL],
                capture_output=True, text=True,
            )
            wheels = list(Path(tmp).glob("gensim-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise DataError(f"could not download {GENSIM_WHEEL} for the default corpus: {proc.stderr.strip()[-500:]}")
            with zipfile.ZipFile(wheels[0]) as zf:
                xml_bytes = bz2.decompress(zf.read(WIKI_MEMBER))
        text = "\n".join(strip_wiki_markup(p) for p in _wiki_pages(xml_bytes))
        publish(out, lambda tmp: tmp.write_text(text))
    return Corpus(name=DEFAULT_NAME, text=out.read_text())


def load_corpus(path: str | Path | None = None) -> Corpus:
    """`path=None` → default Wikipedia excerpt; a file → its text; a folder → its .txt/.md files."""
    if path is None:
        return default_corpus()
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
    else:
        raise DataError(f"corpus path {str(p)!r} does not exist")
    if not files:
        raise DataError(f"corpus folder {str(p)!r} holds no .txt or .md files")
    try:
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus {str(p)!r} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise DataError(f"corpus {str(p)!r} is empty")
    return Corpus(name=p.name, text=text)
