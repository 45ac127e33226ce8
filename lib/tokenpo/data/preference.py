"""Preference datasets in TRL's column format, their tokenisation, and the batch collator.

A preference dataset is a 🤗 `datasets.Dataset` with the columns `prompt`, `chosen`, `rejected` (other columns are
kept). Each of the three is either plain text or a conversation: a list of `{"role", "content"}` messages. A whole
dataset is one or the other. Roles are TRL's: system, user, assistant, tool; `chosen` and `rejected` hold assistant
turns only (the prompt holds the rest).

TRL's implicit-prompt format is accepted too: no `prompt` column, `chosen` and `rejected` hold the whole text or
conversation and the prompt is their shared beginning. It is split off by the rule of TRL's
`trl.data_utils.extract_prompt` (see `extract_prompt`), on loading and in `tokenize_pairs`.

Files (`load_preference_dataset`, `save_preference_dataset`): `.jsonl` is JSON lines (one row object per line,
split at "\\n" only); `.json` is a JSON array of rows, an object of columns (`{"prompt": [...], "chosen": [...],
...}`, each a list with one entry per row; also under a top-level "data" key), a single row object (one row: each
of prompt/chosen/rejected a string or a list of messages), or JSON lines (what `save_preference_dataset` writes, as
🤗 `to_json` does). Files must be UTF-8 (a byte-order mark is allowed); a byte that is not is reported with the
file, line and byte offset. Rows may have different keys: every column seen in any row is kept (None where a row
lacks it). `save_preference_dataset` escapes U+0085, U+2028 and U+2029 so that any string reads back exactly, also
with readers that split lines at them.

Bad rows (see `validate_rows`: missing column, wrong type, empty completion, text and conversation mixed, unknown
role, a completion turn that is not the assistant's, chosen identical to rejected, a row repeating an earlier one,
too many tokens, a token id outside the vocabulary) make `load_preference_dataset` and `tokenize_pairs` raise a
ValueError naming them (`on_bad_rows="raise"`, the default; file rows also by line) or, with `on_bad_rows="drop"`,
leave them out with a `BadRowsWarning` giving the count and the first few. The full list of the latest call is
`last_bad_rows()` (of the latest call of a given function: `last_bad_rows("load_preference_dataset")`,
`last_bad_rows("tokenize_pairs")`), a `BadRowReport`: a list of `BadRow` with `stage`, `total`, `source`. A run keeps
it next to its outputs with `save`, e.g.::

    pairs = tokenize_pairs(load_preference_dataset("pairs.jsonl", on_bad_rows="drop"), tok, max_length=512,
                           on_bad_rows="drop")
    for stage in ("load_preference_dataset", "tokenize_pairs"):
        last_bad_rows(stage).save("runs/sparsepo/bad_rows.jsonl", append=True)  # one JSON object per bad row

Tokenisation (`tokenize_pairs`) follows TRL's DPOTrainer `tokenize_row` (TRL 0.12-0.28): prompt and completions are
tokenised **separately** (no special tokens) and their ids concatenated, so the completion is exactly what follows
the prompt's tokens; an EOS token is appended to each completion. (TRL >= 1.0 tokenises prompt+completion jointly and
splits at the prompt's length; the two agree whenever the tokenizer does not merge across the prompt/completion
boundary — e.g. a prompt ending in a space followed by a completion starting with a word does differ under BPE,
which is why we keep the separate convention: the completion mask never depends on the prompt.) It runs through
`datasets.Dataset.map` (batched, with a progress bar; cached next to the data when the dataset is file-backed).

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
* Without `max_length` nothing is cut to the model's context, so a prompt + completion longer than
  `model_max_length` (the argument, else the tokenizer's when it is set) is a bad row; so is a token id
  >= `vocab_size` (the argument — the model's embedding rows — else `len(tokenizer)`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .collator import PreferenceCollator  # noqa: F401  (part of this module's API)

COLUMNS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")  # the roles of TRL's conversational format
TRUNCATION_MODES = ("keep_start", "keep_end", None)
ON_BAD_ROWS = ("raise", "drop")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "truncated_prompt", "truncated_chosen",
                 "truncated_rejected", "truncated_completion")
_SHOWN_BAD_ROWS = 5
_UNSET_MODEL_MAX_LENGTH = 10 ** 12  # at or above: transformers' "unknown context" placeholder (1e30), not a limit


@dataclass(frozen=True)
class BadRow:
    index: int          # position of the row in the dataset that was checked
    column: str | None  # the column at fault (None when the row itself is not a mapping)
    reason: str
    line: int | None = field(default=None, compare=False)  # line of a JSON lines file the row came from

    def __str__(self) -> str:
        return (f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")
                + (f" [{self.column}]" if self.column else "") + f": {self.reason}")


class BadRowsWarning(UserWarning):
    """Rows were left out (`on_bad_rows="drop"`); the full list is `last_bad_rows()`."""


class BadRowReport(list):
    """The bad rows (`BadRow`) one call found: `stage` (the function), `total` (rows checked), `source` (file)."""

    def __init__(self, rows: Iterable[BadRow] = (), stage: str = "", total: int = 0, source: str | None = None):
        super().__init__(rows)
        self.stage, self.total, self.source = stage, total, source

    @property
    def indices(self) -> list[int]:
        return sorted({b.index for b in self})

    def summary(self, shown: int = _SHOWN_BAD_ROWS) -> str:
        more = f" (and {len(self) - shown} more problems)" if len(self) > shown else ""
        return "; ".join(str(b) for b in self[:shown]) + more

    def save(self, path, append: bool = False) -> Path:
        """Write the report as JSON lines (stage, index, column, reason; line and source when known)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            for b in self:
                record = {"stage": self.stage, "index": b.index, "column": b.column, "reason": b.reason}
                if b.line is not None:
                    record["line"] = b.line
                if self.source is not None:
                    record["source"] = self.source
                f.write(_json_line(record) + "\n")
        return path


