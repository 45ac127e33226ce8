"""Tests of tokenpo.providers.sae (sparse autoencoder, activations) and tokenpo.providers.fpo (pooled features, the
offline reference cache)."""
import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import tokenpo.cache
from tokenpo.providers.activations import capture_sites
from tokenpo.providers.fpo import FPOReferenceCache, pooled_features
from tokenpo.providers.sae import (SAEConfig, SparseAutoencoder, _JumpReLU, _Step, collect_activations,
                                   residual_stream, train_sae)
from tokenpo.tokens import completion_logps

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synthetic():
    """Activations = sparse non-negative combinations (≈2 of 24 per vector) of random unit directions + offset."""
    g = torch.Generator().manual_seed(123)       # not the SAE's init seed (0): its first draws would be these
    d, n_true, n = 32, 24, 4096
    directions = torch.randn(n_true, d, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    active = (torch.rand(n, n_true, generator=g) < 2 / n_true).float()
    coefficients = active * (1 + torch.rand(n, n_true, generator=g))
    x = coefficients @ directions + 0.01 * torch.randn(n, d, generator=g) + 0.3
    return x, directions, active.sum(-1).mean().item()


def _explained_variance(sae, x):
    with torch.no_grad():
        recon, feats = sae(x)
    return 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), (feats > 0).float().sum(-1).mean()


@pytest.fixture(scope="module")
def jumprelu_sae(synthetic):
    x, _, _ = synthetic
    return train_sae(x, width=64, kind="jumprelu", l0_target=2.0, steps=1000, batch_size=256, lr=3e-3,
                     progress=False, seed=0)


def test_jumprelu_sae_learns_sparse_code(synthetic, jumprelu_sae):
    x, directions, true_l0 = synthetic
    ev, l0 = _explained_variance(jumprelu_sae, x)
    assert ev > 0.9
    assert 0.5 * true_l0 < l0 < 2 * true_l0                    # sparsity recovered (a ReLU SAE would be ~32)
    recovered = (directions @ jumprelu_sae.W_dec.t()).max(-1).values > 0.9
    assert recovered.float().mean() >= 0.9
    torch.testing.assert_close(jumprelu_sae.W_dec.norm(dim=-1), torch.ones(64))
    assert (jumprelu_sae.threshold >= 0).all() and jumprelu_sae.threshold.max() > 0.01   # θ was learned
    curve = jumprelu_sae.training_curve
    assert set(curve) >= {"step", "mse", "l0", "explained_variance"}
    assert curve["explained_variance"][-1] > curve["explained_variance"][0]
    assert curve["l0"][-1] < curve["l0"][0]


def test_topk_sae_learns_sparse_code(synthetic):
    x, directions, _ = synthetic
    sae = train_sae(x, width=64, kind="topk", k=4, steps=300, batch_size=256, lr=3e-3, progress=False)
    ev, l0 = _explained_variance(sae, x)
    assert ev > 0.9 and l0 <= 4
    assert ((directions @ sae.W_dec.t()).max(-1).values > 0.9).float().mean() >= 0.9


def test_jumprelu_pseudo_derivatives():
    """∂/∂θ JumpReLU = −(θ/ε)·K, ∂/∂θ H = −(1/ε)·K with the rectangle kernel K((z−θ)/ε) = 1[|z−θ| < ε/2]."""
    pre = torch.tensor([[0.49, 0.52, 0.7, 0.2], [0.51, 0.1, 0.5, 0.56]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    out = _JumpReLU.apply(pre, theta, eps)
    assert out.tolist() == [[0.0, pytest.approx(0.52), pytest.approx(0.7), 0.0],
                            [pytest.approx(0.51), 0.0, 0.0, pytest.approx(0.56)]]
    out.sum().backward()
    window = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    torch.testing.assert_close(theta.grad, -(0.5 / eps) * window.sum(0))
    torch.testing.assert_close(pre.grad, (pre > theta).float())
    pre.grad = None
    theta.grad = None
    _Step.apply(pre, theta, eps).sum().backward()
    torch.testing.assert_close(theta.grad, -(1 / eps) * window.sum(0))
    assert (pre.grad == 0).all()


@pytest.mark.parametrize("kind", ["jumprelu", "topk"])
def test_save_load_round_trip(tmp_path, kind):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, width=16, kind=kind, k=3 if kind == "topk" else None,
                                      input_scale=0.7, layer=1))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae.training_curve = {"step": [0], "mse": [1.0], "l0": [3.0], "explained_variance": [0.5]}
    sae.save_pretrained(tmp_path / "sae")
    assert sorted(f.name for f in (tmp_path / "sae").iterdir()) == ["config.json", "model.safetensors",
                                                                    "training_curve.json"]
    loaded = SparseAutoencoder.from_pretrained(tmp_path / "sae")
    x = torch.randn(5, 8)
    for a, b in zip(sae(x), loaded(x)):
        assert torch.equal(a, b)
    assert loaded.config == sae.config and loaded.training_curve == sae.training_curve
    assert loaded.fingerprint() == sae.fingerprint()
    with torch.no_grad():
        loaded.b_dec[0] += 1e-3
    assert loaded.fingerprint() != sae.fingerprint()
    with pytest.raises(ValueError, match="no SAE"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_from_gemma_scope_npz(tmp_path):
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(6, 10)).astype(np.float32),
              "W_dec": rng.normal(size=(10, 6)).astype(np.float32),
              "b_enc": rng.normal(size=10).astype(np.float32), "b_dec": rng.normal(size=6).astype(np.float32),
              "threshold": np.abs(rng.normal(size=10)).astype(np.float32)}
    np.savez(tmp_path / "params.npz", **params)
    sae = SparseAutoencoder.from_npz(tmp_path / "params.npz")
    x = torch.from_numpy(rng.normal(size=(3, 6)).astype(np.float32))
    pre = x @ torch.from_numpy(params["W_enc"]) + torch.from_numpy(params["b_enc"])
    expected = (pre > torch.from_numpy(params["threshold"])) * torch.relu(pre)     # official FPO encode
    torch.testing.assert_close(sae.encode(x), expected)


