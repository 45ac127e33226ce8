"""The runs of the sentiment experiment: each (method, β, seed) trained on the same pairs with
`tokenpo.training.train`, evaluated at several checkpoints on fresh fixed-length samples from held-out prompts, and
analysed at its last step (the policy's and the masks' weights on held-out pairs with known key tokens). The run, not
the sample, is the unit the verdicts use. Each run is a cached step keyed by its settings, the reference, the pairs,
the evaluation and the training code."""
from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tokenpo.cache import TRAINING_CODE, cached_step, code_fingerprint, content_hash
from tokenpo.profiles import SentimentConfig
from tokenpo.training import TrainConfig, train

SWEEP_VERSION = 2
METHODS = {  # label -> (objective, fixed hyper-parameters)
    "dpo": ("dpo", {}), "ipo": ("ipo", {}), "tdpo1": ("tdpo1", {}), "tdpo2": ("tdpo2", {}), "simpo": ("simpo", {}),
    "mapo": ("mapo", {}), "sparsepo_common": ("sparsepo", {"common": True}),
    "sparsepo_independent": ("sparsepo", {"common": False}),
    "sepo": ("sepo", {}), "sepo_rand": ("sepo", {}),      # oracle-selected tokens / uniformly random tokens
    "fpo": ("fpo", {}),                                   # its SAE features: run(..., providers=[FPOFeatures])
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method label of `METHODS`, its β (SimPO: β and its margin γ; SePO: β is its reward scale
    γ), a seed (model init of the mask networks, data order, random tokens, sampling), SePO's selected shares
    k = (k_w, k_l), the group it belongs to (e.g. "main", or "simpo-grid", the pilot that picks SimPO's setting
    before its main runs) and `options`: more of the objective's hyper-parameters as (name, value) pairs, e.g.
    (("alpha", 1.0), ("stop_chosen", False)) for FPO's ablations."""

    method: str
    beta: float
    seed: int = 0
    gamma: float | None = None
    group: str = "main"
    k: tuple[float, float] | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method label {self.method!r}; known: {sorted(METHODS)}")
        if (self.gamma is not None) != (self.method == "simpo"):
            raise ValueError(f"RunSpec {self}: γ is SimPO's margin; give it for SimPO runs only")
        if (self.k is not None) != (METHODS[self.method][0] == "sepo"):
            raise ValueError(f"RunSpec {self}: k = (k_w, k_l) is SePO's share of selected tokens; give it for SePO "
                             "runs only")

    @property
    def name(self) -> str:
        margin = "" if self.gamma is None else f"-g{self.gamma:g}"
        shares = "" if self.k is None else f"-k{self.k[0]:g}_{self.k[1]:g}"
        shares += "".join(f"-{k}{v}" if isinstance(v, (bool, int, float, str)) else f"-{k}{content_hash(v)[:6]}"
                          for k, v in self.options)
        return (f"{self.method}-b{self.beta:g}{margin}{shares}-s{self.seed}"
                + ("" if self.group == "main" else f"-{self.group}"))

    @property
    def is_sparsepo(self) -> bool:
        return METHODS[self.method][0] == "sparsepo"


def main_specs(cfg: SentimentConfig, simpo: tuple[float, float]) -> list[RunSpec]:
    """Every pre-registered (method, β) of the profile with `cfg.seeds` seeds; SimPO at the (β, γ) the grid chose."""
    specs = [RunSpec(m, b, seed=s) for m, betas in cfg.runs for b in betas for s in range(1, cfg.seeds + 1)]
    specs += [RunSpec("simpo", simpo[0], seed=s, gamma=simpo[1]) for s in range(1, cfg.seeds + 1)]
    return specs


def simpo_grid_specs(cfg: SentimentConfig) -> list[RunSpec]:
    """SimPO's own grid, seed 0 (kept out of the verdicts, which use seeds 1..)."""
    return [RunSpec("simpo", b, seed=0, gamma=g, group="simpo-grid") for b, g in cfg.simpo_grid]


def train_config(spec: RunSpec, cfg: SentimentConfig, out_dir: str | Path, steps: int,
                 providers: Sequence | None = None) -> TrainConfig:
    """The run's TrainConfig; `providers` replaces the method's default providers (e.g. FPO's `FPOFeatures`)."""
    objective, fixed = METHODS[spec.method]
    hparams = {"beta": spec.beta, **fixed, **dict(spec.options)}
    if spec.gamma is not None:
        hparams["gamma"] = spec.gamma
    kwargs = {}
    if objective == "sepo":
        from tokenpo.providers import SePOSelections

        hparams = {"gamma": spec.beta, **dict(spec.options)}
        column = "token_scores" if spec.method == "sepo" else None
        kwargs = dict(providers=[SePOSelections(spec.k[0], spec.k[1], column=column, seed=spec.seed)])
    if objective == "sparsepo":
        from tokenpo.providers import SparsePOMasks

        hparams.update(l1_reward=cfg.l1, l1_kl=cfg.l1)
        kwargs = dict(provider_learning_rate=cfg.mask_lr,
                      providers=[SparsePOMasks(**({} if cfg.mixer_init is None else {"mixer_init": cfg.mixer_init}))])
    if providers is not None:
        kwargs["providers"] = list(providers)
    return TrainConfig(method=objective, hparams=hparams, learning_rate=cfg.lr, schedule="constant",
                       warmup_steps=cfg.warmup_steps, max_steps=steps, batch_size=cfg.batch_size, seed=spec.seed,
                       cpu=not torch.cuda.is_available(), progress=False, save_final=False, save_every=None, out_dir=out_dir,
                       chunk_size=cfg.chunk_size, **kwargs)


# ----------------------------------------------------------------------------------------------- evaluation
def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the whitespace words of `texts` (1 = no repetition)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


class CheckpointEvaluator:
    """Fresh fixed-length samples of a policy on held-out prompts (the same sampling seed at every checkpoint: common
    random numbers make checkpoints comparable), scored by the training reward and by VADER; the exact sequence
    KL(π_θ‖π_ref); the hacking detectors ("!" rate, distinct-1/2, share of rewarded words repeated in a text). The
    MiniLM judge scores the samples of the last checkpoint (it is the slowest part)."""

    def __init__(self, reference, tokenizer, prompts: Sequence[str], reward: Callable, vader: Callable,
                 judge: Callable | None, new_tokens: int, seed: int = 1234, batch_size: int = 64):
        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.reward, self.vader, self.judge = reward, vader, judge
        self.new_tokens, self.seed, self.batch_size = new_tokens, seed, batch_size

    @property
    def identity(self) -> str:
        return content_hash([self.prompts, self.new_tokens, self.seed, getattr(self.reward, "identity", None)])

    def __call__(self, policy, with_judge: bool = False, prompts: Sequence[str] | None = None,
                 seed: int | None = None) -> dict:
        from tokenpo.evaluation import generate_completions, sequence_kl

        out = generate_completions(policy, self.tokenizer, list(prompts or self.prompts), max_new_tokens=self.new_tokens,
                                   temperature=1.0, top_k=0, top_p=1.0, seed=self.seed if seed is None else seed,
                                   batch_size=self.batch_size, fixed_length=True, progress=False)
        reward, vader = np.asarray(self.reward(out.texts)), np.asarray(self.vader(out.texts))
        kl = sequence_kl(policy, self.reference, out, batch_size=self.batch_size)
        row = {"n": len(out.texts), "reward": float(reward.mean()), "reward_se": _se(reward),
               "vader": float(vader.mean()), "vader_se": _se(vader), "kl": float(kl.exact.mean()), "kl_se": _se(kl.exact),
               "kl_sampled": float(kl.sampled.mean()), "exclamation_rate": float(np.mean(["!" in t for t in out.texts])),
               "distinct_1": distinct_n(out.texts, 1), "distinct_2": distinct_n(out.texts, 2),
               "repeated_rewarded_word_rate": _repeated_rewarded_words(self.reward, out.texts),
               "samples": out.texts[:4]}
        if with_judge and self.judge is not None:
            judged = np.asarray(self.judge(out.texts))
            row.update(judge=float(judged.mean()), judge_se=_se(judged))
        row["values"] = {"reward": reward.tolist(), "vader": vader.tolist(), "kl": kl.exact.tolist()}
        return row


def _se(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _repeated_rewarded_words(reward, texts: Sequence[str]) -> float:
    """Share of texts in which one rewarded word of the additive reward occurs more than once."""
    if not hasattr(reward, "words"):
        return float("nan")
    return float(np.mean([len(words) != len(set(words)) for words in
                          ([w for *_, w, _ in reward.words(t)] for t in texts)]))


class _RunCallback:
    """Checkpoint evaluations at `steps` (with an evaluator), and the per-run analyses at the run's `last_step`."""

    def __init__(self, evaluator: CheckpointEvaluator | None, steps: Sequence[int], analyse: Callable | None,
                 judge: bool = True, last_step: int | None = None):
        self.evaluator, self.steps, self.analyse, self.judge = evaluator, sorted(steps), analyse, judge
        self.last_step = last_step if last_step is not None else (self.steps[-1] if self.steps else None)
        self.evals: list[dict] = []
        self.analysis: dict = {}
        self.initial_masks: dict | None = None
        self.eval_seconds = 0.0

    def on_train_begin(self, policy, providers) -> None:
        masks = _mask_provider(providers)
        if masks is not None:
            self.initial_masks = {k: v.detach().clone() for k, v in masks.state_dict().items()}

    def on_step_end(self, step, metrics, policy, providers) -> None:
        evaluate = self.evaluator is not None and step in self.steps
        analyse = self.analyse is not None and step == self.last_step
        if not (evaluate or analyse):
            return
        start = time.perf_counter()
        if evaluate:
            self.evals.append({"step": step, **self.evaluator(policy, with_judge=step == self.steps[-1] and self.judge)})
        if analyse:
            self.analysis = self.analyse(policy, _mask_provider(providers), self.initial_masks)
        self.eval_seconds += time.perf_counter() - start


def pairs_fingerprint(pairs) -> str:
    """The identity of tokenised pairs: a hash of every column of every row (token ids, per-token columns such as
    oracle scores, texts)."""
    return content_hash([{k: row[k] for k in sorted(row)} for row in pairs])


def _mask_provider(providers):
    """The SparsePO mask networks among a run's providers, or None."""
    from tokenpo.providers import SparsePOMasks

    return next((p for p in providers if isinstance(p, SparsePOMasks)), None)


# -------------------------------------------------------------------------------------------------- one run
class LoggedRun:
    """What a run's logged `history` (one dict per logging step) gives: a metric's curve and its late mean."""

    history: list[dict]

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in self.history if r.get(metric) is not None]
        return np.array([r["step"] for r in rows]), np.array([r[metric] for r in rows], dtype=float)

    def late_mean(self, metric: str, share: float = 0.2) -> float:
        """Mean of a logged metric over the last `share` of the steps (smooths batch noise)."""
        _, values = self.curve(metric)
        if values.size == 0:
            return float("nan")
        return float(values[-max(1, int(round(share * values.size))):].mean())


@dataclass
class RunResult(LoggedRun):
    spec: RunSpec
    history: list[dict]
    evals: list[dict]
    analysis: dict = field(default_factory=dict)      # per-run analyses at the last step (mask alignment, ...)
    initial_masks: dict | None = None                 # SparsePO mask networks' state before / after training
    final_masks: dict | None = None
    timing: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        """The evaluation of the last checkpoint."""
        return self.evals[-1] if self.evals else {}


def run(spec: RunSpec, reference, pairs, cfg: SentimentConfig, evaluator: CheckpointEvaluator | None,
        identity: dict, collator, analyse: Callable | None = None, steps: int | None = None,
        eval_steps: Sequence[int] = (), judge: bool = True, providers: Sequence | None = None) -> RunResult:
    """Train one run and return its per-step history, checkpoint evaluations, last-step analyses and mask networks.
    `judge=False` skips the MiniLM judge at the last checkpoint (the slowest part of an evaluation); without an
    evaluator (or `eval_steps`) no checkpoint is evaluated, and `analyse` still runs after the last step; `providers`
    replaces the method's default providers (their `settings()` enter the cache key).

    Cached by the run's settings and `identity` (what the run depends on that is not in its settings: the reference,
    the reward, the evaluation, the analyses: an `analyse` with an `identity` attribute is keyed by it) together with
    a hash of the pairs and of the training code."""
    from safetensors.torch import load_file, save_file

    steps = steps or cfg.steps
    probe = train_config(spec, cfg, "", steps, providers)
    settings = {k: getattr(probe, k) for k in probe.__dataclass_fields__ if k not in ("out_dir", "progress", "providers")}
    settings["providers"] = [p.settings() for p in probe.providers or []]
    inputs = {"kind": "sentiment-run", "version": SWEEP_VERSION, "spec": asdict(spec), "train": settings,
              "eval_steps": sorted(eval_steps), "judge": judge, "analysed": getattr(analyse, "identity", analyse is not None), **identity,
              "pairs": pairs_fingerprint(pairs),
              "code": code_fingerprint(*TRAINING_CODE)}

    def build(folder: Path) -> None:
        callback = _RunCallback(evaluator, eval_steps, analyse, judge, last_step=steps)
        policy = copy.deepcopy(reference).requires_grad_(True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train(policy, reference, pairs, train_config(spec, cfg, Path(tmp) / "run", steps, providers),
                           collator=collator, callbacks=[callback])
        total = time.perf_counter() - start
        timing = {"seconds": total, "eval_seconds": callback.eval_seconds, "steps": result.steps,
                  "train_seconds_per_step": (total - callback.eval_seconds) / max(result.steps, 1)}
        (folder / "run.json").write_text(json.dumps({"history": result.history, "evals": callback.evals,
                                                     "analysis": callback.analysis, "timing": timing}, default=float))
        masks = _mask_provider(result.providers)
        if masks is not None:
            save_file({k: v.contiguous() for k, v in masks.state_dict().items()}, folder / "final.safetensors")
            save_file({k: v.contiguous() for k, v in callback.initial_masks.items()}, folder / "initial.safetensors")

    folder = cached_step("sentiment-run", inputs, build)
    data = json.loads((folder / "run.json").read_text())
    masks = {}
    for which in ("initial", "final"):
        path = folder / f"{which}.safetensors"
        masks[which] = load_file(path) if path.exists() else None
    return RunResult(spec, data["history"], data["evals"], data["analysis"], masks["initial"], masks["final"],
                     data["timing"])


def mask_module(result: RunResult, model_config, cfg: SentimentConfig, final: bool = True):
    """The SparsePO mask networks of a run (trained, or as initialised with `final=False`), in eval mode."""
    from tokenpo.providers import SparsePOMasks

    if not result.spec.is_sparsepo:
        raise ValueError(f"run {result.spec.name} has no mask networks")
    mode = "common" if METHODS[result.spec.method][1]["common"] else "independent"
    module = SparsePOMasks.from_model_config(model_config, mode=mode,
                                             **({} if cfg.mixer_init is None else {"mixer_init": cfg.mixer_init}))
    module.load_state_dict(result.final_masks if final else result.initial_masks)
    return module.eval()
