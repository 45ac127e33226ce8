"""Data: offline corpora from package registries (`sources`, `corpora`, `text_cleaning`) and preference datasets
(`preference`, `collator`)."""
from .corpora import (SENTIMENT_LABELS, TEXT_CORPORA, SentimentRow, load_conversations, load_humaneval,
                      load_imdb_sample, load_lee_background, load_pang_lee, load_sentiment_rows, load_texts,
                      load_wiki_articles, minilm_path, sentiment_cleaning_report)
from .sources import (SOURCES, Source, SourceChecksumError, SourceUnavailableError, archives_dir, fetch, get_source,
                      sources_dir)
from .text_cleaning import WikiArticle, clean_tweet, detokenize, wiki_to_paragraphs

__all__ = ["SOURCES", "Source", "SourceChecksumError", "SourceUnavailableError", "fetch", "get_source", "sources_dir",
           "archives_dir", "SENTIMENT_LABELS", "SentimentRow", "TEXT_CORPORA", "load_texts", "load_sentiment_rows",
           "sentiment_cleaning_report", "load_pang_lee", "load_wiki_articles", "load_lee_background",
           "load_imdb_sample", "load_conversations", "load_humaneval", "minilm_path", "WikiArticle", "clean_tweet",
           "detokenize", "wiki_to_paragraphs"]
