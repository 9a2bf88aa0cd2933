"""Scaling with torchrun: pool scoring and the DPO step with 1, 2, ... processes, same global work.

Measured, per process count N (each a fresh `python -m torch.distributed.run --nproc_per_node=N`
launch of this script's worker; N=1 is a plain one-process run):
  scoring   one offline-AE pool: --pool pairs (2 x --pool sequences) scored by data_selection.CandidateScorer
            with the run's default estimator (laplace) and the reference, each rank its share of the
            sequences, the scores gathered on every rank (what OfflineActiveSource does each step).
  dpo step  trainers.BasicTrainer.train_step on a global batch of --pairs pairs (reference log-probs
            recomputed, AdamW): each rank its rows, gradients averaged by DDP (or FSDP2 with --strategy fsdp).
Both on fixed-length HH pairs (--prompt-len + --response-len tokens), after --warmup untimed repeats;
the median of --repeats timed ones. The launches run in the order 1, 2, ..., 1 (A-B-A), and the
speed-up of N processes is the mean of the two one-process medians over N's median, so a drift of
the machine over the benchmark shows as the difference between the two one-process runs.

On CPU each process uses --threads threads (default 1: N processes on N cores, the same compute
per process); --device cuda uses one GPU per process (N <= the GPUs present). Targets on CPU with
2 processes: pool scoring >= 1.8x, DPO step >= 1.6x.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_scaling.py
    ... scripts/bench_scaling.py --model smollm2-135m --lora --procs 1 2 --strategy ddp
    ... scripts/bench_scaling.py --device cuda --procs 1 2 4 8 --strategy fsdp
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import (ROOT, add_common_arguments, command_line, compose_config,  # noqa: E402
                             fixed_length_pairs, measure, pair_element, pool_sequences)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, default_model="smollm2-135m", pairs=16, seq_len=64,
                         pairs_help="global DPO batch (pairs)")
    parser.set_defaults(threads=1)
    parser.add_argument("--pool", type=int, default=48, help="pairs in the scored pool (2 sequences each)")
    parser.add_argument("--lora", action="store_true", help="LoRA on the model (the reference: adapters disabled)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts; 1 is also run last (A-B-A)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: write this process count's times here
    return parser.parse_args(argv)


def worker(args) -> None:
    """One launch: build the run's models as train.py does, then time scoring and DPO steps."""
    import distributed
    from data_selection import CandidateScorer
    from strategies import STRATEGIES
    from models import build_models
    from preference_datasets import collate
    from scoring import response_logps
    from trainers import BasicTrainer

    torch.set_num_threads(args.threads)
    config = compose_config(args, "loss=dpo", "active=true", "selection_strategy=ae", "optimizer=AdamW", "lr=1e-5",
                            "warmup_steps=0", f"batch_size={args.pairs}", "wandb.enabled=false", "debug=true",
                            f"distributed.strategy={args.strategy}", *(["lora=true"] if args.lora else []),
                            f"max_length={args.prompt_len + args.response_len}", f"max_prompt_length={args.prompt_len}")
    device = distributed.setup(config)
    torch.manual_seed(0)
    tokenizer, policy, reference = build_models(config, device)
    forward = distributed.prepare(policy, config, device, response_logps)
    pairs = fixed_length_pairs(tokenizer, args.data, max(args.pool, args.pairs), args.prompt_len, args.response_len)
    sequences = pool_sequences(pairs[:args.pool])
    batch = collate([pair_element(p) for p in pairs[:args.pairs]], tokenizer.pad_token_id)
    batch["prompt"] = [str(i) for i in range(args.pairs)]
    scorer = CandidateScorer(STRATEGIES["ae"], policy, reference, config, tokenizer.pad_token_id, device, seed=1)
    trainer = BasicTrainer(policy, reference, tokenizer, config, tempfile.mkdtemp(), None, None, None, device, forward)

    times = {}
    for name, work in (("scoring", lambda: scorer(sequences, columns=2)), ("dpo_step", lambda: trainer.train_step(batch))):
        runs = []
        for i in range(args.warmup + args.repeats):
            distributed.barrier()
            record = {}
            with measure(device, record):
                work()
                distributed.barrier()       # the step ends when the slowest rank is done
            if i >= args.warmup:
                runs.append(record["seconds"])
        times[name] = statistics.median(runs)
    if distributed.is_main():
        with open(args.worker, "w") as f:
            json.dump(times, f)
    distributed.leave(0)


def launch(args, procs: int) -> dict:
    """Run the worker on `procs` processes; its median times (s)."""
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([*launcher, os.path.abspath(__file__), *sys.argv[1:], "--worker", out], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {procs}-process launch failed:\n{result.stderr[-3000:]}")
    with open(out) as f:
        times = json.load(f)
    os.remove(out)
    print(f"  {procs} process(es): scoring {times['scoring']:.3f} s, dpo step {times['dpo_step']:.3f} s", flush=True)
    return times


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and max(args.procs) > torch.cuda.device_count():
        sys.exit(f"error: --procs {max(args.procs)} needs that many GPUs; {torch.cuda.device_count()} present")
    print(f"$ {command_line()}")
    print(f"model {args.model}{' + LoRA' if args.lora else ''}, {args.device}, {args.threads} thread(s) per process, "
          f"strategy {args.strategy}; pool {args.pool} pairs, DPO batch {args.pairs} pairs, "
          f"{args.prompt_len}+{args.response_len} tokens; median of {args.repeats} after {args.warmup} warm-up")
    order = [1] + [n for n in args.procs if n != 1] + [1]
    results = [(n, launch(args, n)) for n in order]
    alone = {k: statistics.mean([t[k] for n, t in results if n == 1]) for k in ("scoring", "dpo_step")}
    drift = {k: results[-1][1][k] / results[0][1][k] for k in alone}
    print(f"\none-process drift (last / first launch): scoring {drift['scoring']:.2f}x, dpo step {drift['dpo_step']:.2f}x")
    print("| processes | pool scoring (s) | speed-up | DPO step (s) | speed-up |")
    print("|---|---|---|---|---|")
    for n, t in results[1:-1]:
        print(f"| {n} | {t['scoring']:.3f} | {alone['scoring'] / t['scoring']:.2f}x | "
              f"{t['dpo_step']:.3f} | {alone['dpo_step'] / t['dpo_step']:.2f}x |")
    print(f"| 1 | {alone['scoring']:.3f} | 1.00x | {alone['dpo_step']:.3f} | 1.00x |")


if __name__ == "__main__":
    main()
