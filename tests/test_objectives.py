"""Objectives: hand-computed values (plain python math), equivalences, gradients, stop-gradients, masking, errors."""
import inspect
import math

import pytest
import torch

from tokenpo.objectives import (OBJECTIVES, confpo, dpo, dpop, fpo, get_objective, ipo, mapo, sepo, simpo, sparsepo,
                                tdpo1, tdpo2, tis_dpo)
from tokenpo.tokens import TokenStats

# Two pairs, T = 3. Values at positions where the mask is 0 are junk on purpose: they must not matter.
LP_W = [[-1.0, -2.0, -0.5], [-7.0, -0.4, -0.9]]
REF_W = [[-1.2, -1.5, -0.7], [3.0, -0.6, -1.0]]
KL_W = [[0.10, 0.20, 0.05], [9.0, 0.07, 0.02]]
M_W = [[1, 1, 1], [0, 1, 1]]
LP_L = [[-2.0, -1.0, 5.0], [-0.9, -1.4, -0.2]]
REF_L = [[-1.5, -1.1, -8.0], [-1.0, -1.0, -0.4]]
KL_L = [[0.30, 0.15, 4.00], [0.05, 0.01, 0.25]]
M_L = [[1, 1, 0], [1, 1, 1]]
MASK_W = [[0.5, 0.0, 2.0], [7.0, 1.5, 0.25]]      # token weights (junk 7.0 off the completion)
MASK_L = [[1.0, 0.75, 3.0], [0.2, 0.0, 1.25]]
MASK2_W = [[0.3, 1.1, 0.6], [0.0, 0.9, 0.4]]
MASK2_L = [[0.8, 0.2, 0.0], [1.5, 0.7, 0.1]]
SEL_W = [[1, 0, 1], [0, 1, 0]]
SEL_L = [[0, 1, 0], [1, 0, 1]]
FEAT_W = [[0.9, 0.1, 0.5, 0.0], [0.2, 0.8, 0.05, 0.6]]
FEAT_L = [[0.3, 0.7, 0.05, 0.4], [0.5, 0.1, 0.9, 0.25]]
REF_FEAT_W = [[0.7, 0.2, 0.6, 0.95], [0.1, 0.6, 0.3, 0.5]]
REF_FEAT_L = [[0.1, 0.9, 0.2, 0.35], [0.4, 0.3, 0.6, 0.15]]


# ------------------------------------------------------------------------------------- plain-python references
def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def msum(values, weights):
    return sum(v * w for v, w in zip(values, weights))


def lr(b, side):
    lp, ref = (LP_W, REF_W) if side == "w" else (LP_L, REF_L)
    return [a - r for a, r in zip(lp[b], ref[b])]


def seq(b, side, what, weights=None):
    """Σ_t mask·weight·what over row b of a side."""
    mask = M_W[b] if side == "w" else M_L[b]
    weights = weights[b] if weights is not None else [1.0] * 3
    values = {"lr": lr(b, side), "lp": (LP_W if side == "w" else LP_L)[b],
              "ref": (REF_W if side == "w" else REF_L)[b], "kl": (KL_W if side == "w" else KL_L)[b]}[what]
    return msum(values, [m * w for m, w in zip(mask, weights)])


def n(b, side):
    return sum(M_W[b] if side == "w" else M_L[b])


def stats(dtype=torch.float64, requires_grad=False, zero_kl=False):
    def make(values):
        return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)
    kl_w, kl_l = ([[0.0] * 3] * 2, [[0.0] * 3] * 2) if zero_kl else (KL_W, KL_L)
    chosen = TokenStats(make(LP_W), torch.tensor(M_W, dtype=dtype), make(REF_W), make(kl_w))
    rejected = TokenStats(make(LP_L), torch.tensor(M_L, dtype=dtype), make(REF_L), make(kl_l))
    return chosen, rejected


def pair(a, b, requires_grad=False):
    return (torch.tensor(a, dtype=torch.float64, requires_grad=requires_grad),
            torch.tensor(b, dtype=torch.float64, requires_grad=requires_grad))


def assert_losses(out, expected):
    assert out.losses.shape == (2,)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-10)


# ------------------------------------------------------------------------------------------- hand values
BETA = 0.3


def test_dpo_hand():
    expected = [-logsig(BETA * (seq(b, "w", "lr") - seq(b, "l", "lr"))) for b in range(2)]
    out = dpo(*stats(), beta=BETA)
    assert_losses(out, expected)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(BETA * (seq(0, "w", "lr") + seq(1, "w", "lr")) / 2)
    assert out.metrics["logps/rejected"].item() == pytest.approx((seq(0, "l", "lp") + seq(1, "l", "lp")) / 2)
    assert out.metrics["kl/chosen"].item() == pytest.approx((seq(0, "w", "kl") + seq(1, "w", "kl")) / 2)


