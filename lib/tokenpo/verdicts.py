"""Verdicts: a paper's claims, declared before any result, decided from per-run numbers.

The unit of analysis is the **run** (one seed). Every input is one number per run -- the final reward of each of five
seeds of method A, the AUROC of each seed's trained mask -- never per-sample values pooled across runs (samples of
one run share its training noise, so pooling them overstates the evidence). Inputs of more than `MAX_RUNS` values are
refused for that reason.

Workflow of a notebook::

    prereg = Preregistration([
        Claim("frontier@kl=3", "SparsePO reaches a higher reward than TDPO-1 at the same KL", "greater",
              delta=0.02, groups=("SparsePO", "TDPO-1")),
        Claim("mask alignment", "trained masks align with sentiment tokens better than untrained ones", "greater",
              delta=0.02, threshold=0.05, kind="paired", groups=("trained", "untrained")),
    ], alpha=0.05)
    prereg                                  # first cell: the table of claims, alpha, fingerprint, time
    ...                                     # experiments
    verdicts = prereg.decide({"frontier@kl=3": (a, b), "mask alignment": (trained, untrained)})
    verdicts.to_frame(); summary["headline"].update(verdicts.to_json())

Effects (`Claim.kind`; the effect's null value theta0 in brackets):
    difference    mean(a) - mean(b), unpaired [0]: Welch t interval, df by Welch-Satterthwaite.
    paired        mean(a_i - b_i), runs paired by seed [0]: one-sample t interval of the differences.
    ratio         mean(a) / mean(b), unpaired, positive values [1]: delta method on the log scale,
                  se^2 = s_a^2/(n_a mean(a)^2) + s_b^2/(n_b mean(b)^2), Welch-Satterthwaite df, interval exponentiated.
    paired_ratio  geometric mean of a_i / b_i [1]: one-sample t interval of log(a_i / b_i), exponentiated.
    mean          mean(a) of one group against a stated null (e.g. a per-run mass ratio against 1, AUROC against 0.5).
With `method="bootstrap"` the interval is the percentile interval of `n_boot` resamples of the runs (within each group;
pairs stay together), seeded per claim. With 2-5 runs the bootstrap distribution has few distinct values and its
intervals are too narrow; the t interval is the default and the one to use for so few runs.

Multiplicity (m = number of claims in the preregistration, alpha the family-wise level):
    * p-values: for "greater"/"less" claims the two-sided p of H0: effect = theta0; for "equivalent" claims the TOST
      p against theta0 +- delta, doubled to match a two-sided interval, p = min(1, 2 max(p_lower, p_upper)). The m
      p-values are Holm-adjusted (`holm`).
    * intervals: the decision interval of every claim is the two-sided (1 - alpha/m) interval (Bonferroni). The m
      decision intervals cover their true effects simultaneously with probability >= 1 - alpha, so every outcome other
      than "inconclusive" is a statement that is wrong for some claim with probability <= alpha. The plain 95 %
      interval is reported next to it. With t intervals, "the decision interval excludes theta0" implies
      "Holm-adjusted p <= alpha", so Holm never overrules the interval; the Holm p is what the summary reports.

Decision rules (`classify`). Write the decision interval [L, U], the estimate E, the null theta0, the smallest effect of
interest delta > 0 and the practical threshold T (default theta0 + delta for "greater", theta0 - delta for "less";
a declared T must be at least as far from theta0). For "greater" claims, in this order:
    holds          L > theta0  and  E >= T  and  Holm-adjusted p <= alpha
                   (the direction is established at the corrected level AND the estimate is practically large)
    equivalent     theta0 - delta < L  and  U < theta0 + delta
                   (the whole interval lies within +-delta: any effect is negligible, even when L > theta0)
    does not hold  U < T
                   (the claimed practical effect is excluded: reliably below the threshold -- in particular
                   reliably in the opposite direction when U < theta0)
    inconclusive   anything else (too few or too noisy runs to tell; never read as "does not hold").
"less" claims mirror every inequality (L > theta0 becomes U < theta0, E >= T becomes E <= T, U < T becomes L > T).
The rules are mutually exclusive: E >= T >= theta0 + delta forces U >= T, which fails both later rules.
For "equivalent" claims (the paper claims A matches B):
    holds          theta0 - delta < L  and  U < theta0 + delta  and  Holm-adjusted p <= alpha   (TOST)
    does not hold  L >= theta0 + delta  or  U <= theta0 - delta   (a non-negligible difference, reliably)
    inconclusive   anything else.
Margins are in the effect's units on the effect's scale (for ratios: (1 - delta, 1 + delta), delta < 1).

Frontiers (`interpolate_at_kl`, `sqrt_kl_slope`, `frontier_summary`): each run becomes a few numbers at fixed KL levels
so that methods are compared run by run with the machinery above. See `interpolate_at_kl` for why "the best reward
among checkpoints with KL <= L" is not used.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

OUTCOMES = ("holds", "does not hold", "equivalent", "inconclusive")
DIRECTIONS = ("greater", "less", "equivalent")
KINDS = ("difference", "paired", "ratio", "paired_ratio", "mean")
METHODS = ("t", "bootstrap")
MAX_RUNS = 100
_DEFAULT_NULL = {"difference": 0.0, "paired": 0.0, "ratio": 1.0, "paired_ratio": 1.0}
_LOG_SCALE = ("ratio", "paired_ratio")
_TWO_GROUPS = ("difference", "paired", "ratio", "paired_ratio")


# ----------------------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """One claim of the paper, declared before any result.

    name: short key (unique in a preregistration); text: the paper's claim in a sentence; direction: "greater" (the
    effect exceeds the null), "less", or "equivalent" (the effect is within +-delta of the null); delta: the smallest
    effect of interest, > 0, in the effect's units; threshold: the effect a "holds" needs in the effect's units (e.g.
    a mass ratio of 1.2, an AUROC gain of 0.05), default null +- delta; kind: see the module docstring; null: the
    effect under "no effect" (0 for differences, 1 for ratios, required for kind="mean"); groups: labels of A and B
    (one label for kind="mean")."""

    name: str
    text: str
    direction: str
    delta: float
    kind: str = "difference"
    threshold: float | None = None
    null: float | None = None
    groups: tuple[str, ...] = ("A", "B")

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"claim {self.name!r}: {msg}")

        if self.direction not in DIRECTIONS:
            raise bad(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.kind not in KINDS:
            raise bad(f"kind must be one of {KINDS}, got {self.kind!r}")
        delta = float(self.delta)
        if not (math.isfinite(delta) and delta > 0):
            raise bad(f"delta must be a finite number > 0, got {self.delta!r}")
        if self.kind in _LOG_SCALE and delta >= 1:
            raise bad("for ratios delta must be < 1 (the equivalence margin is (1 - delta, 1 + delta))")
        null = self.null if self.null is not None else _DEFAULT_NULL.get(self.kind)
        if null is None or not math.isfinite(float(null)):
            raise bad("kind='mean' needs a finite null (the effect under 'no effect', e.g. 1 or 0.5)")
        null = float(null)
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(str(g) for g in self.groups)
        if self.kind == "mean":
            groups = groups[:1]
        elif len(groups) != 2:
            raise bad(f"kind={self.kind!r} compares two groups; groups must be two labels, got {self.groups!r}")
        threshold = self.threshold
        if self.direction == "equivalent":
            if threshold is not None:
                raise bad("an 'equivalent' claim has no practical threshold; its margin is delta")
        else:
            sign = 1.0 if self.direction == "greater" else -1.0
            threshold = null + sign * delta if threshold is None else float(threshold)
            if not math.isfinite(threshold) or sign * (threshold - null) < delta * (1 - 1e-12):
                raise bad(f"threshold {threshold} must be at least delta = {delta} beyond the null {null} "
                          f"on the claimed side ({self.direction})")
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "null", null)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "groups", groups)

    @property
    def comparison(self) -> str:
        """How the effect reads, e.g. "SparsePO − TDPO-1"."""
        a, b = (self.groups + ("",))[:2]
        return {"difference": f"{a} − {b}", "paired": f"{a} − {b} (paired)", "ratio": f"{a} / {b}",
                "paired_ratio": f"{a} / {b} (paired, geometric mean)", "mean": f"mean {a}"}[self.kind]


# ---------------------------------------------------------------------------------------------------------- effects
def _as_runs(values: Any, claim: str, label: str) -> np.ndarray:
    x = np.asarray(values.to_numpy() if isinstance(values, pd.Series) else values, dtype=float).ravel()
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"claim {claim!r}: group {label!r} has NaN/inf at run positions {bad.tolist()} "
                         f"(values {x.tolist()}); a run that did not reach a KL level or failed must be dealt with "
                         f"explicitly, not dropped silently")
    if x.size < 2:
        raise ValueError(f"claim {claim!r}: group {label!r} has {x.size} run(s); an interval over runs needs >= 2")
    if x.size > MAX_RUNS:
        raise ValueError(f"claim {claim!r}: group {label!r} has {x.size} values; verdicts take one number per run "
                         f"(seed), not per-sample values pooled across runs -- aggregate each run first")
    return x


def _pair(a: Any, b: Any, claim: str, labels: tuple[str, ...]) -> tuple[Any, Any]:
    """Paired inputs given as pandas Series are aligned on their index (the seed); arrays are paired by position."""
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        if set(a.index) != set(b.index) or a.index.has_duplicates or b.index.has_duplicates:
            raise ValueError(f"claim {claim!r}: paired runs need the same seeds in both groups; {labels[0]} has "
                             f"{list(a.index)}, {labels[1]} has {list(b.index)}")
        b = b.reindex(a.index)
    if len(a) != len(b):
        raise ValueError(f"claim {claim!r}: paired runs need equal counts, got {len(a)} and {len(b)}")
    return a, b


@dataclass(frozen=True)
class Effect:
    """An effect estimated from per-run values. `estimate` is on the effect's scale; intervals and tests are computed
    on the working scale (log for ratios) from a t distribution (`se`, `df`) or from bootstrap replicates."""

    kind: str
    estimate: float
    n_a: int
    n_b: int | None
    method: str
    work_estimate: float
    se: float
    df: float
    replicates: np.ndarray | None = field(default=None, repr=False)

    def _to_work(self, x: float) -> float:
        if self.kind in _LOG_SCALE:
            return math.log(x) if x > 0 else -math.inf
        return x

    def _from_work(self, x: float) -> float:
        return math.exp(x) if self.kind in _LOG_SCALE else x

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Two-sided interval at `level`: est +- t_{1-(1-level)/2, df} se, or the bootstrap percentiles."""
        gamma = 1.0 - level
        if self.replicates is not None:
            lo, hi = np.quantile(self.replicates, [gamma / 2, 1 - gamma / 2])
        elif self.se == 0:
            lo = hi = self.work_estimate
        else:
            q = stats.t.ppf(1 - gamma / 2, self.df)
            lo, hi = self.work_estimate - q * self.se, self.work_estimate + q * self.se
        return self._from_work(float(lo)), self._from_work(float(hi))

    def _one_sided(self, value: float, upper: bool) -> float:
        """p of H0: effect <= value (upper=False) or effect >= value (upper=True), on the working scale."""
        w = self._to_work(value)
        if self.replicates is not None:
            r = self.replicates
            count = np.sum(r >= w) if upper else np.sum(r <= w)
            return float((count + 1) / (r.size + 1))
        if self.se == 0:
            return 0.0 if (self.work_estimate < w if upper else self.work_estimate > w) else 1.0
        z = (self.work_estimate - w) / self.se
        return float(stats.t.cdf(z, self.df) if upper else stats.t.sf(z, self.df))

    def p_value(self, null: float) -> float:
        """Two-sided p of H0: effect = null (for the bootstrap: the smallest level whose percentile interval
        excludes null, with the +1 correction)."""
        return min(1.0, 2 * min(self._one_sided(null, upper=False), self._one_sided(null, upper=True)))

    def p_equivalence(self, low: float, high: float) -> float:
        """TOST p of H0: effect <= low or effect >= high, doubled so that p < gamma exactly when the two-sided
        (1 - gamma) interval lies inside (low, high)."""
        return min(1.0, 2 * max(self._one_sided(low, upper=False), self._one_sided(high, upper=True)))


