"""Supervised fine-tuning of a causal LM on plain task texts: how each experiment makes its reference model π_ref.

Every text is tokenised, followed by EOS, cut to ``max_length`` tokens, and trained on with the next-token loss over
all its tokens (padding excluded). A seeded share of the texts is held out; their loss is reported before training,
every ``eval_every`` steps and at the end. One process, the model's own device; AdamW and the schedules of
:mod:`tokenpo.optim`, shared with the preference trainer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokenpo.tokens import next_token_loss
from tokenpo.utils import pad_token_id, set_seed

from .checkpoint import EpochSampler
from .optim import make_scheduler, parameter_groups, schedule_factor

__all__ = ["SFTConfig", "sft", "heldout_loss"]


@dataclass
class SFTConfig:
    """learning_rate, weight_decay (matrices only), schedule ("cosine" | "linear" | "constant") after warmup_steps
    (or warmup_ratio) of linear warm-up; epochs over the training texts, or max_steps optimizer steps if set;
    batch_size texts per step; max_length tokens per text (incl. EOS); heldout_fraction of the texts kept out of
    training (0 = none); eval_every steps (None = only before and after); seed (split, order, dropout). Schedules are
    transformers' (``get_scheduler``; :data:`tokenpo.training.optim.SCHEDULES`)."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    max_length: int = 128
    max_grad_norm: float | None = 1.0
    heldout_fraction: float = 0.1
    eval_every: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"SFTConfig.heldout_fraction must be in [0, 1), got {self.heldout_fraction!r}")
        for name in ("batch_size", "max_length", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        schedule_factor(self.schedule, 1, 0)


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; SFT appends EOS to every text")
    encoded = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if not ids:
            raise ValueError(f"text {i} is empty after tokenisation")
        encoded.append((ids + [eos])[:max_length])
    return encoded


def _collate(pad_id: int):
    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            attention[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": attention}

    return collate


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 32) -> float:
    """Mean next-token loss (nats per token) of ``model`` on ``texts`` (each followed by EOS)."""
    return _mean_loss(model, _encode(tokenizer, texts, max_length), pad_token_id(tokenizer), batch_size)


@torch.no_grad()
def _mean_loss(model, encoded: list[list[int]], pad_id: int, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in DataLoader(encoded, batch_size=batch_size, collate_fn=_collate(pad_id)):
        loss, n = next_token_loss(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def sft(model, tokenizer, texts: Sequence[str], config: SFTConfig | None = None,
        history: list | None = None):
    """Fine-tune ``model`` (in place) on ``texts`` with the causal-LM loss; returns the model, in eval mode.

    ``history``, if given, receives one dict per step (``step``, ``loss``, ``lr``) and one per evaluation
    (``step``, ``heldout_loss``)."""
    config = config or SFTConfig()
    history = history if history is not None else []
    set_seed(config.seed)
    encoded = _encode(tokenizer, texts, config.max_length)
    order = list(range(len(encoded)))
    random.Random(config.seed).shuffle(order)
    n_heldout = int(round(config.heldout_fraction * len(encoded)))
    heldout = [encoded[i] for i in order[:n_heldout]]
    train_rows = [encoded[i] for i in order[n_heldout:]]
    if not train_rows:
        raise ValueError(f"{len(texts)} texts leave no training text after holding out {n_heldout}")
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    sampler = EpochSampler(len(train_rows), config.seed)
    loader = DataLoader(train_rows, batch_size=config.batch_size, sampler=sampler, collate_fn=_collate(pad_id))
    total_steps = config.max_steps or config.epochs * len(loader)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.learning_rate, config.weight_decay, provider_prefix=""),
                                  lr=config.learning_rate)
    scheduler = make_scheduler(optimizer, config.schedule, total_steps, warmup)  # transformers' get_scheduler

    def evaluate(step: int) -> None:
        if heldout:
            history.append({"step": step, "heldout_loss": _mean_loss(model, heldout, pad_id, config.batch_size)})

    evaluate(0)
    model.train()
    bar = tqdm(total=total_steps, desc="sft", disable=not config.progress, dynamic_ncols=True)
    step, epoch = 0, 0
    while step < total_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss_sum, n_tokens = next_token_loss(model, batch["input_ids"].to(device),
                                                 batch["attention_mask"].to(device))
            loss = loss_sum / max(n_tokens, 1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite SFT loss at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, "loss": loss.item(), "lr": lr})
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                evaluate(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    evaluate(step)
    if heldout and config.progress:
        bar.write(f"sft: held-out loss {history[0]['heldout_loss']:.3f} -> {history[-1]['heldout_loss']:.3f} "
                  "nats/token")
    model.eval()
    return model
