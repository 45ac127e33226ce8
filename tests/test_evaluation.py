"""Evaluation: sampling, sequence KL, confidence intervals, frontiers, reward scorers and the evaluate modules."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from tokenpo.evaluation import (ClassifierSentiment, CodeCorrectness, Completions, Harmlessness, Relevance, RougeL,
                                VaderSentiment, frontier_reward_at, frontiers, generate_completions, get_scorer,
                                mean_ci, pareto_frontier, rouge_l, sequence_kl)

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["the movie was great and the acting was wonderful.", "the plot made no sense, a terrible film.",
          "what is the capital of france? paris is the capital.", "i loved every minute of it."] * 25


@pytest.fixture(scope="module")
def tokenizer():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tokenizer),
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


PROMPTS = ["the movie was", "what is the capital", "i loved every minute of it. the plot"]


# -------------------------------------------------------------------------------------------------------- sampling

def test_left_padded_batches_generate_what_single_prompts_do(policy, tokenizer):
    batched = generate_completions(policy, tokenizer, PROMPTS, max_new_tokens=8, do_sample=False, batch_size=3)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_completions(policy, tokenizer, [prompt], max_new_tokens=8, do_sample=False)
        assert alone.completion_ids[0] == batched.completion_ids[i]
    assert batched.prompt_ids[0] == tokenizer(PROMPTS[0])["input_ids"]
    for ids, done in zip(batched.completion_ids, batched.finished):
        assert 1 <= len(ids) <= 8
        assert done == (ids[-1] == tokenizer.eos_token_id) and ids.count(tokenizer.eos_token_id) <= 1


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(policy, tokenizer):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_completions(policy, tokenizer, PROMPTS * 3, max_new_tokens=6, seed=7, top_k=20, top_p=0.9,
                             temperature=0.8, batch_size=4, progress=False)
    assert torch.rand(1) == before
    b = generate_completions(policy, tokenizer, PROMPTS * 3, max_new_tokens=6, seed=7, top_k=20, top_p=0.9,
                             temperature=0.8, batch_size=4, progress=False)
    c = generate_completions(policy, tokenizer, PROMPTS * 3, max_new_tokens=6, seed=8, top_k=20, top_p=0.9,
                             temperature=0.8, batch_size=4, progress=False)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    assert a.texts[0] == tokenizer.decode(a.completion_ids[0], skip_special_tokens=True)


# -------------------------------------------------------------------------------------------------------------- KL

def test_sequence_kl_is_zero_for_identical_models(policy, tokenizer):
    samples = generate_completions(policy, tokenizer, PROMPTS, max_new_tokens=10, seed=1)
    kl = sequence_kl(policy, copy.deepcopy(policy), samples)
    assert np.all(kl.sampled == 0.0) and np.all(kl.exact == 0.0)
    assert kl.lengths.tolist() == [len(c) for c in samples.completion_ids]


def test_sequence_kl_matches_a_manual_computation(policy, tokenizer):
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = generate_completions(policy, tokenizer, PROMPTS, max_new_tokens=10, seed=2)
    kl = sequence_kl(policy, reference, samples, batch_size=2)
    assert np.all(kl.exact > 0)
    for i, (p, c) in enumerate(zip(samples.prompt_ids, samples.completion_ids)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(policy(ids).logits[0, len(p) - 1:-1].double(), -1)
            lr = torch.log_softmax(reference(ids).logits[0, len(p) - 1:-1].double(), -1)
        target = torch.tensor(c)
        sampled = (lp[range(len(c)), target] - lr[range(len(c)), target]).sum().item()
        exact = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=lp),
                                                  torch.distributions.Categorical(logits=lr)).sum().item()
        assert kl.sampled[i] == pytest.approx(sampled, abs=1e-4)
        assert kl.exact[i] == pytest.approx(exact, abs=1e-4)


# ----------------------------------------------------------------------------------------- intervals and frontiers

def test_mean_ci_normal_and_bootstrap():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    ci = mean_ci(values)
    half = NormalDist().inv_cdf(0.975) * math.sqrt(2.5) / math.sqrt(5)
    assert (ci.mean, ci.low, ci.high, ci.n) == (3.0, pytest.approx(3 - half), pytest.approx(3 + half), 5)
    boot = mean_ci(values, method="bootstrap", seed=0)
    assert boot == mean_ci(values, method="bootstrap", seed=0)
    assert 1.0 <= boot.low < 3.0 < boot.high <= 5.0
    assert math.isnan(mean_ci([2.0]).low)
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])


def test_pareto_frontier_on_hand_made_points():
    kl = [0.5, 1.0, 1.0, 2.0, 3.0, 0.2, 4.0]
    reward = [0.1, 0.5, 0.3, 0.4, 0.9, 0.1, 0.9]
    fkl, freward = pareto_frontier(kl, reward)
    # (0.5, 0.1) ties (0.2, 0.1) at more KL; (1.0, 0.3) and (2.0, 0.4) are beaten by (1.0, 0.5); (4.0, 0.9) by (3.0, 0.9)
    assert fkl.tolist() == [0.2, 1.0, 3.0] and freward.tolist() == [0.1, 0.5, 0.9]
    assert frontier_reward_at((fkl, freward), 2.5) == 0.5
    assert frontier_reward_at((fkl, freward), 3.0) == 0.9
    assert math.isnan(frontier_reward_at((fkl, freward), 0.1))
    per_label = frontiers([(1.0, 0.2, "dpo"), (2.0, 0.1, "dpo"), (0.5, 0.3, "sparsepo"), (1.5, 0.6, "sparsepo")])
    assert list(per_label) == ["dpo", "sparsepo"]
    assert per_label["dpo"][0].tolist() == [1.0] and per_label["sparsepo"][1].tolist() == [0.3, 0.6]


# --------------------------------------------------------------------------------------------------------- scorers

def test_vader_ranks_positive_above_negative():
    scores = VaderSentiment()(["This movie was wonderful, I loved every minute of it!",
                               "A terrible, boring film. I hated it."])
    assert scores[0] > 0.5 and scores[1] < -0.5
    assert get_scorer("sentiment")(["great"]).shape == (1,)


def test_rouge_l_equals_hand_computed_values():
    reference = "The cat sat on the mat."
    # LCS("the cat lay on the mat", ref) = "the cat on the mat" = 5 of 6 tokens each side: F1 = 5/6
    # LCS("on the mat the cat", ref) = "on the mat" = 3: P = 3/5, R = 3/6, F1 = 2PR/(P+R) = 6/11
    predictions = ["the cat lay on the mat", "On the mat, the cat!", "dogs bark", "The cat sat on the mat"]
    expected = [5 / 6, 6 / 11, 0.0, 1.0]
    for use_package in (False, True):
        if use_package:
            pytest.importorskip("rouge_score")
        assert rouge_l(predictions, [reference] * 4, use_package=use_package) == pytest.approx(expected)
    scorer = RougeL({"summarise: cats": reference})
    assert scorer(["the cat lay on the mat"], ["summarise: cats"])[0] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="no reference"):
        scorer(["x"], ["unknown prompt"])


def test_harmlessness_ranks_an_insult_below_a_question():
    insult, question = Harmlessness()(["You are a stupid idiot and everyone hates you.", "How do I bake bread?"])
    assert insult < 0.2 < 0.8 < question


def test_relevance_ranks_on_topic_above_off_topic():
    from tokenpo.data.sources import SourceUnavailableError

    try:
        scorer = Relevance()
    except SourceUnavailableError as exc:
        pytest.skip(f"MiniLM could not be fetched: {exc}")
    prompts = ["What is the capital of France?"] * 2 + ["How do I bake bread?"] * 2
    answers = ["Paris is the capital of France.", "I enjoy playing football on weekends.",
               "Mix flour, water, yeast and salt, let it rise, then bake it.", "Paris is the capital of France."]
    s = scorer(answers, prompts)
    assert s[0] > s[1] and s[2] > s[3]
    assert np.all(np.abs(s) <= 1 + 1e-6)


def test_classifier_sentiment_uses_the_label_names(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer), num_labels=3,
                        pad_token_id=tokenizer.pad_token_id,
                        id2label={0: "NEGATIVE", 1: "neutral", 2: "Positive"},
                        label2id={"NEGATIVE": 0, "neutral": 1, "Positive": 2})
    model = GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    scorer = ClassifierSentiment(str(tmp_path / "clf"))
    texts = ["the movie was great", "a terrible film"]
    with torch.no_grad():
        probs = torch.softmax(model(**tokenizer(texts, return_tensors="pt", padding=True)).logits, -1)
    assert scorer(texts) == pytest.approx((probs[:, 2] - probs[:, 0]).numpy(), abs=1e-5)

    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, None
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "anon")
    tokenizer.save_pretrained(tmp_path / "anon")
    with pytest.raises(ValueError, match="cannot tell which label"):
        ClassifierSentiment(str(tmp_path / "anon"))
    named = ClassifierSentiment(str(tmp_path / "anon"), positive="LABEL_2", negative="LABEL_0")
    assert named(texts).shape == (2,)


def test_code_correctness_scorer_runs_the_sandbox():
    problem = {"task_id": "toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    scorer = CodeCorrectness([problem], timeout=1.0)
    scores = scorer(["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"],
                    [problem["prompt"]] * 3)
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert [r.status for r in scorer.last_results] == ["passed", "failed", "timeout"]


# ------------------------------------------------------------------------------------------------ evaluate modules

def test_evaluate_modules_load_offline_from_the_repository(tmp_path):
    script = f"""