def estimate_effect(a: Any, b: Any = None, *, kind: str = "difference", method: str = "t", n_boot: int = 10_000,
                    seed: int = 0, name: str = "effect", labels: Sequence[str] = ("A", "B")) -> Effect:
    """The effect of `kind` from per-run values `a` (and `b`); see the module docstring for the formulas."""
    if kind not in KINDS or method not in METHODS:
        raise ValueError(f"claim {name!r}: kind must be in {KINDS} and method in {METHODS}")
    labels = tuple(labels) + ("B",) * 2
    if kind in _TWO_GROUPS and b is None:
        raise ValueError(f"claim {name!r}: kind={kind!r} needs two groups of runs (a, b)")
    if kind in ("paired", "paired_ratio"):
        a, b = _pair(a, b, name, labels)
    x = _as_runs(a, name, labels[0])
    y = _as_runs(b, name, labels[1]) if kind in _TWO_GROUPS else None
    if kind in _LOG_SCALE and (np.any(x <= 0) or np.any(y <= 0)):
        raise ValueError(f"claim {name!r}: a ratio needs positive per-run values")
    if kind in ("difference", "ratio"):
        if kind == "difference":
            work = x.mean() - y.mean()
            va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
        else:
            work = math.log(x.mean()) - math.log(y.mean())
            va, vb = x.var(ddof=1) / (x.size * x.mean() ** 2), y.var(ddof=1) / (y.size * y.mean() ** 2)
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (x.size - 1) + vb ** 2 / (y.size - 1)) if se > 0 else math.nan
    else:
        d = {"paired": lambda: x - y, "paired_ratio": lambda: np.log(x / y), "mean": lambda: x}[kind]()
        work, se, df = d.mean(), d.std(ddof=1) / math.sqrt(d.size), d.size - 1.0
    replicates = None
    if method == "bootstrap":
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        ia = rng.integers(0, x.size, (n_boot, x.size))
        if kind == "difference":
            replicates = x[ia].mean(1) - y[rng.integers(0, y.size, (n_boot, y.size))].mean(1)
        elif kind == "ratio":
            replicates = np.log(x[ia].mean(1)) - np.log(y[rng.integers(0, y.size, (n_boot, y.size))].mean(1))
        else:
            replicates = d[ia].mean(1)
    estimate = math.exp(work) if kind in _LOG_SCALE else float(work)
    return Effect(kind, estimate, x.size, None if y is None else y.size, method, float(work), float(se),
                  float(df), replicates)


