"""Step time of a sentiment-notebook training run under thread settings, on an idle and on a half-busy machine.

The notebooks train small models (4 blocks × 256, vocabulary 4,096) whose operations are short, so a parallel region
that waits for a thread the OS has descheduled costs more than the region itself: on a machine where another
process holds one of two cores, two torch threads can be several times slower than one. This script measures it.
Each setting runs `--steps` DPO steps through the real trainer in a fresh process (thread settings are fixed at
process start); "half busy" adds one process spinning on the CPU for the duration of the measurement. Settings and
loads are interleaved over `--rounds`; the figures are medians and the ratios are what to read.

    python benchmarks/bench_threads.py       # 1 / 2 threads, 2 with OMP_WAIT_POLICY=PASSIVE or a short GOMP_SPINCOUNT
    python benchmarks/bench_threads.py --rounds 1 --steps 10
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"1 thread": {"TOKENPO_THREADS": "1"}, "2 threads": {"TOKENPO_THREADS": "2"},
            "2 threads, OMP passive": {"TOKENPO_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
            **{f"2 threads, spin {n}": {"TOKENPO_THREADS": "2", "GOMP_SPINCOUNT": str(n)} for n in (1000, 3000, 10000)}}


def worker(steps: int) -> dict:
    import tempfile

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenpo.data.collator import PreferenceCollator
    from tokenpo.training import TrainConfig, train
    import datasets
    import numpy as np

    torch.set_num_threads(int(os.environ["TOKENPO_THREADS"]))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(1, 4096, 6).tolist(), "chosen_ids": rng.integers(1, 4096, 25).tolist(),
             "rejected_ids": rng.integers(1, 4096, 25).tolist(), "row_index": i} for i in range(8 * (steps + 2))]
    stamps = []

    class Stamp:
        def on_step_end(self, *args):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train(model, None, datasets.Dataset.from_list(rows),
              TrainConfig(method="dpo", max_steps=steps + 2, batch_size=8, learning_rate=1e-5, cpu=True,
                          progress=False, save_final=False, save_every=None, out_dir=tmp, shuffle=False),
              collator=PreferenceCollator(0), callbacks=[Stamp()])
    return {"step_seconds": statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))}


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return 0
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for load in ("idle", "half busy"):
            for name, env in SETTINGS.items():
                stop = mp.Event()
                spinner = mp.Process(target=_spin, args=(stop,)) if load == "half busy" else None
                if spinner:
                    spinner.start()
                try:
                    out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps)],
                                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
                finally:
                    if spinner:
                        stop.set()
                        spinner.join()
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results.setdefault((load, name), []).append(json.loads(out.stdout.strip().splitlines()[-1])
                                                            ["step_seconds"])
    base = statistics.median(results[("idle", "2 threads")])
    print(f"DPO step, 4 x 256 GPT-2, batch 8 pairs x 31 tokens; medians over {args.rounds} rounds "
          f"(ratio to 2 threads idle, {base * 1000:.0f} ms)")
    for (load, name), values in results.items():
        med = statistics.median(values)
        print(f"  {load:10s} {name:24s} {med * 1000:7.1f} ms  x{med / base:5.2f}   "
              f"[{', '.join(f'{v * 1000:.0f}' for v in values)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
