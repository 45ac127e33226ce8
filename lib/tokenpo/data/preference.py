"""Preference datasets in TRL's column format, their tokenisation, and the batch collator.

A preference dataset is a 🤗 `datasets.Dataset` with the columns `prompt`, `chosen`, `rejected` (other columns are
kept). Each of the three is either plain text or a conversation: a list of `{"role", "content"}` messages. A whole
dataset is one or the other.

Tokenisation (`tokenize_pairs`) follows TRL's DPOTrainer `tokenize_row` (TRL 0.12-0.28): prompt and completions are
tokenised **separately** (no special tokens) and their ids concatenated, so the completion is exactly what follows
the prompt's tokens; an EOS token is appended to each completion. (TRL >= 1.0 tokenises prompt+completion jointly and
splits at the prompt's length; the two agree whenever the tokenizer does not merge across the prompt/completion
boundary — e.g. a prompt ending in a space followed by a completion starting with a word does differ under BPE,
which is why we keep the separate convention: the completion mask never depends on the prompt.)

Conversations are rendered to text first: with the tokenizer's chat template if it has one (prompt with the
generation prompt, completion = the templated prompt+completion minus the templated prompt, as TRL does), else with
a plain "role: content" join, one message per line, the prompt ending in "assistant:" so that the completion is
" <answer>" — documented in `render_conversation`.

Truncation is explicit and recorded per row:
* `max_prompt_length`: a longer prompt is cut according to `truncation` — "keep_start" keeps its first tokens,
  "keep_end" its last ones (those next to the completion; TRL's `tokenize_row` behaviour), None makes such a
  prompt a bad row instead. Column `truncated_prompt`.
* `max_length`: each completion is cut at its end so that prompt + completion fits (the prompt is never cut here).
  Columns `truncated_chosen`, `truncated_rejected`, `truncated_completion` (either). A prompt that leaves no room
  for a single completion token is a bad row (TRL drops those rows too).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .collator import PreferenceCollator  # noqa: F401  (part of this module's API)

COLUMNS = ("prompt", "chosen", "rejected")
TRUNCATION_MODES = ("keep_start", "keep_end", None)
ON_BAD_ROWS = ("raise", "drop")
_SHOWN_BAD_ROWS = 5


@dataclass(frozen=True)
class BadRow:
    index: int          # position of the row in the dataset that was checked
    column: str | None  # the column at fault (None when the row itself is not a mapping)
    reason: str

    def __str__(self) -> str:
        return f"row {self.index}" + (f" [{self.column}]" if self.column else "") + f": {self.reason}"


# ----------------------------------------------------------------------------------------------------- validation

def is_conversation(value: Any) -> bool:
    """A non-empty list of messages, each a mapping with string `role` and `content`."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if is_conversation(value):
        return "conversation"
    return None


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)


def _structural_problems(row: Any, index: int, dataset_kind: str | None) -> list[BadRow]:
    if not isinstance(row, Mapping):
        return [BadRow(index, None, f"row is a {type(row).__name__}, not a mapping with prompt/chosen/rejected")]
    problems = []
    kinds = {}
    for column in COLUMNS:
        if column not in row or row[column] is None:
            problems.append(BadRow(index, column, "missing column"))
            continue
        kind = _kind(row[column])
        if kind is None:
            problems.append(BadRow(index, column, "must be a string or a list of {role, content} messages, got "
                                                  f"{type(row[column]).__name__}"))
            continue
        kinds[column] = kind
        if column != "prompt" and _is_empty(row[column]):
            problems.append(BadRow(index, column, "empty completion"))
    if problems:
        return problems
    if len(set(kinds.values())) > 1:
        return [BadRow(index, None, "mixes text and conversational columns: " + ", ".join(
            f"{c}={k}" for c, k in kinds.items()))]
    if dataset_kind is not None and kinds["prompt"] != dataset_kind:
        return [BadRow(index, None, f"{kinds['prompt']} row in a {dataset_kind} dataset")]
    if row["chosen"] == row["rejected"]:
        return [BadRow(index, "rejected", "identical to chosen")]
    return []


def _dataset_kind(rows: Sequence[Any]) -> str | None:
    for row in rows:
        if isinstance(row, Mapping) and _kind(row.get("prompt")) is not None:
            return _kind(row["prompt"])
    return None


def validate_rows(dataset, tokenizer=None, max_prompt_length: int | None = None,
                  max_length: int | None = None) -> list[BadRow]:
    """Every bad row of `dataset` (a Dataset or a list of dicts), with its index and reason.

    Without a tokenizer: missing column, wrong type (not text / not a list of {role, content} messages), empty
    completion, text and conversation mixed, chosen identical to rejected. With a tokenizer also: a prompt longer
    than `max_prompt_length` tokens, a prompt leaving no room for a completion token within `max_length`, and a
    prompt of zero tokens (the first completion token would have nothing to be predicted from).
    """
    rows = list(dataset)
    kind = _dataset_kind(rows)
    bad: list[BadRow] = []
    good: list[int] = []
    for i, row in enumerate(rows):
        found = _structural_problems(row, i, kind)
        bad.extend(found)
        if not found:
            good.append(i)
    if tokenizer is not None and good:
        prompts = [render_pair(rows[i], tokenizer)["prompt"] for i in good]
        lengths = [len(ids) for ids in _encode(tokenizer, prompts, prompt=True)]
        for i, n in zip(good, lengths):
            reason = _prompt_length_problem(n, max_prompt_length, max_length, truncation=None)
            if reason:
                bad.append(BadRow(i, "prompt", reason))
    return sorted(bad, key=lambda b: b.index)


