"""The cached stages before the sweep: the reference model (SFT on opinion texts) and the preference pairs sampled
from it. Each stage is a content-addressed `cached_step`: a rerun with the same inputs loads in seconds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from tokenpo.cache import cached_step, content_hash, weights_fingerprint
from tokenpo.models import load_model, load_tokenizer
from tokenpo.training.sft import SFTConfig, sft

from .data import PairSet, build_pairs

PIPELINE_VERSION = 2


def model_fingerprint(model: torch.nn.Module) -> str:
    """The identity of a model's weights (see :func:`tokenpo.cache.weights_fingerprint`)."""
    return weights_fingerprint(model.state_dict())


def reference_model(base_tokenizer, base_model, texts: Sequence[str], config: SFTConfig):
    """(tokenizer, π_ref, folder, history): the base model fine-tuned on `texts` with `config`, cached; the folder
    name identifies the reference for later stages."""
    inputs = {"kind": "sentiment-reference", "version": PIPELINE_VERSION, "base": model_fingerprint(base_model),
              "texts": content_hash(list(texts)), "config": {k: v for k, v in vars(config).items() if k != "progress"}}

    def build(folder: Path) -> None:
        import copy

        history: list = []
        model = sft(copy.deepcopy(base_model), base_tokenizer, texts, config, history=history)
        model.save_pretrained(folder / "model")
        base_tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "history.json").write_text(json.dumps(history))

    folder = cached_step("sentiment-reference", inputs, build)
    return (load_tokenizer(folder / "tokenizer"), load_model(folder / "model").eval(), folder,
            json.loads((folder / "history.json").read_text()))


def sample_pairs(reference, tokenizer, prompts: Sequence[str], reward: Callable, reward_id: str, samples: int,
                 new_tokens: int, reference_id: str, min_gap: float = 0.0, seed: int = 0,
                 batch_size: int = 64) -> PairSet:
    """`samples` fixed-length continuations of every prompt from the reference (temperature 1, no top-k/p, no early
    EOS), scored by `reward`; the best and the worst become a pair when their rewards differ by more than `min_gap`
    (`build_pairs`). Cached by reference, prompts, reward and settings."""
    from tokenpo.evaluation import generate_completions

    inputs = {"kind": "sentiment-pairs", "version": PIPELINE_VERSION, "reference": reference_id,
              "reward": reward_id, "prompts": content_hash(list(prompts)), "samples": samples,
              "new_tokens": new_tokens, "seed": seed}

    def build(folder: Path) -> None:
        repeated = [p for p in prompts for _ in range(samples)]
        out = generate_completions(reference, tokenizer, repeated, max_new_tokens=new_tokens, temperature=1.0,
                                   top_k=0, top_p=1.0, seed=seed, batch_size=batch_size, fixed_length=True,
                                   progress=False)
        scores = reward(out.texts).tolist()
        texts = [out.texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]
        rewards = [scores[i * samples:(i + 1) * samples] for i in range(len(prompts))]
        (folder / "samples.json").write_text(json.dumps({"prompts": list(prompts), "texts": texts,
                                                         "rewards": rewards}))

    folder = cached_step("sentiment-pairs", inputs, build)
    data = json.loads((folder / "samples.json").read_text())
    pairs = build_pairs(data["prompts"], data["texts"], data["rewards"], tie_tolerance=min_gap)
    flat = [r for rs in data["rewards"] for r in rs]
    pairs.report["sample_reward_mean"] = sum(flat) / max(len(flat), 1)
    pairs.report["sample_reward_zero_share"] = sum(r == 0 for r in flat) / max(len(flat), 1)
    return pairs
