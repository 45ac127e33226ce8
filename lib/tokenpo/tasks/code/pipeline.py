"""The stages of the code experiment before the runs: sampling programs, executing them in the sandbox (each distinct
program once), pass-vs-fail preference pairs, and the reference model (fine-tuned on correct and plausible wrong
solutions, for the templated problems). Stages that take time are content-addressed `cached_step`s."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from tokenpo.cache import cached_step, content_hash

from .problems import Problem, truncate

PIPELINE_VERSION = 1


# ---------------------------------------------------------------------------------------------------- execution
def program_key(problem: Problem, completion: str) -> str:
    """The identity of one check: the problem's prompt, test and entry point and the completion."""
    return content_hash([problem.prompt, problem.test, problem.entry_point, completion], 24)


class Executions:
    """Sandbox verdicts of (task_id, completion) samples (`tokenpo.evaluation.check_completions`, HumanEval's check
    program with honest pass verdicts), each distinct program run once and remembered: a small model repeats itself,
    so most samples cost nothing. `statuses` maps a program's key to its status ("passed", "failed", "timeout", ...);
    `known` (such a map saved earlier) pre-fills it."""

    def __init__(self, problems: Mapping[str, Problem], workers: int = 2, timeout: float = 3.0,
                 known: Mapping[str, str] | None = None):
        self.problems, self.workers, self.timeout = dict(problems), workers, timeout
        self.statuses: dict[str, str] = dict(known or {})
        self.executed = 0

    def __call__(self, samples: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each sample passed its problem's tests, in order."""
        from tokenpo.evaluation import check_completions

        keys = [program_key(self.problems[task], completion) for task, completion in samples]
        todo = {}
        for key, sample in zip(keys, samples):
            if key not in self.statuses and key not in todo:
                todo[key] = sample
        if todo:
            problems = {task: self.problems[task].as_dict() for task, _ in todo.values()}
            results = check_completions(problems, list(todo.values()), timeout=self.timeout, workers=self.workers)
            for key, result in zip(todo, results):
                self.statuses[key] = result.status
            self.executed += len(todo)
        return [self.statuses[key] == "passed" for key in keys]

    def status_counts(self, samples: Sequence[tuple[str, str]]) -> dict[str, int]:
        return dict(Counter(self.statuses[program_key(self.problems[t], c)] for t, c in samples))


# ------------------------------------------------------------------------------------------------------ sampling
def sample_completions(model, tokenizer, problems: Sequence[Problem], n: int, prompt_of: Callable[[Problem], str],
                       max_new_tokens: int, temperature: float, seed: int, batch_size: int = 256,
                       extra_stop: Sequence[str] = ()) -> dict[str, list[str]]:
    """`n` sampled completions per problem (temperature `temperature`, no top-k/p; generation ends at EOS or after
    `max_new_tokens`), each cut at the problem's stop strings and `extra_stop`: task_id -> completions."""
    from tokenpo.evaluation import generate_completions

    prompts = [prompt_of(p) for p in problems for _ in range(n)]
    out = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=0, top_p=1.0, seed=seed, batch_size=batch_size, progress=False)
    texts = iter(out.texts)
    return {p.task_id: [truncate(next(texts), tuple(p.stop) + tuple(extra_stop)) for _ in range(n)]
            for p in problems}


# --------------------------------------------------------------------------------------------------------- pairs
@dataclass
class PairSet:
    rows: list[dict]                       # prompt, chosen, rejected, task_id
    report: dict = field(default_factory=dict)