def _prompt_length_problem(n: int, max_prompt_length: int | None, max_length: int | None,
                           truncation: str | None) -> str | None:
    if n == 0:
        return "prompt has no tokens (the first completion token would have no context)"
    if truncation is None and max_prompt_length is not None and n > max_prompt_length:
        return f"prompt has {n} tokens > max_prompt_length={max_prompt_length}"
    kept = min(n, max_prompt_length) if max_prompt_length is not None else n
    if max_length is not None and kept >= max_length:
        return f"prompt has {kept} tokens, leaving no room for a completion within max_length={max_length}"
    return None


def _handle_bad_rows(bad: list[BadRow], on_bad_rows: str, total: int, what: str) -> set[int]:
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    if bad and on_bad_rows == "raise":
        rows = sorted({b.index for b in bad})
        shown = "; ".join(str(b) for b in bad[:_SHOWN_BAD_ROWS])
        more = f" (and {len(bad) - _SHOWN_BAD_ROWS} more problems)" if len(bad) > _SHOWN_BAD_ROWS else ""
        raise ValueError(f"{what}: {len(rows)} of {total} rows are bad: {shown}{more}. "
                         "Fix them, or pass on_bad_rows='drop' to leave them out.")
    return {b.index for b in bad}


# -------------------------------------------------------------------------------------------------- loading/saving

