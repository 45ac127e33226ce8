"""Preference datasets: loading/saving, bad rows, TRL-style tokenisation, truncation flags, collation."""
from __future__ import annotations

import json

import datasets
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from tokenpo.data.preference import (BadRow, PreferenceCollator, load_preference_dataset, render_conversation,
                                     render_pair, save_preference_dataset, tokenize_pairs, truncation_report,
                                     validate_rows)

CORPUS = [
    "The movie was great and the acting was wonderful.",
    "The movie was terrible, the plot made no sense at all.",
    "What is the capital of France? The capital of France is Paris.",
    "I loved every minute of this film; the music was beautiful.",
    "def add(a, b):\n    return a + b\n",
    "user: how do I bake bread?\nassistant: Mix flour, water, salt and yeast, then bake.",
] * 20

ROWS = [
    {"prompt": "The movie was", "chosen": " great and wonderful.", "rejected": " terrible."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " I do not know, sorry."},
    {"prompt": "I loved", "chosen": " every minute of this film.", "rejected": " nothing"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """A real byte-level BPE (GPT-2 style), trained in the test, loaded as a transformers tokenizer."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def _trl_way(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """TRL's tokenize_row + collator, by hand: separate tokenisation, EOS appended, mask 1 on completion."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


# ---------------------------------------------------------------------------------------------- loading and saving

def test_load_from_list_json_jsonl_and_folder_round_trip(tmp_path):
    ds = load_preference_dataset(ROWS)
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == ROWS
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    for name in ("rows.json", "cols.json"):
        assert load_preference_dataset(tmp_path / name).to_list() == ROWS
    for target in (tmp_path / "saved.jsonl", tmp_path / "saved_folder"):
        save_preference_dataset(ds, target)
        assert load_preference_dataset(target).to_list() == ROWS
        with pytest.raises(ValueError, match="exists"):
            save_preference_dataset(ds, target)  # nothing overwritten silently
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_conversational_rows_load_and_render_without_template(tokenizer):
    row = {"prompt": [{"role": "user", "content": "How do I bake bread?"}],
           "chosen": [{"role": "assistant", "content": "Mix flour, water and yeast, then bake."}],
           "rejected": [{"role": "assistant", "content": "No idea."}]}
    ds = load_preference_dataset([row, row | {"rejected": [{"role": "assistant", "content": "Buy it."}]}])
    assert ds[0]["chosen"] == row["chosen"]
    assert render_pair(ds[0]) == {"prompt": "user: How do I bake bread?\nassistant:",
                                  "chosen": " Mix flour, water and yeast, then bake.", "rejected": " No idea."}
    tok = tokenize_pairs(ds, tokenizer)
    assert tokenizer.decode(tok[0]["prompt_ids"]) == "user: How do I bake bread?\nassistant:"
    assert tok[0]["chosen_ids"][-1] == tokenizer.eos_token_id


def test_conversational_rows_use_the_chat_template(tokenizer):
    templated = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    templated.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    prompt = [{"role": "user", "content": "Hi"}]
    text_prompt, completion = render_conversation(prompt, [{"role": "assistant", "content": "Hello"}], templated)
    assert (text_prompt, completion) == ("<user>Hi<|endoftext|><assistant>", "Hello<|endoftext|>")
    ds = load_preference_dataset([{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello"}],
                                   "rejected": [{"role": "assistant", "content": "Go away"}]}])
    row = tokenize_pairs(ds, templated)[0]
    # the template already ends the completion with EOS: not appended twice
    assert row["chosen_ids"] == templated("Hello<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert row["chosen_ids"].count(templated.eos_token_id) == 1


# -------------------------------------------------------------------------------------------------------- bad rows

def test_every_bad_row_kind_is_reported_with_index_and_reason(tokenizer):
    rows = [
        ROWS[0],                                                            # 0 fine
        {"prompt": "x", "chosen": "a"},                                     # 1 missing rejected
        {"prompt": "x", "chosen": 5, "rejected": "b"},                      # 2 not a string
        {"prompt": "x", "chosen": "  ", "rejected": "b"},                   # 3 empty completion
        {"prompt": "x", "chosen": "same", "rejected": "same"},              # 4 identical
        "just a string",                                                    # 5 not a mapping
        {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},  # 6 mixed
        {"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant"}]},  # 7 message without content
        ROWS[1],                                                            # 8 fine
    ]
    bad = validate_rows(rows)
    assert [(b.index, b.column) for b in bad] == [(1, "rejected"), (2, "chosen"), (3, "chosen"), (4, "rejected"),
                                                   (5, None), (6, None), (7, "rejected")]
    reasons = {b.index: b.reason for b in bad}
    assert reasons[1] == "missing column"
    assert reasons[2].startswith("must be a string") and reasons[2].endswith("got int")
    assert reasons[3] == "empty completion"
    assert reasons[4] == "identical to chosen"
    assert "mapping" in reasons[5] and "mixes text and conversational" in reasons[6]
    assert str(bad[0]) == "row 1 [rejected]: missing column"

    with pytest.raises(ValueError, match=r"7 of 9 rows are bad: row 1 \[rejected\]: missing column; row 2"):
        load_preference_dataset(rows)
    kept = load_preference_dataset(rows, on_bad_rows="drop")
    assert kept.to_list() == [ROWS[0], ROWS[1]]


def test_prompt_length_problems_need_the_tokenizer(tokenizer):
    long_prompt = "The movie was great and the acting was wonderful. " * 3
    rows = [ROWS[0], {"prompt": long_prompt, "chosen": " yes", "rejected": " no"}, ROWS[2],
            {"prompt": "", "chosen": " yes", "rejected": " no"}]
    n = len(tokenizer(long_prompt)["input_ids"])
    assert validate_rows(rows) == []
    bad = validate_rows(rows, tokenizer, max_prompt_length=10)
    assert bad == [BadRow(1, "prompt", f"prompt has {n} tokens > max_prompt_length=10"),
                   BadRow(3, "prompt", "prompt has no tokens (the first completion token would have no context)")]
    no_room = validate_rows(rows[:3], tokenizer, max_length=n)
    assert [(b.index, b.reason) for b in no_room] == [
        (1, f"prompt has {n} tokens, leaving no room for a completion within max_length={n}")]
    # tokenize_pairs: the same rows are bad when prompts may not be truncated ...
    with pytest.raises(ValueError, match=r"row 1 \[prompt\]: prompt has \d+ tokens > max_prompt_length=10"):
        tokenize_pairs(rows[:3], tokenizer, max_prompt_length=10, truncation=None)
    dropped = tokenize_pairs(rows[:3], tokenizer, max_prompt_length=10, truncation=None, on_bad_rows="drop")
    assert dropped["row_index"] == [0, 2]
    # ... and fine when they are
    kept = tokenize_pairs(rows[:3], tokenizer, max_prompt_length=10, truncation="keep_end")
    assert kept["row_index"] == [0, 1, 2] and kept["truncated_prompt"] == [False, True, False]


# ---------------------------------------------------------------------------------------------------- tokenisation

def test_completion_masks_match_trl_tokenisation(tokenizer):
    tokenized = tokenize_pairs(ROWS, tokenizer)
    batch = PreferenceCollator(tokenizer.pad_token_id)([tokenized[i] for i in range(len(ROWS))])
    for b, row in enumerate(ROWS):
        for side in ("chosen", "rejected"):
            ids, mask = _trl_way(tokenizer, row["prompt"], row[side])
            n = len(ids)
            assert batch[f"{side}_input_ids"][b, :n].tolist() == ids
            assert batch[f"{side}_completion_mask"][b, :n].tolist() == mask
            assert batch[f"{side}_completion_mask"][b, n:].sum() == 0
            assert tokenizer.decode(batch[f"{side}_input_ids"][b, :n][torch.tensor(mask, dtype=torch.bool)]) \
                == row[side] + tokenizer.eos_token


def test_completion_ids_do_not_depend_on_the_prompt(tokenizer):
    # "hello " + "world" tokenised jointly would merge the space into the completion's first token
    row = {"prompt": "The movie was ", "chosen": "great", "rejected": "terrible"}
    t = tokenize_pairs([row], tokenizer)[0]
    assert t["chosen_ids"] == tokenizer("great", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert t["prompt_ids"] == tokenizer("The movie was ", add_special_tokens=False)["input_ids"]


def test_truncation_is_explicit_and_recorded(tokenizer):
    prompt = "The movie was great and the acting was wonderful. What is the capital of France?"
    row = {"prompt": prompt, "chosen": " The capital of France is Paris.", "rejected": " No."}
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    r = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(p) > 8 and len(c) > 4

    start = tokenize_pairs([row], tokenizer, max_prompt_length=8, truncation="keep_start")[0]
    end = tokenize_pairs([row], tokenizer, max_prompt_length=8, truncation="keep_end")[0]
    assert start["prompt_ids"] == p[:8] and end["prompt_ids"] == p[-8:]
    assert start["truncated_prompt"] and not start["truncated_completion"] and start["chosen_ids"] == c

    max_length = 8 + len(r) + 1  # rejected fits, chosen does not
    cut = tokenize_pairs([row], tokenizer, max_length=max_length, max_prompt_length=8)
    one = cut[0]
    assert one["chosen_ids"] == c[: max_length - 8] and one["chosen_ids"][-1] != tokenizer.eos_token_id
    assert one["rejected_ids"] == r
    assert (one["truncated_chosen"], one["truncated_rejected"], one["truncated_completion"]) == (True, False, True)
    assert truncation_report(cut) == {"truncated_prompt": 1, "truncated_chosen": 1, "truncated_rejected": 0,
                                      "truncated_completion": 1}
    untouched = tokenize_pairs(ROWS, tokenizer, max_length=512, max_prompt_length=64)
    assert truncation_report(untouched) == dict.fromkeys(truncation_report(cut), 0)
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_pairs(ROWS, tokenizer, truncation="middle")


# -------------------------------------------------------------------------------------------------------- collator

def test_collator_pads_chosen_and_rejected_together(tokenizer):
    tokenized = tokenize_pairs(ROWS, tokenizer)
    features = [tokenized[i] for i in (2, 0)]
    lengths = [len(f["prompt_ids"]) + len(f[f"{s}_ids"]) for f in features for s in ("chosen", "rejected")]
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected")
                          for k in ("input_ids", "attention_mask", "completion_mask")} | {"row_index"}
    for key, value in batch.items():
        if key != "row_index":
            assert value.shape == (2, max(lengths)) and value.dtype == torch.long
    assert batch["row_index"].tolist() == [2, 0]
    for s in ("chosen", "rejected"):
        att, comp, ids = batch[f"{s}_attention_mask"], batch[f"{s}_completion_mask"], batch[f"{s}_input_ids"]
        for b, f in enumerate(features):
            n = len(f["prompt_ids"]) + len(f[f"{s}_ids"])
            assert att[b].tolist() == [1] * n + [0] * (max(lengths) - n)  # right padding
            assert (ids[b, n:] == tokenizer.pad_token_id).all()
        assert (comp <= att).all()
    padded = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=16)(features)
    assert padded["chosen_input_ids"].shape[1] % 16 == 0
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)


