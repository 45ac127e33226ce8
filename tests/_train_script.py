"""Tiny models and preference pairs for the trainer tests; also a script, so runs can be real subprocesses
(`torchrun --nproc_per_node 2 tests/_train_script.py ...`, or killed mid-run and resumed).

Token ids: 0 pad, 1 EOS, 2..40 prompt words, 41..50 "good" words (chosen), 51..60 "bad" words (rejected),
63 a poison token (used to make one pair's loss NaN).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tokenpo.data.preference import PreferenceCollator
from tokenpo.training import TrainConfig, train

PAD, EOS, POISON, VOCAB = 0, 1, 63, 64


def tiny_model(seed: int = 0, tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config)


def make_pairs(n: int, seed: int = 0, poison_row: int | None = None) -> list[dict]:
    """n pairs: chosen completions use good words, rejected ones bad words; lengths vary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randint(2, 40) for _ in range(rng.randint(3, 6))]
        if i == poison_row:
            prompt[1] = POISON
        chosen = [rng.randint(41, 50) for _ in range(rng.randint(2, 6))] + [EOS]
        rejected = [rng.randint(51, 60) for _ in range(rng.randint(2, 6))] + [EOS]
        rows.append({"row_index": i, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows


# PreferenceCollator places per-completion-token columns (chosen_<x>/rejected_<x>: selections, weights,
# token_scores, ...) at the input positions of their tokens, [B, L]
collate = PreferenceCollator(PAD)


class SleepAfter:
    """Callback: after optimizer step `step`, write `marker` and sleep (so a test can SIGKILL the run there)."""

    def __init__(self, step: int, marker: Path, seconds: float = 120.0):
        self.step, self.marker, self.seconds = step, Path(marker), seconds

    def on_step_end(self, step, metrics, policy, providers):
        if step == self.step:
            self.marker.write_text(str(step))
            time.sleep(self.seconds)


def run(out_dir, *, n_pairs=16, batch_size=4, grad_accum=1, max_steps=8, save_every=None, seed=0,
        method="dpo", lr=1e-3, resume=False, callbacks=(), eval_dataset=None, allow_config_changes=(), **config):
    """One run on the standard tiny set-up (a fresh model each time, same init for the same seed)."""
    torch.set_num_threads(1)
    settings = dict(method=method, learning_rate=lr, batch_size=batch_size, grad_accum=grad_accum,
                    max_steps=max_steps, save_every=save_every, out_dir=str(out_dir), seed=seed, progress=False,
                    cpu=True, schedule="constant", save_final=False)
    settings.update(config)
    return train(tiny_model(seed), None, make_pairs(n_pairs, seed), TrainConfig(**settings), collator=collate,
                 resume=resume, callbacks=list(callbacks), eval_dataset=eval_dataset,
                 **({"allow_config_changes": tuple(allow_config_changes)} if allow_config_changes else {}))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument("--sleep-after-step", type=int, default=None)
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--hparams", default="{}")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    callbacks = []
    if args.sleep_after_step is not None:
        callbacks.append(SleepAfter(args.sleep_after_step, Path(args.out_dir) / "sleeping"))
    run(args.out_dir, batch_size=args.batch_size, grad_accum=args.grad_accum, max_steps=args.max_steps,
        save_every=args.save_every, method=args.method, hparams=json.loads(args.hparams), resume=args.resume,
        callbacks=callbacks)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
