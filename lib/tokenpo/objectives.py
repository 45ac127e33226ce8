"""Preference objectives as pure functions of per-token statistics (:class:`tokenpo.tokens.TokenStats`).

Every objective has the signature ``fn(chosen, rejected, *, <hyper-parameters>, <extra inputs>) -> LossOutput``:
no model, no trainer, no data. ``chosen``/``rejected`` hold [B, T] tensors (T = L − 1, zero off the completion);
extra inputs are ``(chosen, rejected)`` pairs (token masks, selections, weights, pooled SAE features) made by the
providers of :mod:`tokenpo.providers`. The per-pair loss ``LossOutput.losses`` [B] includes per-pair regularisers;
the trainer averages it.

Notation (docs/equations.md#notation): lr_t = log π_θ(y_t|·) − log π_ref(y_t|·), s(y) = Σ_t lr_t,
KL_t = D_KL(π_ref ‖ π_θ) at t (+KL sign), D_Seq(y) = Σ_t KL_t, |y| = number of completion tokens, sg = stop-gradient,
σ = sigmoid. Where the official code and the paper differ, the default follows the code and the paper's variant is an
option (docs/equations.md lists every difference).

A new method is a function here plus an entry in :data:`OBJECTIVES` (and, when it takes extra inputs, the names of
the providers that make them): see docs/adding-a-method.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenpo.tokens import TokenStats

__all__ = ["LossOutput", "Objective", "OBJECTIVES", "get_objective", "mask_statistics",
           "dpo", "ipo", "simpo", "dpop", "tdpo1", "tdpo2", "mapo", "sparsepo", "sepo", "fpo", "tis_dpo", "confpo"]

Pair = tuple[Tensor, Tensor]


@dataclass
class LossOutput:
    losses: Tensor                                   # [B] per-pair loss
    metrics: dict[str, Tensor] = field(default_factory=dict)   # detached scalars (batch means), TRL/DESIGN names

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum(-1) / mask.sum(-1)


# ------------------------------------------------------------------------------------------- input checks
def check_stats(chosen: TokenStats, rejected: TokenStats, *, reference: bool = False, kl: bool = False) -> None:
    for side, stats in (("chosen", chosen), ("rejected", rejected)):
        shape = tuple(stats.mask.shape)
        if len(shape) != 2:
            raise ValueError(f"{side}.mask must be [B, T], got {shape}")
        needed = {"logps": stats.logps, "ref_logps": stats.ref_logps if reference else 0,
                  "kl": stats.kl if kl else 0}
        for name, value in needed.items():
            if value is None:
                raise ValueError(f"{side}.{name} is None but this objective needs it"
                                 + (" (compute the token statistics with a reference model)" if reference else ""))
            if isinstance(value, Tensor) and tuple(value.shape) != shape:
                raise ValueError(f"{side}.{name} has shape {tuple(value.shape)}, expected {shape} like {side}.mask")
        empty = (stats.mask.sum(-1) <= 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{side} row(s) {empty} have an empty completion (mask sums to 0); drop them upstream")
    if chosen.mask.shape != rejected.mask.shape:
        raise ValueError(f"chosen and rejected statistics differ in shape: {tuple(chosen.mask.shape)} vs "
                         f"{tuple(rejected.mask.shape)} (pad both sides to the same length)")


def check_positive(**hparams: float) -> None:
    for name, value in hparams.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(**hparams: float) -> None:
    for name, value in hparams.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_ratio(**ratios: float) -> None:
    for name, value in ratios.items():
        if not (isinstance(value, (int, float)) and 0 < value <= 1):
            raise ValueError(f"{name} must be a share of the tokens in (0, 1], got {value!r}")


def token_pair(name: str, pair: Pair | None, chosen: TokenStats, rejected: TokenStats,
                binary: bool = False) -> Pair:
    """Validate a (chosen, rejected) pair of [B, T] token weights and zero it off the completion."""
    if pair is None:
        raise ValueError(f"missing required extra input {name}=(chosen, rejected)")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a (chosen, rejected) pair of [B, T] tensors")
    out = []
    for side, values, stats in (("chosen", pair[0], chosen), ("rejected", pair[1], rejected)):
        if tuple(values.shape) != tuple(stats.mask.shape):
            raise ValueError(f"{name}[{side}] has shape {tuple(values.shape)}, expected {tuple(stats.mask.shape)} "
                             f"like the {side} token statistics")
        on_completion = values.detach()[stats.mask > 0]
        if not torch.isfinite(on_completion).all():
            raise ValueError(f"{name}[{side}] has non-finite values on completion tokens")
        if (on_completion < 0).any():
            row = int((values.detach() * stats.mask < 0).any(-1).nonzero()[0])
            raise ValueError(f"{name}[{side}] has negative values (first in row {row}); token weights must be >= 0")
        if binary and not ((on_completion == 0) | (on_completion == 1)).all():
            raise ValueError(f"{name}[{side}] must be 0/1 on completion tokens")
        # where, not a product: a NaN/inf weight at a padding position must not reach the loss or its gradient
        out.append(torch.where(stats.mask > 0, values, torch.zeros((), dtype=values.dtype, device=values.device)))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------- metrics
def base_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, chosen: TokenStats,
             rejected: TokenStats) -> dict[str, Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen.seq_logps.detach().mean(),
        "logps/rejected": rejected.seq_logps.detach().mean(),
    }
    if chosen.kl is not None and rejected.kl is not None:
        metrics["kl/chosen"] = chosen.seq_kl.detach().mean()
        metrics["kl/rejected"] = rejected.seq_kl.detach().mean()
    return metrics


def mask_statistics(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the share of completion tokens whose weight is exactly 0 (sparsity) and the mean weight over them,
    each [B]. ``values``, ``mask`` [B, T]; rows without completion tokens give 0."""
    on = mask > 0
    values = values.detach().float()
    count = on.sum(-1).clamp(min=1)
    return ((values == 0) & on).sum(-1) / count, torch.where(on, values, 0.0).sum(-1) / count