# --------------------------------------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: with p_(1) <= ... <= p_(m),
    p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Rejecting p~ <= alpha controls the family-wise error at alpha."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def classify(direction: str, estimate: float, low: float, high: float, *, null: float, delta: float,
             threshold: float | None = None, p_adjusted: float = 0.0, alpha: float = 0.05) -> str:
    """The outcome of one claim from its decision interval [low, high]; the exact rules are in the module docstring."""
    if direction == "equivalent":
        if null - delta < low and high < null + delta and p_adjusted <= alpha:
            return "holds"
        if low >= null + delta or high <= null - delta:
            return "does not hold"
        return "inconclusive"
    sign = 1.0 if direction == "greater" else -1.0
    if threshold is None:
        threshold = null + sign * delta
    # Distances from the null in the claimed direction: the "less" rules are the "greater" rules mirrored.
    e, t = sign * (estimate - null), sign * (threshold - null)
    lo, hi = sorted((sign * (low - null), sign * (high - null)))
    if lo > 0 and e >= t and p_adjusted <= alpha:
        return "holds"
    if -delta < lo and hi < delta:
        return "equivalent"
    if hi < t:
        return "does not hold"
    return "inconclusive"


# ----------------------------------------------------------------------------------------------------- verdicts
def _decimals(scale: float) -> int:
    return 3 if not (math.isfinite(scale) and scale > 0) else int(min(6, max(0, 1 - math.floor(math.log10(scale)))))


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