@pytest.mark.parametrize("length_normalize", [True, False])
def test_ipo_hand(length_normalize):
    def h(b, side):
        return seq(b, side, "lr") / (n(b, side) if length_normalize else 1)
    expected = [(h(b, "w") - h(b, "l") - 1 / (2 * BETA)) ** 2 for b in range(2)]
    assert_losses(ipo(*stats(), beta=BETA, length_normalize=length_normalize), expected)


def test_simpo_hand():
    beta, gamma = 2.0, 0.5
    expected = [-logsig(beta * seq(b, "w", "lp") / n(b, "w") - beta * seq(b, "l", "lp") / n(b, "l") - gamma)
                for b in range(2)]
    chosen, rejected = stats()
    chosen.ref_logps = rejected.ref_logps = chosen.kl = rejected.kl = None   # reference-free
    assert_losses(simpo(chosen, rejected, beta=beta, gamma=gamma), expected)


def test_dpop_hand():
    lam = 5.0
    penalties = [max(0.0, -seq(b, "w", "lr")) for b in range(2)]
    assert penalties[0] > 0 and penalties[1] == 0          # row 0 lost chosen likelihood, row 1 did not
    expected = [-logsig(BETA * (seq(b, "w", "lr") - seq(b, "l", "lr") - lam * penalties[b])) for b in range(2)]
    assert_losses(dpop(*stats(), beta=BETA, lambda_=lam), expected)


def test_tdpo_hand():
    alpha = 0.4
    def tdpo_expected(a):
        return [-logsig(BETA * ((seq(b, "w", "lr") - seq(b, "l", "lr")) - a * (seq(b, "l", "kl") - seq(b, "w", "kl"))))
                for b in range(2)]
    assert_losses(tdpo1(*stats(), beta=BETA), tdpo_expected(1.0))
    out = tdpo2(*stats(), beta=BETA, alpha=alpha)
    assert_losses(out, tdpo_expected(alpha))
    reward = [BETA * (seq(b, "w", "lr") + seq(b, "w", "kl")) for b in range(2)]   # official TDPO logging
    assert out.metrics["rewards/chosen"].item() == pytest.approx(sum(reward) / 2)


def test_mapo_hand():
    expected = [-logsig(BETA * (seq(b, "w", "lr", MASK_W) - seq(b, "l", "lr", MASK_L)
                                - (seq(b, "l", "kl", MASK_L) - seq(b, "w", "kl", MASK_W)))) for b in range(2)]
    out = mapo(*stats(), beta=BETA, masks=pair(MASK_W, MASK_L))
    assert_losses(out, expected)
    # Per-row values, then the batch mean. Completion weights of the chosen side: row 0 = 0.5, 0.0, 2.0 and row 1 =
    # 1.5, 0.25 (7.0 is off the completion); rows have different lengths, so pooling all 5 tokens would give 1/5
    # and 4.25/5 instead.
    assert out.metrics["mask/sparsity_reward_chosen"].item() == pytest.approx((1 / 3 + 0) / 2)
    assert out.metrics["mask/mean_kl_chosen"].item() == pytest.approx(((0.5 + 0.0 + 2.0) / 3 + (1.5 + 0.25) / 2) / 2)
    # rejected: row 0 = 1.0, 0.75 (3.0 is off), row 1 = 0.2, 0.0, 1.25
    assert out.metrics["mask/sparsity_kl_rejected"].item() == pytest.approx((0 + 1 / 3) / 2)
    assert out.metrics["mask/mean_reward_rejected"].item() == pytest.approx((1.75 / 2 + 1.45 / 3) / 2)
    reward = [BETA * (seq(b, "w", "lr", MASK_W) - seq(b, "w", "kl", MASK_W)) for b in range(2)]   # official logging
    assert out.metrics["rewards/chosen"].item() == pytest.approx(sum(reward) / 2)


