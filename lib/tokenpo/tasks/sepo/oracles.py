"""SePO's oracles and their token scores, as cached steps, and what the scores say (how concentrated they are, and
whether they point at the reward's key tokens)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from tokenpo.cache import TRAINING_CODE, cached_step, code_fingerprint, weights_fingerprint
from tokenpo.models import load_model
from tokenpo.profiles import SePOConfig
from tokenpo.providers.sepo import score_pairs
from tokenpo.recipes import train_oracle
from tokenpo.tasks.sentiment.sweep import pairs_fingerprint
from tokenpo.training import TrainConfig

SIDES = ("chosen", "rejected")


def cached_oracle(reference: nn.Module, reference_id: str, pairs, cfg: SePOConfig, fraction: float, seed: int,
                  collator) -> tuple[nn.Module, str, dict]:
    """(oracle, its id, info): `reference` trained with DPO on a random share `fraction` of `pairs` (seeded), cached
    by the reference, the pairs, the settings and the training code."""
    config = TrainConfig(method="dpo", hparams={"beta": cfg.oracle_beta}, learning_rate=cfg.oracle_lr,
                         schedule="constant", warmup_steps=5, max_steps=cfg.oracle_steps, batch_size=cfg.oracle_batch,
                         seed=seed, cpu=not torch.cuda.is_available(), progress=False, save_final=False, save_every=None)
    inputs = {"kind": "sepo-oracle", "reference": reference_id, "pairs": pairs_fingerprint(pairs),
              "fraction": fraction, "seed": seed, "beta": cfg.oracle_beta, "lr": cfg.oracle_lr,
              "steps": cfg.oracle_steps, "batch": cfg.oracle_batch, "code": code_fingerprint(*TRAINING_CODE)}

    def build(folder: Path) -> None:
        import tempfile
        from dataclasses import replace

        with tempfile.TemporaryDirectory() as tmp:
            oracle, result = train_oracle(reference, pairs, fraction=fraction, seed=seed, collator=collator,
                                          config=replace(config, out_dir=str(Path(tmp) / "run")))
        oracle.save_pretrained(folder / "model")
        last = result.history[-1]
        (folder / "info.json").write_text(json.dumps({"fraction": fraction, "seed": seed, "steps": result.steps,
                                                      "train_accuracy": last["rewards/accuracies"],
                                                      "train_margin": last["rewards/margins"]}))

    folder = cached_step("sepo-oracle", inputs, build)
    return load_model(folder / "model").eval(), folder.name, json.loads((folder / "info.json").read_text())


def cached_scores(oracle: nn.Module, oracle_id: str, reference: nn.Module, reference_id: str, pairs, collator):
    """`pairs` with the oracle's token scores (`chosen_token_scores`/`rejected_token_scores`), cached by oracle,
    reference and pairs."""
    inputs = {"kind": "sepo-scores", "oracle": oracle_id, "reference": reference_id,
              "pairs": pairs_fingerprint(pairs)}

    def build(folder: Path) -> None:
        scored = score_pairs(oracle, reference, pairs, collator=collator, progress=False)
        (folder / "scores.json").write_text(json.dumps({side: [list(v) for v in scored[f"{side}_token_scores"]]
                                                        for side in SIDES}))

    scores = json.loads((cached_step("sepo-scores", inputs, build) / "scores.json").read_text())
    for side in SIDES:
        name = f"{side}_token_scores"
        pairs = (pairs.remove_columns(name) if name in pairs.column_names else pairs).add_column(name, scores[side])
    return pairs


def share_for_mass(values: Sequence[float], mass: float = 0.8) -> float:
    """The smallest share of a response's tokens whose (positive) values add up to `mass` of the positive total
    (tokens taken from the largest value down); nan when no value is positive. SePO Fig. 1's "top 35.6 % of the
    tokens hold 80 % of the reward"."""
    v = np.sort(np.clip(np.asarray(values, dtype=float), 0, None))[::-1]
    total = v.sum()
    if total <= 0:
        return float("nan")
    needed = int(np.searchsorted(np.cumsum(v), mass * total - 1e-12) + 1)
    return needed / len(v)


def cumulative_share(per_response: Sequence[Sequence[float]], grid: Sequence[float]) -> np.ndarray:
    """Mean over responses of the share of the positive mass held by the top x of their tokens, for x in `grid`
    (the curve of SePO Fig. 1). Responses without a positive value are left out."""
    curves = []
    for values in per_response:
        v = np.sort(np.clip(np.asarray(values, dtype=float), 0, None))[::-1]
        if v.sum() <= 0:
            continue
        cum = np.concatenate([[0.0], np.cumsum(v) / v.sum()])
        curves.append(np.interp(np.asarray(grid) * len(v), np.arange(len(v) + 1), cum))
    return np.mean(curves, axis=0) if curves else np.full(len(grid), np.nan)


def score_auroc(scores, labels) -> float:
    """AUROC of the oracle's scores for the reward's key tokens: high scores on chosen responses and low scores on
    rejected ones should mark them (SePO keeps exactly these), pooled over both sides."""
    from sklearn.metrics import roc_auc_score

    values = np.concatenate([np.asarray(s, dtype=float) * (1 if side == "chosen" else -1)
                             for side in SIDES for s in scores[side]])
    y = np.concatenate([np.asarray(lab) for side in SIDES for lab in labels[side]])
    return float(roc_auc_score(y, values)) if 0 < y.sum() < len(y) else float("nan")


# ------------------------------------------------------------------------------------------------- model sizes
def truncated(model: nn.Module, n_layers: int) -> nn.Module:
    """A GPT-2 with the first `n_layers` blocks of `model` (embeddings and final norm kept): a smaller model from the
    same pretraining, for the weak oracle."""
    config = copy.deepcopy(model.config)
    config.n_layer = n_layers
    small = type(model)(config)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("transformer.h.") or int(k.split(".")[2]) < n_layers}
    small.load_state_dict(state)
    return small


def depth_upscaled(model: nn.Module, factor: int) -> nn.Module:
    """A GPT-2 `factor` times deeper: block i of `model` becomes blocks factor·i … factor·i + factor − 1 (depth
    up-scaling, as SOLAR), for the strong policy. Its function differs from the original until fine-tuned."""
    config = copy.deepcopy(model.config)
    config.n_layer = model.config.n_layer * factor
    large = type(model)(config)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("transformer.h."):
            parts = k.split(".")
            for j in range(factor):
                state[".".join(parts[:2] + [str(int(parts[2]) * factor + j)] + parts[3:])] = v.clone()
        else:
            state[k] = v
    large.load_state_dict(state)
    return large


def model_id(model: nn.Module) -> str:
    return weights_fingerprint(model.state_dict())


def pairs_scores(pairs) -> dict[str, list[list[float]]]:
    return {side: [list(r) for r in pairs[f"{side}_token_scores"]] for side in SIDES}


__all__ = ["cached_oracle", "cached_scores", "share_for_mass", "cumulative_share", "score_auroc", "truncated",
           "depth_upscaled", "model_id", "pairs_scores"]
