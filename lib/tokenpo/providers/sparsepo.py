"""SparsePO's learnable masks (docs/equations.md#sparsepo): small ReLU networks on the reference model's per-layer
hidden states that weight each token's reward term and KL term, trained with the policy.

Official source: SparsePO `src/masks/mask_models.py::SimpleMaskAllLayers`. :class:`SparsePOMasks` is the provider:
it builds its networks from the policy's config when the trainer sets it up, and is saved with
``save_pretrained`` / loaded with ``from_pretrained`` like a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .base import Needs, Provider, StepContext, split_pairs

ACTIVATIONS = ("relu", "resc", "none")
CONFIG_FILE, WEIGHTS_FILE = "sparsepo_masks.json", "sparsepo_masks.safetensors"

__all__ = ["SparsePOMask", "SparsePOMasks", "masked_minmax"]


def masked_minmax(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-row min-max rescale to [0, 1] over `mask` (official `apply_masked_rescaling`, 'resc').

    x [B, T]; min/max are treated as constants in backward (the official code rebuilds them with torch.Tensor(...),
    which detaches them). Constant rows get 1 (the official code divides by zero).
    """
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    lo = x.detach().masked_fill(~m, float("inf")).amin(-1, keepdim=True)
    hi = x.detach().masked_fill(~m, float("-inf")).amax(-1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(x))
    return out * m


