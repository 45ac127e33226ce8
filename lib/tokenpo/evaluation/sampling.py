"""Sampling completions from a policy, with exactly the decoding asked for."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tokenpo.utils import pad_token_id


@dataclass
class Completions:
    prompts: list[str]
    texts: list[str]                  # decoded completions, special tokens (EOS) removed
    prompt_ids: list[list[int]]       # the prompt tokens, unpadded
    completion_ids: list[list[int]]   # sampled tokens up to and including the first EOS
    finished: list[bool]              # True when the completion ended with EOS within max_new_tokens


def generate_completions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
                         seed: int = 0, batch_size: int = 16, add_special_tokens: bool = False,
                         fixed_length: bool = False, progress: bool | None = None) -> Completions:
    """Sample one completion per prompt from a causal LM, in left-padded batches.

    Decoding is exactly what is asked (top_k=0 and top_p=1.0 mean no filtering; the model's own generation config
    does not add any). The global RNG is left as it was: sampling uses `seed` inside a forked RNG state. Prompts
    are tokenised without special tokens by default, like `tokenize_pairs`. `fixed_length=True` forbids EOS before
    `max_new_tokens` tokens, so every completion has exactly that length (a reward then cannot be gamed by ending
    early). `progress=None` shows a bar when there is more than one batch.
    """
    from transformers import GenerationConfig

    prompts = list(prompts)
    if not prompts:
        return Completions([], [], [], [], [])
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature} (use do_sample=False)")
    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, eos_token_id=eos,
                    min_new_tokens=max_new_tokens if fixed_length else 0)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    config = GenerationConfig(**settings)

    encoded = [list(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) has no tokens")
    device = next(model.parameters()).device
    starts = range(0, len(prompts), batch_size)
    if progress is None:
        progress = len(starts) > 1
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="sampling", unit="batch")

    out_ids: list[list[int]] = []
    finished: list[bool] = []
    was_training, saved_config = model.training, getattr(model, "generation_config", None)
    model.eval()
    # generate() fills settings left at their global defaults (e.g. top_p=1.0) from the model's own generation
    # config (a hub checkpoint may ship top_k/top_p there): make ours the model's for the call
    model.generation_config = config
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in starts:
                chunk = encoded[start:start + batch_size]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, ids in enumerate(chunk):  # left padding: generation continues right after each prompt
                    input_ids[b, width - len(ids):] = torch.tensor(ids)
                    attention[b, width - len(ids):] = 1
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                           generation_config=config)
                for row in generated[:, width:].tolist():
                    if eos is not None and eos in row:
                        row = row[: row.index(eos) + 1]
                        finished.append(True)
                    else:
                        finished.append(False)
                    out_ids.append(row)
    finally:
        model.train(was_training)
        model.generation_config = saved_config
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
    return Completions(prompts, texts, encoded, out_ids, finished)