def test_pooled_features_official_vs_paper():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, width=16, kind="topk", k=4))
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    official = pooled_features(sae, hidden, mask, mode="official")
    paper = pooled_features(sae, hidden, mask, mode="paper")
    assert official.shape == (3, 16)
    ratio = (6 / mask.sum(-1).float())[:, None]                     # T / |y|
    torch.testing.assert_close(paper, official * ratio)
    feats = sae.encode(hidden)
    torch.testing.assert_close(official, (feats * mask[..., None]).mean(dim=1))
    official.sum().backward()
    assert hidden.grad is not None and (hidden.grad[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="pooling mode"):
        pooled_features(sae, hidden, mask, mode="max")


# ----------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _pair_batch(seed=0, rows=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    b, length = len(rows), 9
    out = {"row_index": torch.tensor(rows)}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, VOCAB, (b, length), generator=g)
        attn = torch.ones_like(ids)
        comp = torch.zeros_like(ids)
        comp[:, 3:] = 1
        attn[0, 7:], comp[0, 7:], ids[0, 7:] = 0, 0, 0
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_completion_mask": comp})
    return out


def test_residual_capture_and_activations(gpt2):
    batch = _pair_batch()
    ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    with torch.no_grad():
        hf = gpt2(ids, attention_mask=attn, output_hidden_states=True).hidden_states
    torch.testing.assert_close(residual_stream(gpt2, ids, attn, layer=0), hf[1])
    torch.testing.assert_close(residual_stream(gpt2, ids, attn, site="final_norm"), hf[-1])
    hooks_before = sum(len(m._forward_hooks) for m in gpt2.modules())   # HF keeps its own capture hooks
    with capture_sites(gpt2, [(-1, "block_out"), (0, "mlp_out")]) as cap:
        gpt2(ids, attention_mask=attn)
    torch.testing.assert_close(gpt2.transformer.ln_f(cap[(-1, "block_out")]), hf[-1])
    block = gpt2.transformer.h[0]     # block output = x + attn(ln_1 x) + mlp(ln_2(x + attn(ln_1 x)))
    with torch.no_grad():
        after_attn = hf[0] + block.attn(block.ln_1(hf[0]), attention_mask=None)[0]
    real = attn.bool()                # (the hand-run attention ignores padding: compare real tokens)
    torch.testing.assert_close((hf[1] - after_attn)[real], cap[(0, "mlp_out")][real], atol=1e-5, rtol=1e-4)
    assert sum(len(m._forward_hooks) for m in gpt2.modules()) == hooks_before
    acts = collect_activations(gpt2, [batch], layer=0, progress=False)
    n_tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert acts.shape == (n_tokens, 16)
    torch.testing.assert_close(acts[: int(attn.sum())], hf[1][attn.bool()])
    only = collect_activations(gpt2, [batch], layer=0, completion_only=True, max_tokens=10, progress=False)
    assert only.shape == (10, 16)
    with pytest.raises(ValueError, match="out of range"):
        residual_stream(gpt2, ids, attn, layer=5)


