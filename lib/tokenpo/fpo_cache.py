"""FPO's offline reference cache (papers.md §3.1): per dataset row, the reference log-probs per side and the top-k
pooled reference SAE features, computed once so that FPO training needs no reference model in memory.

Re-exported as `tokenpo.sae.FPOReferenceCache`.

What is stored, per row and side (chosen / rejected): Σ_t log π_ref(y_t) over the completion, |y|, and the k largest
pooled reference features c̄_ref (indices + values). One safetensors file, written atomically (temporary sibling,
then rename), with the settings (k, F, pooling, layer, site, SAE fingerprint) in its metadata.

Which feature indices the FPO MSE uses (the loss decides; the cache gives it dense [B, F] reference features that
are exact on the stored indices and 0 elsewhere):
- paper: I_k = topk(c̄_θ) ∪ topk(c̄_ref);   official code (`fpo.py`): topk(c̄_θ) only, with a live reference.
- from this cache the reference part is exact, but a policy top-k index outside the stored reference top-k reads
  c̄_ref = 0 (its true value is between 0 and the smallest stored value: JumpReLU features are ≥ 0). So "union" and
  "policy top-k" are approximations; "reference top-k" alone is exact. Store more than the loss's k (e.g. 2k-4k,
  `k` here) to make the approximation tight: then most policy top-k indices are among the stored ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from tokenpo.cache import atomic_write_bytes

SIDES = ("chosen", "rejected")
FILE_NAME = "fpo_reference.safetensors"


class FPOReferenceCache:
    """In-memory rows + save/load; `get(row_index)` gives a batch's reference tensors."""

    def __init__(self, k: int, n_features: int, meta: Mapping | None = None):
        if not 0 < k <= n_features:
            raise ValueError(f"FPO cache needs 0 < k <= n_features; got k={k}, n_features={n_features}")
        self.k, self.n_features = int(k), int(n_features)
        self.meta = dict(meta or {})
        self._rows: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, row: int) -> bool:
        return int(row) in self._rows

    def add(self, row_index: torch.Tensor, *, logps_chosen, logps_rejected, lengths_chosen, lengths_rejected,
            features_chosen: torch.Tensor, features_rejected: torch.Tensor) -> None:
        """Store a batch: row_index [B]; summed completion log-probs and lengths [B] per side; pooled reference
        features [B, F] per side (only their top-k is kept)."""
        rows = [int(r) for r in row_index.reshape(-1).tolist()]
        per_side = {"chosen": (logps_chosen, lengths_chosen, features_chosen),
                    "rejected": (logps_rejected, lengths_rejected, features_rejected)}
        for side, (_, _, feats) in per_side.items():
            if feats.shape != (len(rows), self.n_features):
                raise ValueError(f"features_{side} must be [B, F] = {(len(rows), self.n_features)}; "
                                 f"got {tuple(feats.shape)}")
        tops = {side: feats.detach().float().topk(self.k, dim=-1) for side, (_, _, feats) in per_side.items()}
        for i, row in enumerate(rows):
            if row in self._rows:
                raise ValueError(f"row {row} is already in the FPO reference cache")
            entry = {}
            for side, (logps, lengths, _) in per_side.items():
                entry[f"logps_sum_{side}"] = torch.as_tensor(logps).detach().float().reshape(-1)[i].cpu()
                entry[f"lengths_{side}"] = torch.as_tensor(lengths).detach().reshape(-1)[i].long().cpu()
                entry[f"topk_values_{side}"] = tops[side].values[i].cpu()
                entry[f"topk_indices_{side}"] = tops[side].indices[i].cpu()
            self._rows[row] = entry

    def get(self, row_index: torch.Tensor, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Reference tensors for a batch, per side: `ref_logps_mean_{side}` [B] (length-normalised, FPO's γ_ref
        ingredient), `ref_logps_sum_{side}` [B], `lengths_{side}` [B], `ref_features_{side}` [B, F] (dense, 0 off
        the stored top-k), `ref_topk_indices_{side}` / `ref_topk_values_{side}` [B, k]."""
        rows = [int(r) for r in torch.as_tensor(row_index).reshape(-1).tolist()]
        missing = [r for r in rows if r not in self._rows]
        if missing:
            raise ValueError(f"row {missing[0]} is not in the FPO reference cache ({len(self)} rows stored)")
        device = device if device is not None else (row_index.device if torch.is_tensor(row_index) else "cpu")
        out: dict[str, torch.Tensor] = {}
        for side in SIDES:
            sums = torch.stack([self._rows[r][f"logps_sum_{side}"] for r in rows])
            lengths = torch.stack([self._rows[r][f"lengths_{side}"] for r in rows])
            values = torch.stack([self._rows[r][f"topk_values_{side}"] for r in rows])
            indices = torch.stack([self._rows[r][f"topk_indices_{side}"] for r in rows])
            dense = torch.zeros(len(rows), self.n_features).scatter(-1, indices, values)
            out.update({f"ref_logps_sum_{side}": sums, f"lengths_{side}": lengths,
                        f"ref_logps_mean_{side}": sums / lengths.clamp(min=1),
                        f"ref_features_{side}": dense, f"ref_topk_indices_{side}": indices,
                        f"ref_topk_values_{side}": values})
        return {k: v.to(device) for k, v in out.items()}

    # ---------------------------------------------------------------------------------------- disk
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (`path` or `path/fpo_reference.safetensors` for a folder), atomically."""
        path = Path(path)
        target = path if path.suffix == ".safetensors" else path / FILE_NAME
        rows = sorted(self._rows)
        if not rows:
            raise ValueError("refusing to save an empty FPO reference cache")
        tensors = {"row_index": torch.tensor(rows, dtype=torch.long)}
        for key in self._rows[rows[0]]:
            tensors[key] = torch.stack([self._rows[r][key] for r in rows]).contiguous()
        metadata = {"k": str(self.k), "n_features": str(self.n_features), "meta": json.dumps(self.meta)}
        atomic_write_bytes(target, save(tensors, metadata=metadata))
        return target

    @classmethod
    def load(cls, path: str | Path) -> "FPOReferenceCache":
        path = Path(path)
        target = path if path.suffix == ".safetensors" else path / FILE_NAME
        if not target.exists():
            raise ValueError(f"no FPO reference cache at {target}")
        with safe_open(str(target), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        cache = cls(int(metadata["k"]), int(metadata["n_features"]), json.loads(metadata.get("meta", "{}")))
        for i, row in enumerate(tensors.pop("row_index").tolist()):
            cache._rows[int(row)] = {key: value[i] for key, value in tensors.items()}
        return cache

    # --------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, reference, sae, batches: Iterable[Mapping[str, torch.Tensor]], k: int, layer: int = -1,
              site: str = "block_out", pooling: str = "official", path: str | Path | None = None,
              progress: bool = True, reference_name: str | None = None) -> "FPOReferenceCache":
        """One reference forward per collator batch (chosen and rejected concatenated): label log-probs and the
        pooled SAE features of the residual stream at (layer, site), aligned with the labels ([:, :-1]).
        Saved to `path` at the end (nothing is written if any batch fails)."""
        from tokenpo.activation_hooks import unwrap_model
        from tokenpo.masks import completion_label_logps
        from tokenpo.sae import capture_residual, pooled_features

        cache = cls(k, sae.config.width, {"pooling": pooling, "layer": layer, "site": site,
                                         "sae": sae.fingerprint(), "reference": reference_name})
        model = unwrap_model(reference)
        device = next(model.parameters()).device
        sae = sae.to(device)
        was_training = model.training
        model.eval()
        try:
            for batch in tqdm(batches, desc="FPO reference cache", disable=not progress, leave=False):
                if "row_index" not in batch:
                    raise ValueError("FPO cache batches need `row_index` (the dataset row of each pair)")
                ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
                attn = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).to(device)
                labels_mask = torch.cat([batch["chosen_completion_mask"],
                                         batch["rejected_completion_mask"]])[:, 1:].to(device)
                with capture_residual(model, layer, site) as cap:
                    logps = completion_label_logps(model, ids, attn, labels_mask)
                with torch.no_grad():
                    feats = pooled_features(sae, cap["hidden"][:, :-1], labels_mask, mode=pooling)
                half = len(ids) // 2
                sums, lengths = logps.sum(-1), labels_mask.sum(-1)
                cache.add(batch["row_index"], logps_chosen=sums[:half], logps_rejected=sums[half:],
                          lengths_chosen=lengths[:half], lengths_rejected=lengths[half:],
                          features_chosen=feats[:half], features_rejected=feats[half:])
        finally:
            model.train(was_training)
        if path is not None:
            cache.save(path)
        return cache