def mask_metrics(metrics: dict[str, Tensor], kind: str, masks: Pair, chosen: TokenStats,
                 rejected: TokenStats) -> None:
    """mask/{sparsity,mean}_{kind}_{side}: the batch mean of :func:`mask_statistics` per row.

    Averaging per row first makes the logged value of a global batch the same however it is split over processes
    or accumulation steps (each micro-batch mean is a mean of row values).
    """
    for side, values, stats in (("chosen", masks[0], chosen), ("rejected", masks[1], rejected)):
        zeros, means = mask_statistics(values, stats.mask)
        metrics[f"mask/sparsity_{kind}_{side}"] = zeros.float().mean()
        metrics[f"mask/mean_{kind}_{side}"] = means.mean()


# --------------------------------------------------------------------------------------------------- objectives
def dpo(chosen: TokenStats, rejected: TokenStats, *, beta: float = 0.1) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7; TRL ``loss_type="sigmoid"``).

    Inputs: logps, ref_logps, mask [B, T] per side.      s(y) = Σ_t lr_t                        [B]
    L = −log σ(β·(s(y_w) − s(y_l)))                      [B];  rewards = β·s(y).
    """
    check_positive(beta=beta)
    check_stats(chosen, rejected, reference=True)
    s_w, s_l = chosen.logratios.sum(-1), rejected.logratios.sum(-1)
    losses = -F.logsigmoid(beta * (s_w - s_l))
    return LossOutput(losses, base_metrics(losses, beta * s_w, beta * s_l, chosen, rejected))


def ipo(chosen: TokenStats, rejected: TokenStats, *, beta: float = 0.1,
        length_normalize: bool = True) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17; β = τ).

    Inputs: logps, ref_logps, mask [B, T].   h(y) = Σ_t lr_t / |y|  (TRL, "confirmed with the IPO authors")
                                             or Σ_t lr_t if ``length_normalize=False`` (paper / SePO App. form)
    L = (h(y_w) − h(y_l) − 1/(2β))²          [B];  rewards = β·h(y).
    """
    check_positive(beta=beta)
    check_stats(chosen, rejected, reference=True)
    h_w, h_l = chosen.logratios.sum(-1), rejected.logratios.sum(-1)
    if length_normalize:
        h_w, h_l = h_w / chosen.lengths, h_l / rejected.lengths
    losses = (h_w - h_l - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, base_metrics(losses, beta * h_w, beta * h_l, chosen, rejected))