# ------------------------------------------------------------------------------------------------ FPO cache
def test_fpo_cache_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    cache = FPOReferenceCache(k=3, n_features=10, meta={"note": "test"})
    feats = {side: torch.rand(4, 10, generator=g) for side in ("chosen", "rejected")}
    cache.add(torch.tensor([7, 2, 9, 4]), logps_chosen=torch.tensor([-4.0, -6.0, -1.0, -3.0]),
              logps_rejected=torch.tensor([-8.0, -2.0, -5.0, -9.0]), lengths_chosen=torch.tensor([2, 3, 1, 3]),
              lengths_rejected=torch.tensor([4, 1, 5, 3]), features_chosen=feats["chosen"],
              features_rejected=feats["rejected"])
    target = cache.save(tmp_path)
    assert [f.name for f in tmp_path.iterdir()] == [target.name]
    loaded = FPOReferenceCache.load(tmp_path)
    assert (loaded.k, loaded.n_features, loaded.meta, len(loaded)) == (3, 10, {"note": "test"}, 4)
    out = loaded.get(torch.tensor([9, 7]))
    torch.testing.assert_close(out["ref_logps_mean_chosen"], torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(out["ref_logps_sum_rejected"], torch.tensor([-5.0, -8.0]))
    assert out["lengths_rejected"].tolist() == [5, 4]
    for side in ("chosen", "rejected"):
        source = feats[side][[2, 0]]
        top = source.topk(3, dim=-1)
        torch.testing.assert_close(out[f"ref_topk_values_{side}"], top.values)
        dense = out[f"ref_features_{side}"]
        assert ((dense > 0).sum(-1) == 3).all()
        torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    with pytest.raises(ValueError, match="row 5 is not in"):
        loaded.get(torch.tensor([5]))
    with pytest.raises(ValueError, match="already"):
        cache.add(torch.tensor([7]), logps_chosen=torch.zeros(1), logps_rejected=torch.zeros(1),
                  lengths_chosen=torch.ones(1), lengths_rejected=torch.ones(1),
                  features_chosen=torch.rand(1, 10), features_rejected=torch.rand(1, 10))


def test_fpo_cache_failed_write_leaves_nothing(tmp_path, monkeypatch):
    cache = FPOReferenceCache(k=2, n_features=4)
    cache.add(torch.tensor([0]), logps_chosen=torch.zeros(1), logps_rejected=torch.zeros(1),
              lengths_chosen=torch.ones(1), lengths_rejected=torch.ones(1),
              features_chosen=torch.rand(1, 4), features_rejected=torch.rand(1, 4))

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(tokenpo.cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fpo_cache_build_from_reference(tmp_path, gpt2):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, width=32, kind="topk", k=6, layer=1))
    batches = [_pair_batch(0, (0, 1, 2)), _pair_batch(1, (3, 4, 5))]
    cache = FPOReferenceCache.build(gpt2, sae, batches, k=4, layer=1, path=tmp_path / "fpo", progress=False)
    loaded = FPOReferenceCache.load(tmp_path / "fpo")
    assert len(loaded) == 6 and loaded.meta["sae"] == sae.fingerprint()
    out = loaded.get(torch.tensor([4, 0]))
    b = batches[1]
    labels_mask = b["chosen_completion_mask"][:, 1:]
    logps = completion_logps(gpt2, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_completion_mask"])
    torch.testing.assert_close(out["ref_logps_mean_chosen"][0], logps[1].sum() / labels_mask[1].sum())
    hidden = residual_stream(gpt2, b["chosen_input_ids"], b["chosen_attention_mask"], layer=1)[:, :-1]
    with torch.no_grad():
        pooled = pooled_features(sae, hidden, labels_mask)
    torch.testing.assert_close(out["ref_topk_values_chosen"][0], pooled[1].topk(4).values)
    assert out["lengths_chosen"].tolist() == [6, 4]
    # a batch that fails half-way writes nothing
    bad = _pair_batch(2, (6, 7, 8))
    del bad["row_index"]
    with pytest.raises(ValueError, match="row_index"):
        FPOReferenceCache.build(gpt2, sae, [batches[0], bad], k=4, layer=1, path=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists() or list((tmp_path / "bad").iterdir()) == []
    assert len(cache) == 6


def test_prepare_fpo_in_one_call_trains_with_the_offline_cache(tmp_path, gpt2):
    """Activations -> SAE -> report -> offline cache -> FPOFeatures -> a training step with no reference model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import _train_script as helper
    from tokenpo.providers.fpo import prepare_fpo
    from tokenpo.providers.sae import spliced
    from tokenpo.tokens import next_token_loss
    from tokenpo.training import TrainConfig, train

    reference = helper.tiny_model(0).eval()
    pairs = helper.make_pairs(16)
    prep = prepare_fpo(reference, pairs, helper.collate, layer=0, width=48, sae_steps=30, sae_batch=64, cache_k=16,
                       batch_size=4, progress=False)
    assert {"l0", "l0_share", "explained_variance", "dead_share"} <= set(prep.report)
    assert 0 < prep.report["l0"] <= 48 and len(prep.cache) == 16 and prep.cache.meta["sae"] == prep.sae.fingerprint()
    batch = helper.collate(pairs[:4])
    ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    with torch.no_grad():
        plain = next_token_loss(reference, ids, attn)[0]
        with spliced(reference, prep.sae, layer=0):
            with_sae = next_token_loss(reference, ids, attn)[0]
        again = next_token_loss(reference, ids, attn)[0]
    assert with_sae != plain and again == plain                  # the splice acts, and is removed afterwards
    config = TrainConfig(method="fpo", hparams={"k": 8}, providers=[prep.provider()], max_steps=2, batch_size=4,
                         learning_rate=1e-3, cpu=True, progress=False, save_final=False, out_dir=str(tmp_path / "run"))
    rows = train(helper.tiny_model(0), None, pairs, config, collator=helper.collate).history
    assert all(math.isfinite(r["loss"]) for r in rows) and "features/mse_rejected" in rows[-1]
