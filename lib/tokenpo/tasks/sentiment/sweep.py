"""The sweep: every method × β (and extra SparsePO mask seeds) trained on the same pairs with `tokenpo.train.train`,
each run evaluated at several checkpoints on fresh samples from held-out prompts (reward, VADER, sequence KL), so
that every run is a curve on the reward-vs-KL plane. Each run is a cached step (history, evaluations, masks)."""
from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from tokenpo.cache import TRAINING_CODE, cached_step, code_fingerprint, content_hash
from tokenpo.profiles import SentimentConfig
from tokenpo.training import TrainConfig, train

SWEEP_VERSION = 1
METHODS = {  # label -> (objective, fixed hyper-parameters)
    "dpo": ("dpo", {}), "tdpo1": ("tdpo1", {}), "tdpo2": ("tdpo2", {}), "simpo": ("simpo", {}),
    "mapo": ("mapo", {}), "sparsepo_common": ("sparsepo", {"common": True}),
    "sparsepo_independent": ("sparsepo", {"common": False}),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run. `mask_settings`: "ours" (the profile's mask knobs) or "official" (the official code's:
    policy lr for the masks, default mixer init, no freeze or warm-up). `data`: "sampled" or "planted" pairs."""

    method: str
    beta: float
    seed: int = 0
    mask_settings: str = "ours"
    data: str = "sampled"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method label {self.method!r}; known: {sorted(METHODS)}")
        if self.mask_settings not in ("ours", "official") or self.data not in ("sampled", "planted"):
            raise ValueError(f"RunSpec {self}: mask_settings must be ours|official and data sampled|planted")

    @property
    def name(self) -> str:
        extra = "" if self.mask_settings == "ours" else "-official"
        extra += "" if self.data == "sampled" else "-planted"
        return f"{self.method}-b{self.beta:g}-s{self.seed}{extra}"

    @property
    def is_sparsepo(self) -> bool:
        return METHODS[self.method][0] == "sparsepo"


def sweep_specs(cfg: SentimentConfig) -> list[RunSpec]:
    """Every method at every β (seed 0); SparsePO variants at `mask_seed_beta` with seeds 1..mask_seeds-1; the
    official-mask-settings ablation; the planted-token runs (SparsePO common and independent)."""
    specs = [RunSpec(m, b) for m, betas in cfg.betas for b in betas]
    sparse = [m for m, _ in cfg.betas if m.startswith("sparsepo")]
    specs += [RunSpec(m, cfg.mask_seed_beta, seed=s) for m in sparse for s in range(1, cfg.mask_seeds)]
    if cfg.official_mask_ablation:
        specs += [RunSpec(m, cfg.mask_seed_beta, mask_settings="official") for m in sparse]
    specs += [RunSpec(m, cfg.planted_beta, data="planted") for m in sparse]
    return specs


def train_config(spec: RunSpec, cfg: SentimentConfig, out_dir: str | Path, steps: int) -> TrainConfig:
    objective, fixed = METHODS[spec.method]
    hparams = {"beta": spec.beta, **fixed}
    if objective == "simpo":
        hparams["gamma"] = cfg.simpo_gamma
    kwargs = {}
    if objective == "sparsepo":
        from tokenpo.providers import SparsePOMasks

        hparams.update(l1_reward=cfg.l1, l1_kl=cfg.l1)
        if spec.mask_settings == "ours":
            kwargs = dict(provider_learning_rate=cfg.mask_lr, provider_freeze_steps=cfg.mask_freeze_steps,
                          provider_warmup_steps=cfg.mask_warmup_steps,
                          providers=[SparsePOMasks(**({} if cfg.mixer_init is None else {"mixer_init": cfg.mixer_init}))])
    # use_reference and log_kl also for SimPO: its loss ignores the reference, but the KL it logs feeds the KL figure
    return TrainConfig(method=objective, hparams=hparams, use_reference=True, log_kl=True, learning_rate=cfg.lr,
                       schedule="constant", warmup_steps=cfg.warmup_steps, max_steps=steps,
                       batch_size=cfg.batch_size, seed=spec.seed, cpu=not torch.cuda.is_available(),
                       progress=False, save_final=False, out_dir=out_dir, **kwargs)


# ----------------------------------------------------------------------------------------------- evaluation
class CheckpointEvaluator:
    """Fresh samples of a policy on held-out prompts (same sampling seed at every checkpoint: common random numbers
    make checkpoints comparable), scored by the reward classifier and VADER; exact sequence KL(π_θ‖π_ref)."""

    def __init__(self, reference, tokenizer, prompts: Sequence[str], reward: Callable, vader: Callable,
                 max_new_tokens: int, seed: int = 1234, batch_size: int = 32):
        self.reference, self.tokenizer, self.prompts = reference, tokenizer, list(prompts)
        self.reward, self.vader = reward, vader
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size

    @property
    def identity(self) -> str:
        return content_hash([self.prompts, self.max_new_tokens, self.seed])

    def __call__(self, policy) -> dict:
        from tokenpo.evaluation import generate_completions, mean_ci, sequence_kl

        out = generate_completions(policy, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                   temperature=1.0, top_k=0, top_p=1.0, seed=self.seed, batch_size=self.batch_size,
                                   progress=False)
        reward, vader = np.asarray(self.reward(out.texts)), np.asarray(self.vader(out.texts))
        kl = sequence_kl(policy, self.reference, out, batch_size=self.batch_size)
        row = {"n": len(out.texts), "length": float(kl.lengths.mean()), "finished": float(np.mean(out.finished)),
               "kl_sampled": float(kl.sampled.mean()),
               "kl_per_token": float(kl.exact.sum() / max(kl.lengths.sum(), 1)), "samples": out.texts[:4]}
        for name, values in (("reward", reward), ("vader", vader), ("kl", kl.exact)):
            ci = mean_ci(values)
            row.update({name: ci.mean, f"{name}_lo": ci.low, f"{name}_hi": ci.high})
        return row


class _CheckpointCallback:
    def __init__(self, evaluator: CheckpointEvaluator | None, steps: Sequence[int]):
        self.evaluator, self.steps = evaluator, set(steps)
        self.evals: list[dict] = []
        self.initial_masks: dict | None = None
        self.eval_seconds = 0.0

    def on_train_begin(self, policy, providers) -> None:
        masks = _mask_provider(providers)
        if masks is not None:
            self.initial_masks = {k: v.detach().clone() for k, v in masks.state_dict().items()}

    def on_step_end(self, step, metrics, policy, providers) -> None:
        if self.evaluator is not None and step in self.steps:
            start = time.perf_counter()
            self.evals.append({"step": step, **self.evaluator(policy)})
            self.eval_seconds += time.perf_counter() - start


def pairs_fingerprint(pairs) -> str:
    """The identity of tokenised pairs: a hash of every row's token ids (and per-token columns)."""
    keys = sorted(k for k in pairs[0] if k.endswith("_ids") or k == "swapped")
    return content_hash([[list(row[k]) for k in keys] for row in pairs])


def _mask_provider(providers):
    """The SparsePO mask networks among a run's providers, or None."""
    from tokenpo.providers import SparsePOMasks

    return next((p for p in providers if isinstance(p, SparsePOMasks)), None)


# -------------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    spec: RunSpec
    history: list[dict]
    evals: list[dict]
    initial_masks: dict | None = None        # SparsePO mask networks' state before / after training
    final_masks: dict | None = None
    timing: dict = field(default_factory=dict)

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in self.history if r.get(metric) is not None]
        return np.array([r["step"] for r in rows]), np.array([r[metric] for r in rows], dtype=float)

    def late_mean(self, metric: str, share: float = 0.2) -> float:
        """Mean of a logged metric over the last `share` of the steps (smooths batch noise)."""
        _, values = self.curve(metric)
        if values.size == 0:
            return float("nan")
        return float(values[-max(1, int(round(share * values.size))):].mean())

    def mask_module(self, model_config, cfg: SentimentConfig, final: bool = True):
        """The SparsePO mask networks (trained, or as initialised with `final=False`), in eval mode."""
        from tokenpo.providers import SparsePOMasks

        if not self.spec.is_sparsepo:
            raise ValueError(f"run {self.spec.name} has no mask networks")
        kwargs = {"mixer_init": cfg.mixer_init} if self.spec.mask_settings == "ours" and cfg.mixer_init is not None \
            else {}
        mode = "common" if METHODS[self.spec.method][1]["common"] else "independent"
        module = SparsePOMasks.from_model_config(model_config, mode=mode, **kwargs)
        module.load_state_dict(self.final_masks if final else self.initial_masks)
        return module.eval()


