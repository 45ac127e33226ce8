"""Tests of tokenpo.tasks.fpo (notebook 04): the memory measurement, the SAE's cost to the language model, the search
for a behaviour's feature and its rate in generations, and FPO runs through the sentiment sweep."""
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tokenpo.data.collator import PreferenceCollator
from tokenpo.data.preference import tokenize_pairs
from tokenpo.models import train_tokenizer
from tokenpo.providers.sae import SAEConfig, SparseAutoencoder
from tokenpo.tasks.fpo import features, memory, saes
from tokenpo.tasks.sentiment.reward import LexiconReward
from tokenpo.tasks.sentiment.sweep import RunSpec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TEXTS = [f"the {a} {b} was {c} and {d}" for a in ("film", "meal", "room", "flight", "phone")
         for b in ("really", "quite", "not") for c in ("good", "bad", "fine", "great", "awful")
         for d in ("cheap", "late", "loud", "clean")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = train_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                       bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)).eval()
    pairs = [{"prompt": "the film was", "chosen": " good and great", "rejected": " bad"},
             {"prompt": "the room", "chosen": " was good", "rejected": " was awful and loud"},
             {"prompt": "my phone", "chosen": " works, good", "rejected": " broke"}]
    return tokenizer, model, tokenize_pairs(pairs, tokenizer, max_length=64), PreferenceCollator(tokenizer.pad_token_id)