@dataclass(frozen=True)
class Verdict:
    """The decision on one claim. (low, high): the decision interval at `level` = 1 - alpha/m; (low95, high95): the
    plain 95 % interval; p_raw / p_adjusted: the claim's p-value before / after Holm."""

    claim: str
    outcome: str
    estimate: float
    low: float
    high: float
    level: float
    low95: float
    high95: float
    n_a: int
    n_b: int | None
    delta: float
    threshold: float | None
    null: float
    p_raw: float
    p_adjusted: float
    kind: str
    direction: str
    method: str
    comparison: str
    text: str
    m: int
    fingerprint: str
    note: str = ""                  # why a claim could not be tested (see `NoData`)

    @property
    def summary(self) -> str:
        """One line, e.g. "holds: SparsePO − TDPO-1 = +0.062 [0.031, 0.093] (98.75 % CI, Bonferroni over 4 claims;
        95 %: [0.040, 0.084]; 5 vs 5 runs, δ = 0.02, Holm-adjusted p = 0.004)"."""
        if self.note:
            return f"{self.outcome}: {self.comparison}: not tested ({self.note})"
        k = _decimals(self.high95 - self.low95 if self.high95 > self.low95 else abs(self.estimate))
        signed = self.kind in ("difference", "paired")
        est = f"{self.estimate:+.{k}f}" if signed else f"{self.estimate:.{k}f}"
        interval = f"[{self.low:.{k}f}, {self.high:.{k}f}]"
        if self.m > 1:
            level = f"{100 * self.level:.4g} % CI, Bonferroni over {self.m} claims; " \
                    f"95 %: [{self.low95:.{k}f}, {self.high95:.{k}f}]"
        else:
            level = f"{100 * self.level:.4g} % CI"
        runs = {"paired": f"{self.n_a} paired runs", "paired_ratio": f"{self.n_a} paired runs",
                "mean": f"{self.n_a} runs"}.get(self.kind, f"{self.n_a} vs {self.n_b} runs")
        null = f", null {self.null:g}" if self.kind == "mean" else ""
        if self.direction == "equivalent":
            margin, test = f"margin ±{self.delta:g}", "Holm-adjusted TOST p"
        else:
            margin, test = f"δ = {self.delta:g}", "Holm-adjusted p"
            default = self.null + (self.delta if self.direction == "greater" else -self.delta)
            if not math.isclose(self.threshold, default):
                margin += f", holds needs {'≥' if self.direction == 'greater' else '≤'} {self.threshold:g}"
        boot = ", bootstrap" if self.method == "bootstrap" else ""
        return (f"{self.outcome}: {self.comparison} = {est} {interval} ({level}; {runs}{null}{boot}, {margin}, "
                f"{test} {_p(self.p_adjusted)})")


