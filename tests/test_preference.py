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
    with pytest.warns(UserWarning, match="dropped 7 of 9 rows"):
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
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
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


# ------------------------------------------------------------------------------- silent changes found by the issue

def test_dropped_rows_are_reported_and_the_full_report_is_kept(tokenizer, tmp_path):
    from tokenpo.data.preference import BadRowsWarning, last_bad_rows

    rows = [ROWS[0], {"prompt": "x", "chosen": "a"}, ROWS[1], {"prompt": "x", "chosen": "same", "rejected": "same"}]
    with pytest.warns(BadRowsWarning, match=r"load_preference_dataset: dropped 2 of 4 rows: row 1 \[rejected\]: "
                                            r"missing column; row 3 \[rejected\]: identical to chosen"):
        kept = load_preference_dataset(rows, on_bad_rows="drop")
    assert kept.to_list() == [ROWS[0], ROWS[1]]
    report = last_bad_rows()
    assert report.stage == "load_preference_dataset" and report.total == 4
    assert [(b.index, b.column, b.reason) for b in report] == [(1, "rejected", "missing column"),
                                                                (3, "rejected", "identical to chosen")]
    # a later stage has its own report; the earlier one stays retrievable by name
    long_prompt = "The movie was great and the acting was wonderful. " * 3
    with pytest.warns(BadRowsWarning, match=r"tokenize_pairs: dropped 1 of 3 rows: row 1 \[prompt\]"):
        tokenize_pairs(datasets.Dataset.from_list([ROWS[0], {"prompt": long_prompt, "chosen": " a", "rejected": " b"},
                                                   ROWS[2]]), tokenizer,
                       max_prompt_length=10, truncation=None, on_bad_rows="drop")
    assert [b.index for b in last_bad_rows()] == [1] and last_bad_rows().stage == "tokenize_pairs"
    assert [b.index for b in last_bad_rows("load_preference_dataset")] == [1, 3]
    # saved next to a run, one JSON object per bad row
    path = last_bad_rows("load_preference_dataset").save(tmp_path / "run" / "bad_rows.jsonl")
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert saved == [{"stage": "load_preference_dataset", "index": 1, "column": "rejected", "reason": "missing column"},
                     {"stage": "load_preference_dataset", "index": 3, "column": "rejected",
                      "reason": "identical to chosen"}]
    # a clean call leaves an empty report, and warns about nothing
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_preference_dataset(ROWS, on_bad_rows="drop")
    assert len(last_bad_rows()) == 0


def test_extra_columns_of_later_rows_are_kept():
    rows = [ROWS[0], ROWS[1] | {"source": "web", "score": 0.5}, ROWS[2] | {"score": 1.0}]
    ds = load_preference_dataset(rows)
    assert ds.column_names == ["prompt", "chosen", "rejected", "source", "score"]
    assert ds["source"] == [None, "web", None] and ds["score"] == [None, 0.5, 1.0]


USER = {"role": "user", "content": "How do I bake bread?"}


def _say(role, content):
    return [{"role": role, "content": content}]


def test_conversation_roles_and_duplicates_are_checked():
    good = {"prompt": [USER], "chosen": _say("assistant", "Knead and bake."), "rejected": _say("assistant", "No.")}
    rows = [
        good,                                                                       # 0 fine
        good | {"rejected": _say("user", "Buy it.")},                               # 1 rejected turn by the user
        good | {"prompt": [{"role": "bot", "content": "hello"}, USER]},             # 2 unknown role
        good | {"chosen": _say("assistant", "Mix.") + _say("user", "ok")},          # 3 user turn inside chosen
        dict(good),                                                                 # 4 duplicate of row 0
        good | {"prompt": [{"role": "system", "content": "Be brief."}, USER],       # 5 fine: system and tool
                "chosen": _say("assistant", "Bake.")},
        good | {"prompt": [USER, {"role": "tool", "content": "recipe: ..."}]},      # 6 fine
    ]
    bad = validate_rows(rows)
    assert [(b.index, b.column) for b in bad] == [(1, "rejected"), (2, "prompt"), (3, "chosen"), (4, None)]
    reasons = {b.index: b.reason for b in bad}
    assert "assistant" in reasons[1] and "'user'" in reasons[1]
    assert "'bot'" in reasons[2] and "system, user, assistant, tool" in reasons[2]
    assert "'user'" in reasons[3]
    assert reasons[4] == "duplicate of row 0"
    with pytest.raises(ValueError, match=r"4 of 7 rows are bad: row 1 \[rejected\]"):
        load_preference_dataset(rows)
    # text rows: duplicates too
    assert [str(b) for b in validate_rows([ROWS[0], ROWS[1], ROWS[0]])] == ["row 2: duplicate of row 0"]