def _read_json_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {number} is not valid JSON: {exc}") from None
        return rows
    data = json.loads(text)
    if isinstance(data, Mapping) and "data" in data:
        data = data["data"]
    if isinstance(data, Mapping):  # column-oriented {"prompt": [...], "chosen": [...], ...}
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
        return [dict(zip(data, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return data


def load_preference_dataset(source, *, on_bad_rows: str = "raise", split: str | None = None):
    """A preference `datasets.Dataset` from a list of dicts, a `.json`/`.jsonl` file, a folder written by
    `save_to_disk` (a DatasetDict folder needs `split`), or a Dataset. Rows failing the checks of `validate_rows`
    (without tokenizer) are dropped or raise a ValueError naming them (`on_bad_rows`)."""
    import datasets

    if isinstance(source, datasets.Dataset):
        rows_or_dataset = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split is None:
                    raise ValueError(f"{path} holds splits {list(loaded)}; pass split=")
                loaded = loaded[split]
            rows_or_dataset = loaded
        elif path.suffix in (".json", ".jsonl"):
            rows_or_dataset = _read_json_rows(path)
        elif not path.exists():
            raise ValueError(f"no preference dataset at {path}")
        else:
            raise ValueError(f"{path}: expected a .json/.jsonl file or a saved dataset folder")
    elif isinstance(source, Sequence):
        rows_or_dataset = list(source)
    else:
        raise ValueError(f"cannot load a preference dataset from a {type(source).__name__}")

    bad = validate_rows(rows_or_dataset)
    total = len(rows_or_dataset)
    drop = _handle_bad_rows(bad, on_bad_rows, total, "preference dataset")
    keep = [i for i in range(total) if i not in drop]
    if isinstance(rows_or_dataset, datasets.Dataset):
        return rows_or_dataset.select(keep) if drop else rows_or_dataset
    if not keep:
        raise ValueError("preference dataset: no rows left")
    return datasets.Dataset.from_list([dict(rows_or_dataset[i]) for i in keep])


def save_preference_dataset(dataset, path, overwrite: bool = False) -> Path:
    """Write `dataset` to a `.jsonl`/`.json` file (JSON lines) or, for any other path, a `save_to_disk` folder.
    Written under a temporary name and renamed, so an interrupted save leaves nothing behind; an existing target
    is only replaced with `overwrite=True`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if path.suffix in (".json", ".jsonl"):
            with open(tmp, "w", encoding="utf-8") as f:
                for row in dataset:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        else:
            dataset.save_to_disk(str(tmp))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return path


# ------------------------------------------------------------------------------------------------------ rendering

def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_join(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def render_conversation(prompt: Sequence[Mapping[str, str]], completion: Sequence[Mapping[str, str]],
                        tokenizer=None) -> tuple[str, str]:
    """(prompt text, completion text) of a conversational pair side.

    With a chat template: prompt = template(prompt, generation prompt — or continuing the final message when it is
    the assistant's), completion = template(prompt + completion) minus their common prefix (TRL's
    `apply_chat_template`). Without: messages joined as "role: content" lines; the prompt ends with a line
    "assistant:" and the completion is the rest, e.g. prompt [user "Hi"], completion [assistant "Hello"] ->
    ("user: Hi\\nassistant:", " Hello").
    """
    prompt, completion = [dict(m) for m in prompt], [dict(m) for m in completion]
    if tokenizer is not None and _has_chat_template(tokenizer):
        continue_final = prompt[-1]["role"] == "assistant"
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not continue_final,
                                                    continue_final_message=continue_final)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    else:
        prompt_text = _plain_join(prompt) + ("" if prompt[-1]["role"] == "assistant" else "\nassistant:")
        full = _plain_join(prompt + completion)
    prompt_text = _common_prefix(prompt_text, full)
    return prompt_text, full[len(prompt_text):]


def render_pair(row: Mapping[str, Any], tokenizer=None) -> dict[str, str]:
    """The texts {prompt, chosen, rejected} that get tokenised (conversations rendered, text unchanged). With a
    chat template the prompt is the common prefix of both templated sides, so both share one prompt."""
    if isinstance(row["prompt"], str):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    p_chosen, chosen = render_conversation(row["prompt"], row["chosen"], tokenizer)
    p_rejected, rejected = render_conversation(row["prompt"], row["rejected"], tokenizer)
    prompt = _common_prefix(p_chosen, p_rejected)
    return {"prompt": prompt, "chosen": p_chosen[len(prompt):] + chosen, "rejected": p_rejected[len(prompt):] + rejected}


# --------------------------------------------------------------------------------------------------- tokenisation

def _encode(tokenizer, texts: list[str], prompt: bool, add_special_tokens: bool = False) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens and prompt)["input_ids"]]


def tokenize_pairs(dataset, tokenizer, max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation: str | None = "keep_start", *, on_bad_rows: str = "raise",
                   add_special_tokens: bool = False):
    """Add `prompt_ids`, `chosen_ids`, `rejected_ids` (completion ids end with EOS), `row_index` and the
    truncation flags to a preference dataset (see the module docstring for the rules).

    `row_index` is the row's position in `dataset` (kept if the column already exists), so it stays valid for
    per-row caches when bad rows are dropped (a list of dicts is loaded first: positions after loading). `add_special_tokens=True` lets the tokenizer add its special tokens
    (e.g. BOS) to the prompt, as TRL >= 1.0 does; completions never get any besides the appended EOS.
    """
    import datasets

    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; every completion ends with EOS")
    if not isinstance(dataset, datasets.Dataset):
        dataset = load_preference_dataset(dataset, on_bad_rows=on_bad_rows)

    rows = list(dataset)
    bad = validate_rows(rows)
    good = [i for i in range(len(rows)) if i not in {b.index for b in bad}]
    texts = [render_pair(rows[i], tokenizer) for i in good]
    conversational = bool(good) and not isinstance(rows[good[0]]["prompt"], str)
    prompt_ids = _encode(tokenizer, [t["prompt"] for t in texts], prompt=True,
                         add_special_tokens=add_special_tokens and not (conversational and _has_chat_template(tokenizer)))
    chosen_ids = _encode(tokenizer, [t["chosen"] for t in texts], prompt=False)
    rejected_ids = _encode(tokenizer, [t["rejected"] for t in texts], prompt=False)

    out: dict[int, dict[str, Any]] = {}
    for i, p, c, r in zip(good, prompt_ids, chosen_ids, rejected_ids):
        reason = _prompt_length_problem(len(p), max_prompt_length, max_length, truncation)
        if reason:
            bad.append(BadRow(i, "prompt", reason))
            continue
        truncated_prompt = max_prompt_length is not None and len(p) > max_prompt_length
        if truncated_prompt:
            p = p[:max_prompt_length] if truncation == "keep_start" else p[-max_prompt_length:]
        c, r = (ids if ids and ids[-1] == eos else ids + [eos] for ids in (c, r))
        room = None if max_length is None else max_length - len(p)
        truncated_chosen = room is not None and len(c) > room
        truncated_rejected = room is not None and len(r) > room
        out[i] = {"prompt_ids": p, "chosen_ids": c[:room] if truncated_chosen else c,
                  "rejected_ids": r[:room] if truncated_rejected else r,
                  "truncated_prompt": truncated_prompt, "truncated_chosen": truncated_chosen,
                  "truncated_rejected": truncated_rejected,
                  "truncated_completion": truncated_chosen or truncated_rejected}
    bad.sort(key=lambda b: b.index)
    _handle_bad_rows(bad, on_bad_rows, len(rows), "tokenize_pairs")
    keep = sorted(out)
    if not keep:
        raise ValueError("tokenize_pairs: no rows left")
    new_columns = list(out[keep[0]])
    result = dataset.select(keep) if len(keep) < len(rows) else dataset
    if "row_index" not in result.column_names:
        result = result.add_column("row_index", keep)
    result = result.remove_columns([c for c in new_columns if c in result.column_names])
    for column in new_columns:
        result = result.add_column(column, [out[i][column] for i in keep])
    return result


def truncation_report(tokenized) -> dict[str, int]:
    """How many rows had their prompt / chosen / rejected / any completion truncated."""
    return {name: int(sum(tokenized[name])) for name in
            ("truncated_prompt", "truncated_chosen", "truncated_rejected", "truncated_completion")}
