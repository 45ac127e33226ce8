"""Harmlessness of texts: 1 - toxicity probability from alt-profanity-check.

Load offline from the repository: evaluate.load("<repo>/metrics/harmlessness").
compute(predictions=[...]) -> {"harmlessness": mean, "scores": [...]}
"""
import datasets
import evaluate

from tokenpo.evaluation.scorers import Harmlessness as HarmlessnessScorer

_DESCRIPTION = "1 - P(toxic) of each text (alt-profanity-check's linear SVM), and the mean."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of texts.
Returns:
    harmlessness: mean score; scores: one score per text, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Harmlessness(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        scorer = self.__dict__.setdefault("_scorer", HarmlessnessScorer())
        scores = scorer(predictions)
        return {"harmlessness": float(scores.mean()) if len(scores) else float("nan"), "scores": scores.tolist()}
