"""Preference files: what `load_preference_dataset` reads must be what was written, or an error naming the file."""
from __future__ import annotations

import json

import pytest

from tokenpo.data.preference import load_preference_dataset, save_preference_dataset

ROWS = [
    {"prompt": "The movie was", "chosen": " great and wonderful.", "rejected": " terrible."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " I do not know, sorry."},
]
CONVERSATION = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Go away"}]}


def test_a_json_file_with_one_row_object_is_one_row(tmp_path):
    for row in (ROWS[0], CONVERSATION):
        path = tmp_path / "one.json"
        path.write_text(json.dumps(row))
        assert load_preference_dataset(path).to_list() == [row]
        assert load_preference_dataset(path, on_bad_rows="raise").to_list() == [row]
    # neither one row nor columns: an error naming the file
    path.write_text(json.dumps({"prompt": ["a", "b"], "chosen": " x", "rejected": [" y", " z"]}))
    with pytest.raises(ValueError, match=rf"{path}: a JSON object .*one row.*columns"):
        load_preference_dataset(path)


SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r", "\r\n", "\n", "\t", "\x00",
              "\ufeff", "\U0001f600", '"', "\\"]


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json"])
def test_files_the_library_writes_read_back_exactly(tmp_path, name):
    rows = [{"prompt": f"a{s}b", "chosen": f" c{s}", "rejected": f"{s}d"} for s in SEPARATORS]
    rows.append({"prompt": "".join(SEPARATORS), "chosen": "x" + "".join(SEPARATORS), "rejected": "y"})
    ds = load_preference_dataset(rows)
    path = save_preference_dataset(ds, tmp_path / name)
    assert load_preference_dataset(path).to_list() == rows
    # other line-oriented readers see one line per row
    assert len(path.read_bytes().split(b"\n")) == len(rows) + 1


def test_a_non_utf8_byte_names_the_file_line_and_offset(tmp_path):
    good = json.dumps(ROWS[0]).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n')
    offset = len(good) + 1 + len(b'{"prompt": "caf')
    with pytest.raises(ValueError, match=rf"{path}: line 2, byte offset {offset} \(0xe9\): not valid UTF-8"):
        load_preference_dataset(path)
    array = tmp_path / "latin1.json"
    array.write_bytes(b'[\n' + good + b',\n{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}]')
    with pytest.raises(ValueError, match=rf"{array}: line 3, byte offset \d+ \(0xe9\)"):
        load_preference_dataset(array)


def test_extra_columns_of_later_lines_are_kept(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1] | {"source": "web"}) + "\n")
    ds = load_preference_dataset(path)
    assert ds["source"] == [None, "web"]


def test_bad_rows_of_a_file_name_the_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "x", "chosen": " a"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}: 1 of 2 rows are bad: row 1 \(line 3\) \[rejected\]: missing"):
        load_preference_dataset(path)