@dataclass(frozen=True)
class NoData:
    """The data of a registered claim that could not be tested (e.g. no key token in a set, or a run that did not
    reach a KL level), with the reason: the claim is reported *inconclusive* with that reason and enters the Holm
    adjustment with p = 1 (it is still one of the m claims)."""

    reason: str


class Verdicts(Sequence[Verdict]):
    """The decided claims of one preregistration, in registration order; index by position or claim name."""

    def __init__(self, verdicts: Sequence[Verdict], registration: "Preregistration") -> None:
        self._items = list(verdicts)
        self.registration = registration

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Verdict]:
        return iter(self._items)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            for v in self._items:
                if v.claim == key:
                    return v
            raise KeyError(key)
        return self._items[key]

    def to_frame(self) -> pd.DataFrame:
        """One row per claim: every field of `Verdict` plus its summary line, indexed by claim name."""
        rows = [{**asdict(v), "summary": v.summary} for v in self._items]
        return pd.DataFrame(rows).set_index("claim")

    def to_json(self) -> dict[str, str]:
        """{claim name: one-line summary} -- JSON-serialisable, for a notebook's summary.json."""
        return {v.claim: v.summary for v in self._items}

    def __repr__(self) -> str:
        return "\n".join([self.registration.stamp] + [f"{v.claim}: {v.summary}" for v in self._items])

    def _repr_html_(self) -> str:
        cols = ["outcome", "estimate", "low", "high", "low95", "high95", "n_a", "n_b", "delta", "p_adjusted"]
        return f"<p>{self.registration.stamp}</p>" + self.to_frame()[cols + ["summary"]].to_html()


