"""Batches of tokenised preference pairs (`tokenize_pairs` rows) for training; re-exported by `preference`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass
class PreferenceCollator:
    """Pads a list of tokenised pairs (`tokenize_pairs` rows) into the batch the trainer takes.

    Returns `{chosen,rejected}_{input_ids,attention_mask,completion_mask}` (all [B, L], long; chosen and rejected
    right-padded to one length L, a multiple of `pad_to_multiple_of` if set) and `row_index` [B]; plus any of
    `extra_keys` present in the rows (e.g. precomputed reference log-probs), as float tensors [B].

    Per-token columns: for each `key` of `token_keys` whose `chosen_<key>`/`rejected_<key>` columns are in the rows
    (one value per completion token, EOS included: `len(chosen_<key>) == len(chosen_ids)`), float tensors
    `chosen_<key>`/`rejected_<key>` [B, L] aligned with the input ids: completion token j of a row sits at position
    len(prompt_ids) + j, and prompt and padding positions hold 0. The trainer shifts such [B, L] columns to label
    positions ([:, 1:], `tokenpo.providers.StepContext.column`), so label position t gets the value of the token it
    predicts. Defaults cover SePO selections / oracle scores and TIS-DPO weights.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    extra_keys: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")
    token_keys: tuple[str, ...] = ("selections", "weights", "token_scores", "oracle_scores")

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("PreferenceCollator needs a pad_token_id (use the EOS id if the tokenizer has no pad)")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PreferenceCollator got an empty batch")
        _check_tokenised(features)
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = [(_as_list(f["prompt_ids"]), _as_list(f[f"{side}_ids"])) for f in features]
        length = max(len(p) + len(c) for pairs in sides.values() for p, c in pairs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for side, pairs in sides.items():
            ids = torch.full((len(pairs), length), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(pairs), length), dtype=torch.long)
            completion = torch.zeros((len(pairs), length), dtype=torch.long)
            for b, (p, c) in enumerate(pairs):
                n = len(p) + len(c)
                ids[b, :n] = torch.tensor(p + c, dtype=torch.long)
                attention[b, :n] = 1
                completion[b, len(p):n] = 1
            batch[f"{side}_input_ids"] = ids
            batch[f"{side}_attention_mask"] = attention
            batch[f"{side}_completion_mask"] = completion
        if any("row_index" not in f for f in features):
            raise ValueError("PreferenceCollator: rows need a row_index column (tokenize_pairs adds it)")
        batch["row_index"] = torch.tensor([int(f["row_index"]) for f in features], dtype=torch.long)
        for key in self.extra_keys:
            if key in features[0]:
                batch[key] = torch.tensor([float(f[key]) for f in features])
        for key in self.token_keys:
            columns = [f"{side}_{key}" for side in sides]
            present = [c for c in columns if any(c in f for f in features)]
            if not present:
                continue
            for column in columns:
                missing = [int(f.get("row_index", i)) for i, f in enumerate(features) if column not in f]
                if missing:
                    raise ValueError(f"PreferenceCollator: per-token column {column!r} is missing in row(s) "
                                     f"{missing} (token_keys needs chosen_{key} and rejected_{key} in every row)")
            for side in sides:
                batch[f"{side}_{key}"] = _token_column(features, side, key, length)
        return batch


_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def _check_tokenised(features: Sequence[Any]) -> None:
    """Rows must be `tokenize_pairs` output; raw prompt/chosen/rejected rows get told so instead of a KeyError."""
    for b, f in enumerate(features):
        if not isinstance(f, Mapping):
            raise ValueError(f"PreferenceCollator: batch item {b} is a {type(f).__name__}, not a tokenised pair; "
                             "call tokenpo.data.preference.tokenize_pairs(dataset, tokenizer) first")
        missing = [k for k in _ID_COLUMNS if k not in f]
        if missing:
            row = f" (row_index {f['row_index']})" if "row_index" in f else ""
            raw = " — they look like untokenised text rows" if any(k in f for k in ("prompt", "chosen")) else ""
            raise ValueError(f"PreferenceCollator: batch item {b}{row} has no {', '.join(missing)} (it has "
                             f"{', '.join(map(str, f))}){raw}: call tokenpo.data.preference.tokenize_pairs(dataset, "
                             "tokenizer) first and train on its output")


def _token_column(features: Sequence[Mapping[str, Any]], side: str, key: str, length: int) -> torch.Tensor:
    """[B, L] float: each row's per-completion-token values at the positions of its completion tokens, 0 elsewhere."""
    column = torch.zeros((len(features), length), dtype=torch.float32)
    for b, f in enumerate(features):
        values = f[f"{side}_{key}"]
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        start, n = len(f["prompt_ids"]), len(f[f"{side}_ids"])
        if len(values) != n:
            raise ValueError(f"PreferenceCollator: row {int(f.get('row_index', b))} has {len(values)} values in "
                             f"{side}_{key} but {n} completion tokens in {side}_ids (one value per completion "
                             "token, EOS included; recompute the column after truncation)")
        column[b, start:start + n] = torch.tensor([float(v) for v in values], dtype=torch.float32)
    return column


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