def test_mask_metrics_are_the_same_for_any_split_of_the_batch():
    """Per-row mask metrics averaged over micro-batches of one row each equal those of the whole batch (pooling
    tokens would not: the rows have 3 and 2 completion tokens)."""
    whole = mapo(*stats(), beta=BETA, masks=pair(MASK_W, MASK_L)).metrics
    parts = []
    for b in range(2):
        chosen, rejected = stats()
        rows = [TokenStats(*(t[b:b + 1] for t in (s.logps, s.mask, s.ref_logps, s.kl))) for s in (chosen, rejected)]
        masks = tuple(m[b:b + 1] for m in pair(MASK_W, MASK_L))
        parts.append(mapo(*rows, beta=BETA, masks=masks).metrics)
    keys = [k for k in whole if k.startswith("mask/")]
    assert len(keys) == 8
    for key in keys:
        assert whole[key].item() == pytest.approx((parts[0][key].item() + parts[1][key].item()) / 2), key


def l1(b, side, weights):
    """‖m ⊙ completion‖₁ of row b (weights are >= 0)."""
    return msum(weights[b], M_W[b] if side == "w" else M_L[b])


@pytest.mark.parametrize("mask_on_reward,mask_on_kl", [(True, True), (True, False), (False, True)])
def test_sparsepo_independent_hand(mask_on_reward, mask_on_kl):
    lu, ld = 0.01, 0.02
    ones = [[1.0] * 3] * 2
    mu_w, mu_l = (MASK_W, MASK_L) if mask_on_reward else (ones, ones)
    md_w, md_l = (MASK2_W, MASK2_L) if mask_on_kl else (ones, ones)
    expected = []
    for b in range(2):
        u = seq(b, "w", "lr", mu_w) - seq(b, "l", "lr", mu_l)
        delta = seq(b, "l", "kl", md_l) - seq(b, "w", "kl", md_w)
        loss = -logsig(BETA * (u - delta))
        if mask_on_reward:
            loss += lu * (l1(b, "w", MASK_W) + l1(b, "l", MASK_L))
        if mask_on_kl:
            loss += ld * (l1(b, "w", MASK2_W) + l1(b, "l", MASK2_L))
        expected.append(loss)
    out = sparsepo(*stats(), beta=BETA, common=False, reward_masks=pair(MASK_W, MASK_L),
                   kl_masks=pair(MASK2_W, MASK2_L), mask_on_reward=mask_on_reward, mask_on_kl=mask_on_kl,
                   l1_reward=lu, l1_kl=ld)
    assert_losses(out, expected)
    assert ("mask/sparsity_reward_chosen" in out.metrics) == mask_on_reward
    assert ("mask/sparsity_kl_chosen" in out.metrics) == mask_on_kl


@pytest.mark.parametrize("halve", [True, False])
def test_sparsepo_common_hand_halves_l1(halve):
    lu, ld = 0.01, 0.03
    factor = 0.5 if halve else 1.0
    expected = []
    for b in range(2):
        u = seq(b, "w", "lr", MASK_W) - seq(b, "l", "lr", MASK_L)
        delta = seq(b, "l", "kl", MASK_L) - seq(b, "w", "kl", MASK_W)
        expected.append(-logsig(BETA * (u - delta))
                        + factor * (lu + ld) * (l1(b, "w", MASK_W) + l1(b, "l", MASK_L)))
    out = sparsepo(*stats(), beta=BETA, common=True, reward_masks=pair(MASK_W, MASK_L), l1_reward=lu, l1_kl=ld,
                   halve_common_l1=halve)
    assert_losses(out, expected)
    reward = [BETA * (seq(b, "w", "lr", MASK_W) - seq(b, "w", "kl", MASK_W)) for b in range(2)]
    assert out.metrics["rewards/chosen"].item() == pytest.approx(sum(reward) / 2)


def test_sepo_hand_official_and_paper():
    def u(b, side, sel):
        return seq(b, side, "lp", sel) / msum(sel[b], M_W[b] if side == "w" else M_L[b])
    expected = [-logsig(u(b, "w", SEL_W) - u(b, "l", SEL_L)) for b in range(2)]
    chosen, rejected = stats()
    chosen.ref_logps = rejected.ref_logps = None
    out = sepo(chosen, rejected, selections=pair(SEL_W, SEL_L))
    assert_losses(out, expected)
    assert out.metrics["mask/mean_reward_chosen"].item() == pytest.approx((2 / 3 + 1 / 2) / 2)   # per row (3/5 pooled)
    assert out.metrics["mask/sparsity_reward_rejected"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)

    gamma, margin, k_w, k_l = 2.1, 0.5, 0.3, 0.4
    paper = [-logsig(gamma * seq(b, "w", "lp", SEL_W) / (n(b, "w") * k_w)
                     - gamma * seq(b, "l", "lp", SEL_L) / (n(b, "l") * k_l) - margin) for b in range(2)]
    assert_losses(sepo(chosen, rejected, selections=pair(SEL_W, SEL_L), gamma=gamma, margin=margin,
                       normalization="length", ratios=(k_w, k_l)), paper)


