"""Turn raw corpus text (MediaWiki markup, tweets, pre-tokenised sentences) into fluent prose for a language model.

Pure string functions, no I/O: `tokenpo.data.sources` reads the files and calls these.
"""
from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------- wiki markup
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
# Tags whose content is not prose at all (formulas, galleries, code, ...): drop them with their content.
_DROP_BLOCK = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|pre|code|score|imagemap|chem|hiero|graph)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_FLAT_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)  # a table without nested braces left in it
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_NON_PROSE_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|template|help|portal|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_EXT_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:.\-]*\s*\)")
_LEADING_PUNCT_IN_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)+")
_TRAILING_PUNCT_IN_PARENS = re.compile(r"\s*(?:[,;:]\s*)+\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_WORD = re.compile(r"[A-Za-z]+")


def _remove_nested(pattern: re.Pattern, text: str) -> str:
    """Remove innermost matches until none are left (handles {{a|{{b}}}} without a full parser)."""
    while True:
        text, n = pattern.subn("", text)
        if n == 0:
            return text


def _resolve_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; File:/Category:/interlanguage links vanish."""

    def replace(match: re.Match) -> str:
        inner = match.group(1)
        if _NON_PROSE_LINK.match(inner):
            return ""
        return inner.split("|")[-1]

    while True:  # innermost first, so a caption's links resolve before its File: link is dropped
        text, n = _INNER_LINK.subn(replace, text)
        if n == 0:
            return text


def _drop_tables(text: str) -> str:
    """Drop `{| ... |}` tables line by line (they nest, and may hold templates we already removed)."""
    kept, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        if depth == 0:
            kept.append(line)
        if stripped.startswith("|}") and depth > 0:
            depth -= 1
    return "\n".join(kept)


def wiki_to_paragraphs(wikitext: str, min_words: int = 12) -> list[str]:
    """Clean MediaWiki markup into prose paragraphs.

    Removes comments, references, templates, tables, files, categories, headings, lists and HTML tags; keeps link
    labels and the text of external links; unescapes HTML entities. A paragraph is kept only if it has at least
    `min_words` words and ends like a sentence, which drops captions, list residue and stubs left by templates.
    """
    text = html.unescape(wikitext)  # the dump double-escapes: &amp;nbsp; -> &nbsp; after XML parsing
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCK.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _drop_tables(text)
    text = _remove_nested(_FLAT_TABLE, text)
    text = _resolve_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text)
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] in "=|!{}":  # blank, heading or table residue: ends the paragraph
            blocks.append([])
        elif line[0] in "*#:;":  # a list item or indented quote: a paragraph of its own
            blocks += [[line.lstrip("*#:; ")], []]
        else:
            blocks[-1].append(line)
    paragraphs = []
    for block in blocks:
        paragraph = _SPACES.sub(" ", " ".join(block))
        paragraph = _EMPTY_PARENS.sub("", paragraph)  # what is left of a template inside (...)
        paragraph = _LEADING_PUNCT_IN_PARENS.sub("(", paragraph)
        paragraph = _TRAILING_PUNCT_IN_PARENS.sub(")", paragraph)
        paragraph = _SPACE_BEFORE_PUNCT.sub(r"\1", paragraph).strip()
        if len(_WORD.findall(paragraph)) >= min_words and paragraph[-1] in ".!?:\"')" \
                and not any(markup in paragraph for markup in ("{{", "}}", "[[", "]]", "{|", "|}")):
            paragraphs.append(paragraph)
    return paragraphs


@dataclass(frozen=True)
class WikiArticle:
    title: str
    paragraphs: tuple[str, ...]


def parse_wiki_dump(xml_bytes: bytes, min_paragraphs: int = 1) -> list[WikiArticle]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML export, as cleaned prose paragraphs."""
    root = ET.fromstring(xml_bytes)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
        paragraphs = wiki_to_paragraphs(wikitext)
        if len(paragraphs) >= min_paragraphs:
            articles.append(WikiArticle(page.findtext(f"{ns}title") or "", tuple(paragraphs)))
    return articles


# ---------------------------------------------------------------------------------------------------- tweets
_TWEET_URL = re.compile(r"(?:https?://|www\.)\S*|\bhttps?\S*|\bt\.co/\S*", re.I)
_ADDRESS_PREFIX = re.compile(r"^(?:(?:RT|MT)\s*@\w+:?\s*|\.?@\w+[:,]?\s*)+")  # "@a RT @b: RT @c: text"
_QUOTED_RETWEET = re.compile(r"\s*[\"']?\b(?:RT|MT)\s*@\w+:?\s*")  # "comment RT @x: quoted tweet" -> "comment - quoted"
_TRAILING_TAGS = re.compile(r"(?:\s+(?:via\s+)?[@#][\w-]+)+\s*$", re.I)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\b")
_GLUED_TAG = re.compile(r"(?<=\w)(?=[@#]\w)")  # "#deflategate@Patriots#NerfBalls": split before each tag
_MENTION = re.compile(r"@#?\w+")
_MENTION_RUN = re.compile(r"@user(?:[\s,]+@user)+")
_HASHTAG = re.compile(r"#(\w)")
# The Twitter US-airline set had "cancel" and "late" rewritten; undo it so the LM does not learn the artefact.
_AIRLINE_ARTEFACTS = ((re.compile(r"Cancelled Flight", re.I), "cancel"), (re.compile(r"Late Flight", re.I), "late"))
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "...", "\u00a0": " "})
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
MENTION_TOKEN = "@user"


