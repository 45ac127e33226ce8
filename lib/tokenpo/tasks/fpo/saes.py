"""The SAEs of notebook 04, cached: one `tokenpo.providers.prepare_fpo` per (layer, site, seed) on the reference and
the training pairs (SAE, held-out report, offline reference cache), and what an SAE costs the language model when its
reconstruction replaces the activation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tokenpo.cache import cached_step, code_fingerprint
from tokenpo.profiles import FPOConfig
from tokenpo.providers.fpo import FPOPreparation, FPOReferenceCache, prepare_fpo
from tokenpo.providers.sae import SparseAutoencoder, spliced
from tokenpo.tasks.sentiment.sweep import pairs_fingerprint
from tokenpo.tokens import next_token_loss
from tokenpo.utils import unwrap_model

POOLING = "paper"      # mean over completion tokens: cached features do not depend on the training batches' padding


def cached_preparation(reference, reference_id: str, pairs, collator, cfg: FPOConfig, layer: int, site: str,
                       seed: int = 0) -> tuple[FPOPreparation, float]:
    """`prepare_fpo` at (layer, site) with the profile's SAE settings, from the cache when it was built before;
    returns the preparation and the seconds it took to build (0 when loaded)."""
    inputs = {"kind": "fpo-preparation", "reference": reference_id, "pairs": pairs_fingerprint(pairs),
              "layer": layer, "site": site, "seed": seed, "width": cfg.sae_width, "l0": cfg.sae_l0,
              "steps": cfg.sae_steps, "batch": cfg.sae_batch, "cache_k": cfg.cache_k, "pooling": POOLING,
              "code": code_fingerprint("providers/sae.py", "providers/fpo.py")}
    seconds = [0.0]

    def build(folder: Path) -> None:
        import time

        start = time.perf_counter()
        prep = prepare_fpo(reference, pairs, collator, layer=layer, site=site, width=cfg.sae_width,
                           l0_target=cfg.sae_l0, sae_steps=cfg.sae_steps, sae_batch=cfg.sae_batch,
                           cache_k=cfg.cache_k, pooling=POOLING, seed=seed, progress=False)
        prep.sae.save_pretrained(folder / "sae")
        prep.cache.save(folder / "cache")
        seconds[0] = time.perf_counter() - start
        (folder / "report.json").write_text(json.dumps({**prep.report, "build_seconds": seconds[0]}))

    folder = cached_step("fpo-preparation", inputs, build)
    sae = SparseAutoencoder.from_pretrained(folder / "sae").requires_grad_(False)
    cache = FPOReferenceCache.load(folder / "cache")
    report = json.loads((folder / "report.json").read_text())
    return FPOPreparation(sae, cache, report, layer, site, POOLING), seconds[0]


@torch.no_grad()
def lm_loss_with_sae(model, sae: SparseAutoencoder, tokenized, collator, batch_size: int = 32) -> dict[str, float]:
    """Next-token loss (nats per token) of `model` on the chosen sides of `tokenized` pairs, as is and with the SAE's
    reconstruction spliced in at its (layer, site): what the SAE loses for the language model."""
    model_ = unwrap_model(model)
    was_training = model_.training
    model_.eval()
    totals = {"loss": [0.0, 0], "loss_spliced": [0.0, 0]}
    try:
        for i in range(0, len(tokenized), batch_size):
            batch = collator([tokenized[j] for j in range(i, min(i + batch_size, len(tokenized)))])
            ids, attn = batch["chosen_input_ids"], batch["chosen_attention_mask"]
            for key in totals:
                if key == "loss":
                    loss, n = next_token_loss(model_, ids, attn)
                else:
                    with spliced(model_, sae, sae.config.layer, sae.config.site):
                        loss, n = next_token_loss(model_, ids, attn)
                totals[key][0] += float(loss)
                totals[key][1] += n
    finally:
        model_.train(was_training)
    out = {k: s / max(n, 1) for k, (s, n) in totals.items()}
    out["loss_increase"] = out["loss_spliced"] - out["loss"]
    return out