def _mse(policy, reference, k, union):
    top = sorted(range(len(policy)), key=lambda i: -policy[i])[:k]
    if union:
        top = set(top) | set(sorted(range(len(reference)), key=lambda i: -reference[i])[:k])
    return sum((policy[i] - reference[i]) ** 2 for i in top) / k


@pytest.mark.parametrize("union", [False, True])
def test_fpo_hand(union):
    beta, alpha, k = 0.2, 0.7, 2
    expected = []
    for b in range(2):
        margin = (seq(b, "w", "lp") - seq(b, "w", "ref")) / n(b, "w") - (seq(b, "l", "lp") - seq(b, "l", "ref")) / n(b, "l")
        d_w = _mse(FEAT_W[b], REF_FEAT_W[b], k, union)
        d_l = _mse(FEAT_L[b], REF_FEAT_L[b], k, union)
        expected.append(-logsig(beta * (margin - alpha * (d_l - d_w))))
    out = fpo(*stats(), features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), beta=beta,
              alpha=alpha, k=k, topk="union" if union else "policy")
    assert_losses(out, expected)
    assert _mse(FEAT_W[0], REF_FEAT_W[0], k, True) != _mse(FEAT_W[0], REF_FEAT_W[0], k, False)   # rules differ here


def test_fpo_offline_reference_means():
    chosen, rejected = stats()
    ref_means = (chosen.ref_logps * chosen.mask).sum(-1) / chosen.lengths, \
        (rejected.ref_logps * rejected.mask).sum(-1) / rejected.lengths
    online = fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), k=2)
    chosen.ref_logps = rejected.ref_logps = None
    offline = fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), k=2,
                  ref_mean_logps=ref_means)
    torch.testing.assert_close(offline.losses, online.losses)


def test_tis_dpo_hand():
    expected = [-logsig(BETA * (seq(b, "w", "lr", MASK_W) - seq(b, "l", "lr", MASK_L)
                                - (seq(b, "l", "kl", MASK_L) - seq(b, "w", "kl", MASK_W)))) for b in range(2)]
    assert_losses(tis_dpo(*stats(), beta=BETA, weights=pair(MASK_W, MASK_L)), expected)


# ------------------------------------------------------------------------------------------- equivalences
def ones_pair():
    return pair([[1.0] * 3] * 2, [[1.0] * 3] * 2)


def test_confpo_hand():
    """r(y) = β·mean of log π over the selected tokens; a pair with an empty side contributes 0 (official code)."""
    beta, gamma = 2.0, 0.5
    out = confpo(*stats(), selections=pair(SEL_W, SEL_L), beta=beta, gamma=gamma)
    for b in range(2):
        w = [s * m for s, m in zip(SEL_W[b], M_W[b])]
        lo = [s * m for s, m in zip(SEL_L[b], M_L[b])]
        r_w = beta * msum(LP_W[b], w) / sum(w)
        r_l = beta * msum(LP_L[b], lo) / sum(lo)
        assert out.losses[b].item() == pytest.approx(-logsig(r_w - r_l - gamma), rel=1e-12)
    empty = confpo(*stats(), selections=pair([[0, 0, 0], SEL_W[1]], SEL_L), beta=beta, gamma=gamma)
    assert empty.losses[0].item() == 0.0 and empty.losses[1].item() == pytest.approx(out.losses[1].item())


def test_equivalences():
    reference = tdpo1(*stats(), beta=BETA).losses
    for common in (True, False):
        out = sparsepo(*stats(), beta=BETA, common=common, reward_masks=ones_pair(), kl_masks=None if common
                       else ones_pair(), l1_reward=0.0, l1_kl=0.0)
        torch.testing.assert_close(out.losses, reference)
    torch.testing.assert_close(mapo(*stats(), beta=BETA, masks=ones_pair()).losses, reference)
    torch.testing.assert_close(tis_dpo(*stats(), beta=BETA, weights=ones_pair()).losses, reference)
    # TDPO with zero KL is DPO
    dpo_losses = dpo(*stats(), beta=BETA).losses
    torch.testing.assert_close(tdpo1(*stats(zero_kl=True), beta=BETA).losses, dpo_losses)
    torch.testing.assert_close(tdpo2(*stats(zero_kl=True), beta=BETA, alpha=0.5).losses, dpo_losses)
    # FPO with α = 0 is the length-normalised DPO margin loss
    chosen, rejected = stats()
    mean_lr = lambda s: (s.logratios.sum(-1) / s.lengths)
    torch.testing.assert_close(
        fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), alpha=0.0,
            beta=BETA, k=2).losses,
        -torch.nn.functional.logsigmoid(BETA * (mean_lr(chosen) - mean_lr(rejected))))
    # SePO selecting every token is the reference-free length-normalised objective
    mean_lp = lambda s: (s.logps * s.mask).sum(-1) / s.lengths
    all_tokens = pair(M_W, M_L)
    target = -torch.nn.functional.logsigmoid(mean_lp(chosen) - mean_lp(rejected))
    torch.testing.assert_close(sepo(chosen, rejected, selections=all_tokens).losses, target)
    torch.testing.assert_close(sepo(chosen, rejected, selections=all_tokens, normalization="length",
                                    ratios=(1.0, 1.0)).losses, target)


