"""Prompt-answer relevance: cosine of MiniLM mean-pooled embeddings.

Load offline from the repository: evaluate.load("<repo>/metrics/relevance").
compute(predictions=[answers], references=[prompts], model_path=None) -> {"relevance": mean, "scores": [...]}
"""
import datasets
import evaluate

from tokenpo.evaluation.scorers import Relevance as RelevanceScorer

_DESCRIPTION = "Cosine similarity between each answer and its prompt (all-MiniLM-L6-v2, mean pooling)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of answers.
    references: list of the prompts they answer.
    model_path: MiniLM folder (default: tokenpo.data.minilm_path()).
Returns:
    relevance: mean cosine; scores: one cosine per pair.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Relevance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Reimers & Gurevych (2019), Sentence-BERT.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, model_path=None):
        cache = self.__dict__.setdefault("_scorers", {})
        if model_path not in cache:
            cache[model_path] = RelevanceScorer(model_path)
        scores = cache[model_path](predictions, references)
        return {"relevance": float(scores.mean()) if len(scores) else float("nan"), "scores": scores.tolist()}
