"""Evaluation: sampling from a policy, sequence KL to the reference, confidence intervals, reward-vs-KL frontiers.

Reward scorers live in `tokenpo.scorers`, sandboxed pass@k in `tokenpo.code_eval` (both re-exported here).

Alignment follows CONTEXT.md: for `input_ids [B, L]`, `logits[:, :-1]` predicts `input_ids[:, 1:]`; a completion
token at position t is scored by the logits at position t-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .code_eval import estimate_pass_at_k, pass_at_k  # noqa: F401  (part of the evaluation API)
from .scorers import (SCORERS, ClassifierSentiment, CodeCorrectness, Harmlessness, Relevance,  # noqa: F401
                      RougeL, VaderSentiment, get_scorer, rouge_l)


# -------------------------------------------------------------------------------------------------------- sampling

@dataclass
class Completions:
    prompts: list[str]
    texts: list[str]                  # decoded completions, special tokens (EOS) removed
    prompt_ids: list[list[int]]       # the prompt tokens, unpadded
    completion_ids: list[list[int]]   # sampled tokens up to and including the first EOS
    finished: list[bool]              # True when the completion ended with EOS within max_new_tokens


def generate_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
                         seed: int = 0, batch_size: int = 16, add_special_tokens: bool = False,
                         progress: bool | None = None) -> Completions:
    """Sample one completion per prompt from a causal LM, in left-padded batches.

    Decoding is exactly what is asked (top_k=0 and top_p=1.0 mean no filtering; the model's own generation config
    does not add any). The global RNG is left as it was: sampling uses `seed` inside a forked RNG state. Prompts
    are tokenised without special tokens by default, like `tokenize_pairs`. `progress=None` shows a bar when
    there is more than one batch.
    """
    from transformers import GenerationConfig

    prompts = list(prompts)
    if not prompts:
        return Completions([], [], [], [], [])
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, eos_token_id=eos)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    config = GenerationConfig(**settings)

    encoded = [list(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) has no tokens")
    device = next(model.parameters()).device
    starts = range(0, len(prompts), batch_size)
    if progress is None:
        progress = len(starts) > 1
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")

    out_ids: list[list[int]] = []
    finished: list[bool] = []
    was_training, saved_config = model.training, getattr(model, "generation_config", None)
    model.eval()
    # generate() fills settings left at their global defaults (e.g. top_p=1.0) from the model's own generation
    # config (a hub checkpoint may ship top_k/top_p there): make ours the model's for the call
    model.generation_config = config
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in starts:
                chunk = encoded[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, ids in enumerate(chunk):  # left padding: generation continues right after each prompt
                    input_ids[b, width - len(ids):] = torch.tensor(ids)
                    attention[b, width - len(ids):] = 1
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                           generation_config=config)
                for row in generated[:, width:].tolist():
                    if eos is not None and eos in row:
                        row = row[: row.index(eos) + 1]
                        finished.append(True)
                    else:
                        finished.append(False)
                    out_ids.append(row)
    finally:
        model.train(was_training)
        model.generation_config = saved_config
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
    return Completions(prompts, texts, encoded, out_ids, finished)


# -------------------------------------------------------------------------------------------------------------- KL

@dataclass
class KLEstimate:
    sampled: np.ndarray   # [N] sum over completion tokens of log pi_theta(y_t) - log pi_ref(y_t)  (Monte Carlo)
    exact: np.ndarray     # [N] sum over completion positions of KL(pi_theta(.|x,y<t) || pi_ref(.|x,y<t))
    lengths: np.ndarray   # [N] completion tokens


def sequence_kl(policy, reference, prompt_ids, completion_ids=None, *, batch_size: int = 8) -> KLEstimate:
    """Sequence KL(pi_theta || pi_ref) of sampled completions, two ways.

    `sampled` = sum_t [log pi_theta(y_t|x,y<t) - log pi_ref(y_t|x,y<t)]: unbiased for KL(pi_theta||pi_ref) of the
    whole sequence when y ~ pi_theta (it can be negative for one sample). `exact` = sum_t KL_t over the full
    vocabulary at each position along the sample (>= 0; its expectation is the same sequence KL, with lower
    variance). Pass `Completions` as `prompt_ids`, or lists of prompt and completion token ids.
    """
    if completion_ids is None:
        if not isinstance(prompt_ids, Completions):
            raise ValueError("pass Completions, or prompt_ids and completion_ids")
        prompt_ids, completion_ids = prompt_ids.prompt_ids, prompt_ids.completion_ids
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(policy.parameters()).device
    ref_device = next(reference.parameters()).device
    sampled, exact = [], []
    modes = (policy.training, reference.training)
    policy.eval()
    reference.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                ps, cs = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
                for i, p in enumerate(ps):
                    if not p:
                        raise ValueError(f"sample {start + i}: empty prompt (the first token has no context)")
                width = max(len(p) + len(c) for p, c in zip(ps, cs))
                ids = torch.zeros((len(ps), width), dtype=torch.long)
                attention = torch.zeros_like(ids)
                mask = torch.zeros((len(ps), width - 1), dtype=torch.float64)
                for b, (p, c) in enumerate(zip(ps, cs)):
                    ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
                    attention[b, : len(p) + len(c)] = 1
                    mask[b, len(p) - 1: len(p) + len(c) - 1] = 1  # logits at t predict token t+1
                logp = _log_probs(policy, ids.to(device), attention.to(device))
                ref_logp = _log_probs(reference, ids.to(ref_device), attention.to(ref_device)).to(logp.device)
                labels = ids[:, 1:].unsqueeze(-1).to(logp.device)
                token_ratio = (logp.gather(-1, labels) - ref_logp.gather(-1, labels)).squeeze(-1).double().cpu()
                token_kl = (logp.exp() * (logp - ref_logp)).sum(-1).double().cpu()
                sampled.append((token_ratio * mask).sum(-1))
                exact.append((token_kl * mask).sum(-1))
    finally:
        policy.train(modes[0])
        reference.train(modes[1])
    lengths = np.array([len(c) for c in completion_ids])
    if not sampled:
        return KLEstimate(np.zeros(0), np.zeros(0), lengths)
    return KLEstimate(torch.cat(sampled).numpy(), torch.cat(exact).numpy(), lengths)


def _log_probs(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


# ------------------------------------------------------------------------------------------ confidence intervals

@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float
    high: float
    n: int
    level: float
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Iterable[float], level: float = 0.95, method: str = "normal", n_boot: int = 2000,
            seed: int = 0) -> MeanCI:
    """Mean and a two-sided confidence interval.

    "normal": mean +- z_{(1+level)/2} * s / sqrt(n), s the sample standard deviation (ddof=1) — the CLT
    approximation, fine for n >~ 30. "bootstrap": the percentile interval of `n_boot` resampled means (seeded).
    With one value the interval is (nan, nan).
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("mean_ci got non-finite values")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(mean, math.nan, math.nan, 1, level, method)
    if method == "normal":
        half = NormalDist().inv_cdf((1 + level) / 2) * float(x.std(ddof=1)) / math.sqrt(x.size)
        return MeanCI(mean, mean - half, mean + half, int(x.size), level, method)
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return MeanCI(mean, float(low), float(high), int(x.size), level, method)
    raise ValueError(f"method must be 'normal' or 'bootstrap', got {method!r}")