_REPORTS: dict[str | None, BadRowReport] = {}


def last_bad_rows(stage: str | None = None) -> BadRowReport:
    """The bad rows found by the latest `load_preference_dataset` / `tokenize_pairs` call (`stage=None`) or by the
    latest call of the function named `stage`; empty if that call found none (or there was no call)."""
    return _REPORTS.get(stage, BadRowReport(stage=stage or ""))


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


def _role_problems(row: Mapping[str, Any], index: int) -> list[BadRow]:
    problems = []
    for column in COLUMNS:
        for j, message in enumerate(row[column]):
            role = message["role"]
            if role not in ROLES:
                problems.append(BadRow(index, column, f"message {j} has role {role!r}; roles are "
                                                      f"{', '.join(ROLES)} (as in TRL)"))
            elif column != "prompt" and role != "assistant":
                hint = ""
                if list(row[column][:len(row["prompt"])]) == list(row["prompt"]):
                    hint = (f" ({column} repeats the prompt: in TRL's implicit-prompt format there is no prompt "
                            "column)")
                problems.append(BadRow(index, column, f"message {j} has role {role!r}: {column} must hold "
                                                      f"assistant turns only{hint}"))
                break
    return problems


def _structural_problems(row: Any, index: int, dataset_kind: str | None,
                         columns: Sequence[str] = COLUMNS) -> list[BadRow]:
    if not isinstance(row, Mapping):
        return [BadRow(index, None, f"row is a {type(row).__name__}, not a mapping with prompt/chosen/rejected")]
    problems = []
    kinds = {}
    for column in columns:
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
    row_kind = next(iter(kinds.values()))
    if dataset_kind is not None and row_kind != dataset_kind:
        return [BadRow(index, None, f"{row_kind} row in a {dataset_kind} dataset")]
    if "prompt" not in columns:
        return []
    if row_kind == "conversation":
        problems = _role_problems(row, index)
        if problems:
            return problems
    if row["chosen"] == row["rejected"]:
        return [BadRow(index, "rejected", "identical to chosen")]
    return []


