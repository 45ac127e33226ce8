"""SePO's key-token selection (docs/equations.md#sepo): an oracle scores every response token, and the policy is
trained only on the top-k% tokens of each chosen response and the bottom-k% of each rejected one.

Official source: SePO `token_score.py` / `utils_selective.py`. The scores s_t = log π_ora(y_t) − log π_ref(y_t) are
computed once, offline (:func:`score_pairs` adds them to the tokenised pairs as ``chosen_token_scores`` /
``rejected_token_scores``, one value per completion token); :class:`SePOSelections` turns them into selections at
every step, and with ``column=None`` draws random tokens instead (SePO-rand).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokenpo.tokens import completion_logps

from .base import PAIR_SIDES, Provider, StepContext

__all__ = ["SePOSelections", "selection_counts", "sepo_selection", "oracle_scores", "score_pairs", "row_uniforms",
           "check_same_vocabulary"]


def selection_counts(mask: Tensor, ratio: float, min_count: int = 1) -> Tensor:
    """Tokens selected per row: int(ratio · N) as in the official `get_topK`, raised to `min_count` (capped at N).

    The official code selects nothing when int(ratio · N) = 0, and its masked-mean loss then divides by zero;
    `min_count=1` keeps at least one token per non-empty response (pass 0 for the official behaviour).
    """
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be a share of the tokens in (0, 1]; got {ratio!r}")
    n = mask.bool().sum(-1)
    counts = torch.floor(n.double() * float(ratio)).long()
    return torch.minimum(counts.clamp(min=min_count), n)


def sepo_selection(scores: Tensor, mask: Tensor, ratio: float, highest: bool, min_count: int = 1) -> Tensor:
    """SePO token selection: 0/1 [B, T] marking, per row, the `selection_counts` completion tokens with the highest
    (chosen side, `highest=True`) or lowest (rejected side) oracle score.

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


def oracle_scores(oracle: nn.Module, reference: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                  completion_mask: Tensor) -> Tensor:
    """SePO token scores s_t = log π_ora(y_t) − log π_ref(y_t) [B, L-1] for one side of a batch (no β), aligned with
    the labels, 0 off the completion. Both models must share the tokenizer. Unlike the official `token_score.py`
    (which slices the scores from len(prompt) and so drops the first response token) every completion token is
    scored."""
    result = []
    for model in (oracle, reference):
        was_training = model.training
        model.eval()
        try:
            result.append(completion_logps(model, input_ids, attention_mask, completion_mask))
        finally:
            model.train(was_training)
    return result[0] - result[1]


def row_uniforms(row_index: Tensor, side: str, seed: int, length: int) -> Tensor:
    """U(0, 1) [B, length] drawn per dataset row from (seed, row, side): the same row gets the same numbers whatever
    the batching, process count or resumption."""
    rows = [np.random.default_rng([seed, int(r), PAIR_SIDES.index(side)]).random(length) for r in row_index.tolist()]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