# ------------------------------------------------------------------------------------------- gradients
def _stats_from(lp_w, ref_w, kl_w, lp_l, ref_l, kl_l):
    return (TokenStats(lp_w, torch.tensor(M_W, dtype=torch.float64), ref_w, kl_w),
            TokenStats(lp_l, torch.tensor(M_L, dtype=torch.float64), ref_l, kl_l))


POSITIVE = lambda rows: [[v + 0.05 for v in row] for row in rows]   # finite differences must stay >= 0

# name -> (fn(chosen, rejected, *extras), extra inputs, indices of stop-gradient inputs among
#          (lp_w, ref_w, kl_w, lp_l, ref_l, kl_l, *extras): gradcheck holds those constant; they are tested below)
GRAD_CASES = {
    "dpo": (lambda c, r: dpo(c, r, beta=BETA), [], ()),
    "ipo": (lambda c, r: ipo(c, r, beta=BETA), [], ()),
    "simpo": (lambda c, r: simpo(c, r), [], ()),
    "dpop": (lambda c, r: dpop(c, r, lambda_=5.0), [], ()),
    "tdpo1": (lambda c, r: tdpo1(c, r, beta=BETA), [], ()),
    "tdpo2": (lambda c, r: tdpo2(c, r, beta=BETA), [], (2,)),
    "mapo": (lambda c, r, a, b: mapo(c, r, masks=(a, b)), [POSITIVE(MASK_W), POSITIVE(MASK_L)], (6, 7)),
    "sparsepo": (lambda c, r, a, b, d, e: sparsepo(c, r, common=False, reward_masks=(a, b), kl_masks=(d, e),
                                                   l1_reward=0.01, l1_kl=0.02),
                 [POSITIVE(m) for m in (MASK_W, MASK_L, MASK2_W, MASK2_L)], ()),
    "sepo": (lambda c, r: sepo(c, r, selections=pair(SEL_W, SEL_L)), [], ()),
    "fpo": (lambda c, r, a, b, d, e: fpo(c, r, features=(a, b), ref_features=(d, e), k=2, topk="union"),
            [FEAT_W, FEAT_L, REF_FEAT_W, REF_FEAT_L], (6, 8, 9)),
    "tis_dpo": (lambda c, r, a, b: tis_dpo(c, r, weights=(a, b)), [POSITIVE(MASK_W), POSITIVE(MASK_L)], (6, 7)),
    "confpo": (lambda c, r: confpo(c, r, selections=pair(SEL_W, SEL_L)), [], ()),
}


def test_every_objective_has_a_gradient_case():
    assert set(GRAD_CASES) == set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    fn, extras, constant = GRAD_CASES[name]
    values = [LP_W, REF_W, KL_W, LP_L, REF_L, KL_L] + extras
    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=i not in constant) for i, v in enumerate(values)]

    def f(*tensors):
        return fn(*_stats_from(*tensors[:6]), *tensors[6:]).losses

    assert torch.autograd.gradcheck(f, tuple(inputs))


