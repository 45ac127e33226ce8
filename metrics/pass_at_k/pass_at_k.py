"""pass@k of generated code, each candidate run in tokenpo's sandbox (HF code_eval's input convention).

Load offline from the repository: evaluate.load("<repo>/metrics/pass_at_k").
compute(predictions=[[candidate programs] per problem], references=[test code per problem], k=[1, 10])
-> {"pass@1": ..., "pass@10": ..., "results": [[status per candidate] per problem]}
A candidate's program is `candidate + "\n" + test`: the test code must call the function under test itself.
"""
import datasets
import evaluate

from tokenpo.evaluation.sandbox import SandboxLimits
from tokenpo.evaluation.code import pass_at_k
from tokenpo.evaluation.sandbox import run_python

_DESCRIPTION = "Unbiased pass@k (Chen et al. 2021) with every program run in a separate, limited, namespaced process."
_KWARGS_DESCRIPTION = """
Args:
    predictions: for each problem, a list of candidate programs.
    references: for each problem, test code (asserts) run after the candidate.
    k: list of k values (those above a problem's candidate count are left out).
    timeout: wall-clock seconds per program.
Returns:
    pass@k for each k, and results: the sandbox status of every candidate.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chen et al. (2021), Evaluating Large Language Models Trained on Code.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, k=(1, 10, 100), timeout=3.0):
        limits = SandboxLimits(wall_time=timeout)
        results = {}
        for index, (candidates, test) in enumerate(zip(predictions, references)):
            results[str(index)] = [run_python(c + "\n" + test, limits) for c in candidates]
        scores = pass_at_k(results, ks=list(k))
        scores["results"] = [[r.status for r in rs] for rs in results.values()]
        return scores
