"""Sparse autoencoders on a model's residual stream: the JumpReLU / TopK model, its training, and activation collection.

SAE (Gemma Scope layout, so `google/gemma-scope-*` `params.npz` files load unchanged):
    pre = (s·x) @ W_enc + b_enc          x [..., d], W_enc [d, F], s = input scale (E‖s·x‖² = d on the training set)
    f   = JumpReLU_θ(pre) = pre · H(pre − θ)       or   TopK: keep the k largest ReLU(pre), zero the rest
    x̂   = (f @ W_dec + b_dec) / s                  W_dec [F, d], each feature's decoder row W_dec[i] has unit norm
JumpReLU training (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope): loss = ‖s·x − s·x̂‖² + λ·‖f‖₀; the
threshold θ (a parameter, kept ≥ 0) learns through straight-through pseudo-derivatives with a rectangle kernel of bandwidth ε:
    ∂JumpReLU/∂θ := −(θ/ε)·K((pre−θ)/ε),   ∂H(pre−θ)/∂θ := −(1/ε)·K((pre−θ)/ε),   K(u) = 1[|u| < ½]
(pre gets the ordinary gradient through JumpReLU and none through the L0 step).

FPO (docs/equations.md#fpo) pools these features over the completion; its provider, pooling and offline reference
cache live in :mod:`tokenpo.providers.fpo`.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from tokenpo.cache import atomic_write_bytes, atomic_write_text, weights_fingerprint

from tokenpo.utils import unwrap_model

from .activations import SITES, capture_sites


@dataclass
class SAEConfig:
    d_in: int
    width: int
    kind: str = "jumprelu"              # "jumprelu" | "topk"
    k: int | None = None                # TopK: active features per token
    bandwidth: float = 0.001            # JumpReLU: ε of the pseudo-derivative kernel
    input_scale: float = 1.0            # s: multiplies inputs before encoding (divides reconstructions)
    layer: int | None = None            # where the activations came from (see `capture_sites`)
    site: str = "block_out"
    source_model: str | None = None     # free text, provenance only

    def __post_init__(self):
        if self.kind not in ("jumprelu", "topk"):
            raise ValueError(f"SAE kind={self.kind!r}: choose 'jumprelu' or 'topk'")
        if self.kind == "topk" and not (self.k and 0 < self.k <= self.width):
            raise ValueError(f"TopK SAE needs 0 < k <= width; got k={self.k}, width={self.width}")
        if self.site not in SITES:
            raise ValueError(f"site={self.site!r}: choose from {SITES}")


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = -(threshold / eps) * window * grad
        return grad * (pre > threshold), grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = -(1.0 / eps) * window * grad
        return torch.zeros_like(pre), grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class SparseAutoencoder(nn.Module):
    """JumpReLU or TopK sparse autoencoder; `encode`, `decode`, `forward` -> (x̂, f); save/load like a model."""

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        d, width = config.d_in, config.width
        decoder = torch.randn(width, d)
        decoder = decoder / decoder.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder.t().clone())          # tied init (Gemma Scope)
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if config.kind == "jumprelu":
            self.threshold = nn.Parameter(torch.full((width,), 0.001))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.W_enc.dtype) * self.config.input_scale) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold, self.config.bandwidth)
        values, index = torch.relu(pre).topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> features f [..., F] (non-negative, sparse)."""
        return self.activate(self.pre_activations(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return (features @ self.W_dec + self.b_dec) / self.config.input_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(x)
        return self.decode(features), features

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))

    # ---------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (+ `training_curve.json` when trained here), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / "model.safetensors", save(tensors))
        atomic_write_text(directory / "config.json", json.dumps(asdict(self.config), indent=2))
        if getattr(self, "training_curve", None):
            atomic_write_text(directory / "training_curve.json", json.dumps(self.training_curve))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise ValueError(f"{directory} holds no SAE (config.json missing)")
        sae = cls(SAEConfig(**json.loads((directory / "config.json").read_text())))
        sae.load_state_dict(load_file(directory / "model.safetensors", device=str(device)))
        curve = directory / "training_curve.json"
        if curve.exists():
            sae.training_curve = json.loads(curve.read_text())
        return sae.to(device)

    @classmethod
    def from_npz(cls, path: str | Path, **config) -> "SparseAutoencoder":
        """A Gemma Scope `params.npz` (W_enc [d, F], W_dec [F, d], b_enc, b_dec, threshold) as a JumpReLU SAE."""
        import numpy as np
        params = np.load(path)
        width, d = params["W_dec"].shape
        sae = cls(SAEConfig(d_in=d, width=width, kind="jumprelu", **config))
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, name).copy_(torch.from_numpy(params[name]))
            sae.threshold.copy_(torch.from_numpy(params["threshold"]))
        return sae

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the config and every weight: ties an FPO cache to the SAE it was built with."""
        return weights_fingerprint(self.state_dict(), extra=asdict(self.config))


# --------------------------------------------------------------------------------------- activations
def residual_stream(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1,
                    site: str = "block_out") -> torch.Tensor:
    """[B, L, d] residual stream at (layer, site) (see :func:`tokenpo.providers.activations.capture_sites`), running
    the transformer body only (no LM head)."""
    with capture_sites(model, [(layer, site)]) as captured:
        unwrap_model(model).base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return captured[(layer, site)]


def collect_activations(model: nn.Module, data: Iterable, layer: int, tokenizer=None, site: str = "block_out",
                        batch_size: int = 16, max_length: int = 256, max_tokens: int | None = None,
                        completion_only: bool = False, progress: bool = True) -> torch.Tensor:
    """Residual-stream vectors [N, d] (float32, CPU) of every non-padding token of `data` at (layer, site).

    data: strings (tokenised with `tokenizer`, right padding) or batches (dicts with `input_ids`,
    `attention_mask`, optionally `completion_mask`; collator batches with `chosen_*`/`rejected_*` keys are split
    into their two sides). With `completion_only`, only completion tokens are kept. Stops after `max_tokens`.
    """
    model_ = unwrap_model(model)
    device = next(model_.parameters()).device
    was_training = model_.training
    model_.eval()
    out, total = [], 0

    def batches():
        items = list(data) if not isinstance(data, (list, tuple)) else data
        if items and isinstance(items[0], str):
            if tokenizer is None:
                raise ValueError("collect_activations: pass a tokenizer to encode text data")
            for i in range(0, len(items), batch_size):
                enc = tokenizer(list(items[i:i + batch_size]), return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length)
                yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            return
        for batch in items:
            if "chosen_input_ids" in batch:
                for side in ("chosen", "rejected"):
                    yield {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")}
            else:
                yield batch

    try:
        with torch.no_grad():
            for batch in tqdm(batches(), desc=f"activations L{layer}", disable=not progress, leave=False):
                ids = batch["input_ids"].to(device)
                attn = batch["attention_mask"].to(device)
                if completion_only and "completion_mask" not in batch:
                    raise ValueError("completion_only=True needs batches with a completion_mask")
                keep = batch["completion_mask"].to(device) if completion_only else attn
                hidden = residual_stream(model_, ids, attn, layer, site)
                vectors = hidden[keep.bool()].float().cpu()
                out.append(vectors)
                total += len(vectors)
                if max_tokens is not None and total >= max_tokens:
                    break
    finally:
        model_.train(was_training)
    if not out:
        raise ValueError("collect_activations: no tokens in data")
    acts = torch.cat(out)
    return acts[:max_tokens] if max_tokens is not None else acts


# ----------------------------------------------------------------------------------------------- training
@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class SAETrainCurve:
    step: list[int] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)                 # mean ‖s·x − s·x̂‖² per token
    l0: list[float] = field(default_factory=list)                  # mean active features per token
    explained_variance: list[float] = field(default_factory=list)  # 1 − Σ‖x−x̂‖² / Σ‖x−x̄‖² on the batch
    l0_coefficient: list[float] = field(default_factory=list)


def train_sae(activations: torch.Tensor, width: int, kind: str = "jumprelu", k: int | None = None,
              l0_target: float | None = None, l0_coefficient: float | None = None, steps: int = 2000,
              batch_size: int = 1024, lr: float = 1e-3, bandwidth: float = 0.05, sparsity_warmup: float = 0.1,
              threshold_init: float = 0.001, seed: int = 0, log_every: int = 10, progress: bool = True,
              device: str | torch.device = "cpu", num_threads: int | None = None, **config) -> SparseAutoencoder:
    """Train an SAE on activations [N, d]; returns it with `.training_curve` (dict of lists, see `SAETrainCurve`).

    TopK: give `k`. JumpReLU: L0 penalty λ·‖f‖₀, ramped in linearly over the first `sparsity_warmup` of the
    steps, λ = `l0_coefficient` (default 0.03·d: inputs are scaled to E‖s·x‖² = d, so the MSE scales with d);
    with `l0_target`, λ starts there and after the warm-up is adapted every step (multiplicatively, ≤2 % per step,
    kept in [1e-4·d, d]) towards the target average L0. Adam, decoder rows renormalised to unit norm after every step, b_dec initialised to the data
    mean, inputs scaled so that E‖s·x‖² = d (Gemma Scope). `bandwidth` ε defaults to 0.05 (Gemma Scope: 0.001
    with billions of tokens; a wider kernel gives θ enough gradient on the few thousand steps run here). θ is a
    plain parameter (not log θ): with Adam, log θ from 0.001 moves too slowly for short runs.
    `num_threads`: torch intra-op threads during training, restored afterwards (1 is ~10x faster for small SAEs
    on a busy CPU).
    """
    if activations.dim() != 2:
        raise ValueError(f"activations must be [N, d]; got {tuple(activations.shape)}")
    with _torch_threads(num_threads):
        generator = torch.Generator().manual_seed(seed)
        acts = activations.float()
        d = acts.shape[1]
        scale = float(math.sqrt(d / acts.square().sum(-1).mean().clamp(min=1e-12)))
        with torch.random.fork_rng(devices=[]):          # seeded init without touching the global RNG
            torch.manual_seed(seed)
            sae = SparseAutoencoder(SAEConfig(d_in=d, width=width, kind=kind, k=k, bandwidth=bandwidth,
                                              input_scale=scale, **config)).to(device)
        with torch.no_grad():
            sae.b_dec.copy_(acts.mean(0) * scale)
            if kind == "jumprelu":
                sae.threshold.fill_(threshold_init)
        optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
        curve = SAETrainCurve()
        coefficient = 0.03 * d if l0_coefficient is None else float(l0_coefficient)
        warmup = max(1, int(sparsity_warmup * steps))
        bar = tqdm(range(steps), desc=f"SAE {kind} F={width}", disable=not progress)
        for step in bar:
            index = torch.randint(0, len(acts), (min(batch_size, len(acts)),), generator=generator)
            x = acts[index].to(device) * scale
            pre = x @ sae.W_enc + sae.b_enc
            features = sae.activate(pre)
            recon = features @ sae.W_dec + sae.b_dec
            mse = (recon - x).square().sum(-1).mean()
            loss = mse
            if kind == "jumprelu":
                l0_soft = _Step.apply(pre, sae.threshold, sae.config.bandwidth).sum(-1).mean()
                ramp = min(1.0, (step + 1) / warmup)
                loss = loss + ramp * coefficient * l0_soft
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_decoder()
            with torch.no_grad():
                if kind == "jumprelu":
                    sae.threshold.clamp_(min=0.0)
                l0 = float((features > 0).float().sum(-1).mean())
                if kind == "jumprelu" and l0_target is not None and step >= warmup:
                    coefficient *= math.exp(0.02 * max(-1.0, min(1.0, l0 / l0_target - 1.0)))
                    coefficient = min(max(coefficient, 1e-4 * d), 1.0 * d)
                if step % log_every == 0 or step == steps - 1:
                    ev = 1.0 - float((recon - x).square().sum() / (x - x.mean(0)).square().sum().clamp(min=1e-12))
                    curve.step.append(step)
                    curve.mse.append(float(mse))
                    curve.l0.append(l0)
                    curve.explained_variance.append(ev)
                    curve.l0_coefficient.append(coefficient if kind == "jumprelu" else 0.0)
                    bar.set_postfix(mse=f"{float(mse):.3g}", l0=f"{l0:.1f}", ev=f"{ev:.3f}")
        sae.training_curve = asdict(curve)
        return sae.eval()


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sae_report(sae: SparseAutoencoder, activations: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """How an SAE does on activations [N, d] it was not trained on: mean active features per token (L0) and its share
    of the width, fraction of variance explained (1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²), and the share of dead features (never
    active on these tokens)."""
    sae = sae.eval()
    l0, squared, ever = 0.0, 0.0, torch.zeros(sae.config.width, dtype=torch.bool)
    for start in range(0, len(activations), batch_size):
        x = activations[start:start + batch_size].to(sae.W_enc.device)
        recon, feats = sae(x)
        active = feats > 0
        l0 += float(active.sum())
        squared += float((recon - x).square().sum())
        ever |= active.any(0).cpu()
    total = float((activations - activations.mean(0)).square().sum())
    n = len(activations)
    return {"l0": l0 / n, "l0_share": l0 / n / sae.config.width, "explained_variance": 1 - squared / max(total, 1e-12),
            "dead_share": float((~ever).float().mean()), "tokens": n, "width": sae.config.width}


@contextmanager
def spliced(model: nn.Module, sae: SparseAutoencoder, layer: int = -1, site: str = "block_out"):
    """Inside the block, the residual stream at (layer, site) is replaced by the SAE's reconstruction in every
    forward of `model` (to measure what the SAE loses for the language model)."""
    from .activations import _first, _site_module

    def replace(module, args, output):
        hidden = _first(output)
        recon = sae(hidden.to(sae.W_enc.dtype))[0].to(hidden.dtype)
        return (recon,) + tuple(output[1:]) if isinstance(output, tuple) else recon

    handle = _site_module(unwrap_model(model), layer, site).register_forward_hook(replace)
    try:
        yield model
    finally:
        handle.remove()


__all__ = ["SAEConfig", "SparseAutoencoder", "SAETrainCurve", "train_sae", "collect_activations", "residual_stream",
           "sae_report", "spliced"]
