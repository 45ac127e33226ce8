"""Tests of tokenpo.tasks.sentiment: classifier reward, pair building, planted pairs, lexicon labels, mask-lexicon
alignment, sweep specs and verdict rules."""
import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tokenpo.data import load_sentiment_rows
from tokenpo.data.preference import PreferenceCollator, tokenize_pairs
from tokenpo.providers import SparsePOMasks
from tokenpo.models import train_tokenizer
from tokenpo.profiles import get_profile
from tokenpo.tasks.sentiment import alignment, analysis
from tokenpo.tasks.sentiment.data import (build_pairs, lexicon_spans, make_prompts, planted_pairs, split_rows,
                                          token_lexicon_labels)
from tokenpo.tasks.sentiment.reward import SentimentClassifier, train_classifier
from tokenpo.tasks.sentiment.sweep import RunResult, RunSpec, main_specs, simpo_grid_specs, train_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def rows():
    return load_sentiment_rows()


@pytest.fixture(scope="module")
def tokenizer(rows, tmp_path_factory):
    """A real byte-level BPE trained on 3,000 opinions (vocabulary 1,024): frequent words are single tokens, rarer
    ones are split, like the profiles' tokenizers."""
    return train_tokenizer([r.text for r in rows[:3000]], 1024, tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------------------- classifier
def test_classifier_orders_obvious_sentences_and_round_trips(rows, tmp_path):
    splits = split_rows(rows, n_test=150, n_pool=100, seed=0)
    model, report = train_classifier(splits.train, splits.test, max_train=600, seed=0)
    positive, neutral, negative = ("I love this, it is wonderful and amazing!", "The car is blue.",
                                   "I hate this, it is terrible and awful.")
    scores = model([positive, neutral, negative])
    assert scores[0] > scores[1] > scores[2]
    assert scores[0] > 0.3 and scores[2] < -0.3 and abs(scores[1]) < scores[0]
    assert report["test_accuracy"] > report["majority_baseline"]
    probabilities = model.probabilities([positive, neutral])
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-9)
    model.save(tmp_path)
    np.testing.assert_allclose(SentimentClassifier.load(tmp_path)([positive, negative]), scores[[0, 2]], atol=1e-9)
    assert model.identity == SentimentClassifier.load(tmp_path).identity


def test_split_rows_is_disjoint_and_seeded(rows):
    a, b = split_rows(rows, 50, 80, seed=3), split_rows(rows, 50, 80, seed=3)
    assert [r.text for r in a.pool] == [r.text for r in b.pool]
    texts = [set(r.text for r in part) for part in (a.train, a.test, a.pool)]
    assert len(texts[1]) == 50 and len(texts[2]) == 80
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    with pytest.raises(ValueError, match="training rows"):
        split_rows(rows[:10], 5, 5)


def test_make_prompts_takes_first_words_of_long_enough_texts():
    texts = ["one two three four five six", "too short", "one two three four again more"]
    assert make_prompts(texts, 3) == ["one two three"]
    assert make_prompts(texts, 2, min_extra_words=0) == ["one two", "too short"]


# ------------------------------------------------------------------------------------------------------ pairs
def test_build_pairs_chosen_beats_rejected_and_counts_ties():
    prompts = ["a", "b", "c", "d"]
    completions = [[" x", " y", " z"], [" p", " q"], [" m", ""], [" u", " v"]]
    rewards = [[0.1, 0.9, -0.5], [0.3, 0.3], [0.2, 0.8], [0.0, 0.05]]
    pairs = build_pairs(prompts, completions, rewards)
    assert [(r["chosen"], r["rejected"]) for r in pairs.rows] == [(" y", " z"), (" v", " u")]
    assert all(r["reward_chosen"] >= r["reward_rejected"] for r in pairs.rows)
    report = pairs.report
    assert (report["pairs"], report["ties"], report["too_few_nonempty"]) == (2, 1, 1)
    assert report["tie_share"] == pytest.approx(0.25)
    assert report["gap_mean"] == pytest.approx((1.4 + 0.05) / 2)
    assert build_pairs(prompts[3:], completions[3:], rewards[3:], tie_tolerance=0.1).report["ties"] == 1
    with pytest.raises(ValueError, match="prompt 0"):
        build_pairs(["a"], [[" x", " y"]], [[0.1]])