# ------------------------------------------------------------------------------------------------ preregistration
class Preregistration:
    """All claims of a notebook, declared in one cell before any result, then frozen.

    The registration cannot be changed: it has no way to add a claim, its attributes cannot be set, and `decide`
    refuses a claim that is not registered and requires data for every registered claim (Holm needs all m p-values,
    and a subset would be under-corrected). `fingerprint` (a hash of the claims and settings, not of the time) and
    `created` go into summary.json through `stamp`, so a claim added later by editing the cell changes the
    recorded fingerprint."""

    def __init__(self, claims: Sequence[Claim], *, alpha: float = 0.05, method: str = "t", n_boot: int = 10_000,
                 seed: int = 0) -> None:
        claims = tuple(claims)
        names = [c.name for c in claims]
        if not claims or len(set(names)) != len(names):
            raise ValueError(f"a preregistration needs at least one claim and unique names, got {names}")
        if not all(isinstance(c, Claim) for c in claims):
            raise TypeError("claims must be Claim objects")
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        settings = {"alpha": alpha, "method": method, "n_boot": n_boot if method == "bootstrap" else None,
                    "seed": seed if method == "bootstrap" else None, "claims": [asdict(c) for c in claims]}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()
        for key, value in {"claims": claims, "alpha": float(alpha), "method": method, "n_boot": int(n_boot),
                           "seed": int(seed), "fingerprint": digest[:16],
                           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}.items():
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"a Preregistration is frozen (cannot set {key!r}); declare every claim in the "
                             f"registration cell before any result and rerun the notebook")

    @property
    def m(self) -> int:
        return len(self.claims)

    @property
    def decision_level(self) -> float:
        """Two-sided level of every decision interval: 1 - alpha/m (Bonferroni)."""
        return 1.0 - self.alpha / self.m

    @property
    def stamp(self) -> str:
        return (f"preregistration {self.fingerprint} ({self.created}): {self.m} claims, alpha = {self.alpha:g}, "
                f"Holm-adjusted p, {100 * self.decision_level:.4g} % {self.method} intervals over runs")

    def table(self) -> pd.DataFrame:
        rows = [{"claim": c.name, "paper says": c.text, "effect": c.comparison, "direction": c.direction,
                 "null": c.null, "delta": c.delta, "holds needs": "" if c.threshold is None else
                 f"{'≥' if c.direction == 'greater' else '≤'} {c.threshold:g}"} for c in self.claims]
        return pd.DataFrame(rows).set_index("claim")

    def __repr__(self) -> str:
        return f"{self.stamp}\n{self.table().to_string()}"

    def _repr_html_(self) -> str:
        return f"<p>{self.stamp}</p>" + self.table().to_html()

    def decide(self, data: Mapping[str, Any]) -> Verdicts:
        """Decide every registered claim. data: {claim name: (a, b)} for two-group kinds, {name: a} for kind="mean";
        a and b hold one number per run (pandas Series indexed by seed are aligned for paired kinds)."""
        registered = {c.name for c in self.claims}
        unknown = [k for k in data if k not in registered]
        if unknown:
            raise KeyError(f"claims {unknown} are not in preregistration {self.fingerprint} ({sorted(registered)}); "
                           f"claims cannot be added after results exist -- declare them in the registration cell "
                           f"and rerun the notebook")
        missing = [c.name for c in self.claims if c.name not in data]
        if missing:
            raise KeyError(f"no data for registered claims {missing}: all {self.m} claims are decided together "
                           f"(Holm needs every p-value); a claim that could not be run is still reported")
        effects, pvalues = [], []
        for c in self.claims:
            value = data[c.name]
            if isinstance(value, NoData):
                effects.append(value)
                pvalues.append(1.0)
                continue
            if c.kind == "mean":
                a, b = (value[0] if isinstance(value, tuple) else value), None
            elif isinstance(value, tuple) and len(value) == 2:
                a, b = value
            else:
                raise ValueError(f"claim {c.name!r}: kind={c.kind!r} needs a pair (a, b) of per-run values")
            e = estimate_effect(a, b, kind=c.kind, method=self.method, n_boot=self.n_boot, seed=self.seed,
                                name=c.name, labels=c.groups)
            effects.append(e)
            pvalues.append(e.p_equivalence(c.null - c.delta, c.null + c.delta) if c.direction == "equivalent"
                           else e.p_value(c.null))
        adjusted = holm(pvalues)
        out = []
        for c, e, p, q in zip(self.claims, effects, pvalues, adjusted):
            if isinstance(e, NoData):
                nan = float("nan")
                out.append(Verdict(c.name, "inconclusive", nan, nan, nan, self.decision_level, nan, nan, 0, None,
                                   c.delta, c.threshold, c.null, p, float(q), c.kind, c.direction, self.method,
                                   c.comparison, c.text, self.m, self.fingerprint, note=e.reason))
                continue
            low, high = e.interval(self.decision_level)
            low95, high95 = e.interval(0.95)
            outcome = classify(c.direction, e.estimate, low, high, null=c.null, delta=c.delta,
                               threshold=c.threshold, p_adjusted=q, alpha=self.alpha)
            out.append(Verdict(c.name, outcome, e.estimate, low, high, self.decision_level, low95, high95, e.n_a,
                               e.n_b, c.delta, c.threshold, c.null, p, float(q), c.kind, c.direction, e.method,
                               c.comparison, c.text, self.m, self.fingerprint))
        return Verdicts(out, self)


