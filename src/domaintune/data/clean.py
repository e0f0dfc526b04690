"""Clean the text fields of training rows: Unicode form, stray control characters, whitespace, HTML.

Cleaning is idempotent: ``clean_text(clean_text(x)) == clean_text(x)``. The exception is
``strip_html`` on markup shown as text: ``&lt;b&gt;`` decodes to ``<b>``, which a second pass
takes for a tag, as it cannot tell the two apart.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser


@dataclass(frozen=True)
class CleanConfig:
    """Which cleaning steps :func:`clean_text` applies.

    unicode_nfc: compose characters (``e`` + combining acute -> ``é``) so that equal text is equal
        code points.
    strip_control: drop C0/C1 control characters except newline and tab, zero-width spaces, word
        joiners, byte-order marks, soft hyphens and lone surrogates; line-break controls (``\\r\\n``,
        ``\\r``, form feed, ...) become newlines instead of vanishing.
    normalize_whitespace: collapse runs of spaces and tabs inside lines to one space, drop trailing
        spaces, keep at most one blank line in a row and trim the ends of the text. A line's leading
        indentation is kept: code and nested lists in chat answers depend on it.
    strip_html: remove tags, decode entities, drop the content of ``<script>`` and ``<style>``;
        block elements (``<p>``, ``<br>``, ``<li>``, ...) become line breaks so words do not run
        together. Off by default: in plain text a ``<`` may be meant literally.
    """

    unicode_nfc: bool = True
    strip_control: bool = True
    normalize_whitespace: bool = True
    strip_html: bool = False


def clean_text(text: str, config: CleanConfig = CleanConfig()) -> str:
    """Return ``text`` cleaned as ``config`` says; newlines inside the text are kept."""
    # HTML goes first: decoded entities (&#8203;, &shy;, &nbsp;) need the later steps.
    if config.strip_html:
        text = _strip_html(text)
    # Control characters go before composing: removing one between a letter and a combining
    # mark makes a new pair to compose, which would break idempotence.
    if config.strip_control:
        text = text.replace("\r\n", "\n").translate(_CONTROL_TABLE)
    if config.unicode_nfc:
        text = unicodedata.normalize("NFC", text)
    if config.normalize_whitespace:
        text = _normalize_whitespace(text)
    return text


def _control_table() -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    for code in [*range(0x00, 0x20), *range(0x7F, 0xA0)]:
        if chr(code) not in "\n\t":
            table[code] = None
    for char in "\r\x0b\x0c\x1c\x1d\x1e\x85":  # the controls str.splitlines treats as line breaks
        table[ord(char)] = "\n"
    # Invisible characters that split words for tokenizers and dedup. Zero-width joiner and
    # non-joiner stay: emoji sequences and Persian and Indic spelling need them.
    for char in "\u200b\u2060\ufeff\u00ad":
        table[ord(char)] = None
    # Lone surrogates (possible from JSON escapes) cannot be encoded as UTF-8 and crash tokenizers.
    table.update(dict.fromkeys(range(0xD800, 0xE000)))
    return table


_CONTROL_TABLE = _control_table()

_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_INNER_SPACE = re.compile(r"(?<=\S)[^\S\n]+")  # runs after a word; leading indentation is kept
_BLANK_LINES = re.compile(r"\n{3,}")


def _normalize_whitespace(text: str) -> str:
    text = "\n".join(text.splitlines())  # every Unicode line boundary becomes \n
    text = _TRAILING_SPACE.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


_HIDDEN_CONTENT = frozenset({"script", "style"})
_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
    "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav",
    "ol", "p", "pre", "section", "table", "td", "th", "tr", "ul",
})


class _TextExtractor(HTMLParser):
    """Collects the text of a document; the parser decodes entities (convert_charrefs)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_CONTENT:
            self._hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_CONTENT:
            self._hidden = max(0, self._hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def _strip_html(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)
