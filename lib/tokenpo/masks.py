"""Token weights for the sparse objectives: MaPO activation masks, the learnable SparsePO mask network, SePO
top/bottom-k token selection, and random masks for ablations.

Alignment (shared convention): a batch side has `input_ids [B, L]`; every mask here has length T = L-1 and is
index-aligned with `labels = input_ids[:, 1:]` — mask[:, t] weights the label token y_{t+1}, whose prediction is made
at position t. A `labels_mask [B, T]` is `completion_mask[:, 1:]` (1 on completion tokens incl. EOS). Every mask is 0
off the completion (prompt and padding).

Sources: SparsePO `src/masks/mask_models.py::SimpleMaskAllLayers`, `src/trainers/mapo_trainer.py` (papers.md §1.3-1.4);
SePO `token_score.py` (papers.md §2.1). The hook points MaPO reads are documented in `tokenpo.activation_hooks`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from tokenpo.activation_hooks import HOOK_TYPES, token_statistics, unwrap_model

MAPPINGS = ("zn_rescale", "sigmoid", "layernorm", "none")
ACTIVATIONS = ("relu", "resc", "none")


# ----------------------------------------------------------------------------------------------------- MaPO
def zn_rescale(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MaPO `zn_rescale` of per-token statistics r [B, T] over each row's completion tokens (mask [B, T]).

        z_t = (r_t − mean_resp r) / (std_resp r + 1e-12)        # unbiased std (torch.std)
        m_t = (z_t − min_resp z) / (max_resp z − min_resp z) · mask_t

    (Mathematically this is a min-max rescale of r; the z step is kept to follow the official code, which also
    casts std/min/max to fp16 — here everything stays float32.) Rows with fewer than 2 completion tokens or a
    constant statistic — where the official code divides by zero — get weight 1 on every completion token (no
    ranking information, so fall back to TDPO-1's uniform weight). Rows without completion tokens get 0.
    """
    mask = mask.bool()
    r = values.float()
    n = mask.sum(-1, keepdim=True)
    mean = (r * mask).sum(-1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * mask) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
    z = (r - mean) / (var.sqrt() + 1e-12)
    z_min = z.masked_fill(~mask, float("inf")).amin(-1, keepdim=True)
    z_max = z.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)
    span = z_max - z_min
    ok = (n >= 2) & torch.isfinite(span) & (span > 0)
    scaled = torch.where(ok, (z - z_min) / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(z))
    return scaled * mask


