"""Online step speed: the demo configuration's generate -> score -> label -> train step, the old path
against the new, in one process.

  old  one generate() call per role (the policy's samples, then the reference's with the adapters
       disabled), each prompt read once per sample, every candidate scored as a whole sequence, and
       the DPO step reading each prompt twice (chosen and rejected).
  new  the defaults: generation.decode samples both roles in one mixed-adapter call under LoRA
       (`generation.joint_roles`), reads the prompts' common start (the chat template's system prompt,
       an instruction) once per adapter and each prompt once for its samples, drops rows at EOS and
       draws from the top_k tokens without sorting the vocabulary; scoring reads each prompt once per
       model (scoring.SharedPrompts) and takes what sampling kept (`generation.keep_states`: the prompts'
       caches and each sample's hidden states under the model that sampled it), so each model reads
       only the other's samples; the DPO step reads each prompt once for both responses.

What is timed: whole online steps of the real loop (data_selection.OnlineSource feeding
trainers.BasicTrainer.train_step), split into the phases the loop logs itself (time/generation_s,
time/scoring_s, time/oracle_s) and the DPO update. After --warmup untimed steps, blocks of --steps
steps alternate old / new / old ... (--blocks, odd), because this machine's speed drifts over a
process's first minutes; the speed-up is the ratio of the median step times. Before timing, both
paths answer the first step's prompts greedily and must agree token for token.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled .venv/bin/python scripts/bench_online.py --threads 2
    ... scripts/bench_online.py --set model=tiny --set lora=true     # any train.py override
"""
import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import alternate, command_line  # noqa: E402

PHASES = ("generation", "scoring", "oracle", "train")


def compose_demo(args):
    from hydra import compose, initialize_config_dir
    overrides = ["experiment=demo", f"cache_dir={args.cache_dir}", "wandb.enabled=false", "n_examples=1000000", *args.set]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def build(config, device):
    """(source, trainer) of the demo run, wired as train.main_with wires them (one process)."""
    from data_selection import build_source, load_run_data
    from models import build_models
    from oracles.build import build_oracle
    from trainers import BasicTrainer
    data = load_run_data(config)
    tokenizer, policy, reference = build_models(config, device, data["train"])
    run_dir = tempfile.mkdtemp(prefix="bench_online_")
    oracle = build_oracle(config.oracle, config.datasets[0], int(config.seed))
    source = build_source(config, data, policy, reference, tokenizer, device, run_dir, oracle)
    trainer = BasicTrainer(policy, reference, tokenizer, config, run_dir, source, evaluator=None, logger=None,
                           device=device)
    return source, trainer


def old_sample(generator):
    """The sampling path before generation.decode: one generate() per role, each sample reading its prompt,
    in the same seeded calls."""
    from generation import sample_responses

    def per_role(model, n):
        return lambda ids: sample_responses(model, generator.tokenizer, ids, n, generator.generation, generator.device,
                                            reuse_prompt=False)

    def sample(prompt_ids, n, start, step=0):
        policy = generator._in_calls(prompt_ids, per_role(generator.policy, n), "policy", start)
        with generator.reference.active() as model:
            reference = generator._in_calls(prompt_ids, per_role(model, n), "reference", start)
        return policy, reference
    return sample


def use_path(source, trainer, new: bool) -> None:
    generator = source.generator
    if new:
        generator.__dict__.pop("sample", None)        # the class's own sample again
    else:
        generator.sample = old_sample(generator)
    generator.keep_states, generator.states = new, None
    source.scorer.share_prompts = new
    trainer.share_prompts = new


def check_greedy_agreement(source, trainer, config) -> int:
    """Both paths' greedy samples (2 per role) of the first step's prompts; exits if they differ.
    Returns the number of prompts."""
    from omegaconf import OmegaConf
    generator = source.generator
    prompts = list(itertools.islice(source.prompts(0), int(config.batch_size) * int(config.selection_ratio)))
    ids = [source.tokens.prompt(name, prompt) for name, prompt, _ in prompts]
    saved_cfg = generator.generation
    generator.generation = OmegaConf.merge(saved_cfg, {"temperature": 0.0})
    outputs = {}
    for new in (False, True):
        use_path(source, trainer, new)
        outputs[new] = generator.sample(ids, 2, start=0)
    generator.generation = saved_cfg
    if outputs[False] != outputs[True]:
        print("error: the new path's greedy samples differ from generate()'s, one call per role", file=sys.stderr)
        sys.exit(1)
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache"), help="converted SmolLM2 (the config's cache_dir)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks in all (odd: old-new-old...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train.py override (repeatable)")
    args = parser.parse_args()
    if args.blocks < 2:
        parser.error("--blocks must be >= 2 (each path runs at least one block)")
    torch.set_num_threads(args.threads)
    config = compose_demo(args)
    source, trainer = build(config, torch.device(args.device))
    if not source.generator.joint:
        print("error: this configuration cannot sample both roles in one call (it needs LoRA on a shared base)",
              file=sys.stderr)
        sys.exit(2)
    agreed = check_greedy_agreement(source, trainer, config)
    print(f"command: {command_line()}")
    print(f"{config.model.name}{' + LoRA' if config.lora else ''} on {args.device} ({args.threads} threads); "
          f"{config.batch_size} labels/step from {int(config.batch_size) * int(config.selection_ratio)} prompts x "
          f"{config.num_action_samples} samples per role, up to {config.generation.max_new_tokens} new tokens")
    print(f"greedy outputs unchanged: yes ({agreed} prompts, policy and reference)")

    steps = iter(source)

    def step() -> Dict[str, float]:
        start = time.perf_counter()
        batch, info = next(steps)
        t0 = time.perf_counter()
        trainer.train_step(batch)
        record = {"train": time.perf_counter() - t0, "total": time.perf_counter() - start}
        record.update({phase: info[f"time/{phase}_s"] for phase in PHASES[:3]})
        return record

    for _ in range(args.warmup):
        step()
    schedule = alternate(("old", "new"), args.blocks, "old")
    records: Dict[str, List[Dict[str, float]]] = {"old": [], "new": []}
    for path in schedule:
        use_path(source, trainer, path == "new")
        records[path].extend(step() for _ in range(args.steps))

    print(f"\nblocks {'-'.join(schedule)} of {args.steps} steps after {args.warmup} warm-up; medians in s/step")
    print(f"{'path':4} | " + " | ".join(f"{p:>10}" for p in PHASES + ("total",)))
    medians = {}
    for path, recs in records.items():
        medians[path] = {k: statistics.median(r[k] for r in recs) for k in PHASES + ("total",)}
        print(f"{path:4} | " + " | ".join(f"{medians[path][k]:10.2f}" for k in PHASES + ("total",)))
    for phase in ("generation", "total"):
        print(f"{phase} speed-up = {medians['old'][phase] / medians['new'][phase]:.2f}x")
    print(f"online step speed-up = {medians['old']['total'] / medians['new']['total']:.2f}x")


if __name__ == "__main__":
    main()
