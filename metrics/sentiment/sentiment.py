"""Sentiment reward of texts: VADER compound (default) or P(positive) - P(negative) of a HF classifier.

Load offline from the repository: evaluate.load("<repo>/metrics/sentiment").
compute(predictions=[...], model="vader" | <classifier folder or hub id>) -> {"sentiment": mean, "scores": [...]}
"""
import datasets
import evaluate

from tokenpo.evaluation.scorers import ClassifierSentiment
from tokenpo.evaluation.scorers import VaderSentiment

_DESCRIPTION = "Per-text sentiment score (higher = more positive) and its mean, computed by tokenpo.scorers."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of texts.
    model: "vader" (default) or a sequence-classification model folder / hub id.
    positive, negative: label names of the classifier's positive and negative classes (found from id2label if omitted).
Returns:
    sentiment: mean score; scores: one score per text.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sentiment(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model="vader", positive=None, negative=None):
        cache = self.__dict__.setdefault("_scorers", {})
        key = (model, positive, negative)
        if key not in cache:
            cache[key] = VaderSentiment() if model == "vader" else ClassifierSentiment(
                model, positive=positive, negative=negative)
        scores = cache[key](predictions)
        return {"sentiment": float(scores.mean()) if len(scores) else float("nan"), "scores": scores.tolist()}
