"""Data: offline corpora (`sources`, `corpora`, `text_cleaning`) and preference datasets.

Public names are imported lazily, on first use, so `import tokenpo.data.<module>` only loads that module.
To export a name from a new module, add it to `_LAZY`.
"""
from __future__ import annotations

import importlib

_LAZY = {
    **dict.fromkeys(["SOURCES", "Source", "SourceChecksumError", "SourceUnavailableError", "fetch", "get_source",
                     "sources_dir", "archives_dir"], "sources"),
    **dict.fromkeys(["SENTIMENT_LABELS", "SentimentRow", "TEXT_CORPORA", "load_texts", "load_sentiment_rows",
                     "sentiment_cleaning_report", "load_pang_lee", "load_wiki_articles", "load_lee_background",
                     "load_imdb_sample", "load_conversations", "load_humaneval", "minilm_path"], "corpora"),
    **dict.fromkeys(["WikiArticle", "clean_tweet", "detokenize", "wiki_to_paragraphs"], "text_cleaning"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
