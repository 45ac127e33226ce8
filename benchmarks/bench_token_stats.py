"""Peak memory and forward+backward time of per-token statistics: plain (full logits) vs chunked.

What is measured, per variant, for policy AND reference (log-probs of the taken tokens and the full-vocabulary
KL(π_ref‖π_θ)), with gradients w.r.t. the policy hidden states and output-embedding weight:

* plain:   logits = hidden @ W.T (policy, with grad) and ref_hidden @ W_ref.T (no grad) -> ``token_stats``;
* chunked: ``chunked_token_stats`` on the hidden states, ``--chunk-size`` rows at a time.

Default shapes are GPT-2-small's head: hidden 768, vocab 50,257, length 512, 4 pairs (8 rows).
Each variant runs in a fresh subprocess, so its peak memory is its own: on CPU the increase of the peak resident
set size (VmHWM, restarted there) over the resident size after the inputs were created; on CUDA
``torch.cuda.max_memory_allocated`` over the allocation after the inputs were created. Time is the median over
``--repeats`` forward+backward passes after one warm-up; on CPU the process CPU time is reported too (it is less
sensitive to other processes on a busy machine, for one thread). Both variants compute the same numbers; the table
prints a checksum of each so that you can see they agree.

    python benchmarks/bench_token_stats.py                 # CPU (and CUDA when available), GPT-2-small shapes
    python benchmarks/bench_token_stats.py --quick         # small shapes, seconds
    python benchmarks/bench_token_stats.py --threads 1 --chunk-size 512 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TARGET_MEMORY_RATIO = 1 / 8
TARGET_TIME_RATIO = 1.3


def worker(args: argparse.Namespace) -> dict:
    import torch

    from tokenpo.tokens import chunked_token_stats, token_stats
    from tokenpo.utils import memory_mb, reset_peak_memory

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows, length = 2 * args.batch, args.length - 1
    hidden = torch.randn(rows, length, args.hidden, generator=gen).to(device).requires_grad_()
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(rows, length, args.hidden, generator=gen).to(device))
    weight = (0.05 * torch.randn(args.vocab, args.hidden, generator=gen)).to(device).requires_grad_()
    ref_weight = weight.detach() + 0.005 * torch.randn(args.vocab, args.hidden, generator=gen).to(device)
    labels = torch.randint(0, args.vocab, (rows, length), generator=gen).to(device)
    labels[:, : int(args.prompt_fraction * length)] = -100
    upstream_logps = torch.randn(rows, length, generator=gen).to(device)
    upstream_kl = torch.randn(rows, length, generator=gen).to(device)

    def step():
        hidden.grad = weight.grad = None
        if args.variant == "plain":
            logits = hidden @ weight.t()
            with torch.no_grad():
                ref_logits = ref_hidden @ ref_weight.t()
            stats = token_stats(logits, labels, ref_logits)
        else:
            stats = chunked_token_stats(hidden, weight, labels, ref_hidden, ref_weight, chunk_size=args.chunk_size)
        objective = (upstream_logps * stats.logps).sum() + (upstream_kl * stats.kl).sum()
        objective.backward()
        return [stats.logps.sum().item(), stats.kl.sum().item(), hidden.grad.norm().item(), weight.grad.norm().item()]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_memory()         # the peak from here on: not the inputs' creation, nor the parent's size at fork
        base = memory_mb()[0]
    wall, cpu = [], []
    checksum = None
    for _ in range(1 + args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        checksum = step()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = memory_mb()[1] - base
    return {"peak_mb": peak, "wall_ms": 1000 * statistics.median(wall[1:]),
            "cpu_ms": 1000 * statistics.median(cpu[1:]), "checksum": checksum}


def run_variant(args: argparse.Namespace, device: str, variant: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--device", device,
               "--length", str(args.length), "--batch", str(args.batch), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--prompt-fraction", str(args.prompt_fraction)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} on {device} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=512, help="sequence length L (T = L - 1 predictions)")
    parser.add_argument("--batch", type=int, default=4, help="preference pairs (2x rows: chosen + rejected)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="share of positions labelled -100 (prompt); the chunked path skips them")
    parser.add_argument("--devices", default="auto", help="'cpu', 'cuda', 'cpu,cuda' or 'auto' (cpu + cuda if any)")
    parser.add_argument("--quick", action="store_true", help="small shapes (length 128, 1 pair, 1 repeat)")
    parser.add_argument("--worker", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.variant = args.worker
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.length, args.batch, args.repeats = 128, 1, 1
    if args.devices == "auto":
        import torch
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")

    rows = 2 * args.batch * (args.length - 1)
    print(f"rows B*T = {rows}, hidden {args.hidden}, vocab {args.vocab}, chunk {args.chunk_size}, "
          f"threads {args.threads}, repeats {args.repeats}, prompt fraction {args.prompt_fraction}")
    print(f"one full fp32 logits tensor = {rows * args.vocab * 4 / 2**20:.0f} MB")
    header = f"{'device':<7}{'variant':<9}{'peak MB':>10}{'wall ms':>11}{'cpu ms':>11}   checksum (Σlogp, ΣKL, |∇h|, |∇W|)"
    print(header)
    print("-" * len(header))
    for device in devices:
        results = {variant: run_variant(args, device, variant) for variant in ("plain", "chunked")}
        for variant, r in results.items():
            cpu = f"{r['cpu_ms']:>11.0f}" if device == "cpu" else f"{'':>11}"
            print(f"{device:<7}{variant:<9}{r['peak_mb']:>10.1f}{r['wall_ms']:>11.1f}{cpu}   "
                  + ", ".join(f"{v:.6g}" for v in r["checksum"]))
        memory_ratio = results["chunked"]["peak_mb"] / results["plain"]["peak_mb"]
        time_ratio = results["chunked"]["wall_ms"] / results["plain"]["wall_ms"]
        line = (f"{device}: memory chunked/plain = {memory_ratio:.3f} (target <= {TARGET_MEMORY_RATIO:.3f}), "
                f"time chunked/plain = {time_ratio:.2f} wall")
        if device == "cpu":
            line += f", {results['chunked']['cpu_ms'] / results['plain']['cpu_ms']:.2f} cpu"
        print(line + f" (target <= {TARGET_TIME_RATIO})")


if __name__ == "__main__":
    main()