class SePOSelections(Provider):
    """The SePO provider: ``selections`` = (top ``ratio_chosen`` of each chosen response, bottom ``ratio_rejected``
    of each rejected one) by the oracle scores in the columns ``chosen_<column>``/``rejected_<column>``
    (:func:`score_pairs`). ``column=None`` gives SePO-rand: uniformly random tokens, drawn per dataset row from
    (seed, row_index). SePO's policy loss is reference-free, so this provider needs no forward of its own."""

    provides = ("selections",)

    def __init__(self, ratio_chosen: float = 0.3, ratio_rejected: float = 0.3, column: str | None = "token_scores",
                 seed: int = 0, min_count: int = 1):
        super().__init__()
        for name, value in (("ratio_chosen", ratio_chosen), ("ratio_rejected", ratio_rejected)):
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"SePOSelections {name} must be a share of the tokens in (0, 1], got {value!r}")
        self.ratio_chosen, self.ratio_rejected = ratio_chosen, ratio_rejected
        self.column, self.seed, self.min_count = column, seed, min_count

    def setup(self, policy: nn.Module, hparams) -> None:
        ratios = tuple(hparams.get("ratios", (0.3, 0.3)))
        if hparams.get("normalization") == "length" and ratios != (self.ratio_chosen, self.ratio_rejected):
            raise ValueError(f"SePO normalises by |y|·k with ratios={ratios} but selects k = ({self.ratio_chosen}, "
                             f"{self.ratio_rejected}) of the tokens: set both to the same k")

    def forward(self, ctx: StepContext) -> dict[str, Any]:
        masks = (ctx.chosen.mask, ctx.rejected.mask)
        if self.column is None:
            scores = tuple(row_uniforms(ctx.batch["row_index"], side, self.seed, m.shape[1]).to(m.device)
                           for side, m in zip(PAIR_SIDES, masks))
            highest = (True, True)
        else:
            try:
                scores = ctx.column(self.column)
            except KeyError as missing:
                raise ValueError(f"batch has no column {missing}: score the pairs with "
                                 "tokenpo.providers.sepo.score_pairs(oracle, reference, pairs) (it adds "
                                 f"chosen_{self.column}/rejected_{self.column}), or use SePOSelections(column=None) "
                                 "for random tokens (SePO-rand)") from None
            highest = (True, False)     # chosen: the oracle's best tokens; rejected: its worst
        selections = tuple(sepo_selection(s.to(m.device), m, ratio, highest=h, min_count=self.min_count)
                           for s, m, ratio, h in zip(scores, masks, (self.ratio_chosen, self.ratio_rejected),
                                                      highest))
        for side, selection, mask, ratio in zip(PAIR_SIDES, selections, masks, (self.ratio_chosen, self.ratio_rejected)):
            empty = ((selection.sum(-1) == 0) & (mask.sum(-1) > 0)).nonzero().flatten().tolist()
            if empty:
                rows = [int(ctx.batch["row_index"][i]) for i in empty]
                raise ValueError(f"SePO selects no {side} token in dataset row(s) {rows}: their responses are shorter "
                                 f"than 1/{ratio:g} tokens, so int({ratio:g}·N) = 0 (min_count={self.min_count}); "
                                 "use min_count >= 1 or drop those rows")
        return {"selections": selections}

    def settings(self) -> dict[str, Any]:
        return {"ratio_chosen": self.ratio_chosen, "ratio_rejected": self.ratio_rejected, "column": self.column,
                "seed": self.seed, "min_count": self.min_count}


def check_same_vocabulary(oracle: nn.Module, reference: nn.Module, oracle_tokenizer=None, tokenizer=None) -> None:
    """ValueError when the oracle cannot score the reference's tokens: another output vocabulary, or (when both
    tokenizers are given) another token-to-id mapping."""
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (oracle, reference)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the oracle's vocabulary ({sizes[0]} tokens) differs from the reference's ({sizes[1]}): SePO "
                         "scores the tokens of one tokenizer — train the oracle from the reference (or a model that "
                         "shares its tokenizer)")
    if oracle_tokenizer is not None and tokenizer is not None and oracle_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError("the oracle's tokenizer maps tokens to other ids than the reference's: SePO scores the tokens "
                         "of one tokenizer")


@torch.no_grad()
def score_pairs(oracle: nn.Module, reference: nn.Module, pairs, collator=None, column: str = "token_scores",
                batch_size: int = 16, progress: bool = True, oracle_tokenizer=None, tokenizer=None):
    """The tokenised pairs with ``chosen_<column>``/``rejected_<column>`` added: the SePO score of every completion
    token (one value per token of ``chosen_ids``/``rejected_ids``, EOS included), in batches, on the oracle's device.
    The oracle must share the reference's tokenizer (checked: vocabulary size, and the mappings when both tokenizers
    are given)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from tokenpo.data.collator import PreferenceCollator

    check_same_vocabulary(oracle, reference, oracle_tokenizer, tokenizer)
    if collator is None:
        pad = getattr(getattr(reference, "config", None), "pad_token_id", None)
        collator = PreferenceCollator(pad if pad is not None else 0, token_keys=())
    device = next(oracle.parameters()).device
    scores: dict[str, list[list[float]]] = {side: [] for side in PAIR_SIDES}
    for batch in tqdm(DataLoader(pairs, batch_size=batch_size, shuffle=False, collate_fn=collator),
                      desc="oracle token scores", disable=not progress):
        for side in PAIR_SIDES:
            ids = batch[f"{side}_input_ids"].to(device)
            attn, comp = batch[f"{side}_attention_mask"].to(device), batch[f"{side}_completion_mask"].to(device)
            values = oracle_scores(oracle, reference, ids, attn, comp).cpu()
            for row, completion in zip(values, comp[:, 1:].bool().cpu()):
                scores[side].append(row[completion].tolist())
    for side in PAIR_SIDES:
        for i, (values, ids) in enumerate(zip(scores[side], pairs[f"{side}_ids"])):
            if len(values) != len(ids):
                raise ValueError(f"row {i}: {len(values)} scores for {len(ids)} {side} tokens")
        name = f"{side}_{column}"
        pairs = (pairs.remove_columns(name) if name in pairs.column_names else pairs).add_column(name, scores[side])
    return pairs