def _grads(out, *tensors):
    grads = torch.autograd.grad(out.losses.sum(), tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


def test_stop_gradients_tdpo():
    chosen, rejected = stats(requires_grad=True)
    g_w, g_l = _grads(tdpo2(chosen, rejected), chosen.kl, rejected.kl)
    assert (g_w == 0).all() and (g_l != 0).any()
    chosen, rejected = stats(requires_grad=True)
    g_w, g_l = _grads(tdpo1(chosen, rejected), chosen.kl, rejected.kl)
    assert (g_w != 0).any() and (g_l != 0).any()


def test_stop_gradients_fpo():
    chosen, rejected = stats(requires_grad=True)
    features, ref_features = pair(FEAT_W, FEAT_L, True), pair(REF_FEAT_W, REF_FEAT_L, True)
    out = fpo(chosen, rejected, features=features, ref_features=ref_features, k=2)
    g_fw, g_fl, g_rw, g_rl, g_lp = _grads(out, *features, *ref_features, chosen.logps)
    assert (g_fw == 0).all(), "chosen feature constraint must be stop-gradient"
    assert (g_fl != 0).any() and (g_lp != 0).any()
    assert (g_rw == 0).all() and (g_rl == 0).all(), "reference features are constants"


def test_mask_gradients_mapo_none_sparsepo_flow():
    chosen, rejected = stats(requires_grad=True)
    masks = pair(MASK_W, MASK_L, True)
    assert all((g == 0).all() for g in _grads(mapo(chosen, rejected, masks=masks), *masks))
    chosen, rejected = stats(requires_grad=True)
    masks, kl_masks = pair(MASK_W, MASK_L, True), pair(MASK2_W, MASK2_L, True)
    out = sparsepo(chosen, rejected, common=False, reward_masks=masks, kl_masks=kl_masks, l1_reward=0.0, l1_kl=0.0)
    grads = _grads(out, *masks, *kl_masks, chosen.kl, rejected.kl)
    assert all((g != 0).any() for g in grads), "SparsePO: masks and both KL terms get gradients"
    completion = [torch.tensor(M_W, dtype=torch.bool), torch.tensor(M_L, dtype=torch.bool)] * 2
    assert all((g[~m] == 0).all() for g, m in zip(grads[:4], completion)), "no gradient off the completion"


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_prompt_and_padding_positions_contribute_nothing(name):
    fn, extras, _ = GRAD_CASES[name]
    values = [LP_W, REF_W, KL_W, LP_L, REF_L, KL_L]
    base = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    extra = [torch.tensor(v, dtype=torch.float64) for v in extras]
    out = fn(*_stats_from(*base), *extra)
    off = [~torch.tensor(m, dtype=torch.bool) for m in (M_W, M_W, M_W, M_L, M_L, M_L)]
    for grad, mask in zip(_grads(out, *base), off):
        assert (grad[mask] == 0).all()
    # Zeroing the junk off the completion changes nothing.
    clean = [torch.tensor(v, dtype=torch.float64) * ~m for v, m in zip(values, off)]
    torch.testing.assert_close(fn(*_stats_from(*clean), *extra).losses, out.losses.detach())


def test_metrics_are_detached_scalars():
    chosen, rejected = stats(requires_grad=True)
    out = sparsepo(chosen, rejected, reward_masks=pair(MASK_W, MASK_L, True))
    assert out.losses.requires_grad
    for name, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad, name
    assert out.metrics["rewards/accuracies"].item() in (0.0, 0.5, 1.0)


# ------------------------------------------------------------------------------------------- registry and errors
def test_registry_defaults_and_requirements():
    assert set(OBJECTIVES) == {"dpo", "ipo", "simpo", "dpop", "tdpo1", "tdpo2", "mapo", "sparsepo", "sepo", "fpo",
                               "tis_dpo", "confpo"}
    extras = {"masks": pair(MASK_W, MASK_L), "reward_masks": pair(MASK_W, MASK_L), "kl_masks": None,
              "selections": pair(SEL_W, SEL_L), "features": pair(FEAT_W, FEAT_L),
              "ref_features": pair(REF_FEAT_W, REF_FEAT_L), "weights": pair(MASK_W, MASK_L)}
    for name, objective in OBJECTIVES.items():
        assert get_objective(name) is objective and objective.source
        parameters = inspect.signature(objective.fn).parameters
        assert set(objective.defaults) | set(objective.extra_inputs) <= set(parameters), name
        kwargs = {key: extras[key] for key in objective.extra_inputs}
        if name == "fpo":
            kwargs["k"] = 2
        chosen, rejected = stats()
        if not objective.needs_kl:
            chosen.kl = rejected.kl = None
        if not objective.needs_reference:
            chosen.ref_logps = rejected.ref_logps = None
        out = objective(chosen, rejected, **kwargs)
        assert torch.isfinite(out.losses).all() and out.metrics["loss"].item() == pytest.approx(out.loss.item())
        if objective.needs_kl:
            chosen.kl = None
            with pytest.raises(ValueError, match="chosen.kl is None"):
                objective(chosen, rejected, **kwargs)
        elif objective.needs_reference:
            chosen.ref_logps = None
            with pytest.raises(ValueError, match="chosen.ref_logps is None"):
                objective(chosen, rejected, **kwargs)


# Every default, with its source (the docs' equations page cites the same). A default changed in the registry must
# be changed here too, on purpose: the test fails on any silent edit (e.g. IPO's length normalisation, DPOP's λ).
GOLDEN_DEFAULTS = {
    "dpo": {"beta": 0.1},                                            # TRL; FPO Table 5
    "ipo": {"beta": 0.1, "length_normalize": True},                  # TRL loss_type="ipo" (÷ |y|)
    "simpo": {"beta": 2.0, "gamma": 0.5},                            # FPO Table 5
    "dpop": {"beta": 0.1, "lambda_": 50.0},                          # Smaug paper
    "tdpo1": {"beta": 0.1},                                          # FPO Table 5
    "tdpo2": {"beta": 0.1, "alpha": 0.5},                            # FPO Table 5; TDPO config/loss/tdpo.yaml
    "mapo": {"beta": 0.1},                                           # SparsePO README (HH)
    "sparsepo": {"beta": 0.1, "common": True, "mask_on_reward": True, "mask_on_kl": True, "l1_reward": 0.001,
                 "l1_kl": 0.001, "halve_common_l1": True},           # SparsePO README (HH sparse-common)
    "sepo": {"gamma": 1.0, "margin": 0.0, "normalization": "selected"},   # official utils_selective.py
    "fpo": {"beta": 0.1, "alpha": 0.5, "k": 50, "topk": "policy"},   # FPO Table 5; official fpo.py
    "tis_dpo": {"beta": 0.1},                                        # official config/loss/tisdpo.yaml
    "confpo": {"beta": 1.5, "gamma": 1.6},                           # official commands/run_confpo.sh
}
GOLDEN_INPUTS = {"mapo": ("masks",), "sparsepo": ("reward_masks", "kl_masks"), "sepo": ("selections",),
                 "fpo": ("features", "ref_features", "ref_mean_logps"), "tis_dpo": ("weights",),
                 "confpo": ("selections",)}
GOLDEN_PROVIDERS = {"mapo": ("mapo_masks",), "sparsepo": ("sparsepo_masks",), "sepo": ("sepo_selections",),
                    "tis_dpo": ("weights_columns",), "confpo": ("low_confidence_tokens",)}


@pytest.mark.parametrize("name", sorted(GOLDEN_DEFAULTS))
def test_registry_defaults_are_the_documented_ones(name):
    objective = get_objective(name)
    assert objective.defaults == GOLDEN_DEFAULTS[name]
    assert set(objective.input_names) == set(GOLDEN_INPUTS.get(name, ()))
    assert objective.providers == GOLDEN_PROVIDERS.get(name, ())
    assert set(GOLDEN_DEFAULTS) == set(OBJECTIVES)


def test_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective 'dpo2'; known objectives: dpo, ipo"):
        get_objective("dpo2")


def test_bad_inputs_raise_clear_errors():
    chosen, rejected = stats()
    short = TokenStats(rejected.logps[:, :2], rejected.mask[:, :2], rejected.ref_logps[:, :2], rejected.kl[:, :2])
    with pytest.raises(ValueError, match="chosen and rejected statistics differ in shape"):
        dpo(chosen, short)
    with pytest.raises(ValueError, match=r"chosen.ref_logps has shape \(2, 2\), expected \(2, 3\)"):
        dpo(TokenStats(chosen.logps, chosen.mask, chosen.ref_logps[:, :2]), rejected)
    empty = TokenStats(rejected.logps, rejected.mask * torch.tensor([[1.0], [0.0]]), rejected.ref_logps, rejected.kl)
    with pytest.raises(ValueError, match=r"rejected row\(s\) \[1\] have an empty completion"):
        dpo(chosen, empty)
    for beta in (0.0, -1.0, math.inf, math.nan, "0.1"):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            tdpo1(chosen, rejected, beta=beta)
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        sepo(chosen, rejected, selections=pair(SEL_W, SEL_L), margin=-0.5)
    for ratio in (1.5, math.inf, 0.0):
        with pytest.raises(ValueError, match=r"ratio_chosen must be a share of the tokens in \(0, 1\]"):
            sepo(chosen, rejected, selections=pair(SEL_W, SEL_L), normalization="length", ratios=(ratio, 0.3))
    with pytest.raises(ValueError, match=r"masks\[rejected\] has shape \(2, 2\), expected \(2, 3\)"):
        mapo(chosen, rejected, masks=(torch.ones(2, 3), torch.ones(2, 2)))
    with pytest.raises(ValueError, match=r"negative values \(first in row 1\)"):
        mapo(chosen, rejected, masks=(torch.ones(2, 3), torch.tensor([[1.0, 1, 1], [1, -0.5, 1]])))
    with pytest.raises(ValueError, match="missing required extra input masks"):
        mapo(chosen, rejected)
    with pytest.raises(ValueError, match="missing required extra input reward_masks"):
        sparsepo(chosen, rejected, common=False, kl_masks=ones_pair())
    with pytest.raises(ValueError, match="common=True uses one mask"):
        sparsepo(chosen, rejected, reward_masks=ones_pair(), kl_masks=ones_pair())
    with pytest.raises(ValueError, match="is TDPO-1"):
        sparsepo(chosen, rejected, reward_masks=ones_pair(), mask_on_reward=False, mask_on_kl=False)
    with pytest.raises(ValueError, match="l1_kl must be a finite number >= 0"):
        sparsepo(chosen, rejected, reward_masks=ones_pair(), l1_kl=-0.1)
    with pytest.raises(ValueError, match="must be 0/1"):
        sepo(chosen, rejected, selections=pair(MASK_W, MASK_L))
    with pytest.raises(ValueError, match=r"selections\[chosen\] select no token in row\(s\) \[0\]"):
        sepo(chosen, rejected, selections=pair([[0, 0, 0], [0, 1, 0]], SEL_L))
    with pytest.raises(ValueError, match="normalization must be"):
        sepo(chosen, rejected, selections=pair(SEL_W, SEL_L), normalization="mean")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, F=4\]"):
        fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), k=5)
    with pytest.raises(ValueError, match="missing required extra input ref_features"):
        fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), k=2)
    with pytest.raises(ValueError, match="topk must be"):
        fpo(chosen, rejected, features=pair(FEAT_W, FEAT_L), ref_features=pair(REF_FEAT_W, REF_FEAT_L), k=2,
            topk="ref")