def simpo(chosen: TokenStats, rejected: TokenStats, *, beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free and length-normalised.

    Inputs: logps, mask [B, T].     r(y) = (β/|y|)·Σ_t log π_θ(y_t|·)                          [B]
    L = −log σ(r(y_w) − r(y_l) − γ)                                                            [B]; rewards = r(y).
    The official code takes gamma_beta_ratio = γ/β and computes −logσ(β·(Δ − γ/β)): the same loss.
    """
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma)
    check_stats(chosen, rejected)
    r_w = beta * _masked_mean(chosen.logps, chosen.mask)
    r_l = beta * _masked_mean(rejected.logps, rejected.mask)
    losses = -F.logsigmoid(r_w - r_l - gamma)
    return LossOutput(losses, base_metrics(losses, r_w, r_l, chosen, rejected))


def dpop(chosen: TokenStats, rejected: TokenStats, *, beta: float = 0.1, lambda_: float = 50.0) -> LossOutput:
    """DPO-Positive / Smaug (Pal et al. 2024, arXiv 2402.13228, Eq. 3).

    Inputs: logps, ref_logps, mask [B, T].   penalty = max(0, log π_ref(y_w|x) − log π_θ(y_w|x)) = max(0, −s(y_w))
    L = −log σ(β·(s(y_w) − s(y_l) − λ·penalty))             [B];  rewards = β·s(y).
    """
    check_positive(beta=beta)
    check_nonnegative(lambda_=lambda_)
    check_stats(chosen, rejected, reference=True)
    s_w, s_l = chosen.logratios.sum(-1), rejected.logratios.sum(-1)
    penalty = torch.clamp(-s_w, min=0.0)
    losses = -F.logsigmoid(beta * (s_w - s_l - lambda_ * penalty))
    out = LossOutput(losses, base_metrics(losses, beta * s_w, beta * s_l, chosen, rejected))
    out.metrics["dpop/penalty"] = penalty.detach().mean()
    return out


def _tdpo(chosen: TokenStats, rejected: TokenStats, beta: float, alpha: float, stop_chosen_kl: bool) -> LossOutput:
    check_positive(beta=beta)
    check_nonnegative(alpha=alpha)
    check_stats(chosen, rejected, reference=True, kl=True)
    s_w, s_l = chosen.logratios.sum(-1), rejected.logratios.sum(-1)
    d_w, d_l = chosen.seq_kl, rejected.seq_kl
    if stop_chosen_kl:
        d_w = d_w.detach()
    losses = -F.logsigmoid(beta * ((s_w - s_l) - alpha * (d_l - d_w)))
    # Official code logs β·(s + D_Seq) as the reward of each side.
    return LossOutput(losses, base_metrics(losses, beta * (s_w + d_w), beta * (s_l + d_l), chosen, rejected))


def tdpo1(chosen: TokenStats, rejected: TokenStats, *, beta: float = 0.1) -> LossOutput:
    """TDPO-1 (Zeng et al. 2024, arXiv 2404.11999, Eq. 18).

    Inputs: logps, ref_logps, kl, mask [B, T].     D_Seq(y) = Σ_t KL_t(π_ref ‖ π_θ)           [B]
    L = −log σ(β·[(s(y_w) − s(y_l)) − (D_Seq(y_l) − D_Seq(y_w))])                             [B]
    rewards = β·(s(y) + D_Seq(y)) as logged by the official code.
    """
    return _tdpo(chosen, rejected, beta, 1.0, stop_chosen_kl=False)


def tdpo2(chosen: TokenStats, rejected: TokenStats, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO-2 (Zeng et al. 2024, Eq. 20): TDPO-1 with a weighted constraint and sg on the chosen sequential KL.

    Inputs: logps, ref_logps, kl, mask [B, T].
    L = −log σ(β·[(s(y_w) − s(y_l)) − α·(D_Seq(y_l) − sg(D_Seq(y_w)))])                       [B]
    """
    return _tdpo(chosen, rejected, beta, alpha, stop_chosen_kl=True)


def _masked_token_level(chosen: TokenStats, rejected: TokenStats, beta: float, reward_masks: Pair,
                        kl_masks: Pair) -> tuple[Tensor, Tensor, Tensor]:
    """Shared core of MaPO / SparsePO: (−log σ(β(u − d)), reward_w, reward_l) per pair (docs/equations.md#sparsepo)."""
    u_w = (reward_masks[0] * chosen.logratios).sum(-1)
    u_l = (reward_masks[1] * rejected.logratios).sum(-1)
    kl_w = (kl_masks[0] * chosen.kl * chosen.mask).sum(-1)           # D^m(x, y) = Σ_t m_d(y, t)·KL_t(y)
    kl_l = (kl_masks[1] * rejected.kl * rejected.mask).sum(-1)
    # Code stores −KL: d = Σ m_d(−KL_w) − Σ m_d(−KL_l), so u − d = u_w − u_l + KL^m_w − KL^m_l.
    losses = -F.logsigmoid(beta * ((u_w - u_l) - (kl_l - kl_w)))
    return losses, beta * (u_w - kl_w), beta * (u_l - kl_l)


def mapo(chosen: TokenStats, rejected: TokenStats, *, masks: Pair | None = None, beta: float = 0.1) -> LossOutput:
    """MaPO, SparsePO's activation-mask variant (official code ``mapo_loss``; docs/equations.md#mapo).

    Inputs: logps, ref_logps, kl, mask [B, T]; masks = (m_w, m_l) [B, T] ≥ 0 from the reference's activations.
    The same fixed mask m weights reward and KL; it is detached (no gradient), and there is no L1 term:
    L = −log σ(β·[Σ_t m_w lr_t(y_w) − Σ_t m_l lr_t(y_l) − (Σ_t m_l KL_t(y_l) − Σ_t m_w KL_t(y_w))])   [B]
    rewards = β·(Σ_t m lr_t − Σ_t m KL_t) as logged by the code. m ≡ 1 gives TDPO-1.
    """
    check_positive(beta=beta)
    check_stats(chosen, rejected, reference=True, kl=True)
    m_w, m_l = token_pair("masks", masks, chosen, rejected)
    m_w, m_l = m_w.detach(), m_l.detach()
    losses, r_w, r_l = _masked_token_level(chosen, rejected, beta, (m_w, m_l), (m_w, m_l))
    metrics = base_metrics(losses, r_w, r_l, chosen, rejected)
    for kind in ("reward", "kl"):
        mask_metrics(metrics, kind, (m_w, m_l), chosen, rejected)
    return LossOutput(losses, metrics)


def sparsepo(chosen: TokenStats, rejected: TokenStats, *, reward_masks: Pair | None = None,
             kl_masks: Pair | None = None, beta: float = 0.1, common: bool = True, mask_on_reward: bool = True,
             mask_on_kl: bool = True, l1_reward: float = 0.001, l1_kl: float = 0.001,
             halve_common_l1: bool = True) -> LossOutput:
    """SparsePO (Christopoulou et al. 2024, arXiv 2410.05102; official ``SparseTrainer.get_batch_loss_metrics``).

    Inputs: logps, ref_logps, kl, mask [B, T]; learned masks ≥ 0, [B, T] pairs: reward m_u, KL m_d.
    ``common``: one mask for both (pass it as reward_masks or kl_masks); else independent m_u, m_d.
    A term whose ``mask_on_*`` is False uses weight 1. No stop-gradient anywhere: masks and both KLs get gradients.
    u = Σ_t m_u(y_w)lr_t(y_w) − Σ_t m_u(y_l)lr_t(y_l);  δ = Σ_t m_d(y_l)KL_t(y_l) − Σ_t m_d(y_w)KL_t(y_w)
    L = −log σ(β·(u − δ)) + λ_u·(‖m_u(y_w)‖₁ + ‖m_u(y_l)‖₁) + λ_d·(‖m_d(y_w)‖₁ + ‖m_d(y_l)‖₁)     [B]
    (L1 norms over completion tokens, only for masks that are on). As in the code, λ_u and λ_d are halved when a
    common mask is on both terms (``halve_common_l1``). rewards = β·(Σ m_u lr − Σ m_d KL) as logged by the code.
    """
    check_positive(beta=beta)
    check_nonnegative(l1_reward=l1_reward, l1_kl=l1_kl)
    check_stats(chosen, rejected, reference=True, kl=True)
    if not (mask_on_reward or mask_on_kl):
        raise ValueError("sparsepo with mask_on_reward=False and mask_on_kl=False is TDPO-1: use tdpo1")
    if common:
        if reward_masks is not None and kl_masks is not None and (reward_masks[0] is not kl_masks[0]
                                                                  or reward_masks[1] is not kl_masks[1]):
            raise ValueError("common=True uses one mask for reward and KL; pass it once (reward_masks) or set "
                             "common=False for independent masks")
        shared = token_pair("reward_masks", reward_masks if reward_masks is not None else kl_masks,
                             chosen, rejected)
        rw, kl = shared, shared
    else:
        rw = token_pair("reward_masks", reward_masks, chosen, rejected) if mask_on_reward else None
        kl = token_pair("kl_masks", kl_masks, chosen, rejected) if mask_on_kl else None
    ones = (chosen.mask, rejected.mask)
    rw_used, kl_used = (rw if mask_on_reward else ones), (kl if mask_on_kl else ones)
    losses, r_w, r_l = _masked_token_level(chosen, rejected, beta, rw_used, kl_used)
    if common and mask_on_reward and mask_on_kl and halve_common_l1:
        l1_reward, l1_kl = l1_reward / 2.0, l1_kl / 2.0     # official: "make up for double adding (from u and d)"
    if mask_on_reward and l1_reward:
        losses = losses + l1_reward * (rw[0].abs().sum(-1) + rw[1].abs().sum(-1))
    if mask_on_kl and l1_kl:
        losses = losses + l1_kl * (kl[0].abs().sum(-1) + kl[1].abs().sum(-1))
    metrics = base_metrics(losses, r_w, r_l, chosen, rejected)
    for kind, on, masks in (("reward", mask_on_reward, rw), ("kl", mask_on_kl, kl)):
        if on:
            mask_metrics(metrics, kind, masks, chosen, rejected)
    return LossOutput(losses, metrics)


def sepo(chosen: TokenStats, rejected: TokenStats, *, selections: Pair | None = None, gamma: float = 1.0,
         margin: float = 0.0, normalization: str = "selected", ratios: tuple[float, float] = (0.3, 0.3)) -> LossOutput:
    """SePO (Yang et al. 2024, arXiv 2408.13518, Eq. 10-11), reference-free.

    Inputs: logps, mask [B, T]; selections = (I_w, I_l) 0/1 [B, T]: top-k% oracle-scored tokens of y_w,
    bottom-k% of y_l.   û(y) = γ/Z(y)·Σ_t I_t log π_θ(y_t|·)                                   [B]
    L = −log σ(û(y_w) − û(y_l) − λ)                                                            [B]; rewards = û(y).
    Official code (``SelectiveRRHFLoss``): Z = Σ_t I_t (``normalization="selected"``), γ = 1, λ = 0 (defaults).
    Paper: Z = |y|·k (``normalization="length"`` with ``ratios=(k_w, k_l)``), γ = 2.1, λ = 0.5 (TinyLLaMA).
    """
    check_positive(gamma=gamma)
    check_nonnegative(margin=margin)
    check_stats(chosen, rejected)
    sel_w, sel_l = token_pair("selections", selections, chosen, rejected, binary=True)
    if normalization == "selected":
        for side, sel in (("chosen", sel_w), ("rejected", sel_l)):
            empty = (sel.sum(-1) <= 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"selections[{side}] select no token in row(s) {empty}")
        z_w, z_l = sel_w.sum(-1), sel_l.sum(-1)
    elif normalization == "length":
        check_ratio(ratio_chosen=ratios[0], ratio_rejected=ratios[1])
        z_w, z_l = chosen.lengths * ratios[0], rejected.lengths * ratios[1]
    else:
        raise ValueError(f"normalization must be 'selected' (official code) or 'length' (paper), got {normalization!r}")
    u_w = gamma * (sel_w * chosen.logps).sum(-1) / z_w
    u_l = gamma * (sel_l * rejected.logps).sum(-1) / z_l
    losses = -F.logsigmoid(u_w - u_l - margin)
    metrics = base_metrics(losses, u_w, u_l, chosen, rejected)
    mask_metrics(metrics, "reward", (sel_w, sel_l), chosen, rejected)
    return LossOutput(losses, metrics)


def _feature_pair(name: str, pair: Pair | None, batch: int) -> Pair:
    if pair is None:
        raise ValueError(f"missing required extra input {name}=(chosen, rejected) of pooled features [B, F]")
    if len(pair) != 2 or pair[0].dim() != 2 or pair[0].shape != pair[1].shape or pair[0].shape[0] != batch:
        raise ValueError(f"{name} must be a (chosen, rejected) pair of [B={batch}, F] tensors, got shapes "
                         f"{[tuple(p.shape) for p in pair]}")
    return pair[0], pair[1]


def _feature_mse(policy: Tensor, reference: Tensor, k: int, topk: str, weights: Tensor | None = None) -> Tensor:
    """D_FPO = (1/k)·Σ_{i∈I} w_i (c̄_θ,i − c̄_ref,i)² per row; I = top-k of the policy features (or the union with the
    reference's), plus every feature with a weight w_i ≠ 1 (default w ≡ 1)."""
    selected = torch.zeros_like(policy, dtype=torch.bool)
    selected.scatter_(1, policy.detach().topk(k, dim=-1).indices, True)
    if topk == "union":
        selected.scatter_(1, reference.topk(k, dim=-1).indices, True)
    squared = (policy - reference) ** 2
    if weights is not None:
        selected = selected | (weights != 1)
        squared = squared * weights
    return (squared * selected).sum(-1) / k


def fpo(chosen: TokenStats, rejected: TokenStats, *, features: Pair | None = None,
        ref_features: Pair | None = None, beta: float = 0.1, alpha: float = 0.5, k: int = 50,
        topk: str = "policy", stop_chosen: bool = True, feature_weights: Tensor | None = None,
        ref_mean_logps: Pair | None = None) -> LossOutput:
    """FPO (Yin et al. 2024, arXiv 2411.07618v4, Eq. 8-11; official ``feature_alignment/model/fpo.py``).

    Inputs: logps, mask (and ref_logps, or ``ref_mean_logps`` = offline mean_t log π_ref per side [B]) [B, T];
    features / ref_features = pooled SAE features of policy / reference per side, [B, F] pairs.
    m(y) = mean_t log π_θ(y_t|·) − mean_t log π_ref(y_t|·)                                      [B]
    D(y) = (1/k)·Σ_{i∈I_k} (c̄_θ,i − c̄_ref,i)²; I_k = top-k of c̄_θ (code, ``topk="policy"``) or top-k(c̄_θ) ∪
    top-k(c̄_ref) (paper, ``topk="union"``; still divided by k)                                 [B]
    L = −log σ(β·[(m(y_w) − m(y_l)) − α·(D(y_l) − sg(D(y_w)))])                                [B]; rewards = β·m(y).
    Options for the paper's ablations: ``stop_chosen=False`` drops the stop-gradient on D(y_w) (Table 3);
    ``feature_weights`` [F] weights each feature's squared difference (the per-feature β of Table 4; features with
    a weight ≠ 1 are always in I).
    """
    check_positive(beta=beta)
    check_nonnegative(alpha=alpha)
    check_stats(chosen, rejected, reference=ref_mean_logps is None)
    if topk not in ("policy", "union"):
        raise ValueError(f"topk must be 'policy' (official code) or 'union' (paper), got {topk!r}")
    batch = chosen.mask.shape[0]
    f_w, f_l = _feature_pair("features", features, batch)
    g_w, g_l = (g.detach() for g in _feature_pair("ref_features", ref_features, batch))
    if f_w.shape != g_w.shape:
        raise ValueError(f"features {tuple(f_w.shape)} and ref_features {tuple(g_w.shape)} differ in shape")
    if not isinstance(k, int) or not 1 <= k <= f_w.shape[1]:
        raise ValueError(f"k must be an integer in [1, F={f_w.shape[1]}], got {k!r}")
    if feature_weights is not None:
        feature_weights = torch.as_tensor(feature_weights, dtype=f_w.dtype, device=f_w.device)
        if feature_weights.shape != (f_w.shape[1],) or not (torch.isfinite(feature_weights).all()
                                                             and (feature_weights >= 0).all()):
            raise ValueError(f"feature_weights must be [F={f_w.shape[1]}] finite values >= 0")
    if ref_mean_logps is None:
        ref_w, ref_l = _masked_mean(chosen.ref_logps, chosen.mask), _masked_mean(rejected.ref_logps, rejected.mask)
    else:
        if len(ref_mean_logps) != 2 or any(tuple(r.shape) != (batch,) for r in ref_mean_logps):
            raise ValueError(f"ref_mean_logps must be a (chosen, rejected) pair of [B={batch}] tensors")
        ref_w, ref_l = (r.detach() for r in ref_mean_logps)
    m_w = _masked_mean(chosen.logps, chosen.mask) - ref_w
    m_l = _masked_mean(rejected.logps, rejected.mask) - ref_l
    d_w, d_l = _feature_mse(f_w, g_w, k, topk, feature_weights), _feature_mse(f_l, g_l, k, topk, feature_weights)
    losses = -F.logsigmoid(beta * ((m_w - m_l) - alpha * (d_l - (d_w.detach() if stop_chosen else d_w))))
    metrics = base_metrics(losses, beta * m_w, beta * m_l, chosen, rejected)
    metrics["features/mse_chosen"], metrics["features/mse_rejected"] = d_w.detach().mean(), d_l.detach().mean()
    return LossOutput(losses, metrics)


def tis_dpo(chosen: TokenStats, rejected: TokenStats, *, weights: Pair | None = None, beta: float = 0.1) -> LossOutput:
    """TIS-DPO (Liu et al., ICLR-2025 submission, Eq. 15-19): TDPO-1 with per-token importance weights w ≥ 0.

    Inputs: logps, ref_logps, kl, mask [B, T]; weights = (w_w, w_l) [B, T] (from contrastive LLMs; detached).
    L = −log σ(β·[Σ_t w_w lr_t(y_w) − Σ_t w_l lr_t(y_l) − (Σ_t w_l KL_t(y_l) − Σ_t w_w KL_t(y_w))])   [B]
    The KL sign follows TDPO (w ≡ 1 gives TDPO-1); the paper's Eq. 17 prints η with the opposite sign
    (docs/equations.md#tis-dpo).
    rewards = β·Σ_t w lr_t.
    """
    check_positive(beta=beta)
    check_stats(chosen, rejected, reference=True, kl=True)
    w_w, w_l = (w.detach() for w in token_pair("weights", weights, chosen, rejected))
    u_w, u_l = (w_w * chosen.logratios).sum(-1), (w_l * rejected.logratios).sum(-1)
    kl_w, kl_l = (w_w * chosen.kl).sum(-1), (w_l * rejected.kl).sum(-1)
    losses = -F.logsigmoid(beta * ((u_w - u_l) - (kl_l - kl_w)))
    metrics = base_metrics(losses, beta * u_w, beta * u_l, chosen, rejected)
    for kind in ("reward", "kl"):
        mask_metrics(metrics, kind, (w_w, w_l), chosen, rejected)
    return LossOutput(losses, metrics)


def confpo(chosen: TokenStats, rejected: TokenStats, *, selections: Pair | None = None, beta: float = 1.5,
           gamma: float = 1.6) -> LossOutput:
    """ConfPO on SimPO (Yoon et al. 2025, arXiv 2506.08712; official ``cpo_trainer.py::cpo_loss_confpo``),
    reference-free.

    Inputs: logps, mask [B, T]; selections = (I_w, I_l) 0/1 [B, T]: the tokens whose probability under the policy is
    below the response's mean probability, log π_θ(y_t|·) < log mean_t π_θ(y_t|·) (detached; provider
    :class:`tokenpo.providers.confpo.LowConfidenceTokens`).
    r(y) = β·Σ_t I_t log π_θ(y_t|·) / Σ_t I_t                                                    [B]
    L = −log σ(r(y_w) − r(y_l) − γ), and 0 for a pair where either side selects no token (as the code) [B]
    rewards = r(y).
    """
    check_positive(beta=beta)
    check_nonnegative(gamma=gamma)
    check_stats(chosen, rejected)
    sel_w, sel_l = token_pair("selections", selections, chosen, rejected, binary=True)
    n_w, n_l = sel_w.sum(-1), sel_l.sum(-1)
    empty = (n_w == 0) | (n_l == 0)
    r_w = beta * (sel_w * chosen.logps).sum(-1) / n_w.clamp(min=1)
    r_l = beta * (sel_l * rejected.logps).sum(-1) / n_l.clamp(min=1)
    losses = torch.where(empty, 0.0, -F.logsigmoid(r_w - r_l - gamma))
    metrics = base_metrics(losses, r_w, r_l, chosen, rejected)
    mask_metrics(metrics, "reward", (sel_w, sel_l), chosen, rejected)
    return LossOutput(losses, metrics)


# --------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Objective:
    """A registry entry: the function, its default hyper-parameters with their source, and what it consumes.

    ``needs_reference``/``needs_kl``: the per-token statistics it reads (reference log-probs; full-vocabulary KL).
    ``extra_inputs``: keyword arguments that providers must make; ``optional_inputs``: ones they may make;
    ``providers``: the names (in :data:`tokenpo.providers.PROVIDERS`) of the providers that make them by default.
    ``reference_free_with``: optional inputs that replace the reference statistics when a provider supplies them
    (FPO's offline cache).
    """

    name: str
    fn: Callable[..., LossOutput]
    defaults: dict
    needs_reference: bool
    needs_kl: bool
    extra_inputs: tuple[str, ...]
    source: str
    providers: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    reference_free_with: tuple[str, ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        """Every keyword argument that is an input, not a hyper-parameter."""
        return self.extra_inputs + self.optional_inputs

    def __call__(self, chosen: TokenStats, rejected: TokenStats, **kwargs) -> LossOutput:
        """``fn`` with the registry defaults, overridden by ``kwargs``."""
        return self.fn(chosen, rejected, **{**self.defaults, **kwargs})


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("dpo", dpo, {"beta": 0.1}, True, False, (),
              "Rafailov et al. 2023 Eq. 7; β=0.1 (TRL default; FPO Table 5)"),
    Objective("ipo", ipo, {"beta": 0.1, "length_normalize": True}, True, False, (),
              "Azar et al. 2023 Eq. 17; TRL loss_type='ipo' (length-normalised), β=τ=0.1 (TRL default)"),
    Objective("simpo", simpo, {"beta": 2.0, "gamma": 0.5}, False, False, (),
              "Meng et al. 2024 Eq. 6; β=2, γ=0.5 as in FPO Table 5"),
    Objective("dpop", dpop, {"beta": 0.1, "lambda_": 50.0}, True, False, (),
              "Pal et al. 2024 (arXiv 2402.13228) Eq. 3; λ=50 (Smaug paper; not verified here)"),
    Objective("tdpo1", tdpo1, {"beta": 0.1}, True, True, (),
              "Zeng et al. 2024 (arXiv 2404.11999) Eq. 18; official trainers.py; β=0.1 (FPO Table 5)"),
    Objective("tdpo2", tdpo2, {"beta": 0.1, "alpha": 0.5}, True, True, (),
              "Zeng et al. 2024 Eq. 20; official trainers.py; β=0.1, α=0.5 (FPO Table 5)"),
    Objective("mapo", mapo, {"beta": 0.1}, True, True, ("masks",),
              "SparsePO paper (arXiv 2410.05102), official mapo_trainer.py; β=0.1 (README HH; 0.8 for IMDB/TL;DR)",
              providers=("mapo_masks",)),
    Objective("sparsepo", sparsepo,
              {"beta": 0.1, "common": True, "mask_on_reward": True, "mask_on_kl": True, "l1_reward": 0.001,
               "l1_kl": 0.001, "halve_common_l1": True}, True, True, ("reward_masks",),
              "SparsePO (arXiv 2410.05102), official sparse_trainer.py; README HH sparse-common: β=0.1, "
              "l1_u=l1_d=0.001 (halved internally); IMDB/TL;DR use β=0.8 without L1",
              providers=("sparsepo_masks",), optional_inputs=("kl_masks",)),
    Objective("sepo", sepo, {"gamma": 1.0, "margin": 0.0, "normalization": "selected"}, False, False,
              ("selections",),
              "Yang et al. 2024 (arXiv 2408.13518) Eq. 10-11; official utils_selective.py (γ=1, λ=0, mean over "
              "selected tokens); paper: γ=2.1, λ=0.5, k=0.3", providers=("sepo_selections",)),
    Objective("fpo", fpo, {"beta": 0.1, "alpha": 0.5, "k": 50, "topk": "policy"}, True, False,
              ("features", "ref_features"),
              "Yin et al. 2024 (arXiv 2411.07618v4) Eq. 8-11, Table 5 (β=0.1, α=0.5); official fpo.py (k=50, "
              "top-k of the policy features)", optional_inputs=("ref_mean_logps",),
              reference_free_with=("ref_mean_logps",)),
    Objective("tis_dpo", tis_dpo, {"beta": 0.1}, True, True, ("weights",),
              "Liu et al. (TIS-DPO, ICLR-2025 submission) Eq. 15-19 with TDPO's KL sign; β=0.1 (official "
              "config/loss/tisdpo.yaml)",
              providers=("weights_columns",)),
    Objective("confpo", confpo, {"beta": 1.5, "gamma": 1.6}, False, False, ("selections",),
              "Yoon et al. 2025 (arXiv 2506.08712), official cpo_trainer.py (ConfPO on SimPO); β=1.5, γ=1.6 "
              "(official commands/run_confpo.sh)", providers=("low_confidence_tokens",)),
)}


def get_objective(name: str) -> Objective:
    """The registry entry of ``name`` (e.g. "sparsepo"); ValueError listing the known names otherwise."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}") from None
