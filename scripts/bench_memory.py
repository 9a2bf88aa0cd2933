"""Memory of DPO steps under LoRA: the reference is never a second copy, and log-probs never need
full-vocabulary logits.

Measured: peak resident memory (ru_maxrss, MiB; the whole process, model loading included) of a
process that loads the model and runs --steps DPO steps (default 3) of SmolLM2-135M-Instruct with
LoRA, a batch of 8 pairs x (64 prompt + 64 response) tokens cut from Anthropic-HH, AdamW lr 1e-5,
dropout off. Each configuration runs in a FRESH process (this script re-invokes itself with
--child NAME), so no peak leaks from one into the other:

  ours     policy with LoRA (models.add_lora); the reference is the same base with the adapters
           disabled (scoring.Reference); one trainers.BasicTrainer.train_step per step, whose
           log-probs (scoring.response_logps) project only response positions, in chunks.
  authors  the authors' formulation: the same LoRA policy plus a separately loaded full reference
           copy, and full-vocabulary logits at every position (model(...).logits.log_softmax(-1),
           gather) for the policy and the reference.

Also printed: the resident memory after loading (MiB), seconds per step, and on CUDA the peak of
torch.cuda.max_memory_allocated (MiB). Target: ours <= 0.65 x authors (peak RSS; on CUDA also
peak allocated). --qlora runs the same pair on a 4-bit NF4 base (bitsandbytes; the authors'
reference is then a second 4-bit copy); a configuration that fails prints its error.

The children run with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed blocks to the OS at once
and the peak RSS is the peak of live memory rather than of glibc's caches (--glibc-cache keeps the
default allocator: higher, noisier figures). The trunk's activations (the same in both
configurations) are most of the peak at this batch; --activation-checkpointing recomputes each
decoder layer in the backward in both configurations (the trainer's `activation_checkpointing=true`),
which leaves the reference copy and the logits as what differs.

Run (from the repository root):
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_memory.py
    ... scripts/bench_memory.py --qlora
    ... scripts/bench_memory.py --activation-checkpointing
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import (add_common_arguments, command_line, compose_config, fixed_length_pairs,  # noqa: E402
                             full_logits_logps, load_tokenizer_and_model, pair_element, synchronize)

LR = 1e-5
TARGET = 0.65
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CONFIGS = {
    "ours": "LoRA policy, reference = adapters disabled, response-only chunked log-probs",
    "authors": "LoRA policy + separately loaded reference copy, full-vocabulary logits",
}


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def authors_step(policy, reference, optimizer, batch, config) -> None:
    """One DPO step as the research code computes it: chosen and rejected through the policy in one
    forward, and through the separate reference, with full logits at every position."""
    from trainers import concatenated_inputs, preference_loss
    concat = concatenated_inputs(batch)
    n = batch["chosen_input_ids"].shape[0]
    logps = full_logits_logps(policy, concat["input_ids"], concat["attention_mask"], concat["labels"])
    with torch.no_grad():
        ref = full_logits_logps(reference, concat["input_ids"], concat["attention_mask"], concat["labels"])
    losses, _, _ = preference_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=config.loss.beta)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_child(args) -> None:
    """Load, run the steps of configuration args.child, print one RESULT line (JSON)."""
    from preference_datasets import collate
    from models import add_lora, enable_activation_checkpointing, load_model
    from trainers import BasicTrainer
    from scoring import Reference
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpointing = ["activation_checkpointing=true"] if args.activation_checkpointing else []
    config = compose_config(args, "loss=dpo", "qlora=true" if args.qlora else "lora=true", "optimizer=AdamW",
                            f"lr={LR}", "warmup_steps=0", "gradient_accumulation_steps=1", *checkpointing)
    tokenizer, base = load_tokenizer_and_model(config, quantize_4bit=args.qlora)
    policy = add_lora(base, config).to(device)
    if config.activation_checkpointing:
        enable_activation_checkpointing(policy, config.model.block_name)
    pairs = fixed_length_pairs(tokenizer, args.data, args.pairs, args.prompt_len, args.response_len)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([pair_element(p) for p in pairs],
                                                                              tokenizer.pad_token_id).items()}
    if args.child == "ours":
        trainer = BasicTrainer(policy, Reference(policy), tokenizer, config, tempfile.mkdtemp(prefix="bench_memory_"),
                               batch_source=None, evaluator=None, logger=None, device=device)

        def step():
            trainer.train_step(batch)
    else:
        reference = load_model(config, tokenizer, config.model.reference_dtype, quantize_4bit=args.qlora).to(device)
        reference.requires_grad_(False).eval()
        policy.train(bool(config.train_dropout))  # as BasicTrainer.train_step
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR)

        def step():
            authors_step(policy, reference, optimizer, batch, config)
    loaded = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    result = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_rss_mib": loaded,
              "step_s": sorted(seconds)[len(seconds) // 2]}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_model="smollm2-135m", pairs=8, seq_len=64)
    parser.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes) instead of full precision")
    parser.add_argument("--steps", type=int, default=3, help="DPO steps per configuration")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute decoder layers in the backward, in both configurations")
    parser.add_argument("--glibc-cache", action="store_true",
                        help="children keep glibc's default malloc (freed memory stays resident)")
    parser.add_argument("--child", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    base = "QLoRA (4-bit NF4 base)" if args.qlora else "LoRA (fp32 base)"
    env = dict(os.environ, **({} if args.glibc_cache else MALLOC_ENV))
    print(f"command: {command_line()}")
    print(f"model {args.model}, {base}, on {args.device} ({args.threads} threads), {args.steps} DPO steps of "
          f"{args.pairs} pairs x ({args.prompt_len} + {args.response_len}) tokens, each configuration in a fresh process; "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}; "
          f"malloc: {'glibc default' if args.glibc_cache else ' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}")
    results = {}
    for name in CONFIGS:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", name],
                              capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            error = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"  {name}: FAILED (exit {proc.returncode}): {error}")
            continue
        results[name] = json.loads(lines[-1][len("RESULT "):])
        print(f"  {name}: done", flush=True)

    cuda = args.device == "cuda"
    print(f"\n{'config':8} | {'peak RSS MiB':>12} | {'RSS after load MiB':>18} | {'s/step':>7}"
          + (f" | {'peak CUDA MiB':>13}" if cuda else "") + " | what")
    for name, r in results.items():
        print(f"{name:8} | {r['peak_rss_mib']:12.0f} | {r['loaded_rss_mib']:18.0f} | {r['step_s']:7.2f}"
              + (f" | {r['peak_cuda_mib']:13.0f}" if cuda else "") + f" | {CONFIGS[name]}")
    if len(results) == len(CONFIGS):
        keys = ["peak_rss_mib"] + (["peak_cuda_mib"] if cuda else [])
        for key in keys:
            ratio = results["ours"][key] / results["authors"][key]
            print(f"ours / authors ({key}) = {ratio:.2f}  (target <= {TARGET}: {'MET' if ratio <= TARGET else 'NOT MET'})")


if __name__ == "__main__":
    main()
