"""DPO training throughput: our trainer's step vs TRL's DPOTrainer, same model, data and optimizer.

Measured: tokens/s of DPO optimizer steps (tokens = all tokens of the chosen and rejected sequences
of a batch, here 8 pairs x 2 x (64 + 64) = 2048; time = forward of the policy, reference
forward, backward, gradient clipping, optimizer and scheduler step):

  ours  trainers.BasicTrainer.train_step on a batch collated by preference_datasets.collate
        (reference log-probs recomputed every step: no precomputed reference_*_logps in the batch).
  TRL   trl.DPOTrainer.train() (TRL 1.16.0), each optimizer step timed by a TrainerCallback from
        on_step_begin to on_step_end (same work; data loading and logging are outside), with
        precompute_ref_log_probs=False, no activation (gradient) checkpointing, fp32 (bf16 off), dropout off.

Both: the same token ids (Anthropic-HH prompts/responses cut to exactly 64 + 64 tokens; TRL's own
text tokenisation is replaced by these ids), AdamW lr 1e-5 (weight decay 0.01, torch's default),
constant learning rate, max_grad_norm and beta from the project config (10.0, 0.1).
Models: --model tiny (the tiny Llama of models.load_model with model=tiny, tokenizer from
models.build_tiny_tokenizer on the HH texts; full fine-tuning, the reference a second copy on both
sides) and --model smollm2-135m --lora (LoRA from models.add_lora; TRL gets the same LoraConfig; the
reference is the base with adapters disabled on both sides).

Timing: --warmup steps of each (not timed), then blocks of --steps steps alternate in one process,
ours / TRL / ours for --blocks 3 (--start-with trl: TRL / ours / TRL), because this machine's
speed drifts over a process's first minutes; tokens/s is computed from the median step time.
TRL steps run inside TRL's own training loop, so our blocks run from its step-end callback.
Target: ours / TRL >= 1.0 on both models.

Needs TRL in the venv (requirements.txt pins it for this benchmark and the parity test):
    .venv/bin/pip install trl==1.16.0
Run (from the repository root):
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_step.py --model tiny
    ... scripts/bench_step.py --model smollm2-135m --lora
"""
import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import (add_common_arguments, alternate, command_line, compose_config,  # noqa: E402
                             fixed_length_pairs, measure, pair_element, synchronize)

LR = 1e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which our trainer uses


def require_trl() -> None:
    if importlib.util.find_spec("trl") is None:
        print("error: trl is not installed; this benchmark compares against it: "
              ".venv/bin/pip install trl==1.16.0 (in requirements.txt)", file=sys.stderr)
        sys.exit(2)


def load_models(config, tokenizer, lora: bool, device):
    """(policy, reference model or None): our loading path; under LoRA no reference copy."""
    from models import add_lora, load_model
    policy = load_model(config, tokenizer, config.model.policy_dtype)
    if lora:
        return add_lora(policy, config).to(device), None
    reference = load_model(config, tokenizer, config.model.reference_dtype).to(device).requires_grad_(False)
    return policy.to(device), reference


def build_trl_trainer(args, config, tokenizer, pairs, peft_config, callback):
    """A DPOTrainer on a fresh copy of the model, training on exactly `pairs` (token ids)."""
    from datasets import Dataset
    from models import load_model
    from trl import DPOConfig, DPOTrainer
    model = load_model(config, tokenizer, config.model.policy_dtype)
    ref_model = None if peft_config else load_model(config, tokenizer, config.model.reference_dtype)
    n_trl_blocks = alternate(("ours", "trl"), args.blocks, args.start_with).count("trl")
    dpo_args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_step_trl_"), per_device_train_batch_size=args.pairs,
        max_steps=args.warmup + args.steps * n_trl_blocks, learning_rate=LR, lr_scheduler_type="constant",
        optim="adamw_torch", weight_decay=WEIGHT_DECAY, max_grad_norm=float(config.max_grad_norm),
        beta=float(config.loss.beta), precompute_ref_log_probs=False, activation_checkpointing=False, bf16=False,
        max_length=None, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=args.device == "cpu", seed=0)
    texts = Dataset.from_dict({key: [tokenizer.decode(pair[i]) for pair in pairs]
                               for i, key in enumerate(("prompt", "chosen", "rejected"))})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=dpo_args, train_dataset=texts,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
    # TRL tokenised the text in __init__; train on the very token ids our trainer gets instead
    trainer.train_dataset = Dataset.from_dict({key: [list(pair[i]) for pair in pairs]
                                               for i, key in enumerate(("prompt_ids", "chosen_ids", "rejected_ids"))})
    return trainer


