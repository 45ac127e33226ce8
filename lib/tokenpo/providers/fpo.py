"""FPO's feature-level inputs (docs/equations.md#fpo): pooled sparse-autoencoder features of the policy and the
reference, and the offline reference cache that lets FPO train with no reference model in memory.

:class:`FPOFeatures` is the provider. It reads the residual stream at (layer, site) during the step's policy forward
(with gradients) and, without a cache, during the reference forward; with an :class:`FPOReferenceCache` the reference
side (pooled features and length-normalised log-probs) comes from disk and no reference forward runs at all.

What the cache stores, per row and side (chosen / rejected): Σ_t log π_ref(y_t) over the completion, |y|, and the k
largest pooled reference features c̄_ref (indices + values). One safetensors file, written atomically, with the
settings (k, F, pooling, layer, site, SAE fingerprint) in its metadata; the provider refuses a cache whose settings
differ from its own.

Which feature indices the FPO MSE uses (the loss decides; the cache gives it dense [B, F] reference features that are
exact on the stored indices and 0 elsewhere):
- paper: I_k = topk(c̄_θ) ∪ topk(c̄_ref);   official code (`fpo.py`): topk(c̄_θ) only, with a live reference.
- from this cache the reference part is exact, but a policy top-k index outside the stored reference top-k reads
  c̄_ref = 0 (its true value is between 0 and the smallest stored value: JumpReLU features are ≥ 0). So "union" and
  "policy top-k" are approximations; "reference top-k" alone is exact. Store more than the loss's k (e.g. 2k-4k,
  `k` here) to make the approximation tight: then most policy top-k indices are among the stored ones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from tokenpo.cache import atomic_write_bytes
from tokenpo.tokens import align_to_labels, completion_logps, label_mask
from tokenpo.utils import unwrap_model

from .activations import capture_sites
from .base import Needs, Provider, StepContext, split_pairs
from .sae import SparseAutoencoder, collect_activations, sae_report, train_sae

SIDES = ("chosen", "rejected")
FILE_NAME = "fpo_reference.safetensors"
POOLINGS = ("official", "paper")

__all__ = ["FPOFeatures", "FPOReferenceCache", "FPOPreparation", "pooled_features", "prepare_fpo"]


def pooled_features(sae: SparseAutoencoder, hidden: torch.Tensor, mask: torch.Tensor,
                    mode: str = "official") -> torch.Tensor:
    """Average-pooled SAE features c̄ [B, F] of hidden [B, T, d] (already aligned with the labels mask [B, T]).

    mode "official" (FeatureAlignment `fpo.py`): (f · mask).mean(dim=1), i.e. divided by T *including* the masked
    prompt/padding positions; "paper": mean over completion tokens only (÷|y|). They differ by the factor T/|y|.
    Gradients flow into `hidden`; freeze the SAE (`requires_grad_(False)`) when it should stay fixed. Positions off
    the completion never reach the result (even non-finite values there).
    """
    if hidden.shape[:2] != mask.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} disagree on [B, T]")
    if mode not in POOLINGS:
        raise ValueError(f"pooling mode={mode!r}: choose from {POOLINGS}")
    on = (mask > 0).unsqueeze(-1)
    features = sae.encode(torch.where(on, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)))
    summed = torch.where(on, features, 0.0).sum(1)
    if mode == "official":
        return summed / hidden.shape[1]
    return summed / mask.sum(-1, keepdim=True).clamp(min=1).to(summed.dtype)


class FPOReferenceCache:
    """FPO's offline reference side: in-memory rows + save/load; `get(row_index)` gives a batch's tensors."""

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
    def build(cls, reference, sae: SparseAutoencoder, batches: Iterable[Mapping[str, torch.Tensor]], k: int,
              layer: int = -1, site: str = "block_out", pooling: str = "official", path: str | Path | None = None,
              progress: bool = True, reference_name: str | None = None) -> "FPOReferenceCache":
        """One reference forward per collator batch (chosen and rejected concatenated): label log-probs and the
        pooled SAE features of the residual stream at (layer, site), aligned with the labels.
        Saved to `path` at the end (nothing is written if any batch fails)."""
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
                completion = torch.cat([batch["chosen_completion_mask"],
                                        batch["rejected_completion_mask"]]).to(device)
                with capture_sites(model, [(layer, site)]) as captured:
                    logps = completion_logps(model, ids, attn, completion)
                labels_mask = label_mask(completion)
                with torch.no_grad():
                    feats = pooled_features(sae, align_to_labels(captured[(layer, site)]), labels_mask, mode=pooling)
                (sum_w, sum_l), (len_w, len_l) = split_pairs(logps.sum(-1)), split_pairs(labels_mask.sum(-1))
                f_w, f_l = split_pairs(feats)
                cache.add(batch["row_index"], logps_chosen=sum_w, logps_rejected=sum_l, lengths_chosen=len_w,
                          lengths_rejected=len_l, features_chosen=f_w, features_rejected=f_l)
        finally:
            model.train(was_training)
        if path is not None:
            cache.save(path)
        return cache

    def check_settings(self, sae: SparseAutoencoder, layer: int, site: str, pooling: str) -> None:
        """ValueError naming every setting in which this cache differs from (sae, layer, site, pooling)."""
        wanted = {"sae": sae.fingerprint(), "layer": layer, "site": site, "pooling": pooling}
        differ = {k: (self.meta.get(k), v) for k, v in wanted.items() if self.meta.get(k) != v}
        if differ:
            raise ValueError("the FPO reference cache was built with other settings: "
                             + ", ".join(f"{k} {a!r} (cache) vs {b!r}" for k, (a, b) in differ.items())
                             + "; rebuild it with FPOReferenceCache.build")
        if sae.config.width != self.n_features:
            raise ValueError(f"the FPO reference cache holds {self.n_features} features, the SAE has "
                             f"{sae.config.width}")


class FPOFeatures(Provider):
    """The FPO provider: ``features`` (policy, with gradients) and ``ref_features`` — pooled SAE features [B, F] per
    side of the residual stream at (layer, site) — and, with an offline ``cache``, ``ref_mean_logps`` (so the
    objective needs no reference statistics and no reference forward runs).

    (layer, site) default to where the SAE was trained (``sae.config.layer``/``site``). The SAE is frozen.
    ``pooling="official"`` divides by the padded length T of the batch the features were computed in, so cached
    features match the trainer's only with the same batching; ``"paper"`` (mean over completion tokens) does not
    depend on it.
    """

    def __init__(self, sae: SparseAutoencoder, layer: int | None = None, site: str | None = None,
                 pooling: str = "official", cache: FPOReferenceCache | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}: choose from {POOLINGS}")
        site = site or sae.config.site
        layer = layer if layer is not None else sae.config.layer
        if layer is None:
            if site != "final_norm":
                raise ValueError("FPOFeatures needs the layer the SAE reads: its config has none; pass layer=")
            layer = -1
        self.sae = sae.requires_grad_(False).eval()
        self.layer, self.site, self.pooling, self.cache = layer, site, pooling, cache
        if cache is not None:
            cache.check_settings(sae, layer, site, pooling)
        self.provides = ("features", "ref_features") + (() if cache is None else ("ref_mean_logps",))

    def needs(self) -> Needs:
        site = ((self.layer, self.site),)
        if self.cache is not None:
            return Needs(policy_sites=site)
        return Needs(reference=True, policy_sites=site, reference_sites=site)

    def _pooled(self, hidden: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(pooled_features(self.sae, h, s.mask, mode=self.pooling)
                     for h, s in zip(split_pairs(hidden), (ctx.chosen, ctx.rejected)))

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        key = (self.layer, self.site)
        out = {"features": self._pooled(ctx.policy_sites[key], ctx)}
        if self.cache is None:
            with torch.no_grad():
                out["ref_features"] = self._pooled(ctx.reference_sites[key], ctx)
            return out
        ref = self.cache.get(ctx.batch["row_index"], device=ctx.chosen.mask.device)
        out["ref_features"] = (ref["ref_features_chosen"], ref["ref_features_rejected"])
        out["ref_mean_logps"] = (ref["ref_logps_mean_chosen"], ref["ref_logps_mean_rejected"])
        return out

    def settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "site": self.site, "pooling": self.pooling, "sae": self.sae.fingerprint(),
                "cache": None if self.cache is None else len(self.cache)}


# --------------------------------------------------------------------------------------------------- one call
@dataclass
class FPOPreparation:
    """What FPO training needs, from `prepare_fpo`: the trained SAE (frozen), its report on held-out tokens, and the
    offline reference cache (or None); `provider()` gives the `FPOFeatures` to pass in `TrainConfig(providers=...)`."""

    sae: SparseAutoencoder
    cache: FPOReferenceCache | None
    report: dict
    layer: int
    site: str
    pooling: str

    def provider(self) -> "FPOFeatures":
        return FPOFeatures(self.sae, self.layer, self.site, self.pooling, self.cache)


def prepare_fpo(reference, pairs, collator, *, layer: int = -1, site: str = "block_out", width: int | None = None,
                l0_target: float | None = None, sae_steps: int = 2000, sae_batch: int = 1024, sae_lr: float = 1e-3,
                num_threads: int | None = 1, cache_k: int | None = 128, pooling: str = "paper", batch_size: int = 32,
                heldout_share: float = 0.1, seed: int = 0, progress: bool = True) -> FPOPreparation:
    """FPO's preparation in one call: the reference's residual stream at (layer, site) on the completion tokens of
    `pairs` → a JumpReLU SAE (width 4·d by default, L0 steered to `l0_target`; trained with `num_threads` torch threads
    — 1 is much faster than 2 on a shared CPU for these sizes) → its report on the held-out share of the tokens →
    the offline reference cache (`cache_k` top pooled features per side; None = no cache: the reference runs online).

    `pooling="paper"` (mean over completion tokens) is the default here because cached features must not depend on
    how the training batches are padded; `"official"` (÷ T) only matches a cache built with the training's batching.
    Save the SAE with `prep.sae.save_pretrained(folder)` and the cache with `prep.cache.save(folder)`."""
    batches = [collator([pairs[j] for j in range(i, min(i + batch_size, len(pairs)))])
               for i in range(0, len(pairs), batch_size)]
    acts = collect_activations(reference, batches, layer, site=site, completion_only=True, progress=progress)
    order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed))
    n_held = int(heldout_share * len(acts))
    held, train = acts[order[:n_held]], acts[order[n_held:]]
    sae = train_sae(train, width or 4 * acts.shape[1], l0_target=l0_target, steps=sae_steps, batch_size=sae_batch,
                    lr=sae_lr, seed=seed, progress=progress, num_threads=num_threads, layer=layer, site=site)
    sae.requires_grad_(False)
    report = sae_report(sae, held) if n_held else {}
    cache = None if cache_k is None else FPOReferenceCache.build(
        reference, sae, batches, k=min(cache_k, sae.config.width), layer=layer, site=site, pooling=pooling,
        progress=progress)
    return FPOPreparation(sae, cache, report, layer, site, pooling)
