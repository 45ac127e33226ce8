"""TRL's token-level metrics of the policy's logits, taken without touching the step's computation
(:mod:`tokenpo.training.step`): a forward hook keeps the policy's logits of its last forward (plain path: the LM head's
output; chunked path: the final hidden states, turned into logits chunk by chunk), and after the step they are
reduced without gradient to TRL's DPOTrainer metrics:

- ``entropy``: mean over the completion tokens of both sides of the entropy of the next-token distribution;
- ``logits/chosen``, ``logits/rejected``: mean over a side's completion tokens of the mean logit over the vocabulary;
- ``mean_token_accuracy``: share of the chosen completion tokens whose label is the arg-max.

They are token-weighted over the micro-batches and processes of a step (sums and counts, reduced with "sum"). Cost:
one more pass over the full-vocabulary logits per step (and on the chunked path one more vocabulary matmul), so
``TrainConfig.log_logit_metrics`` turns them on. ``num_tokens`` (TRL: tokens seen so far, prompts included) is
counted by the trainer from the attention masks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tokenpo.tokens import IGNORE_INDEX, _transformer_body, align_to_labels, completion_labels, output_head

SUM_KEYS = ("entropy", "entropy_tokens", "logits/chosen", "chosen_tokens", "logits/rejected", "rejected_tokens",
            "correct", "correct_tokens")


class LogitMetrics:
    """Keeps the policy's last logits (or final hidden states) through a forward hook; :meth:`sums` reduces them for
    one batch. Call :meth:`close` to remove the hook."""

    def __init__(self, policy: nn.Module, chunk_size: int | None):
        self.chunk_size, self.policy, self._captured = chunk_size, policy, None
        if chunk_size is None:
            module = policy.get_output_embeddings()
            self._handle = module.register_forward_hook(self._keep_output)
        else:
            self._handle = _transformer_body(policy).register_forward_hook(self._keep_last_hidden)

    def _keep_output(self, module, inputs, output) -> None:
        self._captured = output.detach()

    def _keep_last_hidden(self, module, inputs, output) -> None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        self._captured = hidden.detach()

    def discard(self) -> None:
        self._captured = None

    def close(self) -> None:
        self._handle.remove()
        self._captured = None

    @torch.no_grad()
    def sums(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Sums and token counts of the last policy forward, on the rows [chosen; rejected] of ``batch``."""
        captured, self._captured = self._captured, None
        if captured is None:
            raise RuntimeError("log_logit_metrics: the policy's forward was not seen by the hook")
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        completion = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])
        labels = completion_labels(input_ids, completion)
        mask = labels != IGNORE_INDEX
        aligned = align_to_labels(captured)                        # [2B, T, V] logits or [2B, T, H] hidden
        rows = aligned[mask]                                       # [n, V] or [n, H], completion tokens only
        side = torch.arange(input_ids.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        chosen = side < input_ids.shape[0] // 2
        targets = labels[mask]
        entropy, mean_logit, correct = [], [], []
        step = rows.shape[0] if self.chunk_size is None else self.chunk_size
        weight, bias = (None, None) if self.chunk_size is None else output_head(self.policy)
        for start in range(0, rows.shape[0], max(step, 1)):
            part = rows[start:start + step]
            logits = part.float() if weight is None else (part @ weight.detach().T + (
                0 if bias is None else bias.detach())).float()
            logp = torch.log_softmax(logits, -1)
            entropy.append(-(logp.exp() * logp).sum(-1))
            mean_logit.append(logits.mean(-1))
            correct.append(logits.argmax(-1) == targets[start:start + step])
        entropy_t, mean_t, correct_t = (torch.cat(x) if x else torch.zeros(0, device=mask.device)
                                        for x in (entropy, mean_logit, correct))
        count = lambda m: m.sum().float()  # noqa: E731
        return {"entropy": entropy_t.sum(), "entropy_tokens": count(mask),
                "logits/chosen": mean_t[chosen].sum(), "chosen_tokens": count(chosen),
                "logits/rejected": mean_t[~chosen].sum(), "rejected_tokens": count(~chosen),
                "correct": correct_t[chosen].float().sum(), "correct_tokens": count(chosen)}


def logit_metrics(totals: dict[str, float]) -> dict[str, float]:
    """TRL's metrics from summed :meth:`LogitMetrics.sums` (over micro-batches and processes)."""
    ratio = lambda a, b: totals[a] / totals[b] if totals[b] else 0.0  # noqa: E731
    return {"entropy": ratio("entropy", "entropy_tokens"), "logits/chosen": ratio("logits/chosen", "chosen_tokens"),
            "logits/rejected": ratio("logits/rejected", "rejected_tokens"),
            "mean_token_accuracy": ratio("correct", "correct_tokens")}
