"""Per-token statistics of one side (chosen or rejected) of a batch of preference pairs.

Every objective in :mod:`tokenpo.objectives` is a function of the same per-token quantities, computed here once per batch:

* ``mask``      [B, T]  1 on completion tokens (label != -100), 0 on prompt and padding;
* ``logps``     [B, T]  log π_θ(y_t | x, y_<t) of the label token;
* ``ref_logps`` [B, T]  log π_ref(y_t | x, y_<t);
* ``kl``        [B, T]  KL_t = Σ_v π_ref(v|·) [log π_ref(v|·) − log π_θ(v|·)] = D_KL(π_ref ‖ π_θ) over the full vocabulary
  (the +KL sign of the official TDPO code, docs/equations.md#notation).

Alignment: a forward over ``input_ids [B, L]`` predicts token t+1 at position t, so T = L − 1,
``labels = input_ids[:, 1:]`` (-100 off the completion) and ``logits[:, :-1]`` / ``hidden[:, :-1]``.

Two implementations give the same numbers:

* :func:`token_stats` works on full logits ``[B, T, V]`` — the obviously-right reference; it normalises only the
  completion rows (label != -100), so nothing at a prompt or padding position (even a NaN logit) reaches a statistic
  or a gradient;
* :func:`chunked_token_stats` works on hidden states and the output-embedding matrix and never holds more than
  ``chunk_size × V`` logits at once. Its custom autograd function saves only its inputs (plus two log-normalisers per
  row) and recomputes each chunk's logits in backward. Rows with label -100 are dropped before any logits are formed.

Everything is computed in float32 whatever the input dtype (float64 inputs stay in float64, for gradcheck).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenpo.utils import unwrap_model

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "TokenStats",
    "completion_labels",
    "label_mask",
    "align_to_labels",
    "completion_logps",
    "next_token_loss",
    "token_stats",
    "chunked_token_stats",
    "hidden_states",
    "output_head",
]


@dataclass
class TokenStats:
    """Per-token statistics of one side of a batch of pairs; all tensors [B, T] float32, zero where ``mask == 0``."""

    logps: Tensor
    mask: Tensor
    ref_logps: Tensor | None = None
    kl: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        """[B] number of completion tokens |y|."""
        return self.mask.sum(-1)

    @property
    def seq_logps(self) -> Tensor:
        """[B] log π_θ(y|x) = Σ_t log π_θ(y_t|·)."""
        return (self.logps * self.mask).sum(-1)

    @property
    def seq_ref_logps(self) -> Tensor:
        """[B] log π_ref(y|x)."""
        return (self._require("ref_logps") * self.mask).sum(-1)

    @property
    def logratios(self) -> Tensor:
        """[B, T] per-token log-ratio lr_t = log π_θ(y_t|·) − log π_ref(y_t|·), zero off the completion."""
        return (self.logps - self._require("ref_logps")) * self.mask

    @property
    def seq_kl(self) -> Tensor:
        """[B] sequential KL D_Seq(x, y) = Σ_t KL_t(π_ref ‖ π_θ) (TDPO)."""
        return (self._require("kl") * self.mask).sum(-1)

    def _require(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"TokenStats.{name} is None: compute the token statistics with a reference model"
                             + (" and with_kl=True" if name == "kl" else ""))
        return value

    def detach(self) -> "TokenStats":
        return TokenStats(*(None if t is None else t.detach() for t in (self.logps, self.mask, self.ref_logps, self.kl)))


def completion_labels(input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Labels [B, L-1] for the next-token predictions of ``input_ids [B, L]``: the token, or -100 off the completion.

    ``completion_mask [B, L]`` is 1 on completion tokens (as produced by the collator); position t of the result is
    the label of the prediction made at position t, i.e. token t+1.
    """
    if input_ids.shape != completion_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
                         "must have the same [B, L] shape")
    labels = input_ids[:, 1:].clone()
    labels[completion_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


def label_mask(completion_mask: Tensor) -> Tensor:
    """[B, L-1]: 1 where the label (the next token) is a completion token — ``completion_mask[:, 1:]``."""
    return completion_mask[:, 1:]


def align_to_labels(positions: Tensor) -> Tensor:
    """A per-position tensor of a forward over ``input_ids [B, L]`` (logits, hidden states, activations:
    [B, L, ...]) -> [B, L-1, ...] aligned with the labels: the state at position t predicts token t + 1.
    The one place this alignment is written down; trainer, providers and analyses all call it."""
    return positions[:, :-1]


@torch.no_grad()
def completion_logps(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                     completion_mask: Tensor) -> Tensor:
    """log π(y_t | x, y_<t) [B, L-1] of every completion label under ``model`` (0 elsewhere), float32, no
    gradient: :func:`token_stats` on the model's aligned logits."""
    labels = completion_labels(input_ids, completion_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return token_stats(align_to_labels(logits), labels, with_kl=False).logps


def next_token_loss(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    targets: Tensor | None = None) -> tuple[Tensor, int]:
    """(Σ of the next-token negative log-likelihood over the predicted tokens, their number): the causal-LM loss of
    pretraining and SFT. Each position predicts the next input token; with ``targets`` [B, L] (packed blocks: the
    inputs shifted by one) every position predicts its target instead. With an ``attention_mask``, padding positions
    are neither predicted nor counted."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if targets is None:
        logits, targets = align_to_labels(logits), input_ids[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(label_mask(attention_mask) == 0, IGNORE_INDEX)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def _check_labels(labels: Tensor, vocab_size: int, batch_shape: tuple[int, ...], what: str) -> None:
    if labels.dim() != 2 or tuple(labels.shape) != tuple(batch_shape):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] matching {what} {tuple(batch_shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    valid = labels[labels != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(f"labels must be -100 or in [0, {vocab_size}); got values in "
                         f"[{int(valid.min())}, {int(valid.max())}]")


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def token_stats(logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, with_kl: bool = True) -> TokenStats:
    """Plain per-token statistics from full logits.

    Args:
        logits: [B, T, V] policy logits already aligned with ``labels`` (i.e. ``model(...).logits[:, :-1]``).
        labels: [B, T] label token ids, -100 off the completion.
        ref_logits: [B, T, V] reference logits (no gradient flows into them), or None (reference-free).
        with_kl: also compute the full-vocabulary KL_t(π_ref ‖ π_θ) (needs ``ref_logits``).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    _check_labels(labels, logits.shape[-1], logits.shape[:2], "logits")
    mask = labels != IGNORE_INDEX
    dtype = _compute_dtype(logits)
    rows = mask.nonzero(as_tuple=True)             # completion positions only: what lies off them never matters
    target = labels[rows].unsqueeze(-1)
    logp_rows = logits[rows].to(dtype).log_softmax(-1)

    def scatter(values: Tensor) -> Tensor:
        return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put(rows, values)

    logps = scatter(logp_rows.gather(-1, target).squeeze(-1))
    ref_logps = kl = None
    if ref_logits is not None:
        if ref_logits.shape != logits.shape:
            raise ValueError(f"ref_logits {tuple(ref_logits.shape)} must match logits {tuple(logits.shape)}")
        ref_rows = ref_logits.detach()[rows].to(dtype).log_softmax(-1)
        ref_logps = scatter(ref_rows.gather(-1, target).squeeze(-1))
        if with_kl:
            kl = scatter((ref_rows.exp() * (ref_rows - logp_rows)).sum(-1))
    return TokenStats(logps=logps, mask=mask.to(dtype), ref_logps=ref_logps, kl=kl)


class _ChunkBuffers:
    """Reusable [V, rows] float buffers for one call: on CPU a fresh 200 MB tensor per chunk costs more in page
    faults than the elementwise work on it, so every chunk writes into the same storage."""

    def __init__(self, count: int, vocab: int, rows: int, dtype: torch.dtype, device: torch.device):
        self.storage = [torch.empty(vocab * rows, dtype=dtype, device=device) for _ in range(count)]
        self.vocab = vocab

    def get(self, index: int, rows: int) -> Tensor:
        return self.storage[index][: self.vocab * rows].view(self.vocab, rows)


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """out[V, c] = (hidden @ weight.T + bias).T in the compute dtype.

    The vocab-major layout makes the matmul ~1.4x faster on CPU than [c, V] (``W @ h.T`` is a plain NN/NT gemm
    into contiguous memory). The matmul runs in the inputs' dtype, like the model's own LM head; bf16 logits are
    then upcast.
    """
    if weight.dtype == out.dtype and hidden.dtype == out.dtype:
        if bias is None:
            return torch.mm(weight, hidden.t(), out=out)
        return torch.addmm(bias.to(out.dtype).unsqueeze(1), weight, hidden.t(), out=out)
    logits = weight @ hidden.t() if bias is None else torch.addmm(bias.unsqueeze(1), weight, hidden.t())
    return out.copy_(logits)


def _log_normaliser(logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """(logsumexp over the vocabulary [c], Σ_v exp(z − max) [c]); leaves exp(z − max) in ``scratch``."""
    top = logits.amax(0)
    torch.sub(logits, top, out=scratch).exp_()
    total = scratch.sum(0)
    return top + total.log(), total


class _ChunkedTokenStatsFunction(torch.autograd.Function):
    """(log π_θ(y), log π_ref(y), KL(π_ref‖π_θ)) per row of [M, H] hidden states, ``chunk_size`` rows at a time.

    Saves its inputs and one log-normaliser per row and side; backward recomputes each chunk's logits. With z the
    policy logits, p = softmax(z), q = softmax(z_ref): ∂ log p_y/∂z = onehot(y) − p and ∂ KL/∂z = p − q, so
    ∂L/∂z = g_lp·(onehot(y) − p) + g_kl·(p − q).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, chunk_size, with_kl):
        rows, vocab = hidden.shape[0], weight.shape[0]
        has_ref = ref_hidden is not None
        with_kl = with_kl and has_ref
        dtype = _compute_dtype(hidden)
        f32 = dict(dtype=dtype, device=hidden.device)
        logps, lse = torch.empty(rows, **f32), torch.empty(rows, **f32)
        ref_logps, ref_lse, kl = (torch.empty(rows if has_ref else 0, **f32) for _ in range(3))
        buffers = _ChunkBuffers(3 if has_ref else 2, vocab, min(chunk_size, max(rows, 1)), dtype, hidden.device)
        for start in range(0, rows, chunk_size):
            rows_c = slice(start, min(start + chunk_size, rows))
            count = rows_c.stop - start
            columns = torch.arange(count, device=hidden.device)
            target = labels[rows_c]
            z = _logits_into(buffers.get(0, count), hidden[rows_c], weight, bias)
            lse[rows_c], _ = _log_normaliser(z, buffers.get(1, count))
            logps[rows_c] = z[target, columns] - lse[rows_c]
            if not has_ref:
                continue
            z_ref = _logits_into(buffers.get(2, count), ref_hidden[rows_c], ref_weight, ref_bias)
            ref_lse[rows_c], total = _log_normaliser(z_ref, buffers.get(1, count))
            ref_logps[rows_c] = z_ref[target, columns] - ref_lse[rows_c]
            if with_kl:
                # KL = Σ_v q_v (log q_v − log p_v) = Σ_v q_v (z_ref − z)_v + lse − lse_ref, as Σ_v q_v = 1.
                q = buffers.get(1, count).div_(total)
                kl[rows_c] = z_ref.sub_(z).mul_(q).sum(0) + lse[rows_c] - ref_lse[rows_c]
        ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, ref_lse)
        ctx.chunk_size, ctx.with_kl = chunk_size, with_kl
        ctx.mark_non_differentiable(ref_logps)
        return logps, ref_logps, kl

    @staticmethod
    def backward(ctx, grad_logps, grad_ref_logps, grad_kl):
        hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, lse, ref_lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # Accumulate the weight gradient in the compute dtype across chunks even for bfloat16 weights.
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_bias else None
        if rows == 0 or not (need_hidden or need_weight or need_bias):
            return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None
        with_kl = ctx.with_kl and grad_kl is not None and bool(grad_kl.any())
        grad_logps = grad_logps.to(dtype)
        coef_p = (grad_kl.to(dtype) - grad_logps) if with_kl else -grad_logps
        buffers = _ChunkBuffers(2 if with_kl else 1, vocab, min(ctx.chunk_size, rows), dtype, hidden.device)
        for start in range(0, rows, ctx.chunk_size):
            rows_c = slice(start, min(start + ctx.chunk_size, rows))
            count = rows_c.stop - start
            hidden_c = hidden[rows_c]
            grad_z = _logits_into(buffers.get(0, count), hidden_c, weight, bias)
            grad_z.sub_(lse[rows_c]).exp_().mul_(coef_p[rows_c])                  # (g_kl − g_lp)·p
            if with_kl:
                q = _logits_into(buffers.get(1, count), ref_hidden[rows_c], ref_weight, ref_bias)
                grad_z.sub_(q.sub_(ref_lse[rows_c]).exp_().mul_(grad_kl[rows_c].to(dtype)))   # − g_kl·q
            grad_z[labels[rows_c], torch.arange(count, device=hidden.device)] += grad_logps[rows_c]  # + g_lp·onehot
            if need_hidden:
                if grad_hidden.dtype == dtype:
                    torch.mm(grad_z.t(), weight, out=grad_hidden[rows_c])
                else:
                    grad_hidden[rows_c] = grad_z.t().to(weight.dtype) @ weight
            if need_weight:
                grad_weight.addmm_(grad_z, hidden_c.to(dtype))
            if need_bias:
                grad_bias.add_(grad_z.sum(1))
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def chunked_token_stats(hidden: Tensor, weight: Tensor, labels: Tensor, ref_hidden: Tensor | None = None,
                        ref_weight: Tensor | None = None, *, bias: Tensor | None = None,
                        ref_bias: Tensor | None = None, chunk_size: int = 1024, with_kl: bool = True) -> TokenStats:
    """Same statistics as :func:`token_stats`, from hidden states, holding at most ``chunk_size × V`` logits at once.

    Args:
        hidden: [B, T, H] policy hidden states after the final norm, already aligned with ``labels``
            (``hidden_states(...)[0][:, :-1]``).
        weight: [V, H] policy output-embedding matrix; ``bias`` [V] or None (see :func:`output_head`).
        labels: [B, T] label ids, -100 off the completion; those rows are skipped entirely.
        ref_hidden, ref_weight, ref_bias: the reference model's counterparts (no gradient), or None.
        chunk_size: rows of the flattened B·T positions per chunk.
        with_kl: also compute KL_t(π_ref ‖ π_θ) over the full vocabulary (needs the reference).
    Gradients flow to ``hidden``, ``weight`` and ``bias`` only.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    _check_labels(labels, weight.shape[0], hidden.shape[:2], "hidden")
    if ref_hidden is not None:
        if ref_weight is None:
            raise ValueError("ref_hidden was given without ref_weight (pass the reference model's output head)")
        if ref_hidden.shape != hidden.shape or ref_weight.shape != weight.shape:
            raise ValueError(f"reference shapes hidden {tuple(ref_hidden.shape)} / weight {tuple(ref_weight.shape)} "
                             f"must match the policy's {tuple(hidden.shape)} / {tuple(weight.shape)}")
        if ref_bias is not None and tuple(ref_bias.shape) != (weight.shape[0],):
            raise ValueError(f"ref_bias must be [V], got {tuple(ref_bias.shape)}")
    batch, length, _ = hidden.shape
    mask = labels != IGNORE_INDEX
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat_hidden = hidden.reshape(batch * length, -1).index_select(0, rows)
    flat_labels = labels.reshape(-1).index_select(0, rows).long()
    flat_ref = None
    if ref_hidden is not None:
        flat_ref = ref_hidden.detach().reshape(batch * length, -1).index_select(0, rows)
        ref_weight = ref_weight.detach()
        ref_bias = None if ref_bias is None else ref_bias.detach()
    logps, ref_logps, kl = _ChunkedTokenStatsFunction.apply(
        flat_hidden, weight, bias, flat_labels, flat_ref, ref_weight, ref_bias, chunk_size, with_kl)

    def scatter(values: Tensor) -> Tensor:
        full = torch.zeros(batch * length, dtype=values.dtype, device=hidden.device)
        return full.index_copy(0, rows, values).reshape(batch, length)

    has_ref = ref_hidden is not None
    return TokenStats(logps=scatter(logps), mask=mask.to(logps.dtype),
                      ref_logps=scatter(ref_logps) if has_ref else None,
                      kl=scatter(kl) if has_ref and with_kl else None)


def _transformer_body(model: torch.nn.Module) -> torch.nn.Module:
    base = unwrap_model(model)
    prefix = getattr(base, "base_model_prefix", None)
    body = getattr(base, prefix, None) if prefix else None
    if body is None:
        raise ValueError(f"cannot find the transformer body of {type(base).__name__}: expected an attribute named by "
                         f"base_model_prefix={prefix!r} (e.g. GPT-2 'transformer', Llama/Qwen 'model', "
                         "GPT-NeoX 'gpt_neox')")
    return body


def hidden_states(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  all_layers: bool = False) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Run the transformer body of a causal LM without its LM head.

    Returns ``last`` [B, L, H] (after the final norm, the input of the LM head) and, if ``all_layers``, the per-layer
    outputs ``hidden_states[1:]`` of HF (embedding output excluded; for GPT-2 the last one is after ``ln_f``), else None.
    PEFT-wrapped models are unwrapped with ``get_base_model()`` (adapters stay active, or disabled inside
    ``disable_adapter()``).
    """
    body = _transformer_body(model)
    out = body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=all_layers,
               use_cache=False, return_dict=True)
    layers = tuple(out.hidden_states[1:]) if all_layers else None
    return out.last_hidden_state, layers


def output_head(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight [V, H] and bias [V] (or None), such that logits = hidden @ weight.T + bias."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"output embeddings of type {type(head).__name__} are not a plain nn.Linear (e.g. a LoRA-"
                         "wrapped lm_head): use the plain token_stats path on model(...).logits instead")
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise ValueError(f"model config sets {attribute}={getattr(config, attribute)!r}, so logits are not "
                             "hidden @ weight.T: use the plain token_stats path")
    return head.weight, head.bias
