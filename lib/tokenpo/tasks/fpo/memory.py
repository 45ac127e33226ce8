"""Peak memory of one preference-training setup per method, each in a fresh process, measured side by side.

FPO's memory claim (arXiv 2411.07618v4, Fig. 4) is about what a step must hold: the policy, its optimizer state and
activations, and — for reference-based methods — the reference model and its per-token terms (TDPO: full-vocabulary
reference log-probabilities at every position). With the offline cache FPO needs no reference model at all. On a
CPU the honest measure is the process's peak resident set: each measurement is a new Python process
(`python -m tokenpo.tasks.fpo.memory`) that builds the model, trains a few steps through the real trainer and reports
its peak RSS (VmHWM, restarted just before) above what it held before the model was built. The methods run in interleaved rounds
(A B C … A B C …), so a busy machine touches every method alike.

The model has GPT-2-small's width and vocabulary (768, 50,257) and 2 blocks, randomly initialised (memory does not
depend on the weights' values): there the full-vocabulary [2B, T, V] terms and the weight copies dominate, as in the
paper's setting. The pairs are random token ids of fixed lengths; the SAE (width 4·768) is random too, and FPO's
offline reference cache is built beforehand in its own process, so that building it does not enter the peak.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

METHODS = ("dpo", "simpo", "tdpo1", "tdpo2", "fpo", "fpo_online")
LABELS = {"dpo": "DPO", "simpo": "SimPO", "tdpo1": "TDPO-1", "tdpo2": "TDPO-2", "fpo": "FPO (offline cache)",
          "fpo_online": "FPO (reference online)"}


@dataclass(frozen=True)
class Shape:
    """What one measured step holds: `pairs` per batch, completions of `completion` tokens after `prompt` tokens,
    a GPT-2 of `n_layer` blocks with width `n_embd` and vocabulary `vocab`; `steps` optimizer steps."""

    pairs: int = 4
    prompt: int = 16
    completion: int = 112
    n_layer: int = 2
    n_embd: int = 768
    vocab: int = 50257
    steps: int = 2            # the first step allocates the optimizer state; the second holds it with everything else
    threads: int = 2


def _model(shape: Shape):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_embd // 64, vocab_size=shape.vocab,
                        n_positions=shape.prompt + shape.completion + 1, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    return GPT2LMHeadModel(config)


def _pairs(shape: Shape):
    """steps × pairs rows of random token ids (seeded): prompt, chosen and rejected of fixed lengths."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    n = shape.pairs * shape.steps
    rows = [{"prompt_ids": rng.integers(1, shape.vocab, shape.prompt).tolist(),
             "chosen_ids": rng.integers(1, shape.vocab, shape.completion).tolist(),
             "rejected_ids": rng.integers(1, shape.vocab, shape.completion).tolist(), "row_index": i}
            for i in range(n)]
    return datasets.Dataset.from_list(rows)


def _sae(shape: Shape):
    from tokenpo.providers.sae import SAEConfig, SparseAutoencoder
    import torch

    torch.manual_seed(1)
    return SparseAutoencoder(SAEConfig(d_in=shape.n_embd, width=4 * shape.n_embd, layer=-1, site="block_out"))


def _collator():
    from tokenpo.data.collator import PreferenceCollator

    return PreferenceCollator(pad_token_id=0)


def prepare(shape: Shape, folder: Path) -> None:
    """The SAE and FPO's offline reference cache for the measured pairs, saved under `folder` (its own process)."""
    from tokenpo.providers import FPOReferenceCache

    sae, pairs, collator = _sae(shape), _pairs(shape), _collator()
    batches = [collator([pairs[j] for j in range(i, i + shape.pairs)]) for i in range(0, len(pairs), shape.pairs)]
    sae.save_pretrained(folder / "sae")
    FPOReferenceCache.build(_model(shape).eval(), sae, batches, k=64, pooling="paper", path=folder / "cache",
                            progress=False)


def measure(method: str, shape: Shape, folder: Path | None) -> dict:
    """Train `shape.steps` steps of `method` in this process; its peak RSS above the RSS before the model was built
    (MB; after a warm-up step on a tiny model, so that it counts no library, and with the peak restarted there) and the
    median step time."""
    import torch

    from tokenpo.training import TrainConfig, train
    from tokenpo.utils import memory_mb, reset_peak_memory

    torch.set_num_threads(shape.threads)
    pairs, collator = _pairs(shape), _collator()

    def config(method_, steps, tmp, **kwargs):
        return TrainConfig(method=method_, max_steps=steps, batch_size=shape.pairs, learning_rate=1e-6,
                           schedule="constant", cpu=True, progress=False, save_final=False, save_every=None,
                           out_dir=tmp, shuffle=False, **kwargs)

    # Warm-up: one step of DPO on a tiny model loads the trainer's libraries and thread pools before the baseline.
    tiny = Shape(pairs=1, prompt=2, completion=2, n_layer=1, n_embd=64, vocab=32, steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        train(_model(tiny), None, _pairs(tiny), config("dpo", 1, tmp), collator=collator)
    providers, hparams = None, {}
    if method.startswith("fpo"):
        from tokenpo.providers import FPOFeatures, FPOReferenceCache
        from tokenpo.providers.sae import SparseAutoencoder

        sae = SparseAutoencoder.from_pretrained(folder / "sae")
        cache = FPOReferenceCache.load(folder / "cache") if method == "fpo" else None
        providers, hparams = [FPOFeatures(sae, pooling="paper", cache=cache)], {"k": 16}
    reset_peak_memory()
    base, _ = memory_mb()
    policy = _model(shape)
    stamps: list[float] = []

    class Stamp:
        def on_step_end(self, *args):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train(policy, None, pairs, config("fpo" if method.startswith("fpo") else method, shape.steps, tmp,
                                          hparams=hparams, providers=providers), collator=collator,
              callbacks=[Stamp()])
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return {"method": method, "peak_mb": memory_mb()[1] - base,
            "step_seconds": steps[len(steps) // 2] if steps else float("nan")}


def compare(methods: Sequence[str] = METHODS, repeats: int = 3, shape: Shape = Shape(),
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every method in a fresh process, `repeats` interleaved rounds; one row per measurement (method, round,
    peak_mb, step_seconds)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {METHODS}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if any(m.startswith("fpo") for m in methods):
            _run(["--prepare"], shape, folder)
        for round_ in range(repeats):
            for method in methods:
                row = json.loads(_run(["--method", method], shape, folder).strip().splitlines()[-1])
                rows.append({**row, "round": round_})
                if progress:
                    progress(f"{method} round {round_}: {row['peak_mb']:.0f} MB")
    return rows


def _run(args: list[str], shape: Shape, folder: Path) -> str:
    cmd = [sys.executable, "-m", "tokenpo.tasks.fpo.memory", "--folder", str(folder), "--shape",
           json.dumps(asdict(shape)), *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory worker {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one FPO memory measurement (see the module docstring)")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--shape", required=True, help="JSON of Shape's fields")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--prepare", action="store_true")
    args = parser.parse_args(argv)
    shape, folder = Shape(**json.loads(args.shape)), Path(args.folder)
    if args.prepare:
        prepare(shape, folder)
    else:
        print(json.dumps(measure(args.method, shape, folder)))


if __name__ == "__main__":
    main()