def test_collator_works_in_a_dataloader(tokenizer):
    tokenized = tokenize_pairs(ROWS, tokenizer)
    loader = torch.utils.data.DataLoader(tokenized, batch_size=2, shuffle=False,
                                         collate_fn=PreferenceCollator(tokenizer.pad_token_id))
    batches = list(loader)
    assert [b["row_index"].tolist() for b in batches] == [[0, 1], [2]]
    assert batches[0]["chosen_input_ids"].shape == batches[0]["rejected_input_ids"].shape


def test_collator_pads_per_token_columns_aligned_with_the_labels(tokenizer):
    """`chosen_<key>`/`rejected_<key>` (one value per completion token) become [B, L] columns that the Columns
    provider's shift ([:, 1:]) puts on the label position of the very token each value belongs to."""
    from tokenpo.providers import Columns, StepContext
    from tokenpo.tokens import completion_labels

    tokenized = tokenize_pairs(ROWS, tokenizer)
    features = []
    for i in (2, 0, 1):  # values that encode (row, side, token index), so any misplacement shows
        f = dict(tokenized[i])
        for s, code in (("chosen", 1), ("rejected", 2)):
            f[f"{s}_weights"] = [100 * (i + 1) + 10 * code + j for j in range(len(f[f"{s}_ids"]))]
        features.append(f)
    batch = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=8)(features)
    extra = Columns("weights")(StepContext(batch=batch, labels=None, chosen=None, rejected=None, hparams={}))
    for k, s in enumerate(("chosen", "rejected")):
        column = batch[f"{s}_weights"]
        assert column.shape == batch[f"{s}_input_ids"].shape and column.dtype == torch.float32
        assert (column[batch[f"{s}_completion_mask"] == 0] == 0).all()  # prompt and padding positions
        labels = completion_labels(batch[f"{s}_input_ids"], batch[f"{s}_completion_mask"])
        shifted = extra["weights"][k]
        assert shifted.shape == labels.shape
        for b, f in enumerate(features):
            on = labels[b] != -100
            assert labels[b][on].tolist() == f[f"{s}_ids"]  # the completion's tokens, in order ...
            assert shifted[b][on].tolist() == f[f"{s}_weights"]  # ... and each gets its own value
            assert (shifted[b][~on] == 0).all()
    assert "chosen_selections" not in batch  # absent columns are not invented

    bad = [dict(features[0]), dict(features[1])]
    bad[1]["rejected_weights"] = bad[1]["rejected_weights"][:-1]
    with pytest.raises(ValueError, match=r"row 0 has .* values in rejected_weights"):
        PreferenceCollator(tokenizer.pad_token_id)(bad)
    del bad[1]["rejected_weights"]
    with pytest.raises(ValueError, match=r"'rejected_weights' is missing in row\(s\) \[0\]"):
        PreferenceCollator(tokenizer.pad_token_id)(bad)
    plain = PreferenceCollator(tokenizer.pad_token_id, token_keys=())(features)
    assert "chosen_weights" not in plain