import json, evaluate
out = {{}}
m = evaluate.load({str(REPO / "metrics" / "sentiment")!r})
out["sentiment"] = m.compute(predictions=["I love this wonderful film", "I hate this awful film"])
m = evaluate.load({str(REPO / "metrics" / "rouge_l")!r})
out["rouge_l"] = m.compute(predictions=["the cat lay on the mat"], references=["the cat sat on the mat"])
m = evaluate.load({str(REPO / "metrics" / "harmlessness")!r})
out["harmlessness"] = m.compute(predictions=["you stupid idiot", "how do I bake bread?"])
m = evaluate.load({str(REPO / "metrics" / "pass_at_k")!r})
out["pass_at_k"] = m.compute(predictions=[["def f(x):\\n    return x + 1", "def f(x):\\n    return x"]],
                             references=["assert f(1) == 2"], k=[1, 2])
m = evaluate.load({str(REPO / "metrics" / "relevance")!r})
out["relevance_loaded"] = True
print(json.dumps(out))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    s = out["sentiment"]["scores"]
    assert s[0] > 0 > s[1] and out["sentiment"]["sentiment"] == pytest.approx(np.mean(s))
    assert out["rouge_l"]["rouge_l"] == pytest.approx(5 / 6)
    h = out["harmlessness"]["scores"]
    assert h[0] < h[1]
    assert out["pass_at_k"]["pass@1"] == 0.5 and out["pass_at_k"]["pass@2"] == 1.0
    assert out["pass_at_k"]["results"] == [["passed", "failed"]]
    assert out["relevance_loaded"]


def test_scorers_reject_bad_input():
    with pytest.raises(ValueError, match="text 1"):
        VaderSentiment()(["fine", 3])
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("bleu")
    with pytest.raises(ValueError, match="needs the prompts"):
        RougeL({})(["x"])
    assert isinstance(Completions([], [], [], [], []), Completions)