def _masked_layernorm(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z-normalise per row over completion tokens (biased std, eps 1e-5, like F.layer_norm), no rescale."""
    mask = mask.bool()
    n = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (values * mask).sum(-1, keepdim=True) / n
    var = (((values - mean) * mask) ** 2).sum(-1, keepdim=True) / n
    return (values - mean) / torch.sqrt(var + 1e-5) * mask


def _parse_hook(hook) -> tuple[str, ...]:
    if isinstance(hook, str):
        if hook == "all":
            return HOOK_TYPES
        if hook == "uniform":
            return ("uniform",)
        hook = [h.strip() for h in hook.split(",") if h.strip()]
    types = tuple(hook)
    bad = [t for t in types if t not in HOOK_TYPES]
    if not types or bad:
        raise ValueError(f"hook={hook!r}: use 'all', 'uniform', or one or more of {HOOK_TYPES}")
    return types


def mapo_masks(ref_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels_mask: torch.Tensor, hook="all", mapping: str = "zn_rescale",
               return_by_type: bool = False):
    """MaPO token masks [B, T] from the reference model's activations (papers.md §1.4), detached.

    input_ids, attention_mask: [B, L]; labels_mask: [B, L-1] (= completion_mask[:, 1:]).
    hook: "all" (= mean over the types resid, attn, mlp, logits), "uniform" (m ≡ 1 on the completion = TDPO-1),
          one type, or a tuple / comma list of types. Each type = mean over its hooked tensors and layers.
    mapping (applied to every hooked tensor a, sliced [:, :-1]):
        zn_rescale  per-token mean over the hidden dim, then `zn_rescale` (values in [0, 1])   [official default]
        sigmoid     per-token mean of sigmoid(a)                                                 (values in (0, 1))
        layernorm   per-token mean, z-normalised over the completion (unbounded). The official code calls
                    F.layer_norm(a, normalized_shape=None), which raises, so this is our reading of it.
        none        per-token mean (unbounded). Official: mean over the concatenation of a type's tensors, i.e.
                    weighted by width; here every tensor counts equally.
    Returns m [B, T] (float32, requires_grad False, 0 off the completion); with `return_by_type` also a dict
    type -> [B, T]. The model runs in eval mode, under no_grad; its training flag is restored and all hooks are
    removed afterwards, even on error.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    expected = (input_ids.shape[0], input_ids.shape[1] - 1)
    if tuple(labels_mask.shape) != expected:
        raise ValueError(f"labels_mask must be [B, L-1] = {expected} (pass completion_mask[:, 1:]); "
                         f"got {tuple(labels_mask.shape)}")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping={mapping!r}: choose from {MAPPINGS}")
    types = _parse_hook(hook)
    loss_mask = labels_mask.bool()
    if types == ("uniform",):
        ones = loss_mask.float()
        return (ones, {"uniform": ones}) if return_by_type else ones

    def reduce(a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(a).mean(-1) if mapping == "sigmoid" else a.mean(-1)

    def mapped(stat: torch.Tensor) -> torch.Tensor:
        stat = stat[:, :-1]
        if mapping == "zn_rescale":
            return zn_rescale(stat, loss_mask)
        if mapping == "layernorm":
            return _masked_layernorm(stat, loss_mask)
        return stat

    model = unwrap_model(ref_model)
    was_training = model.training
    model.eval()
    try:
        stats = token_statistics(model, input_ids, attention_mask, types, reduce)
    finally:
        model.train(was_training)
    by_type = {}
    for kind in types:
        if not stats[kind]:
            raise ValueError(f"hook type {kind!r} recorded no activations for {type(model).__name__}")
        by_type[kind] = (torch.stack([mapped(s) for s in stats[kind]]).mean(0) * loss_mask).detach()
    masks = torch.stack(list(by_type.values())).mean(0).detach()
    return (masks, by_type) if return_by_type else masks


def mapo_batch_masks(ref_model: nn.Module, batch: Mapping[str, torch.Tensor], hook="all",
                     mapping: str = "zn_rescale") -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) MaPO masks [B, T] for a collator batch, in one reference forward (sides concatenated;
    every statistic is per sequence, so concatenating changes nothing)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attn = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    comp = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
    masks = mapo_masks(ref_model, ids, attn, comp[:, 1:], hook=hook, mapping=mapping)
    return masks[: len(masks) // 2], masks[len(masks) // 2:]


# ------------------------------------------------------------------------------------------- SparsePO masks
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


def aligned_reference_layers(layers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Reference per-layer hidden states [B, L, d] (embedding output excluded, HF `hidden_states[1:]`) ->
    [B, L-1, d], detached: the state at position t predicts label y_{t+1}, so it gives mask[:, t]."""
    return [h[:, :-1].detach() for h in layers]


class SparsePOMask(nn.Module):
    """SparsePO learnable mask (`SimpleMaskAllLayers`, papers.md §1.3) on the reference hidden states.

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
        """ref_layers: L tensors [B, T, d], already aligned with the labels (`aligned_reference_layers`; detached
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


class SparsePOMasks(nn.Module):
    """Reward and KL masks of SparsePO: mode "common" (one network, `common_mask`; both masks are the same tensor)
    or "independent" (`rw_mask` for the reward term, `kl_mask` for the KL term). Parameter names contain "_mask"
    so a trainer can give them their own weight decay (official `mask_weight_decay`)."""

    def __init__(self, n_layers: int, hidden_size: int, mode: str = "common", **mask_kwargs):
        super().__init__()
        if mode not in ("common", "independent"):
            raise ValueError(f"mode={mode!r}: choose 'common' or 'independent'")
        self.mode = mode
        if mode == "common":
            self.common_mask = SparsePOMask(n_layers, hidden_size, **mask_kwargs)
        else:
            self.rw_mask = SparsePOMask(n_layers, hidden_size, **mask_kwargs)
            self.kl_mask = SparsePOMask(n_layers, hidden_size, **mask_kwargs)

    @classmethod
    def from_model_config(cls, config, mode: str = "common", **mask_kwargs) -> "SparsePOMasks":
        mask_kwargs.setdefault("layer_norm_eps", _config_norm_eps(config))
        return cls(config.num_hidden_layers, config.hidden_size, mode=mode, **mask_kwargs)

    def reward(self, ref_layers, mask=None) -> torch.Tensor:
        return (self.common_mask if self.mode == "common" else self.rw_mask)(ref_layers, mask)

    def kl(self, ref_layers, mask=None) -> torch.Tensor:
        return (self.common_mask if self.mode == "common" else self.kl_mask)(ref_layers, mask)

    def forward(self, ref_layers, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward mask, kl mask), each [B, T]; in common mode the same tensor object (computed once)."""
        reward = self.reward(ref_layers, mask)
        return (reward, reward) if self.mode == "common" else (reward, self.kl(ref_layers, mask))


def mask_summary(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean `sparsity` (share of completion tokens with weight exactly 0) and `mean` weight on the completion."""
    m = mask.bool()
    n = m.sum(-1).clamp(min=1)
    sparsity = ((weights == 0) & m).sum(-1) / n
    mean = (weights * m).sum(-1) / n
    return {"sparsity": sparsity.float().mean().detach(), "mean": mean.float().mean().detach()}


# ------------------------------------------------------------------------------------------------ SePO
def selection_counts(mask: torch.Tensor, ratio: float, min_count: int = 1) -> torch.Tensor:
    """Tokens selected per row: int(ratio · N) as in the official `get_topK`, raised to `min_count` (capped at N).

    The official code selects nothing when int(ratio · N) = 0, and its masked-mean loss then divides by zero;
    `min_count=1` keeps at least one token per non-empty response (pass 0 for the official behaviour).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1]; got {ratio}")
    n = mask.bool().sum(-1)
    counts = torch.floor(n.double() * float(ratio)).long()
    return torch.minimum(counts.clamp(min=min_count), n)


def sepo_selection(scores: torch.Tensor, mask: torch.Tensor, ratio: float, highest: bool,
                   min_count: int = 1) -> torch.Tensor:
    """SePO token selection (papers.md §2.1): 0/1 [B, T] marking, per row, the `selection_counts` completion
    tokens with the highest (chosen side, `highest=True`) or lowest (rejected side) oracle score.

    scores [B, T] = log π_ora(y_t) − log π_ref(y_t) (see `oracle_scores`); mask [B, T] labels mask.
    Ties go to the earlier position (as the official argmax/argmin loop). Prompt and padding are never selected.
    """
    if scores.shape != mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and mask {tuple(mask.shape)} must have the same shape")
    m = mask.bool()
    bad = torch.isnan(scores) & m
    if bad.any():
        row = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"sepo_selection: NaN score on a completion token in row {row}")
    counts = selection_counts(m, ratio, min_count)
    order = torch.sort(scores.float(), dim=-1, descending=highest, stable=True).indices
    order = order.gather(-1, torch.sort((~m).gather(-1, order).to(torch.int8), dim=-1, stable=True).indices)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    chosen = (ranks < counts[:, None]).float()
    return torch.zeros_like(chosen).scatter(-1, order, chosen)


def completion_label_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels_mask: torch.Tensor) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each label token [B, L-1] (plain logits -> log_softmax -> gather), 0 off the
    completion; no_grad, float32."""
    vocab_out = unwrap_model(model).get_output_embeddings().weight.shape[0]
    labels = input_ids[:, 1:]
    if labels.max() >= vocab_out:
        raise ValueError(f"token id {int(labels.max())} is outside the vocabulary ({vocab_out}) of "
                         f"{type(unwrap_model(model)).__name__}")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logps * labels_mask.to(logps.dtype)


def oracle_scores(oracle: nn.Module, reference: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  completion_mask: torch.Tensor) -> torch.Tensor:
    """SePO token scores s_t = log π_ora(y_t) − log π_ref(y_t) [B, L-1] for one side of a batch (no β), 0 off the
    completion. Both models must share the tokenizer. Unlike the official `token_score.py` (which slices the scores
    from len(prompt) and so drops the first response token) every completion token is scored."""
    labels_mask = completion_mask[:, 1:].bool()
    result = []
    for model in (oracle, reference):
        was_training = model.training
        model.eval()
        try:
            result.append(completion_label_logps(model, input_ids, attention_mask, labels_mask))
        finally:
            model.train(was_training)
    return (result[0] - result[1]) * labels_mask


# ---------------------------------------------------------------------------------------------- ablations
def _uniform(mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) of mask's shape drawn on the generator's device (so a CPU generator works for CUDA masks and gives
    the same numbers on every device), moved to mask's device."""
    device = generator.device if generator is not None else mask.device
    return torch.rand(mask.shape, generator=generator, device=device).to(mask.device)


def random_mask(mask: torch.Tensor, generator: torch.Generator | None = None, kind: str = "uniform",
                p: float = 0.5) -> torch.Tensor:
    """Random token weights [B, T], 0 off `mask`: "uniform" U(0, 1) (official `RandomMask` ablation) or
    "bernoulli" (1 with probability p)."""
    u = _uniform(mask, generator)
    if kind == "uniform":
        return u * mask.bool()
    if kind == "bernoulli":
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1]; got {p}")
        return (u < p).float() * mask.bool()
    raise ValueError(f"kind={kind!r}: choose 'uniform' or 'bernoulli'")


def random_selection(mask: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                     min_count: int = 1) -> torch.Tensor:
    """SePO-rand: 0/1 [B, T] with exactly `selection_counts(mask, ratio)` uniformly random completion tokens per row."""
    u = _uniform(mask, generator)
    return sepo_selection(u, mask, ratio, highest=True, min_count=min_count)
