"""The runs of the code experiment: each (method, β, seed) trained on the same pass-vs-fail pairs with
`tokenpo.training.train`, then evaluated once, at its last step, by pass@k on held-out problems (fresh samples,
executed in the sandbox, the unbiased estimator). The run, not the sample, is the unit the verdicts use; every run
samples with the same seed (common random numbers), so methods are compared on the same random draws. Each run is a
cached step keyed by its settings, the reference, the pairs, the evaluation and the training code."""
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
from tokenpo.tasks.sentiment.sweep import METHODS, LoggedRun, RunSpec, _mask_provider, pairs_fingerprint
from tokenpo.training import TrainConfig, train

from .pipeline import Executions, sample_completions
from .problems import Problem

CODE_RUN_VERSION = 1
METHOD_ORDER = ("dpo", "tdpo1", "simpo", "mapo", "sparsepo_common", "sparsepo_independent")


def code_specs(cfg) -> list[RunSpec]:
    """Every pre-registered (method, β) of `cfg.runs` and SimPO at `cfg.simpo`, each with seeds 1..`cfg.seeds`."""
    specs = [RunSpec(m, b, seed=s) for m, betas in cfg.runs for b in betas for s in range(1, cfg.seeds + 1)]
    specs += [RunSpec("simpo", cfg.simpo[0], seed=s, gamma=cfg.simpo[1]) for s in range(1, cfg.seeds + 1)]
    return specs


def train_config(spec: RunSpec, cfg, out_dir: str | Path) -> TrainConfig:
    """The run's `TrainConfig`: constant learning rate after a short warm-up, `cfg.steps` steps of `cfg.batch_size`
    pairs; SparsePO's mask networks with their own learning rate (`cfg.mask_lr`) and mixer init."""
    objective, fixed = METHODS[spec.method]
    hparams = {"beta": spec.beta, **fixed}
    if spec.gamma is not None:
        hparams["gamma"] = spec.gamma
    kwargs = {}
    if objective == "sparsepo":
        from tokenpo.providers import SparsePOMasks

        hparams.update(l1_reward=cfg.l1, l1_kl=cfg.l1)
        kwargs = dict(provider_learning_rate=cfg.mask_lr,
                      providers=[SparsePOMasks(**({} if cfg.mixer_init is None else {"mixer_init": cfg.mixer_init}))])
    if objective == "sepo":
        raise ValueError("SePO needs oracle scores; the code experiment does not run it")
    return TrainConfig(method=objective, hparams=hparams, learning_rate=cfg.lr, schedule="constant",
                       warmup_steps=cfg.warmup_steps, max_steps=cfg.steps, batch_size=cfg.batch_size, seed=spec.seed,
                       cpu=not torch.cuda.is_available(), progress=False, save_final=False, out_dir=out_dir,
                       chunk_size=cfg.chunk_size, save_every=None,
                       mixed_precision=cfg.mixed_precision if torch.cuda.is_available() else "no", **kwargs)


