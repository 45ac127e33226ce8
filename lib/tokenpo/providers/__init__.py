"""Providers: one module per kind of extra input an objective takes (see :mod:`tokenpo.providers.base`).

| provider (registry name)                   | makes                         | for        | reads from the step               |
|--------------------------------------------|-------------------------------|------------|-----------------------------------|
| :class:`MaPOMasks` ("mapo_masks")          | masks                         | mapo       | reference activation statistics   |
| :class:`SparsePOMasks` ("sparsepo_masks")  | reward_masks, kl_masks        | sparsepo   | reference per-layer hidden states |
| :class:`SePOSelections` ("sepo_selections")| selections                    | sepo       | oracle-score columns of the data  |
| :class:`LowConfidenceTokens` ("low_confidence_tokens") | selections        | confpo     | the policy's own log-probs        |
| :class:`Columns` ("weights_columns")       | any dataset column, e.g. weights | tis_dpo | dataset columns                   |
| :class:`FPOFeatures` (no default: needs an SAE) | features, ref_features (+ ref_mean_logps) | fpo | residual stream at one site |

An objective's registry entry (:data:`tokenpo.objectives.OBJECTIVES`) names its default providers; pass
``TrainConfig(providers=[...])`` to use others (e.g. ``SePOSelections(column=None)`` for SePO-rand, ``FPOFeatures``).
"""
from __future__ import annotations

from typing import Callable

from tokenpo.objectives import Objective

from .base import Columns, Needs, Provider, StepContext, split_pairs
from .confpo import LowConfidenceTokens
from .fpo import FPOFeatures, FPOReferenceCache
from .mapo import MaPOMasks
from .sepo import SePOSelections
from .sparsepo import SparsePOMasks

PROVIDERS: dict[str, Callable[[], Provider]] = {
    "mapo_masks": MaPOMasks,
    "sparsepo_masks": SparsePOMasks,
    "sepo_selections": SePOSelections,
    "low_confidence_tokens": LowConfidenceTokens,
    "weights_columns": lambda: Columns("weights"),
}

__all__ = ["PROVIDERS", "Provider", "Needs", "StepContext", "Columns", "MaPOMasks", "SparsePOMasks",
           "SePOSelections", "LowConfidenceTokens", "FPOFeatures", "FPOReferenceCache", "default_providers",
           "check_providers", "split_pairs"]


def default_providers(objective: Objective) -> list[Provider]:
    """Fresh instances of the providers ``objective``'s registry entry names."""
    unknown = [name for name in objective.providers if name not in PROVIDERS]
    if unknown:
        raise ValueError(f"objective {objective.name!r} names unknown provider(s) {unknown}; known: {sorted(PROVIDERS)}")
    return [PROVIDERS[name]() for name in objective.providers]


def check_providers(objective: Objective, providers: list[Provider]) -> None:
    """ValueError unless the providers together make every extra input the objective takes, each exactly once."""
    made: dict[str, str] = {}
    for provider in providers:
        if not isinstance(provider, Provider):
            raise ValueError(f"{provider!r} is not a tokenpo Provider (subclass tokenpo.providers.Provider)")
        for name in provider.provides:
            if name in made:
                raise ValueError(f"extra input {name!r} is made by two providers: {made[name]} and "
                                 f"{type(provider).__name__}")
            made[name] = type(provider).__name__
    unknown = [n for n in made if n not in objective.input_names]
    if unknown:
        raise ValueError(f"objective {objective.name!r} takes no input {unknown} (made by {made[unknown[0]]}); "
                         f"its inputs: {list(objective.input_names)}")
    missing = [n for n in objective.extra_inputs if n not in made]
    if missing:
        hint = ("FPOFeatures(sae, layer, site) (see tokenpo.providers.fpo)" if "features" in missing else
                "the providers its registry entry names" if objective.providers else "a provider that makes them")
        raise ValueError(f"objective {objective.name!r} takes extra inputs {missing} that no provider makes: pass "
                         f"TrainConfig(providers=[...]) with {hint}")