def clean_tweet(text: str, min_words: int = 4) -> str | None:
    """A tweet as fluent text, or None when it should be dropped.

    Unescapes HTML entities; drops the tweet if any non-ASCII or control character remains (in this corpus those are
    mostly mojibake of emoji and curly quotes); removes URLs, the `RT @x:` prefix, addressee @handles at the start and
    trailing @handle/#tag chains; replaces other @handles by `@user` and strips `#` from in-text hashtags. Drops the
    result if it has fewer than `min_words` words.
    """
    text = html.unescape(html.unescape(text)).translate(_TYPOGRAPHY)
    text = re.sub(r"[\r\n\t]+", " ", text)
    if _NOT_PRINTABLE_ASCII.search(text):
        return None
    text = _TWEET_URL.sub(" ", _EMAIL.sub(" ", text))
    text = _GLUED_TAG.sub(" ", text)
    text = _SPACES.sub(" ", text).strip()
    text = _ADDRESS_PREFIX.sub("", text)
    text = _QUOTED_RETWEET.sub(" - ", text)
    text = _TRAILING_TAGS.sub("", text)
    text = _MENTION.sub(MENTION_TOKEN, text)
    text = _MENTION_RUN.sub(MENTION_TOKEN, text)
    text = _HASHTAG.sub(r"\1", text)
    for pattern, replacement in _AIRLINE_ARTEFACTS:
        text = pattern.sub(replacement, text)
    text = _SPACES.sub(" ", text).strip(" -:|")
    if len(_WORD.findall(text)) < min_words:
        return None
    return text


# ---------------------------------------------------------------------------------------------------- tokenised text
_DETOK_RULES = (
    (re.compile(r"\s+([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$])\s+"), r"\1"),
    (re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", re.I), r"\1"),
    (re.compile(r'"\s+([^"]*?)\s+"'), r'"\1"'),  # " conan " -> "conan"
    (re.compile(r"(?<=[.!?])(?=[a-z])"), " "),  # ".  . i would" -> ". . i would" after the first rule
    (re.compile(r"\s{2,}"), " "),
)
_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_LONE_I = re.compile(r"\bi\b")


def detokenize(text: str, capitalize: bool = True) -> str:
    """Undo PTB-style tokenisation ("it 's great , really ." -> "It's great, really.").

    With `capitalize`, the first letter of each sentence and the pronoun "i" are upper-cased, since the Pang & Lee
    and IMDB files are lower-cased.
    """
    text = " ".join(text.split())
    text = text.replace("` ", "'").replace(" `", " '").replace("``", '"').replace("''", '"')
    for pattern, replacement in _DETOK_RULES:
        text = pattern.sub(replacement, text)
    text = re.sub(r"(\.\s*){2,}", ". ", text).strip()
    if capitalize:
        text = _LONE_I.sub("I", text)
        text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    return text.strip()
