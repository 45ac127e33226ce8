"""The sentiment world every experiment notebook starts from (02 sentiment control, 03 SePO, 04 FPO): the data
splits and prompts, the reference π_ref, the additive reward and the judges, the preference pairs, the held-out sets
with known key tokens, and the checkpoint evaluator with its reference anchor. Each stage is a cached step, so the
second notebook to ask for the world loads it in seconds; the numbers are those of notebook 02."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from tokenpo.cache import cached_step, code_fingerprint, content_hash, weights_fingerprint
from tokenpo.data import load_sentiment_rows
from tokenpo.data.collator import PreferenceCollator
from tokenpo.data.preference import tokenize_pairs
from tokenpo.evaluation.scorers import VaderSentiment
from tokenpo.models import base_model, load_model, load_tokenizer
from tokenpo.profiles import Profile
from tokenpo.training.sft import SFTConfig

from .data import PairSet, Splits, make_prompts, planted_pairs, split_rows
from .pipeline import reference_model, sample_pairs
from .reward import LexiconReward, cached_classifier, cached_lexicon_reward
from .sweep import CheckpointEvaluator


@dataclass
class SentimentWorld:
    """Everything the sentiment experiments share (see the module docstring)."""

    profile: Profile
    seed: int
    splits: Splits
    train_prompts: list[str]
    heldout_prompts: list[str]
    eval_prompts: list[str]
    tokenizer: Any
    reference: Any
    reference_id: str
    sft_history: list[dict]
    reward: LexiconReward
    judge: Callable
    judge_id: str
    judge_report: dict
    vader: Callable
    train_pairs: PairSet
    heldout_pairs: PairSet
    train_set: datasets.Dataset
    heldout_set: datasets.Dataset
    planted_set: datasets.Dataset
    collator: PreferenceCollator
    _analysis: tuple | None = field(default=None, repr=False)

    def evaluator(self, reference=None, tokenizer=None) -> CheckpointEvaluator:
        """Fresh fixed-length samples on the evaluation prompts, scored by the reward and the judges; KL to
        `reference` (default: the world's)."""
        return CheckpointEvaluator(reference or self.reference, tokenizer or self.tokenizer, self.eval_prompts,
                                   self.reward, self.vader, self.judge, self.profile.sentiment.new_tokens,
                                   seed=self.seed + 99)

    def anchor(self, model=None, tokenizer=None) -> dict:
        """A reference evaluated on `anchor_samples` fresh samples (every evaluation prompt several times): the
        frontier's anchor at KL 0. Cached by the model's weights and the evaluation."""
        s = self.profile.sentiment
        repeats = max(1, s.anchor_samples // len(self.eval_prompts))
        model = model or self.reference
        evaluator = self.evaluator(model, tokenizer)
        inputs = {"kind": "sentiment-anchor", "model": weights_fingerprint(model.state_dict()),
                  "evaluator": evaluator.identity, "judge": self.judge_id, "repeats": repeats, "seed": self.seed + 7,
                  "code": code_fingerprint("tasks/sentiment", "evaluation")}

        def build(folder: Path) -> None:
            row = evaluator(model, with_judge=True, prompts=self.eval_prompts * repeats, seed=self.seed + 7)
            (folder / "anchor.json").write_text(json.dumps(row, default=float))

        return json.loads((cached_step("sentiment-anchor", inputs, build) / "anchor.json").read_text())

    def analysis(self):
        """(labelled held-out sets, the per-run `analyse` function) — the same for every notebook, so that runs shared
        between notebooks are one cached run: "sampled" = the held-out pairs with the reward's key tokens, "planted" =
        the planted pairs with their swapped tokens (`tokenpo.tasks.sentiment.alignment`)."""
        if self._analysis is None:
            from . import alignment

            labelled = {"sampled": (alignment.ReferenceStates(self.reference, self.heldout_set, self.collator),
                                    alignment.key_token_labels(self.heldout_set, self.tokenizer, self.reward)),
                        "planted": (alignment.ReferenceStates(self.reference, self.planted_set, self.collator),
                                    alignment.planted_labels(self.planted_set))}
            s = self.profile.sentiment
            mask_kwargs = {} if s.mixer_init is None else {"mixer_init": s.mixer_init}
            self._analysis = labelled, alignment.run_analysis(labelled, self.reference.config, mask_kwargs)
        return self._analysis

    def identity(self, evaluator: CheckpointEvaluator) -> dict:
        """What a run of this world depends on beyond its own settings (the run cache's key)."""
        return {"reference": self.reference_id, "reward": self.reward.identity, "judge": self.judge_id,
                "evaluator": evaluator.identity, "task_code": code_fingerprint("tasks/sentiment"),
                "analysis": content_hash([list(self.heldout_set["chosen_ids"]), list(self.planted_set["chosen_ids"])])}


def sentiment_world(profile: Profile, seed: int = 0, progress: Callable[[str], None] | None = None) -> SentimentWorld:
    """Build (or load from the cache) the sentiment world of `profile`. `progress(stage)` is called after each
    stage (e.g. to print its wall time)."""
    s = profile.sentiment
    done = progress or (lambda stage: None)
    rows = load_sentiment_rows()
    splits = split_rows(rows, n_test=s.classifier_test_texts, n_pool=int(0.2 * len(rows)), seed=seed)
    prompts = make_prompts([r.text for r in splits.pool], s.prompt_words)
    n_train, n_held, n_eval = s.train_prompts, s.heldout_pairs * 2, s.eval_prompts
    eval_prompts = prompts[n_train + n_held:n_train + n_held + n_eval]
    if len(eval_prompts) != n_eval:
        raise ValueError(f"only {len(prompts)} prompts in the pool; the profile needs {n_train + n_held + n_eval}")
    done("data")

    if s.reference_hub:  # paper profile: the paper's SFT model by hub id
        tokenizer, reference = load_tokenizer(s.reference_hub), load_model(s.reference_hub).eval()
        reference_id, sft_history = s.reference_hub, []
    else:
        base_tokenizer, base = base_model(profile)
        config = SFTConfig(learning_rate=s.sft_lr, max_steps=s.sft_steps, batch_size=s.sft_batch_size,
                           max_length=s.max_length, warmup_steps=max(1, s.sft_steps // 10), heldout_fraction=0.02,
                           seed=seed, progress=False)
        tokenizer, reference, folder, sft_history = reference_model(base_tokenizer, base,
                                                                    [r.text for r in splits.train], config)
        reference_id = folder.name
    reference.requires_grad_(False)
    done("reference SFT")

    reward = cached_lexicon_reward(splits.train, splits.test, c=s.lexicon_c, seed=seed)
    if s.classifier_hub:  # paper profile: the paper's classifier by hub id
        from tokenpo.evaluation.scorers import ClassifierSentiment

        judge, judge_id, judge_report = ClassifierSentiment(s.classifier_hub), s.classifier_hub, {}
    else:
        judge, judge_report = cached_classifier(splits.train, splits.test, max_train=s.classifier_train_texts,
                                                seed=seed)
        judge_id = judge.identity
    done("reward and judges")

    def pairs_for(prompt_list, sampling_seed):
        return sample_pairs(reference, tokenizer, prompt_list, reward, reward.identity, s.samples_per_prompt,
                            s.new_tokens, reference_id, min_gap=s.min_reward_gap, seed=sampling_seed)

    train_prompts, heldout_prompts = prompts[:n_train], prompts[n_train:n_train + n_held]
    train_pairs, heldout_pairs = pairs_for(train_prompts, seed), pairs_for(heldout_prompts, seed + 1)
    heldout_pairs.rows = heldout_pairs.rows[:s.heldout_pairs]
    tokenized = [tokenize_pairs(datasets.Dataset.from_list(p.rows), tokenizer, max_length=s.max_length)
                 for p in (train_pairs, heldout_pairs)]
    planted = planted_pairs(tokenizer, [r.text for r in splits.pool], s.prompt_words, s.max_length,
                            limit=s.planted_heldout_pairs)
    planted_set = tokenize_pairs(datasets.Dataset.from_list(planted), tokenizer, max_length=s.max_length)
    done("pairs")
    return SentimentWorld(profile, seed, splits, train_prompts, heldout_prompts, eval_prompts, tokenizer, reference,
                          reference_id, sft_history, reward, judge, judge_id, judge_report, VaderSentiment(),
                          train_pairs, heldout_pairs, tokenized[0], tokenized[1], planted_set,
                          PreferenceCollator(tokenizer.pad_token_id))


def pair_report(pairs: PairSet, vader: Callable) -> dict:
    """The pairs' report plus the "!" rate of each side and how often VADER prefers the chosen completion."""
    chosen, rejected = [r["chosen"] for r in pairs.rows], [r["rejected"] for r in pairs.rows]
    return {**pairs.report, "'!' in chosen": float(np.mean(["!" in t for t in chosen])),
            "'!' in rejected": float(np.mean(["!" in t for t in rejected])),
            "VADER prefers chosen": float(np.mean(vader(chosen) > vader(rejected)))}