# ------------------------------------------------------------------------------------------------------ frontiers
def _run_points(kl: Any, reward: Any, r_ref: float | None) -> tuple[np.ndarray, np.ndarray]:
    """A run's checkpoints sorted by KL, the reference (KL 0) included, rewards at equal KL averaged."""
    k, r = np.asarray(kl, dtype=float).ravel(), np.asarray(reward, dtype=float).ravel()
    if k.shape != r.shape or not (np.all(np.isfinite(k)) and np.all(np.isfinite(r))):
        raise ValueError("kl and reward must be finite and of equal length")
    if np.any(k < 0):
        raise ValueError(f"negative KL {k[k < 0].tolist()}: clip sampled KL estimates at 0 first")
    if r_ref is not None:
        k, r = np.append(0.0, k), np.append(float(r_ref), r)
    if not np.any(k == 0):
        raise ValueError("the run has no reference point at KL 0; include it or pass r_ref")
    xs, inverse = np.unique(k, return_inverse=True)
    ys = np.bincount(inverse, weights=r) / np.bincount(inverse)
    return xs, ys


def interpolate_at_kl(kl: Any, reward: Any, levels: Sequence[float], *, r_ref: float | None = None) -> np.ndarray:
    """The reward of one run at fixed KL levels: linear interpolation of reward against KL between the run's
    checkpoints in order of KL (the reference, KL 0 and reward r_ref, is the first point), NaN for a level beyond the
    run's largest KL (or below 0) -- never extrapolated.

    Why not "the best reward among checkpoints with KL <= L"? Each checkpoint's reward is f(KL_j) + noise_j. The
    maximum over the k checkpoints under L is at least each of them, so its expectation never decreases when a
    checkpoint is added, and grows with k: for independent noise of s.d. sigma roughly by sigma sqrt(2 ln k), and for
    a rising f also because the largest KL under L creeps towards L. A method evaluated at more checkpoints (or more
    densely near L) wins for free. Interpolation at L is a weighted average, with weights summing to 1, of the two
    checkpoints around L: its expectation is the interpolated f whatever the number of checkpoints. (One residual
    effect: on a concave curve the chord lies below f by O(h^2 |f''|) for a spacing h, so denser schedules read
    slightly higher between checkpoints; evaluate methods on the same schedule, or use `sqrt_kl_slope`, which has no
    such effect when reward ~ r_ref + a sqrt(KL) holds.)"""
    xs, ys = _run_points(kl, reward, r_ref)
    levels = np.asarray(levels, dtype=float)
    out = np.interp(levels, xs, ys)
    out[(levels > xs[-1]) | (levels < 0)] = np.nan
    return out


