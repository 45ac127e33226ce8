"""The provider protocol: how an objective gets everything it takes besides the per-token statistics.

A provider makes one or more of an objective's extra inputs (``provides``) for each micro-batch, from a
:class:`StepContext`. It declares in :class:`Needs` what it reads from the step's forward passes — the reference
forward at all, the reference's or the policy's per-layer hidden states, the residual stream at named sites, or
per-token activation statistics of the reference (MaPO) — and the trainer computes exactly that, in **one**
reference forward and one policy forward per step. A provider is an ``nn.Module``: it may own trainable modules
(SparsePO's mask networks), which are optimised, checkpointed and saved with the run. It knows no trainer.

The trainer never looks at a method's name: an objective's registry entry names its default providers
(:data:`tokenpo.providers.PROVIDERS`), ``TrainConfig(providers=[...])`` replaces them, and the trainer checks that
the providers together make every extra input the objective takes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from torch import Tensor, nn

from tokenpo.tokens import TokenStats

Site = tuple[int, str]          # (layer, site name), see tokenpo.providers.activations.SITES
PAIR_SIDES = ("chosen", "rejected")


def split_pairs(rows: Tensor) -> tuple[Tensor, Tensor]:
    """[2B, ...] rows in the trainer's order (all chosen rows, then all rejected rows) -> (chosen, rejected)."""
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


@dataclass(frozen=True)
class Needs:
    """What a provider reads from the step's forward passes (the trainer computes the union, once per step).

    reference: a reference forward (without gradients) must run.
    reference_layers / policy_layers: per-layer hidden states [2B, T, H] (HF ``hidden_states[1:]``, aligned with the
        labels); the policy's carry gradients.
    reference_sites / policy_sites: the residual stream [2B, T, d] at (layer, site) (:func:`capture_sites`).
    reference_activations: hook types of :mod:`tokenpo.providers.activations` ("resid", "attn", "mlp", "logits")
        whose per-token statistics [2B, T] are recorded during the reference forward, reduced with
        ``activation_reduce`` ("mean" over the hidden dimension, or "sigmoid" = mean of the sigmoid).
    """

    reference: bool = False
    reference_layers: bool = False
    policy_layers: bool = False
    reference_sites: tuple[Site, ...] = ()
    policy_sites: tuple[Site, ...] = ()
    reference_activations: tuple[str, ...] = ()
    activation_reduce: str = "mean"

    @property
    def uses_reference(self) -> bool:
        return self.reference or self.reference_layers or bool(self.reference_sites or self.reference_activations)

    def __or__(self, other: "Needs") -> "Needs":
        if self.reference_activations and other.reference_activations \
                and self.activation_reduce != other.activation_reduce:
            raise ValueError("two providers ask for reference activation statistics reduced differently "
                             f"({self.activation_reduce!r} and {other.activation_reduce!r})")
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, bool):
                merged[f.name] = a or b
            elif isinstance(a, tuple):
                merged[f.name] = tuple(dict.fromkeys(a + b))
            else:
                merged[f.name] = a if self.reference_activations else b
        return Needs(**merged)


@dataclass
class StepContext:
    """What a provider sees for one micro-batch of B pairs (rows: B chosen, then B rejected; T = L − 1 label
    positions, aligned so that position t predicts token t + 1)."""

    batch: Mapping[str, Any]                          # the collated batch, on the device
    labels: Tensor                                    # [2B, T] label ids, -100 off the completion
    chosen: TokenStats                                # [B, T] policy statistics of the chosen rows (with gradients)
    rejected: TokenStats
    hparams: Mapping[str, Any]                        # the objective's effective hyper-parameters
    step: int = 0                                     # the optimizer step being computed (1-based; 0 = evaluation)
    policy_layers: tuple[Tensor, ...] | None = None
    reference_layers: tuple[Tensor, ...] | None = None
    policy_sites: Mapping[Site, Tensor] | None = None
    reference_sites: Mapping[Site, Tensor] | None = None
    reference_activations: Mapping[str, list[Tensor]] | None = None

    @property
    def completion_mask(self) -> Tensor:
        """[2B, T] 1 on completion tokens."""
        import torch

        return torch.cat([self.chosen.mask, self.rejected.mask])

    def column(self, name: str) -> tuple[Tensor, Tensor]:
        """Dataset columns ``chosen_<name>``/``rejected_<name>`` as a (chosen, rejected) pair. A column with one value
        per input token ([B, L], like ``chosen_input_ids``) is shifted to the label positions ([:, 1:], [B, T]): the
        value of token t + 1 lands where that token is predicted."""
        pair = []
        for side in PAIR_SIDES:
            key = f"{side}_{name}"
            if key not in self.batch:
                raise KeyError(key)
            value = self.batch[key]
            if value.shape == self.batch[f"{side}_input_ids"].shape:
                value = value[:, 1:]
            pair.append(value)
        return pair[0], pair[1]


class Provider(nn.Module):
    """Base class of providers: override ``provides``, :meth:`needs` and :meth:`forward`; :meth:`setup` when the
    provider builds modules sized from the policy; :meth:`settings` for what is saved with the run."""

    provides: tuple[str, ...] = ()

    def needs(self) -> Needs:
        return Needs()

    def setup(self, policy: nn.Module, hparams: Mapping[str, Any]) -> None:
        """Called once by the trainer, before the optimizer exists: build trainable modules sized from the policy
        and check the provider's settings against the objective's hyper-parameters."""

    def forward(self, ctx: StepContext) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """JSON-able settings, written to the run's ``config.json`` (and with trainable state, to its saved folder)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings().items())


class Columns(Provider):
    """Extra inputs stored in the dataset, as columns ``chosen_<name>``/``rejected_<name>`` of the tokenised pairs
    (e.g. TIS-DPO ``weights`` per completion token). Per-token columns hold one value per input token ([B, L], padded
    by :class:`tokenpo.data.collator.PreferenceCollator` with ``token_keys``) or per label ([B, T])."""

    def __init__(self, *names: str):
        super().__init__()
        if not names:
            raise ValueError("Columns needs at least one input name")
        self.names = tuple(names)
        self.provides = self.names

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        out = {}
        for name in self.names:
            try:
                out[name] = ctx.column(name)
            except KeyError as missing:
                raise ValueError(f"batch has no column {missing}: add chosen_{name}/rejected_{name} to the "
                                 "tokenised pairs (and pass their names to PreferenceCollator(token_keys=...))"
                                 ) from None
        return out

    def settings(self) -> dict[str, Any]:
        return {"names": list(self.names)}