def make_interleaver(device, warmup: int, steps: int, schedule: List[str], run_ours: Callable[[], None]):
    """A TrainerCallback that times TRL's optimizer steps after `warmup` of them, in blocks of `steps`,
    and at each block boundary runs the blocks of ours that `schedule` puts there."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.pending = list(schedule)
            self.blocks: List[List[Dict[str, float]]] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            record = {"seconds": time.perf_counter() - self.start}
            if device.type == "cuda":
                record["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            done = state.global_step - warmup
            if done < 0:
                return
            if done > 0:
                self.blocks[-1].append(record)
            if done % steps == 0:
                while self.pending and self.pending[0] == "ours":
                    self.pending.pop(0)
                    run_ours()
                if self.pending:
                    self.pending.pop(0)
                    self.blocks.append([])

    return Interleave()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, default_model="tiny", pairs=8, seq_len=64)
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (models.add_lora) instead of full fine-tuning")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks in all (odd: A-B-A...)")
    parser.add_argument("--start-with", choices=("ours", "trl"), default="ours")
    args = parser.parse_args()
    if args.blocks < 2:
        parser.error("--blocks must be >= 2 (each trainer runs at least one block)")
    require_trl()
    from preference_datasets import collate
    from models import load_tokenizer
    from trainers import BasicTrainer
    from scoring import Reference

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    config = compose_config(args, "loss=dpo", f"lora={str(args.lora).lower()}", "optimizer=AdamW", f"lr={LR}",
                            "warmup_steps=0", "gradient_accumulation_steps=1", "train_dropout=false")
    tokenizer = load_tokenizer(config)
    pairs = fixed_length_pairs(tokenizer, args.data, args.pairs, args.prompt_len, args.response_len)
    batch = collate([pair_element(pair) for pair in pairs], tokenizer.pad_token_id)
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())

    policy, reference_model = load_models(config, tokenizer, args.lora, device)
    ours = BasicTrainer(policy, Reference(policy, reference_model), tokenizer, config,
                        tempfile.mkdtemp(prefix="bench_step_ours_"), batch_source=None, evaluator=None,
                        logger=None, device=device)
    ours_blocks: List[List[Dict[str, float]]] = []

    def run_ours() -> None:
        block = []
        for _ in range(args.steps):
            record: Dict[str, float] = {}
            with measure(device, record):
                ours.train_step(batch)
            block.append(record)
        ours_blocks.append(block)

    schedule = alternate(("ours", "trl"), args.blocks, args.start_with)
    interleaver = make_interleaver(device, args.warmup, args.steps, schedule, run_ours)
    peft_config = copy.deepcopy(policy.peft_config["default"]) if args.lora else None
    trl_trainer = build_trl_trainer(args, config, tokenizer, pairs, peft_config, interleaver)

    print(f"command: {command_line()}")
    print(f"model {args.model}{' + LoRA' if args.lora else ' (full fine-tuning)'} on {args.device} "
          f"({args.threads} threads); batch {args.pairs} pairs x ({args.prompt_len} + {args.response_len}) tokens "
          f"= {tokens} tokens/step; blocks {'-'.join(schedule)} of {args.steps} steps after {args.warmup} warm-up steps")
    for _ in range(args.warmup):
        ours.train_step(batch)
    trl_trainer.train()

    results = {"ours": ours_blocks, "TRL": interleaver.blocks}
    cuda = device.type == "cuda"
    print(f"\n{'trainer':7} | {'block medians (s/step)':28} | {'median s/step':>13} | {'tokens/s':>9}"
          + (f" | {'peak CUDA MiB':>13}" if cuda else ""))
    throughput = {}
    for name, blocks in results.items():
        step_times = [r["seconds"] for block in blocks for r in block]
        median = statistics.median(step_times)
        throughput[name] = tokens / median
        block_medians = ", ".join(f"{statistics.median(r['seconds'] for r in block):.3f}" for block in blocks)
        line = f"{name:7} | {block_medians:28} | {median:13.3f} | {throughput[name]:9.0f}"
        if cuda:
            line += f" | {max(r['peak_mib'] for block in blocks for r in block):13.0f}"
        print(line)
    ratio = throughput["ours"] / throughput["TRL"]
    print(f"ours / TRL = {ratio:.2f}x  (target >= 1.0x: {'MET' if ratio >= 1.0 else 'NOT MET'})")


if __name__ == "__main__":
    main()