def test_implicit_prompt_conversations_are_accepted_as_trl_does(tokenizer):
    """No `prompt` column: the prompt is the shared prefix of `chosen` and `rejected` (TRL's `extract_prompt`)."""
    system = {"role": "system", "content": "Be brief."}
    rows = [{"chosen": [system, USER, {"role": "assistant", "content": "Knead and bake."}],
             "rejected": [system, USER, {"role": "assistant", "content": "No."}]},
            {"chosen": [USER, {"role": "assistant", "content": "Bake."}],
             "rejected": [USER, {"role": "assistant", "content": "Buy it."}]}]
    ds = load_preference_dataset(rows)
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert ds[0]["prompt"] == [system, USER] and ds[0]["chosen"] == _say("assistant", "Knead and bake.")
    assert ds[1]["prompt"] == [USER] and ds[1]["rejected"] == _say("assistant", "Buy it.")
    assert load_preference_dataset(datasets.Dataset.from_list(rows)).to_list() == ds.to_list()
    explicit = [{"prompt": [system, USER], "chosen": _say("assistant", "Knead and bake."),
                 "rejected": _say("assistant", "No.")},
                {"prompt": [USER], "chosen": _say("assistant", "Bake."), "rejected": _say("assistant", "Buy it.")}]
    expected = tokenize_pairs(explicit, tokenizer)
    for source in (rows, datasets.Dataset.from_list(rows)):  # a Dataset without a prompt column too
        tokenized = tokenize_pairs(source, tokenizer)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids", "row_index"):
            assert tokenized[column] == expected[column]


def test_implicit_prompt_text_is_accepted_as_trl_does():
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Paris is in France.", "rejected": "Paris is in Texas."}]
    ds = load_preference_dataset(rows)
    # TRL's rule: the shared prefix, minus a trailing space (which goes to the completions)
    assert ds.to_list() == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                            {"prompt": "Paris is in", "chosen": " France.", "rejected": " Texas."}]
    for chosen, rejected in (("abc", "xyz"), (" a", " b")):  # nothing shared (TRL moves a final space out)
        [problem] = validate_rows([{"chosen": chosen, "rejected": rejected}])
        assert str(problem).startswith("row 0 [prompt]: no shared prompt: chosen and rejected share no beginning")


def test_sequences_longer_than_the_model_context_are_bad_rows(tokenizer):
    long_prompt = "The movie was great and the acting was wonderful. " * 3
    rows = [ROWS[0], {"prompt": long_prompt, "chosen": " yes", "rejected": " no"}, ROWS[2]]
    n = len(tokenizer(long_prompt, add_special_tokens=False)["input_ids"]) + 1  # the prompt fits, no completion
    yes = len(tokenizer(" yes", add_special_tokens=False)["input_ids"]) + 1
    short = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                    model_max_length=n)
    with pytest.raises(ValueError, match=rf"tokenize_pairs: 1 of 3 rows are bad: row 1 \[chosen\]: prompt \+ chosen "
                                         rf"has {n - 1 + yes} tokens > model_max_length={n}"):
        tokenize_pairs(rows, short)
    # the tokenizer's model_max_length is a placeholder here: the model's context is passed explicitly
    with pytest.raises(ValueError, match=rf"row 1 \[chosen\]: .* > model_max_length={n}"):
        tokenize_pairs(rows, tokenizer, model_max_length=n)
    with pytest.warns(UserWarning, match="dropped 1 of 3"):
        assert tokenize_pairs(rows, tokenizer, model_max_length=n, on_bad_rows="drop")["row_index"] == [0, 2]
    # with max_length (completions cut to fit) nothing is bad, but max_length may not exceed the context
    assert tokenize_pairs(rows, short, max_length=n)["truncated_completion"] == [False, True, False]
    with pytest.raises(ValueError, match=rf"max_length={n + 1} exceeds model_max_length={n}"):
        tokenize_pairs(rows, short, max_length=n + 1)