def build_pairs(problems: Sequence[Problem], completions: Mapping[str, Sequence[str]],
                passed: Mapping[str, Sequence[bool]], prompt_of: Callable[[Problem], str],
                per_problem: int) -> PairSet:
    """Pass-vs-fail pairs: for each problem with at least one passing and one failing *distinct* completion (in order
    of first appearance), up to `per_problem` pairs (passing[i mod P], failing[i mod F]) for i = 0, 1, ... < max(P, F),
    so that every distinct program takes part before any repeats. Problems whose samples all pass or all fail give no
    pair (they carry no preference); an empty completion is never used."""
    rows, counts = [], Counter()
    n_samples = n_passed = 0
    for problem in problems:
        texts, verdicts = list(completions[problem.task_id]), list(passed[problem.task_id])
        if len(texts) != len(verdicts):
            raise ValueError(f"{problem.task_id}: {len(texts)} completions but {len(verdicts)} verdicts")
        n_samples += len(texts)
        n_passed += sum(verdicts)
        good = list(dict.fromkeys(t for t, ok in zip(texts, verdicts) if ok and t.strip()))
        bad = list(dict.fromkeys(t for t, ok in zip(texts, verdicts) if not ok and t.strip()))
        counts["all pass" if not bad else "all fail" if not good else "both"] += 1
        if not good or not bad:
            continue
        prompt = prompt_of(problem)
        for i in range(min(per_problem, max(len(good), len(bad)))):
            rows.append({"prompt": prompt, "chosen": good[i % len(good)], "rejected": bad[i % len(bad)],
                         "task_id": problem.task_id})
    report = {"problems": len(problems), "problems with pass and fail": counts["both"],
              "problems all pass": counts["all pass"], "problems all fail": counts["all fail"], "pairs": len(rows),
              "samples": n_samples, "sample pass rate": n_passed / max(n_samples, 1)}
    return PairSet(rows, report)


def sampled_pairs(reference, reference_id: str, tokenizer, problems: Sequence[Problem], n: int,
                  prompt_of: Callable[[Problem], str], max_new_tokens: int, temperature: float, seed: int,
                  per_problem: int, executions: Executions, extra_stop: Sequence[str] = (),
                  batch_size: int = 256) -> tuple[PairSet, dict]:
    """Samples of the reference on `problems`, executed, made into pairs (`build_pairs`); cached by the reference,
    problems and settings. Returns the pairs and the samples (task_id -> completions and verdicts)."""
    inputs = {"kind": "code-pairs", "version": PIPELINE_VERSION, "reference": reference_id,
              "problems": content_hash([[p.prompt, p.test, p.entry_point, p.stop] for p in problems]),
              "prompt": content_hash([prompt_of(p) for p in problems]), "n": n, "max_new_tokens": max_new_tokens,
              "temperature": temperature, "seed": seed, "extra_stop": list(extra_stop), "batch_size": batch_size}

    pairs, data = _executed_pairs("code-pairs", inputs, problems, prompt_of, per_problem, executions, lambda: (
        sample_completions(reference, tokenizer, problems, n, prompt_of, max_new_tokens, temperature, seed,
                           batch_size=batch_size, extra_stop=extra_stop)))
    pairs.report["distinct completions per problem"] = float(np.mean([len(set(c))
                                                                      for c in data["completions"].values()]))
    return pairs, data


def executed_pairs(problems_with_samples: Sequence[tuple[Problem, Sequence[str]]], prompt_of, per_problem: int,
                   executions: Executions, include_solution: bool = True) -> tuple[PairSet, dict]:
    """Pairs from samples given with the problems (the gpu profile: CodeGen-2B's samples of HumanEval), executed in
    the sandbox; with `include_solution` the canonical solution joins the candidates when it passes (so a problem
    that no sample solves still gives pairs). Cached by the problems and samples."""
    problems = [p for p, _ in problems_with_samples]
    inputs = {"kind": "code-executed-samples", "version": PIPELINE_VERSION,
              "samples": content_hash([[p.prompt, p.test, p.entry_point, p.solution, list(s)]
                                       for p, s in problems_with_samples]), "include_solution": include_solution}

    return _executed_pairs("code-executed-samples", inputs, problems, prompt_of, per_problem, executions, lambda: {
        p.task_id: ([p.solution] if include_solution and p.solution else []) + list(s)
        for p, s in problems_with_samples})


def _executed_pairs(kind: str, inputs: dict, problems: Sequence[Problem], prompt_of, per_problem: int,
                    executions: Executions, completions_of: Callable[[], dict[str, list[str]]]) -> tuple[PairSet, dict]:
    """The completions that `completions_of()` gives (task_id -> programs), executed and made into pairs; the
    completions and verdicts are cached as step `kind` by `inputs`."""
    def build(folder: Path) -> None:
        completions = completions_of()
        samples = [(task, c) for task, cs in completions.items() for c in cs]
        verdicts = executions(samples)
        (folder / "samples.json").write_text(json.dumps({
            "completions": completions, "passed": _regroup(samples, verdicts),
            "statuses": executions.status_counts(samples)}))

    data = json.loads((cached_step(kind, inputs, build) / "samples.json").read_text())
    pairs = build_pairs(problems, data["completions"], data["passed"], prompt_of, per_problem)
    pairs.report["statuses"] = data["statuses"]
    return pairs, data