def test_planted_pairs_differ_only_at_swapped_tokens(tokenizer, rows):
    planted = planted_pairs(tokenizer, [r.text for r in rows[:2000]], n_prompt_words=3, max_length=64, limit=40)
    assert len(planted) == 40
    tokenized = tokenize_pairs(planted, tokenizer, max_length=64)
    for row in tokenized:
        chosen, rejected, swapped = row["chosen_ids"], row["rejected_ids"], list(row["swapped"])
        assert len(chosen) == len(rejected) and swapped
        differing = [j for j, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert differing and set(differing) <= set(swapped)
        words = tokenizer.decode([chosen[j] for j in swapped]).split()
        assert all(w.strip().lower() in {"good", "great", "love", "happy", "best", "amazing", "nice", "better", "safe",
                                         "fun", "beautiful", "smart", "excellent", "loved", "wonderful", "perfect",
                                         "glad", "cool", "exciting", "win"} for w in words), words
    labels = alignment.planted_labels(tokenized)
    assert [int(y.sum()) for y in labels["chosen"]] == [len(r["swapped"]) for r in tokenized]


def test_lexicon_labels_mark_sentiment_words():
    lexicon = {"love": 3.2, "terrible": -2.1, ":)": 2.0, "car": 0.0}
    text = "I love this terrible, car :)"
    spans = lexicon_spans(text, lexicon)
    assert [text[a:b] for a, b in spans] == ["love", "terrible", ":)"]


def test_token_lexicon_labels_follow_words(tokenizer):
    lexicon = {"love": 3.2, "terrible": -2.1}
    ids = tokenizer(" I love this terrible car", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = token_lexicon_labels(tokenizer, ids, lexicon)
    marked = "".join(tokenizer.decode([t]) for t, y in zip(ids, labels) if y)
    assert marked.split() == ["love", "terrible"]
    assert labels[-1] == 0 and len(labels) == len(ids)


# -------------------------------------------------------------------------------------------------- alignment
def _weights_like(labels, fn):
    return {side: [fn(y) for y in labels[side]] for side in labels}


def test_alignment_auroc_one_for_the_indicator_and_half_for_random():
    rng = np.random.default_rng(0)
    labels = {side: [(rng.random(30) < 0.2).astype(int) for _ in range(300)] for side in ("chosen", "rejected")}
    indicator = _weights_like(labels, lambda y: y.astype(float))
    assert alignment.alignment_auroc(indicator, labels) == pytest.approx(1.0)
    assert alignment.alignment_auroc(_weights_like(labels, lambda y: 1.0 - y), labels) == pytest.approx(0.0)
    random = _weights_like(labels, lambda y: rng.random(len(y)))
    assert abs(alignment.alignment_auroc(random, labels) - 0.5) < 0.03
    share = alignment.mass_share(indicator, labels)
    assert share["mass_on_labelled"] == pytest.approx(1.0) and 0.15 < share["uniform_share"] < 0.25
    uniform = alignment.mass_share(_weights_like(labels, lambda y: np.ones(len(y))), labels)
    assert uniform["mass_on_labelled"] == pytest.approx(uniform["uniform_share"])
    labelled_share = np.concatenate(labels["chosen"] + labels["rejected"]).mean()
    stats = alignment.alignment_stats(indicator, labels)
    assert stats["auroc"] == pytest.approx(1.0) and stats["sparsity"] == pytest.approx(1 - labelled_share)
    with pytest.raises(ValueError, match="row 0"):
        alignment.alignment_auroc({"chosen": [np.ones(3)], "rejected": []}, {"chosen": [np.ones(4)], "rejected": []})


def test_token_masks_give_one_weight_per_completion_token(tokenizer):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    pairs = [{"prompt": "The flight was", "chosen": " great, I loved it", "rejected": " late and bad"},
             {"prompt": "My phone", "chosen": " works", "rejected": " broke again today, sadly"}]
    tokenized = tokenize_pairs(pairs, tokenizer, max_length=64)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    masks = SparsePOMasks.from_model_config(model.config, mode="independent", mixer_init=1.0)
    lengths = {side: [len(r[f"{side}_ids"]) for r in tokenized] for side in ("chosen", "rejected")}
    states = alignment.ReferenceStates(model, tokenized, collator, batch_size=1)
    for kind in alignment.MASK_KINDS:
        weights = alignment.token_masks(states, kind, masks=masks)
        assert {side: [len(w) for w in weights[side]] for side in weights} == lengths
        assert all((w >= 0).all() for side in weights.values() for w in side)
    with pytest.raises(ValueError, match="needs the SparsePO"):
        alignment.token_masks(states, "kl")


def test_the_mask_analysis_reproduces_the_trainers_logged_mask_means(tokenizer):
    """The analyses read the masks through the same alignment as the trainer: the mean mask weight per completion
    token that `alignment.token_masks` gives on pairs equals what the trainer logs (mask/mean_*) on the same pairs."""
    from tokenpo.training import TrainConfig, evaluate_pairs

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)).eval()
    pairs = [{"prompt": "The flight was", "chosen": " great, I loved it", "rejected": " late and bad"},
             {"prompt": "My phone", "chosen": " works", "rejected": " broke again today, sadly"},
             {"prompt": "Service", "chosen": " was friendly and quick", "rejected": " was rude"}]
    tokenized = tokenize_pairs(pairs, tokenizer, max_length=64)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    masks = SparsePOMasks.from_model_config(model.config, mode="independent", mixer_init=1.0)
    with torch.no_grad():                              # a mask that varies from token to token
        for net in (masks.rw_mask, masks.kl_mask):
            net.layer_norm.weight.uniform_(0.5, 1.5)
    logged = evaluate_pairs(model, model, tokenized, TrainConfig(method="sparsepo", hparams={"common": False},
                                                                 batch_size=len(pairs)),
                            collator=collator, providers=[masks])
    states = alignment.ReferenceStates(model, tokenized, collator, batch_size=2)
    for kind in ("reward", "kl"):
        weights = alignment.token_masks(states, kind, masks=masks)
        for side in ("chosen", "rejected"):
            analysed = np.mean([w.mean() for w in weights[side]])
            assert analysed == pytest.approx(logged[f"mask/mean_{kind}_{side}"], rel=1e-5), (kind, side)
            assert np.std(np.concatenate(weights[side])) > 1e-3