def test_token_ids_beyond_the_vocabulary_are_bad_rows(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a vocabulary with a hole: id 500 in a tokenizer of 5 tokens
    word = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3, "zzz": 500}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    holes = PreTrainedTokenizerFast(tokenizer_object=word, eos_token="<eos>")
    rows = [{"prompt": "a", "chosen": "b", "rejected": "a b"}, {"prompt": "a", "chosen": "zzz", "rejected": "b"}]
    with pytest.raises(ValueError, match=r"row 1 \[chosen\]: token id 500 >= vocabulary size 5"):
        tokenize_pairs(rows, holes)
    # the model's embedding can be smaller than the tokenizer (tokens added without resizing)
    biggest = max(max(r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"]) for r in tokenize_pairs(ROWS, tokenizer))
    with pytest.raises(ValueError, match=rf"token id {biggest} >= vocabulary size {biggest}"):
        tokenize_pairs(ROWS, tokenizer, vocab_size=biggest)


def test_collator_on_untokenised_rows_says_what_to_do():
    with pytest.raises(ValueError, match=r"call tokenpo.data.preference.tokenize_pairs"):
        PreferenceCollator(0)([ROWS[0] | {"row_index": 0}])


def test_tokenisation_output_columns_and_types_are_pinned(tokenizer):
    tokenized = tokenize_pairs(ROWS + [ROWS[0] | {"prompt": "Another"}], tokenizer, max_length=8)
    assert tokenized.column_names == ["prompt", "chosen", "rejected", "row_index", "prompt_ids", "chosen_ids",
                                      "rejected_ids", "truncated_prompt", "truncated_chosen", "truncated_rejected",
                                      "truncated_completion"]
    assert {k: repr(v) for k, v in tokenized.features.items() if k not in ("prompt", "chosen", "rejected")} == {
        "row_index": "Value('int64')", "prompt_ids": "List(Value('int64'))", "chosen_ids": "List(Value('int64'))",
        "rejected_ids": "List(Value('int64'))", "truncated_prompt": "Value('bool')",
        "truncated_chosen": "Value('bool')", "truncated_rejected": "Value('bool')",
        "truncated_completion": "Value('bool')"}
    # an existing row_index column is kept where it is, and re-tokenising replaces the token columns
    again = tokenize_pairs(tokenized, tokenizer)
    assert again.column_names == tokenized.column_names and again["row_index"] == [0, 1, 2, 3]
    assert again["truncated_completion"] == [False] * 4


def test_tokenisation_uses_the_datasets_cache_for_file_backed_datasets(tokenizer, tmp_path):
    save_preference_dataset(datasets.Dataset.from_list(ROWS), tmp_path / "pairs")
    ds = load_preference_dataset(tmp_path / "pairs")
    first = tokenize_pairs(ds, tokenizer, max_length=16)
    cached = [f["filename"] for f in first.cache_files if "cache-" in f["filename"]]
    assert cached, first.cache_files
    second = tokenize_pairs(load_preference_dataset(tmp_path / "pairs"), tokenizer, max_length=16)
    assert second.to_list() == first.to_list()
    assert {f["filename"] for f in second.cache_files} >= set(cached)  # the same cache file, not a new one