def sqrt_kl_slope(kl: Any, reward: Any, *, r_ref: float | None = None) -> float:
    """a of the least-squares fit reward ~ r_ref + a sqrt(KL) through the reference point:
    a = sum_j sqrt(KL_j) (r_j - r_ref) / sum_j KL_j (NaN if the run has no checkpoint beyond KL 0)."""
    xs, ys = _run_points(kl, reward, r_ref)
    denom = xs.sum()
    return float(np.sum(np.sqrt(xs) * (ys - ys[0])) / denom) if denom > 0 else math.nan


def frontier_summary(points: pd.DataFrame, levels: Sequence[float], *, by: Sequence[str] = ("method", "seed"),
                     kl: str = "kl", reward: str = "reward", r_ref: float | None = None) -> pd.DataFrame:
    """One row per run (`by` columns) of a table of evaluated checkpoints: `reward_at_kl_<L>` for each level
    (`interpolate_at_kl`), `sqrt_kl_a` (`sqrt_kl_slope`), `max_kl` and `n_checkpoints` (beyond the reference). Each
    run's KL-0 reference row must be in `points`, or a shared reference reward given as r_ref."""
    rows = []
    for key, g in points.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        k, r = g[kl].to_numpy(), g[reward].to_numpy()
        values = interpolate_at_kl(k, r, levels, r_ref=r_ref)
        rows.append({**dict(zip(by, key)), **{f"reward_at_kl_{L:g}": v for L, v in zip(levels, values)},
                     "sqrt_kl_a": sqrt_kl_slope(k, r, r_ref=r_ref), "max_kl": float(np.max(k)),
                     "n_checkpoints": int(np.sum(k > 0))})
    return pd.DataFrame(rows).set_index(list(by))


def per_run(summary: pd.DataFrame, method: str, column: str, *, level: str = "method") -> pd.Series:
    """The per-run numbers of one method from `frontier_summary`, indexed by the remaining index levels (the seed),
    ready for `Preregistration.decide` (paired kinds align on the seed)."""
    return summary.xs(method, level=level)[column]