class PassAtK:
    """pass@k of a policy on held-out problems: `n` samples per problem (temperature `temperature`, no top-k/p, the
    same `seed` for every policy), cut at the problems' stop strings, executed in the sandbox (each distinct program
    once, `executions`), and the unbiased estimator 1 − C(n−c, k)/C(n, k) averaged over problems."""

    def __init__(self, tokenizer, problems: Sequence[Problem], prompt_of: Callable[[Problem], str], n: int,
                 ks: Sequence[int], max_new_tokens: int, temperature: float, executions: Executions, seed: int = 1234,
                 extra_stop: Sequence[str] = (), batch_size: int = 256):
        if max(ks) > n:
            raise ValueError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem, got n = {n}")
        self.tokenizer, self.problems, self.prompt_of = tokenizer, list(problems), prompt_of
        self.n, self.ks, self.max_new_tokens, self.temperature = n, tuple(ks), max_new_tokens, temperature
        self.executions, self.seed, self.extra_stop, self.batch_size = executions, seed, tuple(extra_stop), batch_size

    @property
    def identity(self) -> str:
        return content_hash([[self.prompt_of(p), p.prompt, p.test, p.entry_point, p.stop] for p in self.problems]
                            + [self.n, self.ks, self.max_new_tokens, self.temperature, self.seed, self.extra_stop,
                               self.batch_size])

    def __call__(self, policy) -> dict:
        from tokenpo.evaluation import estimate_pass_at_k

        start = time.perf_counter()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(policy.parameters()).is_cuda)
        with autocast:
            completions = sample_completions(policy, self.tokenizer, self.problems, self.n, self.prompt_of,
                                             self.max_new_tokens, self.temperature, self.seed, self.batch_size,
                                             self.extra_stop)
        sampled = time.perf_counter() - start
        samples = [(task, c) for task, cs in completions.items() for c in cs]
        before = self.executions.executed
        verdicts = self.executions(samples)
        correct: dict[str, int] = {}
        for (task, _), ok in zip(samples, verdicts):
            correct[task] = correct.get(task, 0) + int(ok)
        n = np.full(len(self.problems), self.n)
        c = np.array([correct[p.task_id] for p in self.problems])
        row = {f"pass@{k}": float(estimate_pass_at_k(n, c, k).mean()) for k in self.ks}
        row.update({"n": self.n, "problems": len(self.problems), "correct": {p.task_id: int(correct[p.task_id])
                                                                             for p in self.problems},
                    "distinct": float(np.mean([len(set(cs)) for cs in completions.values()])),
                    "statuses": self.executions.status_counts(samples), "programs_run": self.executions.executed - before,
                    "sample_seconds": sampled, "execute_seconds": time.perf_counter() - start - sampled,
                    "examples": {p.task_id: completions[p.task_id][:4] for p in self.problems[:6]}})
        return row


@dataclass
class CodeRunResult(LoggedRun):
    spec: RunSpec
    history: list[dict]
    evaluation: dict
    final_masks: dict | None = None
    timing: dict = field(default_factory=dict)


def code_run(spec: RunSpec, reference, pairs, cfg, evaluator: PassAtK, identity: dict, collator) -> CodeRunResult:
    """Train one run from `reference` on `pairs` and evaluate its last step with `evaluator`. Cached by the run's
    settings, `identity` (the reference and the evaluation), a hash of the pairs and of the training code."""
    from safetensors.torch import load_file, save_file

    probe = train_config(spec, cfg, "")
    settings = {k: getattr(probe, k) for k in probe.__dataclass_fields__ if k not in ("out_dir", "progress", "providers")}
    settings["providers"] = [p.settings() for p in probe.providers or []]
    inputs = {"kind": "code-run", "version": CODE_RUN_VERSION, "spec": asdict(spec), "train": settings, **identity,
              "evaluation": evaluator.identity, "pairs": pairs_fingerprint(pairs),
              "code": code_fingerprint(*TRAINING_CODE)}

    def build(folder: Path) -> None:
        policy = copy.deepcopy(reference).requires_grad_(True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train(policy, reference, pairs, train_config(spec, cfg, Path(tmp) / "run"), collator=collator)
        trained = time.perf_counter() - start
        evaluation = evaluator(result.policy)
        timing = {"train_seconds": trained, "train_seconds_per_step": trained / max(result.steps, 1),
                  "eval_seconds": time.perf_counter() - start - trained, "steps": result.steps}
        (folder / "run.json").write_text(json.dumps({"history": result.history, "evaluation": evaluation,
                                                     "timing": timing}, default=float))
        masks = _mask_provider(result.providers)
        if masks is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in masks.state_dict().items()},
                      folder / "final.safetensors")

    folder = cached_step("code-run", inputs, build)
    data = json.loads((folder / "run.json").read_text())
    path = folder / "final.safetensors"
    return CodeRunResult(spec, data["history"], data["evaluation"], load_file(path) if path.exists() else None,
                         data["timing"])


def mask_module(result: CodeRunResult, model_config, cfg):
    """The trained SparsePO mask networks of a run, in eval mode."""
    from tokenpo.providers import SparsePOMasks

    if result.final_masks is None:
        raise ValueError(f"run {result.spec.name} has no mask networks")
    mode = "common" if METHODS[result.spec.method][1]["common"] else "independent"
    module = SparsePOMasks.from_model_config(model_config, mode=mode,
                                             **({} if cfg.mixer_init is None else {"mixer_init": cfg.mixer_init}))
    module.load_state_dict(result.final_masks)
    return module.eval()