def run(spec: RunSpec, reference, pairs, cfg: SentimentConfig, evaluator: CheckpointEvaluator | None,
        identity: dict, collator, steps: int | None = None, eval_steps: Sequence[int] = ()) -> RunResult:
    """Train one run (cached by `identity` — the reference, pairs and evaluator it depends on — plus its settings)
    and return its per-step history, checkpoint evaluations and mask networks."""
    from safetensors.torch import load_file, save_file

    steps = steps or cfg.steps
    probe = train_config(spec, cfg, "", steps)
    settings = {k: getattr(probe, k) for k in probe.__dataclass_fields__ if k not in ("out_dir", "progress", "providers")}
    settings["providers"] = [p.settings() for p in probe.providers or []]
    inputs = {"kind": "sentiment-run", "version": SWEEP_VERSION, "spec": asdict(spec), "train": settings,
              "eval_steps": sorted(eval_steps), **identity, "pairs": pairs_fingerprint(pairs),
              "code": code_fingerprint(*TRAINING_CODE)}

    def build(folder: Path) -> None:
        callback = _CheckpointCallback(evaluator, eval_steps)
        policy = copy.deepcopy(reference).requires_grad_(True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train(policy, reference, pairs, train_config(spec, cfg, Path(tmp) / "run", steps),
                           collator=collator, callbacks=[callback])
        total = time.perf_counter() - start
        timing = {"seconds": total, "eval_seconds": callback.eval_seconds, "steps": result.steps,
                  "train_seconds_per_step": (total - callback.eval_seconds) / max(result.steps, 1)}
        (folder / "run.json").write_text(json.dumps({"history": result.history, "evals": callback.evals,
                                                     "timing": timing}, default=float))
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
    return RunResult(spec, data["history"], data["evals"], masks["initial"], masks["final"], data["timing"])
