"""Batches of tokenised preference pairs (`tokenize_pairs` rows) for training; re-exported by `preference`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass
class PreferenceCollator:
    """Pads a list of tokenised pairs into the batch dict of CONTEXT.md.

    Returns `{chosen,rejected}_{input_ids,attention_mask,completion_mask}` (all [B, L], long; chosen and rejected
    right-padded to one length L, a multiple of `pad_to_multiple_of` if set) and `row_index` [B]; plus any of
    `extra_keys` present in the rows (e.g. precomputed reference log-probs), as float tensors [B].
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    extra_keys: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("PreferenceCollator needs a pad_token_id (use the EOS id if the tokenizer has no pad)")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PreferenceCollator got an empty batch")
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
        return batch


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
