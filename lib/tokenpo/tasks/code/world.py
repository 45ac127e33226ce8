"""What the code runs share: the problems and their train / held-out split, the reference π_ref and its tokenizer,
how a problem becomes a prompt, the pass-vs-fail pairs, the sandbox's verdicts and the pass@k evaluator. One library
call, each stage cached.

Which problems are trained on and which are held out:
* templated (cpu, smoke): pairs and fine-tuning texts come from the training problems only; every held-out problem
  is a (template, constant) never seen in training (its template is, with other constants).
* gpu: pairs from HumanEval (CodeGen-2B's samples and the canonical solutions), pass@k on MBPP — a disjoint set of
  problems and a different benchmark. The instruct model writes whole functions in its chat format
  (`problems.chat_prompt`, `problems.chat_variant`); the pairs' programs are put in the same form. This way round because CodeGen-2B's 200 samples per HumanEval problem give
  pass-vs-fail pairs even where a 135M model rarely passes (on-policy samples of MBPP would leave most problems
  without a passing program), and MBPP's 397 problems give the larger evaluation set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import datasets
import torch

from tokenpo.data.collator import PreferenceCollator
from tokenpo.data.preference import tokenize_pairs
from tokenpo.profiles import Profile

from . import problems as P
from .pipeline import (Executions, PairSet, correct_share_by_template, executed_pairs, sampled_pairs,
                       scratch_reference, sft_texts)
from .runs import PassAtK


@dataclass
class CodeWorld:
    profile: Profile
    seed: int
    train_problems: list
    heldout_problems: list
    tokenizer: Any
    reference: Any
    reference_id: str
    sft_history: list
    prompt_of: Callable
    extra_stop: tuple
    max_new_tokens: int
    pairs: PairSet
    samples: dict                       # the pairs' candidates: task_id -> completions, and their verdicts
    train_set: datasets.Dataset
    collator: PreferenceCollator
    executions: Executions
    stage_seconds: dict = field(default_factory=dict)

    def evaluator(self, seed: int | None = None) -> PassAtK:
        c = self.profile.code
        return PassAtK(self.tokenizer, self.heldout_problems, self.prompt_of, c.eval_samples, c.ks,
                       self.max_new_tokens, c.temperature, self.executions, seed=self.seed + 1234 if seed is None
                       else seed, extra_stop=self.extra_stop, batch_size=c.sample_batch)

    def identity(self, evaluator: PassAtK) -> dict:
        """What a run depends on beyond its own settings (the run cache's key)."""
        return {"reference": self.reference_id, "evaluator": evaluator.identity}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def code_world(profile: Profile, seed: int = 0, progress: Callable[[str], None] | None = None) -> CodeWorld:
    """Build (or load from the cache) the code world of `profile` (see the module docstring)."""
    c = profile.code
    done = progress or (lambda stage: None)
    if c.problems == "templated":
        templates = P.TEMPLATES[:c.templates] if c.templates else P.TEMPLATES
        every = P.templated_problems(c.constants, templates)
        train, heldout = P.split_problems(every, c.heldout_per_template, seed=seed)
        share = correct_share_by_template([t.name for t in templates], c.correct_shares)
        texts = sft_texts(train, c.sft_texts_per_problem, share, seed=seed)
        done("problems")
        tokenizer, reference, reference_id, history = scratch_reference(texts, c, seed=seed)
        unclean = [p.task_id for p in every for comp in (p.solution,) + p.mutants
                   if not P.boundary_is_clean(tokenizer, p.prompt, comp)]
        if unclean:
            raise ValueError(f"prompt/completion token boundary not clean for {unclean[:5]}: sampling would not see "
                             "what fine-tuning taught")
        longest_prompt = max(len(ids) for ids in tokenizer([p.prompt for p in every])["input_ids"])
        max_new = min(c.max_new_tokens, c.n_positions - longest_prompt)
        if max_new < 8:
            raise ValueError(f"prompts of up to {longest_prompt} tokens leave {max_new} of the {c.n_positions} "
                             "positions for the completion")

        def prompt_of(problem):
            return problem.prompt

        extra_stop: tuple = ()
        done("reference")
        executions = Executions({p.task_id: p for p in every}, workers=c.workers, timeout=c.timeout)
        reference.to(_device())
        pairs, samples = sampled_pairs(reference, reference_id, tokenizer, train, c.pair_samples, prompt_of, max_new,
                                       c.temperature, seed, c.pairs_per_problem, executions, batch_size=c.sample_batch)
    elif c.problems == "humaneval-mbpp":
        from tokenpo.models import load_model, load_tokenizer

        training = [P.chat_variant(p, samples) for p, samples in P.humaneval_training_set()]
        train = [p for p, _ in training]
        mbpp = P.mbpp_problems()[:c.eval_problems] if c.eval_problems else P.mbpp_problems()
        heldout = [P.chat_variant(p)[0] for p in mbpp]
        done("problems")
        tokenizer = load_tokenizer(c.reference)
        reference = load_model(c.reference).eval().to(_device())
        reference_id, history, max_new = c.reference, [], c.max_new_tokens
        extra_stop = P.CHAT_STOP

        def prompt_of(problem):
            return P.chat_prompt(tokenizer, problem.shown)

        done("reference")
        executions = Executions({p.task_id: p for p in train + heldout}, workers=c.workers, timeout=c.timeout)
        pairs, samples = executed_pairs(training, prompt_of, c.pairs_per_problem, executions)
    else:
        raise ValueError(f"CodeConfig.problems must be 'templated' or 'humaneval-mbpp', got {c.problems!r}")
    reference.requires_grad_(False)
    if not pairs.rows:
        raise ValueError(f"no pass-vs-fail pair: no training problem has both a passing and a failing candidate "
                         f"({pairs.report})")
    train_set = tokenize_pairs(datasets.Dataset.from_list(pairs.rows), tokenizer, max_length=c.max_length,
                               on_bad_rows="drop")
    pairs.report["pairs after tokenising"] = len(train_set)
    done("pairs")
    return CodeWorld(profile, seed, train, heldout, tokenizer, reference, reference_id, history, prompt_of, extra_stop,
                     max_new, pairs, samples, train_set, PreferenceCollator(tokenizer.pad_token_id), executions)