def _exact_sae(d: int, layer: int, site: str) -> SparseAutoencoder:
    """A JumpReLU SAE that reconstructs exactly: features (relu(x), relu(−x)), decoder [I; −I]."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, width=2 * d, layer=layer, site=site))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.threshold.zero_()
    return sae.requires_grad_(False)


@pytest.mark.parametrize("site", ["block_out", "mlp_out"])
def test_lm_loss_with_an_exact_sae_is_unchanged_and_a_wrong_one_acts_at_its_site(world, site):
    tokenizer, model, pairs, collator = world
    same = saes.lm_loss_with_sae(model, _exact_sae(16, 0, site), pairs, collator)
    assert same["loss"] > 0 and abs(same["loss_increase"]) < 1e-5
    negating = _exact_sae(16, 0, site)
    with torch.no_grad():
        negating.W_dec.neg_()                    # reconstructs −x
    spliced = saes.lm_loss_with_sae(model, negating, pairs, collator)

    def negate(module, args, output):
        return (-output[0],) + tuple(output[1:]) if isinstance(output, tuple) else -output

    block = model.transformer.h[0]
    handle = (block if site == "block_out" else block.mlp).register_forward_hook(negate)
    try:
        expected = saes.lm_loss_with_sae(model, _exact_sae(16, 0, site), pairs, collator)["loss"]
    finally:
        handle.remove()
    assert spliced["loss_spliced"] == pytest.approx(expected, rel=1e-5)
    assert abs(spliced["loss_increase"]) > 1e-4


def test_find_feature_ranks_by_selectivity_and_checks_lengths(world, monkeypatch):
    tokenizer, model, pairs, collator = world
    lengths = [len(ids) for side in ("chosen", "rejected") for ids in pairs[f"{side}_ids"]]
    labels = {side: [(np.arange(len(ids)) == 0).astype(int) for ids in pairs[f"{side}_ids"]]
              for side in ("chosen", "rejected")}
    flat = [y for side in ("chosen", "rejected") for y in labels[side]]

    def planted(model_, sae, batches):   # feature 2 fires exactly on labelled tokens, feature 1 everywhere
        out = []
        for n, y in zip(lengths, flat):
            f = np.zeros((n, 4))
            f[:, 1] = 1.0
            f[:, 2] = 3.0 * y
            f[:, 3] = 0.5 * y + 0.5 * (np.arange(n) == n - 1)
            out.append(f)
        return out

    monkeypatch.setattr(features, "completion_features", planted)
    ranking = features.find_feature(model, None, pairs, collator, labels)
    assert ranking["feature"].tolist()[:2] == [2, 3] and ranking.loc[0, "selectivity"] == pytest.approx(1.0)
    assert 0 not in ranking["feature"].tolist()                       # never fires on labelled tokens
    assert ranking.loc[ranking.feature == 1, "selectivity"].item() == pytest.approx(0.0)
    short = {side: [y[:-1] for y in labels[side]] for side in labels}
    with pytest.raises(ValueError, match="row 0 \\(chosen\\)"):
        features.find_feature(model, None, pairs, collator, short)


def test_completion_features_cover_every_completion_token(world):
    tokenizer, model, pairs, collator = world
    sae = _exact_sae(16, -1, "block_out")
    feats = features.completion_features(model, sae, features._side_batches(pairs, collator, batch_size=2))
    assert [len(f) for f in feats] == [len(ids) for side in ("chosen", "rejected") for ids in pairs[f"{side}_ids"]]
    assert all(f.shape[1] == 32 for f in feats)


def test_generation_features_measure_rates_on_samples(world):
    tokenizer, model, pairs, collator = world
    sae = _exact_sae(16, -1, "block_out")
    reward = LexiconReward({"good": 1.0, "great": 1.0, "bad": -1.0})
    measure = features.GenerationFeatures(None, sae, 0, tokenizer, ["the film was", "the room"] * 4, reward,
                                          new_tokens=6, batch_size=3)
    result = measure(model)["feature"]
    assert result["n"] == 8 and 0 < result["firing_rate"] < 1 and 0 <= result["samples_with_feature"] <= 1
    assert 0 <= result["positive_word_rate"] <= 1 and 0 < result["distinct_2"] <= 1
    assert measure.measure(model) == result                              # seeded sampling
    other = features.GenerationFeatures(None, sae, 1, tokenizer, ["the film was"], reward, new_tokens=6)
    assert other.identity != measure.identity


def test_memory_separates_the_reference_free_methods():
    """At shapes where the full-vocabulary terms dominate, TDPO-2 holds more than FPO with its offline cache — also
    when the measuring parent is large (a notebook kernel): the workers' peaks are their own."""
    shape = memory.Shape(pairs=2, prompt=4, completion=60, n_layer=1, n_embd=64, vocab=8192, steps=2, threads=1)
    ballast = torch.ones(400 * 2**20 // 4)         # 400 MB held by the parent while it measures
    rows = pd.DataFrame(memory.compare(("tdpo2", "fpo"), repeats=1, shape=shape))
    del ballast
    peak = rows.set_index("method")["peak_mb"]
    assert (peak > 0).all() and peak["tdpo2"] > peak["fpo"] + 5
    with pytest.raises(ValueError, match="unknown methods"):
        memory.compare(("ppo",))


def test_fpo_run_specs_name_their_options():
    spec = RunSpec("fpo", 0.1, seed=2, options=(("alpha", 2.0), ("stop_chosen", False),
                                                 ("feature_weights", (1.0, 100.0))))
    assert spec.name.startswith("fpo-b0.1-alpha2.0-stop_chosenFalse-feature_weights") and spec.name.endswith("-s2")
    assert RunSpec("fpo", 0.1, options=(("feature_weights", (1.0, 5.0)),)).name != \
        RunSpec("fpo", 0.1, options=(("feature_weights", (1.0, 100.0)),)).name


def test_peak_memory_rises_with_an_allocation_and_restarts():
    """In a fresh process (a long-lived one may serve the allocation from memory it already holds)."""
    import json
    import subprocess
    import sys

    script = """
import json, torch
from tokenpo.utils import memory_mb, reset_peak_memory
reset_peak_memory()
before = memory_mb()[0]
block = torch.ones(64 * 2**20 // 4)
del block
rise = memory_mb()[1] - before
reset_peak_memory()
now, peak = memory_mb()
print(json.dumps({"rise": rise, "after_reset": peak - now}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["rise"] > 50 and out["after_reset"] < 20