@pytest.mark.parametrize("name", ["mapo", "sparsepo", "tis_dpo"])
@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_non_finite_weights_off_the_completion_reach_neither_loss_nor_gradient(name, junk):
    """A NaN/inf token weight at a prompt or padding position (where the mask is 0) changes nothing."""
    fn, extras, _ = GRAD_CASES[name]
    base = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (LP_W, REF_W, KL_W, LP_L, REF_L, KL_L)]
    clean = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in extras]
    poisoned = [t.detach().clone().requires_grad_(True) for t in clean]
    for t, mask in zip(poisoned, [M_W, M_L] * (len(poisoned) // 2)):
        with torch.no_grad():
            t[~torch.tensor(mask, dtype=torch.bool)] = junk
    expected = fn(*_stats_from(*base), *clean).losses
    got = fn(*_stats_from(*base), *poisoned).losses
    torch.testing.assert_close(got, expected.detach())
    grads = torch.autograd.grad(got.sum(), [*base, *poisoned], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_fpo_ablation_options():
    """stop_chosen=False lets gradient reach the chosen features; feature weights scale one feature's term (and
    always count it)."""
    chosen, rejected = stats(requires_grad=True)
    features, ref_features = pair(FEAT_W, FEAT_L, True), pair(REF_FEAT_W, REF_FEAT_L)
    out = fpo(chosen, rejected, features=features, ref_features=ref_features, k=2, stop_chosen=False)
    g_fw, g_fl = _grads(out, *features)
    assert (g_fw != 0).any() and (g_fl != 0).any()
    base = fpo(*stats(), features=pair(FEAT_W, FEAT_L), ref_features=ref_features, k=1)
    # feature 3 is outside every row's policy top-1: weighting it adds w·(c̄ − c̄_ref)² / k to D
    weights = torch.tensor([1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    weighted = fpo(*stats(), features=pair(FEAT_W, FEAT_L), ref_features=ref_features, k=1, feature_weights=weights)
    extra = [4.0 * (FEAT_L[b][3] - REF_FEAT_L[b][3]) ** 2 for b in range(2)]
    torch.testing.assert_close(weighted.metrics["features/mse_rejected"] - base.metrics["features/mse_rejected"],
                               torch.tensor(sum(extra) / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"feature_weights must be \[F=4\]"):
        fpo(*stats(), features=pair(FEAT_W, FEAT_L), ref_features=ref_features, k=1, feature_weights=torch.ones(3))