def _activate(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "resc":
        return masked_minmax(x, mask)
    return x


def _config_norm_eps(config) -> float:
    return next((getattr(config, k) for k in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps")
                 if getattr(config, k, None) is not None), 1e-5)


class SparsePOMask(nn.Module):
    """SparsePO learnable mask (`SimpleMaskAllLayers`, docs/equations.md#sparsepo) on the reference hidden states.

        h_ℓ = LayerNorm_shared(ref_h_ℓ)                    ref_h_ℓ [B, T, d], ℓ = 1..L (one LayerNorm for all layers)
        s_ℓ = Dropout(act_layer(W_ℓ h_ℓ + b_ℓ))            W_ℓ: Linear(d, 1) per layer
        m   = Dropout(act_mixer(w_mix · [s_1 … s_L]))       w_mix: Linear(L, 1, bias=False)      -> m [B, T]

    Activations: "relu" (official default, gives exact zeros), "resc" (masked min-max to [0, 1]; needs `mask`),
    "none". No clamp: m is unbounded above. `dropout` defaults to 0.0 here; the official default `mask_dropout`
    is 0.01, but TRL's `disable_dropout=True` (default) zeroes every nn.Dropout in the wrapped model, masks included.
    `mixer_init`: None = PyTorch's default Linear init (official); a float c fills the mixer with c, e.g. a positive
    start so that the untrained mask is not near zero.
    """

    def __init__(self, n_layers: int, hidden_size: int, dropout: float = 0.0, mixer_init: float | None = None,
                 layer_activation: str = "relu", mixer_activation: str = "relu", layer_norm_eps: float = 1e-5):
        super().__init__()
        for name, value in (("layer_activation", layer_activation), ("mixer_activation", mixer_activation)):
            if value not in ACTIVATIONS:
                raise ValueError(f"{name}={value!r}: choose from {ACTIVATIONS}")
        if n_layers < 1 or hidden_size < 1:
            raise ValueError(f"n_layers and hidden_size must be positive; got {n_layers}, {hidden_size}")
        self.n_layers, self.hidden_size = n_layers, hidden_size
        self.layer_activation, self.mixer_activation = layer_activation, mixer_activation
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layer_scorers = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(n_layers))
        self.mixer = nn.Linear(n_layers, 1, bias=False)
        self.layer_dropout = nn.Dropout(dropout)
        self.mixer_dropout = nn.Dropout(dropout)
        if mixer_init is not None:
            nn.init.constant_(self.mixer.weight, float(mixer_init))

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "SparsePOMask":
        """Sizes (and the LayerNorm eps, as the official code) from a 🤗 config."""
        kwargs.setdefault("layer_norm_eps", _config_norm_eps(config))
        return cls(config.num_hidden_layers, config.hidden_size, **kwargs)

    def forward(self, ref_layers: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """ref_layers: L tensors [B, T, d], already aligned with the labels (`tokenpo.tokens.align_to_labels`; detached
        here in any case); mask [B, T] (labels mask) -> m [B, T], multiplied by `mask` when given."""
        if len(ref_layers) != self.n_layers:
            raise ValueError(f"SparsePOMask expects {self.n_layers} layer states, got {len(ref_layers)} "
                             "(pass the per-layer outputs without the embedding output)")
        scores = []
        for scorer, h in zip(self.layer_scorers, ref_layers):
            # detach: the mask network must never send gradient into the (frozen) reference model
            s = scorer(self.layer_norm(h.detach().to(self.layer_norm.weight.dtype))).squeeze(-1)
            scores.append(self.layer_dropout(_activate(self.layer_activation, s, mask)))
        m = self.mixer(torch.stack(scores, dim=-1)).squeeze(-1)
        m = self.mixer_dropout(_activate(self.mixer_activation, m, mask))
        return m if mask is None else m * mask.to(m.dtype)


class SparsePOMasks(Provider):
    """The SparsePO provider: reward and KL masks, ``reward_masks`` and (independent mode) ``kl_masks``, each a
    (chosen, rejected) pair [B, T], from the reference's per-layer hidden states.

    mode "common": one network (`common_mask`), the same tensor weights both terms; "independent": `rw_mask` for the
    reward, `kl_mask` for the KL. ``mode=None`` follows the objective's ``common`` hyper-parameter when the trainer
    sets the provider up (a single network also when only one term is masked: a second one would get no gradient).
    Sizes come from the policy's config then, unless given here. ``mask_kwargs`` go to :class:`SparsePOMask`
    (dropout, mixer_init, activations).
    """

    provides = ("reward_masks", "kl_masks")

    def __init__(self, mode: str | None = None, n_layers: int | None = None, hidden_size: int | None = None,
                 **mask_kwargs):
        super().__init__()
        if mode not in (None, "common", "independent"):
            raise ValueError(f"mode={mode!r}: choose 'common', 'independent' or None (from the objective)")
        self.mode, self.mask_kwargs = mode, dict(mask_kwargs)
        self.n_layers = self.hidden_size = None
        if n_layers is not None and hidden_size is not None:
            self._build(n_layers, hidden_size, mode or "common")

    def _build(self, n_layers: int, hidden_size: int, mode: str) -> None:
        self.mode, self.n_layers, self.hidden_size = mode, n_layers, hidden_size
        if mode == "common":
            self.common_mask = SparsePOMask(n_layers, hidden_size, **self.mask_kwargs)
        else:
            self.rw_mask = SparsePOMask(n_layers, hidden_size, **self.mask_kwargs)
            self.kl_mask = SparsePOMask(n_layers, hidden_size, **self.mask_kwargs)

    @property
    def built(self) -> bool:
        return self.n_layers is not None

    @classmethod
    def from_model_config(cls, config, mode: str = "common", **mask_kwargs) -> "SparsePOMasks":
        """Networks sized (and the LayerNorm eps set, as the official code) from a 🤗 config."""
        mask_kwargs.setdefault("layer_norm_eps", _config_norm_eps(config))
        return cls(mode, config.num_hidden_layers, config.hidden_size, **mask_kwargs)

    def setup(self, policy: nn.Module, hparams: Mapping[str, Any]) -> None:
        both_masked = hparams.get("mask_on_reward", True) and hparams.get("mask_on_kl", True)
        wanted = "common" if hparams.get("common", True) or not both_masked else "independent"
        # one network for only the KL term of independent masks: its output is the KL mask
        self.single_key = "kl_masks" if not (hparams.get("common", True) or hparams.get("mask_on_reward", True)) \
            else "reward_masks"
        if self.mode is not None and self.mode != wanted:
            raise ValueError(f"SparsePOMasks(mode={self.mode!r}) but the objective's hyper-parameters ask for "
                             f"{wanted!r} masks (common={hparams.get('common', True)}, mask_on_reward="
                             f"{hparams.get('mask_on_reward', True)}, mask_on_kl={hparams.get('mask_on_kl', True)})")
        if not self.built:
            config = policy.config
            self.mask_kwargs.setdefault("layer_norm_eps", _config_norm_eps(config))
            self._build(config.num_hidden_layers, config.hidden_size, wanted)

    def needs(self) -> Needs:
        return Needs(reference=True, reference_layers=True)

    def reward(self, ref_layers, mask=None) -> torch.Tensor:
        return (self.common_mask if self.mode == "common" else self.rw_mask)(ref_layers, mask)

    def kl(self, ref_layers, mask=None) -> torch.Tensor:
        return (self.common_mask if self.mode == "common" else self.kl_mask)(ref_layers, mask)

    def weights(self, ref_layers, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward mask, kl mask), each [N, T]; in common mode the same tensor object (computed once)."""
        if not self.built:
            raise ValueError("SparsePOMasks has no networks yet: give n_layers/hidden_size, use from_model_config, "
                             "or let the trainer set it up")
        reward = self.reward(ref_layers, mask)
        return (reward, reward) if self.mode == "common" else (reward, self.kl(ref_layers, mask))

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        if ctx.reference_layers is None:
            raise ValueError("SparsePO masks need the reference model's per-layer hidden states")
        reward, kl = self.weights(ctx.reference_layers, ctx.completion_mask)
        # one network: no kl_masks, so the loss sees one tensor (output casting under mixed precision would
        # otherwise turn it into two, and the loss checks that a common mask is one)
        if kl is reward:
            return {getattr(self, "single_key", "reward_masks"): split_pairs(reward)}
        return {"reward_masks": split_pairs(reward), "kl_masks": split_pairs(kl)}

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "n_layers": self.n_layers, "hidden_size": self.hidden_size,
                "mask_kwargs": self.mask_kwargs}

    def save_pretrained(self, directory: str | Path) -> Path:
        """``sparsepo_masks.json`` (mode, sizes, network settings) + ``sparsepo_masks.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.settings(), indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SparsePOMasks":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists():
            raise ValueError(f"{directory} holds no SparsePO masks ({CONFIG_FILE} missing)")
        settings = json.loads((directory / CONFIG_FILE).read_text())
        masks = cls(settings["mode"], settings["n_layers"], settings["hidden_size"], **settings["mask_kwargs"])
        masks.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return masks.eval()
