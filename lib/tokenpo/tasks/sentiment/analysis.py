"""Tables of the sentiment runs, computed from their numbers: checkpoint evaluations, the frontier per run at fixed
KL, the final metrics, mask sparsities and mask alignment — one row per run, the unit the verdicts use."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from tokenpo.verdicts import NoData, frontier_summary

from .sweep import RunResult

DETECTORS = ("exclamation_rate", "distinct_1", "distinct_2", "repeated_rewarded_word_rate")
EVAL_COLUMNS = ("reward", "vader", "kl", "kl_sampled", *DETECTORS, "judge")


def label(result: RunResult) -> str:
    """"method β=…" (SimPO: "simpo β=… γ=…"; SePO: "sepo k=k_w/k_l"), then the run's scalar options and its group
    unless "main" or "simpo-grid" (e.g. "fpo β=0.1 alpha=2 [ablation]"): what a legend shows and what claims
    compare."""
    spec = result.spec
    if spec.k is not None:
        text = f"{spec.method} k={spec.k[0]:g}/{spec.k[1]:g}"
    else:
        text = f"{spec.method} β={spec.beta:g}" + ("" if spec.gamma is None else f" γ={spec.gamma:g}")
    text += "".join(f" {k}={v}" for k, v in spec.options if isinstance(v, (bool, int, float, str)))
    return text + ("" if spec.group in ("main", "simpo-grid") else f" [{spec.group}]")


def checkpoint_table(results: Sequence[RunResult], anchor: dict) -> pd.DataFrame:
    """One row per (run, evaluated checkpoint), plus the reference (step 0, KL 0, the anchor's numbers) at the start
    of every run: label, method, beta, gamma, seed, group, step and the evaluation columns."""
    rows = []
    for r in results:
        base = {"label": label(r), "method": r.spec.method, "beta": r.spec.beta, "gamma": r.spec.gamma,
                "seed": r.spec.seed, "group": r.spec.group}
        rows.append({**base, "step": 0, **{k: anchor.get(k, np.nan) for k in EVAL_COLUMNS}, "kl": 0.0,
                     "kl_sampled": 0.0})
        for e in r.evals:
            rows.append({**base, "step": e["step"], **{k: e.get(k, np.nan) for k in EVAL_COLUMNS}})
    return pd.DataFrame(rows)


def frontier_per_run(points: pd.DataFrame, levels: Sequence[float], r_ref: float) -> pd.DataFrame:
    """Per run: the reward interpolated at each KL level along its checkpoints (NaN beyond its largest KL, never
    extrapolated) and the slope a of reward ≈ r_ref + a·√KL (`tokenpo.verdicts.frontier_summary`)."""
    trained = points[points["step"] > 0]
    return frontier_summary(trained, levels, by=("label", "seed"), r_ref=r_ref)


def _late_mask_metric(result: RunResult, name: str) -> float:
    """A logged mask metric (e.g. "sparsity_reward") late in training: the mean of its chosen and rejected values
    over the last 20 % of the steps; NaN for a run without masks."""
    values = [result.late_mean(f"mask/{name}_{side}") for side in ("chosen", "rejected")]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def mask_sparsity(result: RunResult, kind: str) -> float:
    """Share of completion tokens whose `kind` ("reward" or "kl") mask weight is exactly 0, late in training."""
    return _late_mask_metric(result, f"sparsity_{kind}")


def runs_table(results: Sequence[RunResult]) -> pd.DataFrame:
    """Per run: the last checkpoint's evaluation, the training accuracy (last 20 % of the steps), the held-out
    preference accuracy and entropy (when the run was analysed), the mask sparsities (last 20 % of the steps), seconds
    per step."""
    rows = []
    for r in results:
        row = {"label": label(r), "method": r.spec.method, "beta": r.spec.beta, "gamma": r.spec.gamma,
               "seed": r.spec.seed, "group": r.spec.group,
               **{k: r.final.get(k, np.nan) for k in EVAL_COLUMNS},
               "train accuracy": r.late_mean("rewards/accuracies"),
               "held-out accuracy": r.analysis.get("heldout", {}).get("accuracy", np.nan),
               "entropy": r.analysis.get("heldout", {}).get("entropy", np.nan),
               "s/step": r.timing.get("train_seconds_per_step", np.nan)}
        for kind in ("reward", "kl"):
            row[f"sparsity {kind} mask"] = mask_sparsity(r, kind)
            row[f"mean {kind} mask"] = _late_mask_metric(r, f"mean_{kind}")
        rows.append(row)
    return pd.DataFrame(rows)


def alignment_table(results: Sequence[RunResult]) -> pd.DataFrame:
    """Long table of the per-run mask analyses: label, method, beta, seed, set, weighting, auroc, mass_ratio,
    mean_weight, sparsity."""
    rows = []
    for r in results:
        for dataset, weightings in r.analysis.get("alignment", {}).items():
            for weighting, stats in weightings.items():
                rows.append({"label": label(r), "method": r.spec.method, "beta": r.spec.beta, "seed": r.spec.seed,
                             "set": dataset, "weighting": weighting, **stats})
    return pd.DataFrame(rows)


def per_seed(frame: pd.DataFrame, column: str, **where) -> pd.Series:
    """`column` of the rows matching `where` (column == value), indexed by seed: one number per run."""
    selected = frame
    for key, value in where.items():
        selected = selected[selected[key] == value]
    return selected.set_index("seed")[column].sort_index()


def summary_by(frame: pd.DataFrame, by: str | Sequence[str], columns: Sequence[str]) -> pd.DataFrame:
    """Mean ± s.d. over runs (and the number of runs) of `columns`, grouped by `by` (a column or columns)."""
    grouped = frame.groupby([by] if isinstance(by, str) else list(by), sort=False)[list(columns)]
    out = grouped.mean().round(3).astype(str) + " ± " + grouped.std().round(3).astype(str)
    out["runs"] = grouped.size()
    return out


def claim_data(a: pd.Series, b: pd.Series | None = None, what: str = "value"):
    """The per-run data of a claim, or `NoData` naming the runs without a value (e.g. that never reached a KL level,
    or a set without key tokens): such a claim is reported inconclusive with that reason, never decided on the
    remaining runs."""
    missing = {name: sorted(int(k) for k in series[series.isna()].index)
               for name, series in (("a", a), ("b", b)) if series is not None and series.isna().any()}
    if missing:
        return NoData(f"no {what} for run(s) " + "; ".join(f"seeds {v}" for v in missing.values()))
    if len(a) < 2 or (b is not None and len(b) < 2):
        return NoData(f"fewer than 2 runs with a {what}")
    return a if b is None else (a, b)


def best_simpo(grid: Sequence[RunResult], anchor: dict, levels: Sequence[float]) -> tuple[float, float]:
    """SimPO's (β, γ) for its main runs, by the pre-registered rule: the grid setting with the steepest
    reward-vs-√KL slope (the most reward per unit of divergence)."""
    front = frontier_per_run(checkpoint_table(grid, anchor), levels, anchor["reward"]).reset_index()
    best = front.loc[front["sqrt_kl_a"].idxmax(), "label"]
    return next((r.spec.beta, r.spec.gamma) for r in grid if label(r) == best)