def extract_prompt(chosen, rejected):
    """(prompt, chosen, rejected) of an implicit-prompt pair, by the rule of TRL's `trl.data_utils.extract_prompt`
    (its `_extract_prompt`; TRL is not a dependency): the prompt is the longest shared beginning of `chosen` and
    `rejected` (characters of a text, messages of a conversation), less a text's final space, which goes to the
    completions ("The sky is blue." / "The sky is green." -> "The sky is", " blue.", " green."). As in TRL, when
    one side is a beginning of the other the prompt stops one element short of the shorter side. None when there is
    no shared beginning (TRL would take a meaningless prompt there)."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        return None
    idx = n - 1  # TRL's loop variable when no element differs
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if i > 0 and chosen[i - 1] == " ":
                idx -= 1
            break
    if idx <= 0:
        return None
    return chosen[:idx], chosen[idx:], rejected[idx:]


_NO_SHARED_PROMPT = ("no shared prompt: chosen and rejected share no beginning to use as the prompt "
                     "(implicit-prompt format: the prompt is their shared beginning, as in TRL's extract_prompt)")


def _explicit_row(row: Any, index: int, dataset_kind: str | None, implicit: bool) -> tuple[Any, list[BadRow]]:
    """The row with a prompt column (split off when `implicit`) and its structural problems."""
    if not implicit or not isinstance(row, Mapping):
        return row, _structural_problems(row, index, dataset_kind)
    problems = _structural_problems(row, index, dataset_kind, columns=("chosen", "rejected"))
    if problems:
        return row, problems
    split = extract_prompt(list(row["chosen"]) if not isinstance(row["chosen"], str) else row["chosen"],
                           list(row["rejected"]) if not isinstance(row["rejected"], str) else row["rejected"])
    if split is None:
        return row, [BadRow(index, "prompt", _NO_SHARED_PROMPT)]
    explicit = {"prompt": split[0], "chosen": split[1], "rejected": split[2],
                **{k: v for k, v in row.items() if k not in COLUMNS}}
    return explicit, _structural_problems(explicit, index, dataset_kind)


def _is_implicit(dataset) -> bool:
    """TRL's implicit-prompt format: no row has a prompt (a Dataset: no prompt column), rows have chosen."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return "prompt" not in dataset.column_names and "chosen" in dataset.column_names
    rows = [r for r in dataset if isinstance(r, Mapping)]
    return bool(rows) and not any("prompt" in r for r in rows) and any("chosen" in r for r in rows)


def _dataset_kind(rows: Iterable[Any], implicit: bool = False) -> str | None:
    column = "chosen" if implicit else "prompt"
    for row in rows:
        if isinstance(row, Mapping) and _kind(row.get(column)) is not None:
            return _kind(row[column])
    return None