# ------------------------------------------------------------------------------------------------------ sweep
def test_main_specs_simpo_grid_and_train_configs():
    cfg = get_profile("cpu").sentiment
    specs = main_specs(cfg, simpo=(1.0, 0.5))
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for method, betas in cfg.runs:
        for beta in betas:
            assert sorted(s.seed for s in specs if s.method == method and s.beta == beta) == \
                list(range(1, cfg.seeds + 1))
    assert {(s.beta, s.gamma) for s in specs if s.method == "simpo"} == {(1.0, 0.5)}
    grid = simpo_grid_specs(cfg)
    assert {s.seed for s in grid} == {0} and not set(s.name for s in grid) & set(names)  # the grid is kept apart
    sparse = train_config(RunSpec("sparsepo_independent", 0.8), cfg, "", 10)
    assert sparse.provider_learning_rate == cfg.mask_lr and sparse.save_every is None
    assert sparse.hparams == {"beta": 0.8, "common": False, "l1_reward": cfg.l1, "l1_kl": cfg.l1}
    assert train_config(RunSpec("simpo", 2.0, gamma=0.5), cfg, "", 10).hparams == {"beta": 2.0, "gamma": 0.5}
    sepo = train_config(RunSpec("sepo", 1.0, k=(0.1, 0.3)), cfg, "", 10)
    assert sepo.hparams == {"gamma": 1.0} and sepo.providers[0].column == "token_scores"
    assert train_config(RunSpec("sepo_rand", 1.0, k=(0.1, 0.3)), cfg, "", 10).providers[0].column is None
    with pytest.raises(ValueError, match="unknown method"):
        RunSpec("ppo", 0.1)


# --------------------------------------------------------------------------------------------------- analysis
def _result(method, seed, kls, rewards):
    evals = [{"step": 10 * (i + 1), "kl": kl, "reward": r, "vader": r, "judge": r}
             for i, (kl, r) in enumerate(zip(kls, rewards))]
    history = [{"step": i, "rewards/accuracies": 0.5 + 0.01 * i} for i in range(1, 11)]
    return RunResult(RunSpec(method, 0.1, seed=seed), history, evals,
                     analysis={"heldout": {"accuracy": 0.6 + seed / 100, "entropy": 3.0}})


def test_frontier_per_run_interpolates_and_never_extrapolates():
    results = [_result("dpo", 1, (0.5, 1.5, 3.0), (0.1, 0.3, 0.45)), _result("dpo", 2, (0.2, 0.8), (0.05, 0.2))]
    points = analysis.checkpoint_table(results, {"reward": 0.0, "vader": 0.0, "judge": 0.0})
    front = analysis.frontier_per_run(points, (1.0, 2.0), r_ref=0.0)
    assert front.loc[("dpo β=0.1", 1), "reward_at_kl_1"] == pytest.approx(0.1 + 0.2 * 0.5)
    assert np.isnan(front.loc[("dpo β=0.1", 2), "reward_at_kl_1"])          # seed 2 never reached KL 1
    claim = analysis.claim_data(analysis.per_seed(front.reset_index(), "reward_at_kl_1", label="dpo β=0.1"),
                                what="reward at KL 1")
    assert "seeds [2]" in claim.reason
    table = analysis.runs_table(results)
    assert table["held-out accuracy"].tolist() == pytest.approx([0.61, 0.62])
    assert table["train accuracy"].tolist() == pytest.approx([0.595, 0.595])  # mean of the last 20 % of the steps


def test_run_callback_evaluates_at_its_steps_and_analyses_after_the_last_step():
    from tokenpo.tasks.sentiment.sweep import _RunCallback

    calls = []

    def evaluator(policy, with_judge=False):
        calls.append(with_judge)
        return {"reward": 0.0}

    analysed = []
    callback = _RunCallback(evaluator, (2, 4), lambda p, m, i: analysed.append(p) or {"x": 1}, last_step=6)
    for step in range(1, 7):
        callback.on_step_end(step, {}, f"policy@{step}", [])
    assert [e["step"] for e in callback.evals] == [2, 4] and calls == [False, True]   # the judge at the last eval
    assert analysed == ["policy@6"] and callback.analysis == {"x": 1}
    no_eval = _RunCallback(None, (), lambda p, m, i: {"y": p}, last_step=3)
    for step in range(1, 4):
        no_eval.on_step_end(step, {}, step, [])
    assert no_eval.evals == [] and no_eval.analysis == {"y": 3}