def _regroup(samples: Sequence[tuple[str, str]], values: Sequence) -> dict[str, list]:
    out: dict[str, list] = {}
    for (task, _), value in zip(samples, values):
        out.setdefault(task, []).append(value)
    return out


# -------------------------------------------------------------------------------------------- the reference model
def sft_texts(problems: Sequence[Problem], per_problem: int, correct_share: Callable[[Problem], float],
              seed: int) -> list[str]:
    """Fine-tuning texts: `per_problem` texts per problem, prompt + completion, where a seeded draw makes the
    completion the canonical one with probability `correct_share(problem)` and one of its mutants (uniformly)
    otherwise — so the fine-tuned model writes both passing and failing programs."""
    rng = np.random.default_rng(seed)
    texts = []
    for p in problems:
        for _ in range(per_problem):
            ok = rng.random() < correct_share(p) or not p.mutants
            texts.append(p.prompt + (p.solution if ok else p.mutants[rng.integers(len(p.mutants))]))
    return texts


def correct_share_by_template(templates: Sequence[str], shares: Sequence[float]) -> Callable[[Problem], float]:
    """Templates take the shares in turn (template i gets shares[i mod len]): some are mostly solved, some rarely,
    so that pass@k at larger k has room to differ from pass@1."""
    table = {name: shares[i % len(shares)] for i, name in enumerate(dict.fromkeys(templates))}
    return lambda problem: table[problem.template]


def scratch_reference(texts: Sequence[str], cfg, seed: int = 0, progress: bool = False) -> tuple:
    """(tokenizer, π_ref, identity, history) for the templated problems: a byte-level BPE of `cfg.vocab_size` trained
    on `texts`, a GPT-2 of `cfg.n_layer` x `cfg.n_embd` initialised with `seed`, trained on the texts with
    `tokenpo.training.sft` (each text, then EOS, from position 0: exactly what sampling after a prompt sees) for
    `cfg.sft_steps` steps. Cached by the texts, the sizes and the seed."""
    from transformers import GPT2LMHeadModel

    from tokenpo.models import gpt2_config, load_model, load_tokenizer, train_tokenizer
    from tokenpo.profiles import WorldConfig
    from tokenpo.training.sft import SFTConfig, sft
    from tokenpo.utils import set_seed

    sizes = WorldConfig(corpora=(), max_texts_per_corpus=None, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                        n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_positions, batch_size=cfg.sft_batch_size,
                        lr=cfg.sft_lr, min_lr_ratio=0.0, warmup_steps=0, max_steps=cfg.sft_steps, max_minutes=None)
    config = SFTConfig(learning_rate=cfg.sft_lr, max_steps=cfg.sft_steps, batch_size=cfg.sft_batch_size,
                       max_length=cfg.n_positions, warmup_steps=max(1, cfg.sft_steps // 12), heldout_fraction=0.02,
                       seed=seed, progress=progress)
    inputs = {"kind": "code-reference", "version": PIPELINE_VERSION, "texts": content_hash(list(texts)),
              "vocab_size": cfg.vocab_size, "model": {k: getattr(sizes, k) for k in ("n_layer", "n_embd", "n_head",
                                                                                       "n_positions")},
              "sft": {k: v for k, v in vars(config).items() if k != "progress"}, "seed": seed}

    def build(folder: Path) -> None:
        tokenizer = train_tokenizer(list(texts), cfg.vocab_size, folder / "tokenizer")
        set_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(sizes, tokenizer))
        history: list = []
        model = sft(model, tokenizer, texts, config, history=history)
        model.save_pretrained(folder / "model")
        (folder / "history.json").write_text(json.dumps(history))

    folder = cached_step("code-reference", inputs, build)
    return (load_tokenizer(folder / "tokenizer"), load_model(folder / "model").eval(), folder.name,
            json.loads((folder / "history.json").read_text()))
