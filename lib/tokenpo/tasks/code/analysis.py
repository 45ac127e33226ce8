"""Tables of the code runs, one row per run (the unit the verdicts use): pass@k on the held-out problems, the training
statistics, the SparsePO mask sparsities; and the token-level differences between a pair's two programs."""
from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np
import pandas as pd

from tokenpo.tasks.sentiment.analysis import per_seed, summary_by  # noqa: F401  (re-exported: one row per run)

from .runs import CodeRunResult


def label(result: CodeRunResult) -> str:
    """"method β=…" ("simpo β=… γ=…"): what tables and claims name."""
    spec = result.spec
    return f"{spec.method} β={spec.beta:g}" + ("" if spec.gamma is None else f" γ={spec.gamma:g}")


def mask_sparsity(result: CodeRunResult, kinds: Sequence[str] = ("reward", "kl"), first: bool = False) -> float:
    """Share of completion tokens whose mask weight is exactly 0 (`mask/sparsity_<kind>_<side>` of the training
    pairs), mean over the masks of `kinds` the run has and both sides: over the last 20 % of the steps, or at the
    first step (`first=True`: the masks as initialised, before any update). NaN for a run without masks."""
    values = []
    for kind in kinds:
        for side in ("chosen", "rejected"):
            metric = f"mask/sparsity_{kind}_{side}"
            if first:
                _, curve = result.curve(metric)
                values.append(curve[0] if curve.size else np.nan)
            else:
                values.append(result.late_mean(metric))
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def runs_table(results: Sequence[CodeRunResult], ks: Sequence[int]) -> pd.DataFrame:
    """Per run: pass@k, distinct programs per problem, training accuracy and reward margin (last 20 % of the steps),
    mask sparsity (trained, and at the first step), seconds per training step."""
    rows = []
    for r in results:
        e = r.evaluation
        rows.append({"label": label(r), "method": r.spec.method, "beta": r.spec.beta, "gamma": r.spec.gamma,
                     "seed": r.spec.seed, **{f"pass@{k}": e[f"pass@{k}"] for k in ks},
                     "distinct programs / problem": e["distinct"],
                     "train accuracy": r.late_mean("rewards/accuracies"),
                     "reward margin": r.late_mean("rewards/margins"),
                     "mask sparsity": mask_sparsity(r), "mask sparsity at step 1": mask_sparsity(r, first=True),
                     "reward-mask sparsity": mask_sparsity(r, ("reward",)),
                     "s/step": r.timing.get("train_seconds_per_step", np.nan)})
    return pd.DataFrame(rows)


def differing_tokens(chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per side, 1 for the completion tokens outside the longest matching blocks of the two token sequences (the
    tokens that make one program pass and the other fail, e.g. the operator or the constant), 0 elsewhere."""
    matcher = difflib.SequenceMatcher(a=list(chosen_ids), b=list(rejected_ids), autojunk=False)
    a, b = np.ones(len(chosen_ids)), np.ones(len(rejected_ids))
    for block in matcher.get_matching_blocks():
        a[block.a:block.a + block.size] = 0
        b[block.b:block.b + block.size] = 0
    return a, b


def difference_labels(tokenized) -> dict[str, list[np.ndarray]]:
    """`differing_tokens` of every pair of a tokenised set: {"chosen": [...], "rejected": [...]}."""
    out: dict[str, list[np.ndarray]] = {"chosen": [], "rejected": []}
    for row in tokenized:
        a, b = differing_tokens(row["chosen_ids"], row["rejected_ids"])
        out["chosen"].append(a)
        out["rejected"].append(b)
    return out