# ------------------------------------------------------------------------------------------------------ frontiers

def pareto_frontier(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Upper-left Pareto frontier: the points no other point beats with lower-or-equal KL and higher reward.

    Returned sorted by KL (ascending), with strictly increasing reward, so that `max reward for KL <= x` is the
    reward of the last frontier point with kl <= x (see `frontier_reward_at`).
    """
    kl, reward = np.asarray(kl, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    if kl.shape != reward.shape or kl.ndim != 1:
        raise ValueError(f"kl and reward must be 1-D arrays of one length, got {kl.shape} and {reward.shape}")
    if not (np.all(np.isfinite(kl)) and np.all(np.isfinite(reward))):
        raise ValueError("pareto_frontier got non-finite values")
    order = np.lexsort((-reward, kl))  # by KL, and the best reward first among equal KL
    keep, best = [], -np.inf
    for i in order:
        if reward[i] > best:
            keep.append(i)
            best = reward[i]
    keep = np.array(keep, dtype=np.int64)
    return kl[keep], reward[keep]


def frontiers(points: Iterable[tuple[float, float, Any]]) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """Per label, the Pareto frontier of its (kl, reward, label) points (labels in first-seen order)."""
    grouped: dict[Any, tuple[list, list]] = {}
    for kl, reward, label in points:
        grouped.setdefault(label, ([], []))
        grouped[label][0].append(kl)
        grouped[label][1].append(reward)
    return {label: pareto_frontier(k, r) for label, (k, r) in grouped.items()}


def frontier_reward_at(frontier: tuple[np.ndarray, np.ndarray], max_kl: float) -> float:
    """The best reward reachable with KL <= max_kl on a frontier (nan when no point is that close)."""
    kl, reward = frontier
    i = np.searchsorted(kl, max_kl, side="right")
    return float(reward[i - 1]) if i > 0 else math.nan
