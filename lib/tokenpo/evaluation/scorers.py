"""Reward scorers: plain callables `scorer(texts, prompts=None) -> np.ndarray` (one float per text, higher = better).

| name | scorer | score |
|---|---|---|
| "sentiment", "vader" | `VaderSentiment()` | VADER compound polarity in [-1, 1] |
| "sentiment-classifier" | `ClassifierSentiment(path_or_hub_id)` | P(positive) - P(negative) of a HF sequence classifier |
| "rouge_l" | `RougeL(references)` | ROUGE-L F1 against the reference of each prompt |
| "harmlessness" | `Harmlessness()` | 1 - toxicity probability (alt-profanity-check's linear SVM) |
| "relevance" | `Relevance()` | cosine of MiniLM mean-pooled embeddings of prompt and text |
| "code" | `CodeCorrectness(problems)` | 1.0 if the sandboxed HumanEval-style tests pass, else 0.0 |

Models load from a local path by default; a hub id only works where the hub is reachable (not offline).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np

Scorer = Callable[..., np.ndarray]


def _texts(texts) -> list[str]:
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is a {type(t).__name__}, not a string")
    return texts


def _prompts_for(texts: list[str], prompts, who: str) -> list[str]:
    if prompts is None:
        raise ValueError(f"{who} needs the prompts")
    prompts = list(prompts)
    if len(prompts) != len(texts):
        raise ValueError(f"{who}: {len(texts)} texts but {len(prompts)} prompts")
    return prompts


# ------------------------------------------------------------------------------------------------------- sentiment

class VaderSentiment:
    """VADER compound score of each text (rule-based, lexicon shipped with `vaderSentiment`)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts, prompts=None) -> np.ndarray:
        return np.array([self.analyzer.polarity_scores(t)["compound"] for t in _texts(texts)], dtype=np.float64)


