"""ROUGE-L F1 of predictions against references (rouge-score's tokenisation, no stemming).

Load offline from the repository: evaluate.load("<repo>/metrics/rouge_l").
compute(predictions=[...], references=[...]) -> {"rouge_l": mean F1, "scores": [...]}
"""
import datasets
import evaluate

from tokenpo.evaluation.scorers import rouge_l

_DESCRIPTION = "ROUGE-L F1 (longest common subsequence of lowercased alphanumeric tokens), per pair and mean."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, one per prediction.
Returns:
    rouge_l: mean F1; scores: one F1 per pair.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin (2004), ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = rouge_l(predictions, references)
        return {"rouge_l": float(scores.mean()) if len(scores) else float("nan"), "scores": scores.tolist()}
