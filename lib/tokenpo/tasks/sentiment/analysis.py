"""Tables, frontiers and verdicts of the sentiment sweep, computed from the runs' numbers (never tuned to agree)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd

from tokenpo.evaluation import frontier_reward_at, pareto_frontier

from .sweep import RunResult


def frontier_points(results: Sequence[RunResult], reference_eval: dict, seeds: Sequence[int] = (0,)) -> pd.DataFrame:
    """One row per (run, evaluated checkpoint) of the sampled-pair runs with the profile's mask settings, plus the
    reference itself (step 0, KL 0) for every method: method, beta, seed, step, reward(_lo/_hi), vader, kl, ..."""
    rows = []
    methods = []
    for r in results:
        if r.spec.data != "sampled" or r.spec.mask_settings != "ours" or r.spec.seed not in seeds:
            continue
        methods.append(r.spec.method)
        for e in r.evals:
            rows.append({"method": r.spec.method, "beta": r.spec.beta, "seed": r.spec.seed,
                         **{k: v for k, v in e.items() if k != "samples"}})
    for m in dict.fromkeys(methods):
        rows.append({"method": m, "beta": float("nan"), "seed": 0, "step": 0,
                     **{k: v for k, v in reference_eval.items() if k != "samples"}})
    return pd.DataFrame(rows)


def method_frontiers(points: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m: pareto_frontier(g["kl"].to_numpy(), g["reward"].to_numpy())
            for m, g in points.groupby("method", sort=False)}


def frontier_table(points: pd.DataFrame, levels: Sequence[float]) -> pd.DataFrame:
    """Best reward per method among its checkpoints with KL <= level (nan if none), and that point's CI
    half-width."""
    rows = []
    for m, g in points.groupby("method", sort=False):
        row = {"method": m}
        front = pareto_frontier(g["kl"].to_numpy(), g["reward"].to_numpy())
        for level in levels:
            best = frontier_reward_at(front, level)
            row[f"reward@KL<={level:g}"] = best
            hit = g[(g["kl"] <= level) & np.isclose(g["reward"], best)] if not math.isnan(best) else g.iloc[:0]
            row[f"ci@KL<={level:g}"] = float((hit["reward_hi"] - hit["reward"]).max()) if len(hit) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


MASK_METRICS = ("mask/sparsity_reward_chosen", "mask/sparsity_reward_rejected", "mask/sparsity_kl_chosen",
                "mask/sparsity_kl_rejected")


def results_table(results: Sequence[RunResult]) -> pd.DataFrame:
    """Per run: the last checkpoint's reward, VADER and KL on fresh samples; the training accuracy, sequence KL and
    mask sparsities averaged over the last 20 % of the steps; seconds per step."""
    rows = []
    for r in results:
        last = r.evals[-1] if r.evals else {}
        row = {"method": r.spec.method, "beta": r.spec.beta, "seed": r.spec.seed, "masks": r.spec.mask_settings,
               "data": r.spec.data, "reward": last.get("reward", np.nan), "vader": last.get("vader", np.nan),
               "kl": last.get("kl", np.nan), "train accuracy": r.late_mean("rewards/accuracies"),
               "train kl chosen": r.late_mean("kl/chosen"), "train kl rejected": r.late_mean("kl/rejected"),
               "s/step": r.timing.get("train_seconds_per_step", np.nan)}
        for metric in MASK_METRICS:
            row[metric.split("/")[1]] = r.late_mean(metric)
        rows.append(row)
    return pd.DataFrame(rows)


def kl_sparsity(result: RunResult) -> float:
    """KL-mask sparsity late in training, chosen and rejected averaged."""
    return float(np.nanmean([result.late_mean("mask/sparsity_kl_chosen"),
                             result.late_mean("mask/sparsity_kl_rejected")]))


# ------------------------------------------------------------------------------------------------- verdicts
def sparsity_verdict(by_beta: dict[float, float], seed_values: Sequence[float], variant: str) -> str:
    """Claim: higher β gives a sparser divergence (KL) mask. Holds when sparsity never falls by more than the seed
    spread from one β to the next and the largest β is sparser than the smallest by more than twice the spread
    (at least 0.01)."""
    betas = sorted(by_beta)
    values = [by_beta[b] for b in betas]
    spread = float(np.std(seed_values, ddof=1)) if len(seed_values) > 1 else 0.0
    rise = values[-1] - values[0]
    monotone = all(b - a >= -spread for a, b in zip(values, values[1:]))
    holds = len(betas) > 1 and monotone and rise > max(2 * spread, 0.01)
    numbers = " / ".join(f"{v:.3f}" for v in values)
    return (f"{'holds' if holds else 'does not hold'} ({variant}: KL-mask sparsity {numbers} at β "
            f"{' / '.join(f'{b:g}' for b in betas)}; seed s.d. {spread:.3f})")


def alignment_verdict(trained: Sequence[float], untrained: Sequence[float], random_auroc: float, what: str) -> str:
    """Claim: learned masks weight sentiment tokens. Holds when the trained networks' AUROC (mean over seeds) beats
    both the untrained networks' and a random mask's by more than 2 standard errors and by at least 0.02."""
    t, u = np.asarray(trained, float), np.asarray(untrained, float)
    se = float(t.std(ddof=1) / math.sqrt(t.size)) if t.size > 1 else 0.0
    margin = t.mean() - max(u.mean(), random_auroc)
    holds = margin > max(2 * se, 0.02)
    return (f"{'holds' if holds else 'does not hold'} ({what}: AUROC {t.mean():.3f} ± {se:.3f} (s.e., {t.size} "
            f"seeds) vs untrained {u.mean():.3f}, random {random_auroc:.3f})")


def _compare(a: float, b: float, tol: float) -> str:
    return "above" if a > b + tol else ("below" if a < b - tol else "within CI")


def frontier_verdicts(table: pd.DataFrame, levels: Sequence[float]) -> dict[str, str]:
    """Two frontier claims read off the paper's figure: DPO has the best frontier at low KL; SparsePO's frontier is
    at least that of TDPO-1, the objective it masks. A difference counts only beyond the larger 95 % CI half-width
    of the two points: "holds" (better), "does not hold" (worse), else "inconclusive (within the CI)"."""
    out = {}
    low = min(levels)
    col, ci = f"reward@KL<={low:g}", f"ci@KL<={low:g}"
    if "dpo" in table.index and not math.isnan(table.loc["dpo", col]):
        others = table.drop(index="dpo")[col].dropna()
        if len(others):
            best_other = others.idxmax()
            tol = float(np.nanmax([table.loc["dpo", ci], table.loc[best_other, ci]]))
            side = _compare(table.loc["dpo", col], others.max(), tol)
            verdict = {"above": "holds", "below": "does not hold"}.get(side, "inconclusive (within the CI)")
            out["DPO has the best frontier at low KL"] = (
                f"{verdict} (KL <= {low:g}: DPO {table.loc['dpo', col]:.3f}, best other {best_other} "
                f"{others.max():.3f}, CI half-width {tol:.3f})")
    for variant in [m for m in table.index if m.startswith("sparsepo")]:
        if "tdpo1" not in table.index:
            break
        parts, sides = [], []
        for level in levels:
            col, ci = f"reward@KL<={level:g}", f"ci@KL<={level:g}"
            s, t = table.loc[variant, col], table.loc["tdpo1", col]
            if math.isnan(s) or math.isnan(t):
                parts.append(f"KL<={level:g}: not measurable")
                continue
            tol = float(np.nanmax([table.loc[variant, ci], table.loc["tdpo1", ci]]))
            sides.append(_compare(s, t, tol))
            parts.append(f"KL<={level:g}: {s:.3f} vs {t:.3f} (±{tol:.3f})")
        if not sides:
            verdict = "not measurable"
        elif "below" in sides:
            verdict = "does not hold"
        elif "above" in sides:
            verdict = "holds"
        else:
            verdict = "inconclusive (within the CI)"
        out[f"{variant} frontier >= TDPO-1"] = f"{verdict} ({'; '.join(parts)})"
    return out