class ClassifierSentiment:
    """P(positive) - P(negative) from any HF sequence-classification model (local folder or hub id).

    The positive and negative classes are found from `config.id2label` (labels starting with "pos" / "neg", any
    case), or given by name with `positive=` / `negative=`.
    """

    def __init__(self, model_name_or_path: str, *, device: str | None = None, batch_size: int = 32,
                 max_length: int = 512, positive: str | None = None, negative: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path).eval()
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:  # GPT-2-style classifiers
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = torch.device(device) if device else torch.device("cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length
        labels = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        self.positive = self._find(labels, positive, "pos")
        self.negative = self._find(labels, negative, "neg")

    @staticmethod
    def _find(labels: dict[int, str], wanted: str | None, prefix: str) -> int:
        hits = [i for i, name in labels.items()
                if (name == wanted if wanted is not None else name.lower().startswith(prefix))]
        if len(hits) != 1:
            raise ValueError(f"cannot tell which label is {wanted or prefix + '*'} among {labels}; "
                             "pass positive=/negative= label names")
        return hits[0]

    def __call__(self, texts, prompts=None) -> np.ndarray:
        import torch

        texts, out = _texts(texts), []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                probs = torch.softmax(self.model(**enc).logits.float(), dim=-1)
                out.append((probs[:, self.positive] - probs[:, self.negative]).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


# --------------------------------------------------------------------------------------------------------- ROUGE-L

def _rouge_tokens(text: str) -> list[str]:
    # the `rouge-score` package's default tokenisation: lowercase, non-alphanumerics become spaces
    return [t for t in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if t]


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_f1(prediction: str, reference: str) -> float:
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_package: bool | None = None) -> np.ndarray:
    """ROUGE-L F1 of each prediction against its reference (no stemming). Uses the `rouge-score` package when it
    is installed (`use_package=None`), else the same computation here: LCS of lowercased alphanumeric tokens."""
    predictions, references = _texts(predictions), _texts(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if use_package is None:
        try:
            import rouge_score  # noqa: F401
            use_package = True
        except ImportError:
            use_package = False
    if use_package:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    return np.array([_rouge_l_f1(p, r) for p, r in zip(predictions, references)], dtype=np.float64)


class RougeL:
    """ROUGE-L F1 of each text against the reference of its prompt (`references[prompt]`)."""

    def __init__(self, references: Mapping[str, str]):
        self.references = dict(references)

    def __call__(self, texts, prompts=None) -> np.ndarray:
        texts = _texts(texts)
        prompts = _prompts_for(texts, prompts, "RougeL")
        missing = [i for i, p in enumerate(prompts) if p not in self.references]
        if missing:
            raise ValueError(f"RougeL: no reference for the prompts of rows {missing[:5]}")
        return rouge_l(texts, [self.references[p] for p in prompts])


# ---------------------------------------------------------------------------------------------------- harmlessness

class Harmlessness:
    """1 - P(toxic) from `alt-profanity-check` (a linear SVM on toxic comments, calibrated)."""

    def __init__(self):
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def __call__(self, texts, prompts=None) -> np.ndarray:
        texts = _texts(texts)
        if not texts:
            return np.zeros(0)
        return 1.0 - np.asarray(self._predict_prob(texts), dtype=np.float64)


# ------------------------------------------------------------------------------------------------------- relevance

class Relevance:
    """Cosine similarity of mean-pooled MiniLM (all-MiniLM-L6-v2) embeddings of prompt and text.

    `model_path=None` uses `tokenpo.data.minilm_path()` (fetched offline from the package registry).
    """

    def __init__(self, model_path: str | None = None, *, device: str | None = None, batch_size: int = 32,
                 max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            from tokenpo.data import minilm_path

            model_path = str(minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.device = torch.device(device) if device else torch.device("cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm sentence embeddings [N, 384]: mean of the token states over the attention mask."""
        import torch

        texts, out = _texts(texts), []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def __call__(self, texts, prompts=None) -> np.ndarray:
        texts = _texts(texts)
        prompts = _prompts_for(texts, prompts, "Relevance")
        if not texts:
            return np.zeros(0)
        return np.sum(self.embed(texts) * self.embed(prompts), axis=-1).astype(np.float64)


# ------------------------------------------------------------------------------------------------------------ code

class CodeCorrectness:
    """1.0 when a completion passes its HumanEval-format problem's tests in the sandbox, else 0.0.

    `problems` maps task ids to problems (dicts with prompt, test, entry_point); each text's problem is the one
    whose `prompt` equals the text's prompt. `.last_results` keeps the sandbox results of the last call.
    """

    def __init__(self, problems: Mapping[str, Mapping[str, str]] | Sequence[Mapping[str, str]],
                 timeout: float = 3.0, workers: int = 2):
        if not isinstance(problems, Mapping):
            problems = {p["task_id"]: p for p in problems}
        self.problems = dict(problems)
        self.by_prompt = {p["prompt"]: task_id for task_id, p in self.problems.items()}
        self.timeout, self.workers = timeout, workers
        self.last_results: list = []

    def __call__(self, texts, prompts=None) -> np.ndarray:
        from .code import check_completions

        texts = _texts(texts)
        prompts = _prompts_for(texts, prompts, "CodeCorrectness")
        unknown = [i for i, p in enumerate(prompts) if p not in self.by_prompt]
        if unknown:
            raise ValueError(f"CodeCorrectness: rows {unknown[:5]} have prompts that match no problem")
        samples = [(self.by_prompt[p], t) for p, t in zip(prompts, texts)]
        self.last_results = check_completions(self.problems, samples, timeout=self.timeout, workers=self.workers)
        return np.array([float(r.passed) for r in self.last_results])


SCORERS: dict[str, Callable[..., Scorer]] = {
    "sentiment": VaderSentiment,
    "vader": VaderSentiment,
    "sentiment-classifier": ClassifierSentiment,
    "rouge_l": RougeL,
    "harmlessness": Harmlessness,
    "relevance": Relevance,
    "code": CodeCorrectness,
}


def get_scorer(name: str, *args, **kwargs) -> Scorer:
    """Build a scorer by name (see the table in the module docstring)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name](*args, **kwargs)
