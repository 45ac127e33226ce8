"""An SAE feature tied to a behaviour, and how often it fires in a policy's generations (FPO's targeted control).

FPO (arXiv 2411.07618v4, Table 4) raises the constraint weight of chosen SAE features to suppress a behaviour: the
policy may then move everything but those features away from the reference. Here the behaviour is positive
sentiment: `find_feature` ranks the SAE's features by how much more often they fire on the reward's positive key
tokens than on other completion tokens of the pairs; `GenerationFeatures` measures, on fresh fixed-length samples of
a policy, the feature's firing rate (read from the policy's own residual stream, where FPO constrains it), the share
of samples with a positive rewarded word, and distinct-2 (the "other behaviour kept" check).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from tokenpo.cache import content_hash
from tokenpo.providers.sae import SparseAutoencoder, residual_stream
from tokenpo.utils import unwrap_model


@torch.no_grad()
def completion_features(model, sae: SparseAutoencoder, batches: Sequence[dict]) -> list[np.ndarray]:
    """SAE features [T_i, F] of the completion tokens of every row of `batches` (dicts with input_ids,
    attention_mask, completion_mask), at the SAE's own (layer, site), in row order."""
    model_ = unwrap_model(model)
    device = next(model_.parameters()).device
    was_training = model_.training
    model_.eval()
    out = []
    try:
        for batch in batches:
            hidden = residual_stream(model_, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     sae.config.layer, sae.config.site)
            feats = sae.encode(hidden.float()).cpu()
            for row, keep in zip(feats, batch["completion_mask"].bool()):
                out.append(row[keep].numpy())
    finally:
        model_.train(was_training)
    return out


def _side_batches(tokenized, collator, batch_size: int = 32) -> list[dict]:
    """Collator batches of `tokenized` pairs split into sides: chosen rows first, then rejected rows."""
    batches = []
    for side in ("chosen", "rejected"):
        for i in range(0, len(tokenized), batch_size):
            batch = collator([tokenized[j] for j in range(i, min(i + batch_size, len(tokenized)))])
            batches.append({k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")})
    return batches


def find_feature(reference, sae: SparseAutoencoder, tokenized, collator, labels: dict[str, list[np.ndarray]],
                 min_rate: float = 0.05) -> pd.DataFrame:
    """Features ranked by how selectively they fire on the labelled tokens (e.g. the reward's positive key tokens):
    rate on labelled tokens − rate on the others, for features firing on at least `min_rate` of the labelled tokens.
    `labels[side][i]` is the 0/1 label of every completion token of row i. Columns: feature, rate_labelled,
    rate_other, selectivity, mean_activation_labelled."""
    feats = completion_features(reference, sae, _side_batches(tokenized, collator))
    flat_labels = labels["chosen"] + labels["rejected"]
    for i, (f, y) in enumerate(zip(feats, flat_labels)):
        if len(f) != len(y):
            raise ValueError(f"row {i % len(tokenized)} ({'chosen' if i < len(tokenized) else 'rejected'}): "
                             f"{len(y)} labels for {len(f)} completion tokens")
    x, y = np.concatenate(feats), np.concatenate(flat_labels).astype(bool)
    if not y.any():
        raise ValueError("no labelled token: nothing to find a feature for")
    active = x > 0
    table = pd.DataFrame({"feature": np.arange(x.shape[1]), "rate_labelled": active[y].mean(0),
                          "rate_other": active[~y].mean(0),
                          "mean_activation_labelled": x[y].mean(0)})
    table["selectivity"] = table["rate_labelled"] - table["rate_other"]
    table = table[table["rate_labelled"] >= min_rate]
    return table.sort_values("selectivity", ascending=False).reset_index(drop=True)


def top_activations(reference, sae: SparseAutoencoder, tokenizer, tokenized, collator, feature: int,
                    n: int = 8, context: int = 4) -> pd.DataFrame:
    """The `n` completion tokens (over both sides of the pairs) where `feature` is largest, with `context` tokens
    before them: what the feature reads."""
    batches = _side_batches(tokenized, collator)
    feats = completion_features(reference, sae, batches)
    ids = list(tokenized["chosen_ids"]) + list(tokenized["rejected_ids"])
    hits = sorted(((float(f[t, feature]), i, t) for i, f in enumerate(feats) for t in range(len(f))),
                  reverse=True)[:n]
    return pd.DataFrame([{"activation": a, "token": tokenizer.decode([ids[i][t]]),
                          "context": tokenizer.decode(ids[i][max(0, t - context):t]) + "[" +
                          tokenizer.decode([ids[i][t]]) + "]"} for a, i, t in hits])


class GenerationFeatures:
    """`analyse(policy, masks, initial)` for FPO runs: `base(...)` (the sentiment analyses) plus, under "feature",
    the targeted feature on fresh fixed-length samples of the policy: firing rate over generated tokens, share of
    samples where it fires, share of samples with a positively rewarded word, distinct-2, mean reward. `identity`
    keys the run cache (the feature, the SAE and the sampling)."""

    def __init__(self, base: Callable, sae: SparseAutoencoder, feature: int, tokenizer, prompts: Sequence[str],
                 reward, new_tokens: int, seed: int = 4321, batch_size: int = 64):
        self.base, self.sae, self.feature, self.tokenizer = base, sae, int(feature), tokenizer
        self.prompts, self.reward, self.new_tokens = list(prompts), reward, new_tokens
        self.seed, self.batch_size = seed, batch_size
        self.identity = content_hash(["generation-features", sae.fingerprint(), self.feature, self.prompts,
                                      new_tokens, seed, getattr(reward, "identity", None)])

    def __call__(self, policy, masks=None, initial=None) -> dict:
        out = self.base(policy, masks, initial) if self.base is not None else {}
        out["feature"] = self.measure(policy)
        return out

    @torch.no_grad()
    def measure(self, policy) -> dict:
        from tokenpo.evaluation import generate_completions
        from tokenpo.tasks.sentiment.sweep import distinct_n

        samples = generate_completions(policy, self.tokenizer, self.prompts, max_new_tokens=self.new_tokens,
                                       temperature=1.0, top_k=0, top_p=1.0, seed=self.seed,
                                       batch_size=self.batch_size, fixed_length=True, progress=False)
        rows = [p + c for p, c in zip(samples.prompt_ids, samples.completion_ids)]
        batches = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attn, completion = torch.zeros_like(ids), torch.zeros_like(ids)
            for j, (row, prompt) in enumerate(zip(chunk, samples.prompt_ids[i:i + self.batch_size])):
                ids[j, :len(row)], attn[j, :len(row)] = torch.tensor(row), 1
                completion[j, len(prompt):len(row)] = 1
            batches.append({"input_ids": ids, "attention_mask": attn, "completion_mask": completion})
        fires = [f[:, self.feature] > 0 for f in completion_features(policy, self.sae, batches)]
        positive = [any(theta > 0 for *_, theta in self.reward.words(t)) for t in samples.texts]
        return {"firing_rate": float(np.concatenate(fires).mean()),
                "samples_with_feature": float(np.mean([f.any() for f in fires])),
                "positive_word_rate": float(np.mean(positive)), "distinct_2": distinct_n(samples.texts, 2),
                "reward": float(np.mean(self.reward(samples.texts))), "n": len(samples.texts)}