def _row_key(row: Mapping[str, Any]) -> str:
    """A digest of prompt/chosen/rejected (messages without their None fields) to find repeated rows."""
    def plain(value):
        return value if isinstance(value, str) else [{k: v for k, v in m.items() if v is not None} for m in value]
    text = json.dumps([plain(row[c]) for c in COLUMNS], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _duplicates(keys: Iterable[str | None]) -> list[BadRow]:
    """Rows whose key (None: not checked) repeats an earlier row's: "duplicate of row N" (N its first occurrence)."""
    first: dict[str, int] = {}
    bad = []
    for i, key in enumerate(keys):
        if not key:
            continue
        if key in first:
            bad.append(BadRow(i, None, f"duplicate of row {first[key]}"))
        else:
            first[key] = i
    return bad


def validate_rows(dataset, tokenizer=None, max_prompt_length: int | None = None,
                  max_length: int | None = None) -> list[BadRow]:
    """Every bad row of `dataset` (a Dataset or a list of dicts), with its index and reason.

    Without a tokenizer: missing column, wrong type (not text / not a list of {role, content} messages), empty
    completion, text and conversation mixed, a role other than system/user/assistant/tool, a chosen or rejected
    message that is not the assistant's, chosen identical to rejected, a row repeating an earlier one's
    prompt/chosen/rejected ("duplicate of row N"), and in the implicit-prompt format (no prompt column) chosen and
    rejected without a shared beginning. With a tokenizer also: a prompt longer than `max_prompt_length` tokens, a
    prompt leaving no room for a completion token within `max_length`, and a prompt of zero tokens (the first
    completion token would have nothing to be predicted from).
    """
    rows = dataset if hasattr(dataset, "column_names") else list(dataset)
    implicit = _is_implicit(rows)
    kind = _dataset_kind(rows, implicit)
    bad: list[BadRow] = []
    keys: list[str | None] = []
    prompts: list[tuple[int, str]] = []
    for i, raw in enumerate(rows):
        row, found = _explicit_row(raw, i, kind, implicit)
        bad.extend(found)
        keys.append(None if found else _row_key(row))
        if not found and tokenizer is not None:
            prompts.append((i, render_pair(row, tokenizer)["prompt"]))
    duplicates = _duplicates(keys)
    bad.extend(duplicates)
    if prompts:
        repeated = {b.index for b in duplicates}
        prompts = [(i, p) for i, p in prompts if i not in repeated]
        lengths = [len(ids) for ids in _encode(tokenizer, [p for _, p in prompts], prompt=True)]
        for (i, _), n in zip(prompts, lengths):
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


def _handle_bad_rows(bad: list[BadRow], on_bad_rows: str, total: int, stage: str,
                     source: str | None = None) -> set[int]:
    """Record the report (`last_bad_rows`), then raise naming the bad rows or warn that they are left out."""
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    report = BadRowReport(sorted(bad, key=lambda b: b.index), stage, total, source)
    _REPORTS[stage] = _REPORTS[None] = report
    if not report:
        return set()
    where = stage + (f" {source}" if source else "")
    if on_bad_rows == "raise":
        raise ValueError(f"{where}: {len(report.indices)} of {total} rows are bad: {report.summary()}. "
                         "Fix them, or pass on_bad_rows='drop' to leave them out.")
    warnings.warn(f"{where}: dropped {len(report.indices)} of {total} rows: {report.summary()}. The full list: "
                  f"tokenpo.data.preference.last_bad_rows({stage!r}) (its .save(path) writes it as JSON lines).",
                  BadRowsWarning, stacklevel=3)
    return set(report.indices)


# -------------------------------------------------------------------------------------------------- loading/saving

_ESCAPED_IN_FILES = re.compile("[\x85\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_line(value: Any) -> str:
    """One line of JSON: as `json.dumps(ensure_ascii=False)`, with U+0085, U+2028, U+2029 (line breaks to
    `str.splitlines` and other readers) and lone surrogates (not UTF-8 encodable) written as \\u escapes."""
    return _ESCAPED_IN_FILES.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ValueError(f"{path}: line {line}, byte offset {start} (0x{data[start]:02x}): not valid UTF-8 "
                         f"({exc.reason}, byte {column} of the line); preference files must be UTF-8 — re-encode "
                         "it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text[1:] if text.startswith("\ufeff") else text  # a UTF-8 byte-order mark


def _json_lines(text: str, path: Path) -> tuple[list[Any], list[int]]:
    """Rows and their line numbers; lines end at "\\n" only (never at U+2028 & co, which JSON strings may hold)."""
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip(" \t\r"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number}, column {exc.colno}: not valid JSON: {exc.msg}") from None
            lines.append(number)
    return rows, lines


def _is_row_object(data: Mapping[str, Any]) -> bool:
    present = [data[c] for c in COLUMNS if c in data]
    return bool(present) and all(isinstance(v, str) or (isinstance(v, list) and v and all(
        isinstance(m, Mapping) for m in v)) for v in present)


def _is_column_object(data: Mapping[str, Any]) -> bool:
    return bool(data) and all(isinstance(v, list) for v in data.values()) and not any(
        isinstance(x, Mapping) for c in COLUMNS for x in data.get(c, ()))


def _read_json_rows(path: Path) -> tuple[list[Any], list[int] | None]:
    """The rows of a .json/.jsonl file and, for JSON lines, each row's line number."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        return _json_lines(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file (as save_preference_dataset and 🤗 to_json write)
            return _json_lines(text, path)
        raise ValueError(f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}") from None
    if isinstance(data, Mapping) and "data" in data and not any(c in data for c in COLUMNS):
        data = data["data"]
    if isinstance(data, Mapping):
        if _is_row_object(data):  # a single row object is one row
            return [dict(data)], None
        if not _is_column_object(data):
            raise ValueError(f"{path}: a JSON object must be one row (prompt, chosen, rejected each a string or a "
                             "list of messages) or columns (each value a list with one entry per row); got "
                             + ", ".join(f"{k}={type(v).__name__}" for k, v in data.items()))
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
        return [dict(zip(data, values)) for values in zip(*data.values())], None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return data, None


def _dataset_from_rows(rows: Sequence[Mapping[str, Any]], where: str):
    """A Dataset with every key of any row as a column (first-seen order, prompt/chosen/rejected first; None where a
    row lacks a key), or an error naming the column whose rows hold different types."""
    import datasets

    keys = dict.fromkeys(c for c in COLUMNS if any(c in r for r in rows))
    keys.update(dict.fromkeys(k for r in rows for k in r))
    columns = {k: [r.get(k) for r in rows] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as exc:  # pyarrow's type errors, not UTF-8 encodable strings, ...
        for name, values in columns.items():
            types: dict[str, list[int]] = {}
            for i, v in enumerate(values):
                if v is not None:
                    kind = "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
                    types.setdefault(kind, []).append(i)
            if len(types) > 1:
                raise ValueError(f"{where}: column {name!r} holds different types: " + "; ".join(
                    f"{t} in rows {r[:_SHOWN_BAD_ROWS]}{' …' if len(r) > _SHOWN_BAD_ROWS else ''}"
                    for t, r in types.items())) from exc
        if isinstance(exc, UnicodeEncodeError):  # a lone surrogate: Arrow stores UTF-8 only
            for name, values in columns.items():
                for i, v in enumerate(values):
                    if isinstance(v, str) and _SURROGATE.search(v):
                        raise ValueError(f"{where}: row {i} [{name}]: a lone surrogate ({exc.reason}); datasets "
                                         "store UTF-8 text only") from exc
        raise ValueError(f"{where}: cannot build a dataset from these rows: {exc}") from exc


def load_preference_dataset(source, *, on_bad_rows: str = "raise", split: str | None = None):
    """A preference `datasets.Dataset` from a list of dicts, a `.json`/`.jsonl` file (formats: module docstring),
    a folder written by `save_to_disk` (a DatasetDict folder needs `split`), or a Dataset. Rows failing the checks
    of `validate_rows` (without tokenizer) raise a ValueError naming them (and, in a JSON lines file, their lines)
    or, with `on_bad_rows="drop"`, are left out with a `BadRowsWarning`; `last_bad_rows()` has the full list.
    Implicit-prompt rows (no prompt column) come back with their prompt split off (`extract_prompt`)."""
    import datasets

    lines = None
    source_name = None
    if isinstance(source, datasets.Dataset):
        rows_or_dataset = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source_name = str(path)
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split is None:
                    raise ValueError(f"{path} holds splits {list(loaded)}; pass split=")
                loaded = loaded[split]
            rows_or_dataset = loaded
        elif path.suffix in (".json", ".jsonl"):
            if not path.exists():
                raise ValueError(f"no preference dataset at {path}")
            rows_or_dataset, lines = _read_json_rows(path)
        elif not path.exists():
            raise ValueError(f"no preference dataset at {path}")
        else:
            raise ValueError(f"{path}: expected a .json/.jsonl file or a saved dataset folder")
    elif isinstance(source, Sequence):
        rows_or_dataset = list(source)
    else:
        raise ValueError(f"cannot load a preference dataset from a {type(source).__name__}")

    bad = validate_rows(rows_or_dataset)
    if lines is not None:
        bad = [replace(b, line=lines[b.index]) for b in bad]
    total = len(rows_or_dataset)
    drop = _handle_bad_rows(bad, on_bad_rows, total, "load_preference_dataset", source_name)
    keep = [i for i in range(total) if i not in drop]
    implicit = _is_implicit(rows_or_dataset)
    if isinstance(rows_or_dataset, datasets.Dataset):
        dataset = rows_or_dataset.select(keep) if drop else rows_or_dataset
        if implicit and len(dataset):
            dataset = _split_prompts(dataset)
        return dataset
    if not keep:
        raise ValueError(f"{source_name or 'preference dataset'}: no rows left")
    kind = _dataset_kind(rows_or_dataset, implicit)
    rows = [_explicit_row(rows_or_dataset[i], i, kind, implicit)[0] for i in keep]
    return _dataset_from_rows(rows, source_name or "preference dataset")


def _split_prompts(dataset):
    """A Dataset in the implicit-prompt format (all rows valid) with its prompt column split off, placed first."""
    import datasets

    features = datasets.Features({"prompt": dataset.features["chosen"], **dataset.features})

    def split(batch):
        out = {"prompt": [], "chosen": [], "rejected": []}
        for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
            for column, value in zip(out, extract_prompt(chosen, rejected)):
                out[column].append(value)
        return out

    return dataset.map(split, batched=True, features=features, desc="extract_prompt")


def save_preference_dataset(dataset, path, overwrite: bool = False) -> Path:
    """Write `dataset` to a `.jsonl`/`.json` file (JSON lines, any string read back exactly: see `_json_line`) or,
    for any other path, a `save_to_disk` folder. Written under a temporary name and renamed, so an interrupted save
    leaves nothing behind; an existing target is only replaced with `overwrite=True`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if path.suffix in (".json", ".jsonl"):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                for row in dataset:
                    f.write(_json_line(row) + "\n")
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


def _tokenizer_context(tokenizer) -> int | None:
    """The tokenizer's `model_max_length`, or None when it is transformers' "unknown" placeholder."""
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < _UNSET_MODEL_MAX_LENGTH else None


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer, kind: str | None, implicit: bool,
                    max_length: int | None, max_prompt_length: int | None, truncation: str | None,
                    add_special_tokens: bool, context: int | None, vocab_size: int, eos: int,
                    add_row_index: bool) -> dict[str, list]:
    """`Dataset.map` function of `tokenize_pairs`: the token columns of a batch of rows, plus `_bad` (the rows'
    problems as JSON [[column, reason], ...], "" if none) and `_key` (`_row_key` of valid rows, to find repeats)."""
    names = list(batch)
    size = len(indices)
    out: dict[str, list] = {"prompt_ids": [[] for _ in range(size)], "chosen_ids": [[] for _ in range(size)],
                            "rejected_ids": [[] for _ in range(size)]}
    for flag in TOKEN_COLUMNS[3:]:
        out[flag] = [False] * size
    problems: list[list[BadRow]] = [[] for _ in range(size)]
    keys = [""] * size
    explicit: dict[str, list] = {c: [None] * size for c in COLUMNS} if implicit else {}
    good, texts = [], []
    for j in range(size):
        row, found = _explicit_row({name: batch[name][j] for name in names}, indices[j], kind, implicit)
        if found:
            problems[j] = found
            continue
        if implicit:
            for c in COLUMNS:
                explicit[c][j] = row[c]
        keys[j] = _row_key(row)
        good.append(j)
        texts.append(render_pair(row, tokenizer))
    special = add_special_tokens and not (kind == "conversation" and _has_chat_template(tokenizer))
    prompt_ids = _encode(tokenizer, [t["prompt"] for t in texts], prompt=True, add_special_tokens=special)
    chosen_ids = _encode(tokenizer, [t["chosen"] for t in texts], prompt=False)
    rejected_ids = _encode(tokenizer, [t["rejected"] for t in texts], prompt=False)
    for j, p, c, r in zip(good, prompt_ids, chosen_ids, rejected_ids):
        i = indices[j]
        reason = _prompt_length_problem(len(p), max_prompt_length, max_length, truncation)
        if reason:
            problems[j].append(BadRow(i, "prompt", reason))
            continue
        truncated_prompt = max_prompt_length is not None and len(p) > max_prompt_length
        if truncated_prompt:
            p = p[:max_prompt_length] if truncation == "keep_start" else p[-max_prompt_length:]
        c, r = (ids if ids and ids[-1] == eos else ids + [eos] for ids in (c, r))
        room = None if max_length is None else max_length - len(p)
        truncated_chosen = room is not None and len(c) > room
        truncated_rejected = room is not None and len(r) > room
        c, r = c[:room] if truncated_chosen else c, r[:room] if truncated_rejected else r
        if max_length is None and context is not None:
            for side, ids in (("chosen", c), ("rejected", r)):
                if len(p) + len(ids) > context:
                    problems[j].append(BadRow(i, side, f"prompt + {side} has {len(p) + len(ids)} tokens > "
                                                       f"model_max_length={context} (pass max_length= to cut the "
                                                       "completions, max_prompt_length= to cut the prompt)"))
        for column, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
            if ids and max(ids) >= vocab_size:
                problems[j].append(BadRow(i, column, f"token id {max(ids)} >= vocabulary size {vocab_size}"))
        out["prompt_ids"][j], out["chosen_ids"][j], out["rejected_ids"][j] = p, c, r
        out["truncated_prompt"][j], out["truncated_chosen"][j] = truncated_prompt, truncated_chosen
        out["truncated_rejected"][j] = truncated_rejected
        out["truncated_completion"][j] = truncated_chosen or truncated_rejected
    result = dict(explicit)
    if add_row_index:
        result["row_index"] = list(indices)
    result.update(out)
    result["_bad"] = [json.dumps([[b.column, b.reason] for b in found]) if found else "" for found in problems]
    result["_key"] = keys
    return result


def tokenize_pairs(dataset, tokenizer, max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation: str | None = "keep_start", *, on_bad_rows: str = "raise",
                   add_special_tokens: bool = False, model_max_length: int | None = None,
                   vocab_size: int | None = None, batch_size: int = 1000, load_from_cache_file: bool | None = None,
                   num_proc: int | None = None):
    """Add `prompt_ids`, `chosen_ids`, `rejected_ids` (completion ids end with EOS), `row_index` and the
    truncation flags to a preference dataset (see the module docstring for the rules).

    `row_index` is the row's position in `dataset` (kept if the column already exists), so it stays valid for
    per-row caches when bad rows are dropped (a list of dicts is loaded first: positions after loading).
    `add_special_tokens=True` lets the tokenizer add its special tokens (e.g. BOS) to the prompt, as TRL >= 1.0
    does; completions never get any besides the appended EOS.

    Bad rows — those of `validate_rows` plus a prompt + completion longer than the model's context when
    `max_length` is None (`model_max_length`: pass the model's, e.g. `model.config.n_positions`; default the
    tokenizer's when set) and a token id >= `vocab_size` (default `len(tokenizer)`; pass the model's embedding rows
    when tokens were added to the tokenizer) — raise or are dropped (`on_bad_rows`), see `last_bad_rows()`.
    `max_length` may not exceed `model_max_length`. An implicit-prompt dataset (no prompt column) gets its prompt
    split off (`extract_prompt`) into prompt/chosen/rejected.

    Runs as a batched `datasets.Dataset.map` (`batch_size` rows per call, `num_proc` processes, a progress bar),
    whose results are cached next to a file-backed dataset (`load_from_cache_file=False` recomputes them).
    """
    import datasets

    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                        ("model_max_length", model_max_length), ("vocab_size", vocab_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; every completion ends with EOS")
    context = model_max_length if model_max_length is not None else _tokenizer_context(tokenizer)
    if max_length is not None and context is not None and max_length > context:
        raise ValueError(f"max_length={max_length} exceeds model_max_length={context} (the model's context"
                         + ("" if model_max_length is not None else ", from the tokenizer; pass model_max_length= "
                            "if the model's is larger") + ")")
    if not isinstance(dataset, datasets.Dataset):
        dataset = load_preference_dataset(dataset, on_bad_rows=on_bad_rows)

    implicit = _is_implicit(dataset)
    kind = _dataset_kind(dataset, implicit)
    add_row_index = "row_index" not in dataset.column_names
    replaced = [c for c in TOKEN_COLUMNS if c in dataset.column_names]
    int_list = datasets.List(datasets.Value("int64"))
    features = {k: v for k, v in dataset.features.items() if k not in replaced}
    if implicit:
        features = {"prompt": features["chosen"], **features}
    if add_row_index:
        features["row_index"] = datasets.Value("int64")
    features.update({c: int_list for c in TOKEN_COLUMNS[:3]})
    features.update({c: datasets.Value("bool") for c in TOKEN_COLUMNS[3:]})
    features.update({"_bad": datasets.Value("string"), "_key": datasets.Value("string")})
    mapped = dataset.map(
        _tokenize_batch, batched=True, batch_size=batch_size, with_indices=True, remove_columns=replaced,
        features=datasets.Features(features), load_from_cache_file=load_from_cache_file, num_proc=num_proc,
        desc="tokenize_pairs",
        fn_kwargs=dict(tokenizer=tokenizer, kind=kind, implicit=implicit, max_length=max_length,
                       max_prompt_length=max_prompt_length, truncation=truncation,
                       add_special_tokens=add_special_tokens, context=context,
                       vocab_size=vocab_size if vocab_size is not None else len(tokenizer), eos=eos,
                       add_row_index=add_row_index))
    checks = mapped.select_columns(["_bad", "_key"]).to_dict()  # whole columns at once, not row by row
    bad = [BadRow(i, column, reason) for i, found in enumerate(checks["_bad"]) if found
           for column, reason in json.loads(found)]
    bad.extend(_duplicates(checks["_key"]))
    drop = _handle_bad_rows(bad, on_bad_rows, len(dataset), "tokenize_pairs")
    if len(drop) == len(dataset):
        raise ValueError("tokenize_pairs: no rows left")
    result = mapped.select([i for i in range(len(dataset)) if i not in drop]) if drop else mapped
    return result.remove_columns(["_bad", "_key"])


def truncation_report(tokenized) -> dict[str, int]:
    """How many rows had their prompt / chosen / rejected / any completion truncated."""
    return {name: int(sum(tokenized[name])) for name in
            ("truncated_prompt", "truncated_chosen", "truncated_rejected", "truncated_completion")}
