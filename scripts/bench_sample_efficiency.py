"""End-to-end sample-efficiency benchmark: active label selection against its uniform baseline.

What it does. For one task (or all of them), every selection strategy is trained with every seed by
launching `train.py` as a subprocess; then `scripts/compare_runs.py` compares them against the
baseline (learning-curve PNGs, final mean +- std over seeds, AUC, labels needed to reach the
baseline's final value, Welch's t-test) and the table is printed and written to <out>/comparison.md.

    jeopardy-online  online. SmolLM2-135M-Instruct + LoRA answers the clues (same --split), 2 samples per
              role and prompt; the Jeopardy rule oracle labels correct > abstain > wrong (ties buy nothing):
              borda against uniref. Metrics: jeopardy/* rates of greedy answers on held-out clues and
              win_rate/win_rate against the reference.
    jeopardy  offline. SmolLM2-135M-Instruct + LoRA, no SFT stage (the model is instruction-tuned);
              pairs correct > abstain > wrong from the J! Archive file; ae, us and the ablations gradnorm
              (largest expected gradient) and length (longest responses) against uniform. --split dev |
              validation keeps one half of the shows (a fixed hash of show_number, written once to
              <out>/data/): tune on dev, report on validation once. Metrics on held-out clues:
              jeopardy/{wrong,abstain,correct}_rate of greedy answers, rewards_eval/accuracies, loss/eval.
    haikus    online. The strict 5-7-5 rows of haiku_test.csv (task_rules.is_strict_haiku) are written
              to <out>/data/{train,test}.csv (split by keyword set, so no test prompt is seen in
              training); a ~3.7M-parameter tiny Llama is SFT'd on them once (<out>/sft/); then online
              DPO from that checkpoint with the rule oracle: borda against uniref. Metrics: haiku/*
              of greedy answers on the held-out prompts and win_rate/win_rate against the SFT model.
    hh        offline. SmolLM2-135M-Instruct + LoRA is SFT'd once on the pretrain share (30%, fixed by
              split_seed) of hh_sample.jsonl (<out>/sft/), then DPO with labels chosen from the other 70%:
              ae, us, gradnorm and length against uniform. Metrics: held-out preference accuracy of the
              implicit reward and held-out DPO loss.

A strategy is `name[/estimator][@key=value,...]`: `uniform@lr=5e-4` is uniform at another learning rate
(compare_runs then names it `uniform@lr=0.0005`; pass that, or the spec, as --baseline).

Runs live in <out>/runs/<task>_<strategy>_s<seed>_<timestamp>/. A run whose summary.json exists is
skipped; one that was interrupted after a checkpoint is resumed (`resume=`); one interrupted before
its first checkpoint is deleted and started again. So the command can be re-run, e.g. with more
seeds. Finished runs are reduced to config.yaml, metrics.jsonl and summary.json (checkpoints,
oracle ledgers, samples deleted) unless --keep-checkpoints; an SFT stage also keeps its final
weights (small), which later seeds start from. Each run's console output goes to <out>/logs/.

How long (CPU defaults, 1 thread per run, measured on 2 CPU cores with 2-3 runs side by side):
jeopardy 7-10 min per uniform run, 10-14 min per us or ae run, so 15 runs (5 seeds) are ~2.8 h of
run time, ~1.5 h with two invocations of disjoint seeds; haikus SFT 10 min, then ~35 s per uniref
run and ~2.5 min per borda run on a free core; hh SFT 7 min, then 10-16 min per uniform run and 17-24 min
per ae run (2-3 runs side by side). Time
grows linearly with seeds and labels. `--device cuda` uses bigger defaults (train.py picks the GPU
by itself when one is present).

    python scripts/bench_sample_efficiency.py --task jeopardy --seeds 0 1 2 3 4 --out benchmarks/jeopardy_240labels
    python scripts/bench_sample_efficiency.py --task all --seeds 0 1 2 --out benchmarks   # <out>/<task>
    python scripts/bench_sample_efficiency.py --task haikus --labels 512 --out benchmarks/haikus --dry-run

Options that change a run's settings (--labels, --evals, --n-eval, --n-samples, --set) do not
change its directory name: use a fresh --out when changing them, or finished runs are reused.
Run one invocation per --out at a time (a second one would resume the runs the first is training),
unless their --seeds are disjoint and the task has no shared SFT stage still to train.
Data is read from --data-dir (default ../shared/data). Runs are offline: HF_HUB_OFFLINE=1,
HF_DATASETS_OFFLINE=1 and WANDB_MODE=disabled are set for them unless already set.
"""
import argparse
import csv
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("jeopardy", "jeopardy-online", "haikus", "hh")
DATA_FILES = {"jeopardy": "jeopardy_clues.json", "jeopardy-online": "jeopardy_clues.json", "haikus": "haiku_test.csv",
              "hh": "hh_sample.jsonl"}  # in --data-dir
KEEP_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}

# Budgets per device: labels per run, eval points after the first eval, held-out pairs scored
# (n_eval_examples), held-out prompts answered greedily (n_eval_model_samples), SFT examples.
DEFAULTS = {
    "cpu": {
        "jeopardy": {"labels": 240, "evals": 3, "n_eval": 48, "n_samples": 48},
        "jeopardy-online": {"labels": 240, "evals": 3, "n_eval": 48, "n_samples": 48},
        "haikus": {"labels": 256, "evals": 4, "n_eval": 64, "n_samples": 128, "sft_examples": 12000},
        "hh": {"labels": 120, "evals": 3, "n_eval": 64, "n_samples": 0, "sft_examples": 256},
    },
    "cuda": {
        "jeopardy": {"labels": 1024, "evals": 6, "n_eval": 256, "n_samples": 256},
        "jeopardy-online": {"labels": 1024, "evals": 6, "n_eval": 256, "n_samples": 256},
        "haikus": {"labels": 1024, "evals": 6, "n_eval": 256, "n_samples": 256, "sft_examples": 40000},
        "hh": {"labels": 2048, "evals": 6, "n_eval": 512, "n_samples": 0, "sft_examples": 8000},
    },
}

# A ~3.7M-parameter Llama (vocab 2048, 4 layers of width 256) for the haiku task.
HAIKU_TINY = ["model=tiny", "model.architecture.vocab_size=2048", "model.architecture.hidden_size=256",
              "model.architecture.intermediate_size=768", "model.architecture.num_hidden_layers=4",
              "model.architecture.num_attention_heads=4"]


@dataclass
class Task:
    """strategies: the baseline first. dpo(args, strategy): overrides of a preference run (seed,
    names and directories are added by the caller). sft(args): overrides of the SFT stage that every seed
    starts from (split_seed fixes its data share), or None without one."""
    name: str
    strategies: List[str]
    metrics: List[str]
    dpo: Callable[[argparse.Namespace, str], List[str]]
    sft: Optional[Callable[[argparse.Namespace], List[str]]] = None
    prepare: Optional[Callable[[argparse.Namespace], None]] = field(default=None, repr=False)


def data_file(args, task: str) -> str:
    return os.path.join(args.data_dir, DATA_FILES[task])


def budget_overrides(args) -> List[str]:
    return [f"n_examples={args.labels}", f"eval_every={max(1, args.labels // args.evals)}", "do_first_eval=true",
            f"n_eval_examples={args.n_eval}", f"n_eval_model_samples={args.n_samples}"]


JEOPARDY_SPLITS = ("all", "dev", "validation")


def jeopardy_split(show_number) -> str:
    """'dev' or 'validation' for a show: a fixed hash of its show_number, so every clue of a show lands in
    the same half, any clues file splits the same way, and a show's half never depends on the others."""
    digest = hashlib.sha256(f"jeopardy-show|{str(show_number).strip()}".encode()).digest()
    return "dev" if digest[0] % 2 == 0 else "validation"


def jeopardy_clues(args) -> str:
    """The clues file the runs read: the --data-dir file itself (--split all), or the shows of one half of
    it written once to <out>/data/jeopardy_clues.<split>.json (same J! Archive JSON format)."""
    source = data_file(args, "jeopardy")
    if args.split == "all":
        return source
    target = os.path.join(os.path.abspath(args.out), "data", f"jeopardy_clues.{args.split}.json")
    if args.dry_run:
        return target
    with open(source, "rb") as f:
        raw = f.read()
    # the half is rewritten whenever the source differs from the one it was cut from (another clues file)
    digest = hashlib.sha256(raw).hexdigest()
    if os.path.exists(target) and os.path.exists(target + ".source"):
        with open(target + ".source", encoding="utf-8") as f:
            if f.read().strip() == digest:
                return target
    try:
        rows = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        sys.exit(f"error: {source}: not a JSON list of J! Archive clues ({e})")
    if not isinstance(rows, list) or any(not isinstance(r, dict) or "show_number" not in r for r in rows):
        sys.exit(f"error: {source}: expected a JSON list of clue objects, each with a show_number")
    keep = [r for r in rows if jeopardy_split(r["show_number"]) == args.split]
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in keep) + "\n]\n")
    os.replace(target + ".tmp", target)
    with open(target + ".source", "w", encoding="utf-8") as f:
        f.write(digest + "\n")
    shows = {str(r["show_number"]) for r in keep}
    print(f"jeopardy: {len(keep)} of {len(rows)} clues ({len(shows)} shows) in the {args.split} half -> {target}")
    return target


def jeopardy_dpo(args, strategy: str) -> List[str]:
    # lr 1e-3 from CPU pilots (uniform): at 64 labels 5e-4 barely moved the LoRA (held-out loss 0.677);
    # 2e-3 was noisy (after 48 labels the loss was above its starting 0.693 in 3 of 5 seeds, up to
    # 0.740); 1e-3 lowered it steadily over 240 labels (0.693 -> 0.658 -> 0.641 -> 0.596, seed 0).
    return ["model=smollm2-135m", "lora=true", "datasets=[jeopardy]",
            f"dataset_files.jeopardy={jeopardy_clues(args)}",
            "loss=dpo", "loss.beta=0.1", "active=true", f"selection_strategy={strategy}", "selection_ratio=3",
            "batch_size=8", "eval_batch_size=16", "optimizer=AdamW", "lr=1e-3", "warmup_steps=2",
            "max_length=96", "max_prompt_length=80", "generation.max_new_tokens=16", *budget_overrides(args)]


def jeopardy_online_dpo(args, strategy: str) -> List[str]:
    # the model answers clues itself; the rule oracle prefers correct > abstain > wrong and buys nothing
    # for a tie. lr 1e-3 as offline Jeopardy (not tuned online)
    ratio = 1 if strategy == "uniref" else 3
    return ["model=smollm2-135m", "lora=true", "datasets=[jeopardy]", f"dataset_files.jeopardy={jeopardy_clues(args)}",
            "loss=dpo", "loss.beta=0.1", "online=true", "oracle=jeopardy", f"selection_strategy={strategy}",
            f"selection_ratio={ratio}", "num_action_samples=2", "batch_size=8", "eval_batch_size=16", "optimizer=AdamW",
            "lr=1e-3", "warmup_steps=2", "max_length=96", "max_prompt_length=80", "generation.max_new_tokens=16",
            "generation.temperature=1.0", *budget_overrides(args)]


def haiku_data_dir(args) -> str:
    return os.path.join(os.path.abspath(args.out), "data")


def haiku_common(args) -> List[str]:
    return [*HAIKU_TINY, "datasets=[haikus]", f"dataset_files.haikus={haiku_data_dir(args)}", "optimizer=AdamW",
            "max_length=96", "max_prompt_length=48", "generation.max_new_tokens=40"]


def haiku_sft(args) -> List[str]:
    return [*haiku_common(args), "loss=sft", "lr=1e-3", "warmup_steps=50", "batch_size=32", "eval_batch_size=64",
            f"n_examples={args.sft_examples}", f"eval_every={max(1, args.sft_examples // 4)}",
            "n_eval_examples=128", f"n_eval_model_samples={args.n_samples}"]


def haiku_dpo(args, strategy: str) -> List[str]:
    # lr 5e-4: half the SFT stage's rate, not tuned by a pilot
    ratio = 1 if strategy == "uniref" else 3
    return [*haiku_common(args), "loss=dpo", "loss.beta=0.1", "online=true", "oracle=haiku",
            f"selection_strategy={strategy}", f"selection_ratio={ratio}", "num_action_samples=4",
            "batch_size=8", "eval_batch_size=64", "lr=5e-4", "warmup_steps=0", "generation.temperature=1.0",
            *budget_overrides(args)]


def write_strict_haikus(args) -> None:
    """<out>/data/{train,test}.csv: the rows of haiku_test.csv that are strict 5-7-5 haikus with all
    their keywords, with the source's columns; 10% of the keyword sets (seeded, fixed) go to test."""
    from task_rules import is_strict_haiku
    from preference_datasets import _haiku_keywords  # the loader's own keyword parsing
    directory = haiku_data_dir(args)
    if os.path.exists(os.path.join(directory, "test.csv")):
        return
    source = data_file(args, "haikus")
    with open(source, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames or [], list(reader)
    if not {"text", "keywords"} <= set(columns):
        sys.exit(f"error: {source}: expected the statworx/haiku columns text and keywords, found {columns}")
    strict = [r for r in rows if is_strict_haiku(r["text"], _haiku_keywords(r["keywords"]))]
    keyword_sets = sorted({" ".join(_haiku_keywords(r["keywords"])) for r in strict})
    random.Random("bench-haiku-split").shuffle(keyword_sets)
    test_sets = set(keyword_sets[:max(1, len(keyword_sets) // 10)])
    os.makedirs(directory, exist_ok=True)
    for split in ("train", "test"):
        keep = [r for r in strict if (" ".join(_haiku_keywords(r["keywords"])) in test_sets) == (split == "test")]
        with open(os.path.join(directory, f"{split}.csv.tmp"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(keep)
        print(f"haikus: {len(keep)} strict rows -> {directory}/{split}.csv")
    for split in ("train", "test"):  # test.csv last: its presence marks the data as complete
        os.replace(os.path.join(directory, f"{split}.csv.tmp"), os.path.join(directory, f"{split}.csv"))
    print(f"haikus: {len(strict)} of {len(rows)} rows are strict 5-7-5 haikus with their keywords")


def hh_common(args) -> List[str]:
    # SmolLM2-135M-Instruct + LoRA: the tiny model learns nothing on hh that transfers (section 3 of RESULTS)
    return ["model=smollm2-135m", "lora=true", "datasets=[hh]", f"dataset_files.hh={data_file(args, 'hh')}",
            "pretrain_fraction=0.3", "optimizer=AdamW", "max_length=160", "max_prompt_length=96", "eval_batch_size=16"]


def hh_sft(args) -> List[str]:
    return [*hh_common(args), "loss=sft", "lr=5e-4", "warmup_steps=4", "batch_size=8",
            f"n_examples={args.sft_examples}", f"eval_every={args.sft_examples}", f"n_eval_examples={args.n_eval}"]


def hh_dpo(args, strategy: str) -> List[str]:
    return [*hh_common(args), "loss=dpo", "loss.beta=0.1", "active=true", f"selection_strategy={strategy}",
            "selection_ratio=3", "batch_size=8", "lr=1e-3", "warmup_steps=2", *budget_overrides(args)]


TASK_SPECS = {
    "jeopardy": Task("jeopardy", ["uniform", "ae", "us", "gradnorm", "length", "headroom"],
                     ["jeopardy/wrong_rate", "jeopardy/abstain_rate", "jeopardy/correct_rate", "rewards_eval/accuracies",
                      "loss/eval"],
                     jeopardy_dpo),
    "jeopardy-online": Task("jeopardy-online", ["uniref", "borda"],
                            ["jeopardy/wrong_rate", "jeopardy/abstain_rate", "jeopardy/correct_rate", "win_rate/win_rate"],
                            jeopardy_online_dpo),
    "haikus": Task("haikus", ["uniref", "borda"],
                   ["haiku/strict_valid_rate", "haiku/three_line_rate", "haiku/mean_syllable_distance",
                    "haiku/keyword_inclusion_rate", "win_rate/win_rate"],
                   haiku_dpo, sft=haiku_sft, prepare=write_strict_haikus),
    "hh": Task("hh", ["uniform", "ae", "us", "gradnorm", "length"], ["rewards_eval/accuracies", "loss/eval"],
               hh_dpo, sft=hh_sft),
}


# ---------------------------------------------------------------------------------------------
# Runs: find, launch, resume, prune
# ---------------------------------------------------------------------------------------------

def run_dirs(base: str, exp_name: str) -> List[str]:
    """Directories train.py made for `exp_name` under `base` (<exp_name>_<YYYY-MM-DD>_...), oldest first."""
    if not os.path.isdir(base):
        return []
    pattern = re.compile(re.escape(exp_name) + r"_\d{4}-\d\d-\d\d_")
    return sorted(os.path.join(base, d) for d in os.listdir(base) if pattern.match(d))


def finished(base: str, exp_name: str) -> Optional[str]:
    done = [d for d in run_dirs(base, exp_name) if os.path.exists(os.path.join(d, "summary.json"))]
    return done[-1] if done else None


def prune(run_dir: str, keep_final_weights: bool) -> None:
    """Reduce a finished run to KEEP_FILES (checkpoints, ledgers, samples are deleted). With
    keep_final_weights (an SFT stage) LATEST and its step's weights and tokenizer stay too (what
    `model.archive` reads), without the optimizer state."""
    latest = os.path.realpath(os.path.join(run_dir, "LATEST")) if keep_final_weights else None
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name in KEEP_FILES:
            continue
        if latest is not None and (name == "LATEST" or os.path.realpath(path) == latest):
            state = os.path.join(latest, "training_state.pt")
            if os.path.exists(state):
                os.remove(state)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


class Runner:
    """Launches train.py runs one at a time, with their output in <out>/logs/<exp_name>.log."""

    def __init__(self, args):
        self.args = args
        self.env = {**os.environ, **{k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}}
        if args.threads:
            self.env["OMP_NUM_THREADS"] = self.env["MKL_NUM_THREADS"] = str(args.threads)
        self.log_dir = os.path.join(os.path.abspath(args.out), "logs")

    def ensure(self, base: str, exp_name: str, overrides: List[str], keep_final_weights: bool = False) -> Optional[str]:
        """The finished run directory of `exp_name` under `base`: reused, resumed or trained now.
        None in --dry-run when the run would have to be trained."""
        done = finished(base, exp_name)
        if done:
            print(f"[skip] {exp_name}: finished in {os.path.relpath(done)}")
            return done
        partial = run_dirs(base, exp_name)
        resumable = [d for d in partial if os.path.isdir(os.path.join(d, "LATEST"))]
        if resumable:
            command = [sys.executable, "-u", "train.py", f"resume={resumable[-1]}"]
        else:
            command = [sys.executable, "-u", "train.py", *overrides, f"exp_name={exp_name}", f"local_dirs=[{base}]",
                       "wandb.enabled=false"]
        if self.args.dry_run:
            print(" ".join(command))
            return None
        for stale in partial if not resumable else []:
            print(f"[clean] {os.path.relpath(stale)}: interrupted before its first checkpoint; starting again")
            shutil.rmtree(stale)
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{exp_name}.log")
        print(f"[run] {exp_name} ({'resume' if resumable else 'new'}; log {os.path.relpath(log_path)})", flush=True)
        start = time.time()
        with open(log_path, "a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            rc = subprocess.call(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        done = finished(base, exp_name)
        if rc != 0 or done is None:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            sys.exit(f"{exp_name} failed (exit code {rc}); last lines of {log_path}:\n{tail}")
        print(f"[done] {exp_name} in {time.time() - start:.0f} s", flush=True)
        if not self.args.keep_checkpoints:
            prune(done, keep_final_weights)
        return done


def parse_spec(spec: str):
    """'strategy[/estimator][@key=value,...]' -> (strategy, estimator or '', ['key=value', ...]): e.g.
    'uniform@lr=5e-4' (uniform at another learning rate), 'ae/laplace@laplace_prior=fixed'."""
    name, _, settings = spec.partition("@")
    strategy, _, estimator = name.partition("/")
    extra = [item for item in settings.split(",") if item]
    bad = [item for item in extra if "=" not in item]
    if bad:
        sys.exit(f"error: strategy {spec}: expected key=value after '@', got {bad[0]!r}")
    return strategy, estimator, extra


def spec_slug(spec: str) -> str:
    """A spec as a run-name part: 'ae/laplace@lr=5e-4' -> 'ae-laplace_lr5e-4'."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", spec.replace("/", "-").replace("@", "_").replace(",", "_"))


def compared_metrics(task: Task, n_samples: int) -> List[str]:
    """The task's metrics that its runs log: without held-out answers (--n-samples 0) only the held-out
    pair metrics exist. Empty: let compare_runs take every eval metric the runs share."""
    return [m for m in task.metrics if n_samples or m.startswith(("rewards_eval/", "loss/"))]


def run_task(task: Task, args) -> None:
    out = os.path.abspath(args.out)
    runs, sft_base = os.path.join(out, "runs"), os.path.join(out, "sft")
    runner = Runner(args)
    start = time.time()
    if task.prepare is not None and not args.dry_run:
        task.prepare(args)
    strategies = args.strategies or task.strategies
    archive = None
    if task.sft is not None:
        archive = runner.ensure(sft_base, f"{task.name}_sft", task.sft(args), keep_final_weights=True)
    for seed in args.seeds:
        for spec in strategies:
            strategy, estimator, extra = parse_spec(spec)
            overrides = [*task.dpo(args, strategy), *([f"uncertainty_method={estimator}"] if estimator else []),
                         *extra, f"seed={seed}", *args.set]
            if task.sft is not None:
                overrides.append(f"model.archive={archive or '<SFT run directory>'}")
            runner.ensure(runs, f"{task.name}_{spec_slug(spec)}_s{seed}", overrides)
    if args.dry_run:
        return
    print(f"{task.name}: all runs finished; {time.time() - start:.0f} s in this invocation")
    metrics = compared_metrics(task, args.n_samples)
    compare = [sys.executable, os.path.join(ROOT, "scripts", "compare_runs.py"), runs, "--out", out,
               "--baseline", args.baseline or strategies[0], *(["--metrics", ",".join(metrics)] if metrics else [])]
    print("$ " + " ".join(compare), flush=True)
    if subprocess.call(compare, cwd=ROOT) != 0:
        sys.exit(f"{task.name}: compare_runs failed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=[*TASKS, "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--strategies", nargs="+", help="strategies to run, the baseline first, each optionally with "
                        "its estimator and train.py overrides: e.g. uniform@lr=5e-4 ae/laplace gradnorm length "
                        "ae/laplace@laplace_prior=fixed (default: the task's)")
    parser.add_argument("--baseline", help="the strategy the others are compared with, as compare_runs names it, "
                        "e.g. uniform@lr=0.0005 (default: the first of --strategies)")
    parser.add_argument("--split", choices=JEOPARDY_SPLITS, default="all",
                        help="jeopardy: which shows of the clues file to use: all, or the dev / validation half "
                             "(by a fixed hash of show_number; tune on dev, report on validation once)")
    parser.add_argument("--labels", type=int, help="label budget of each preference run (default: per task and device)")
    parser.add_argument("--evals", type=int, help="evaluations after the first one (eval_every = labels / evals)")
    parser.add_argument("--n-eval", type=int, help="held-out pairs scored at each eval (n_eval_examples)")
    parser.add_argument("--n-samples", type=int, help="held-out prompts answered greedily at each eval (n_eval_model_samples)")
    parser.add_argument("--sft-examples", type=int, help="examples seen by the SFT stage (haikus, hh)")
    parser.add_argument("--out", required=True, help="results directory of the task (with --task all: their parent)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="which defaults to use")
    parser.add_argument("--data-dir", default="../shared/data",
                        help="folder holding jeopardy_clues.json (J! Archive JSON), haiku_test.csv (statworx/haiku) "
                             "and hh_sample.jsonl (HH-RLHF rows); default ../shared/data")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra train.py override for every preference run (repeatable), e.g. --set lr=1e-4")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (OMP_NUM_THREADS; default 1 with --device cpu: on a shared "
                             "machine, torch's spinning OpenMP threads are ~3x slower than one thread)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="do not delete finished runs' checkpoints")
    parser.add_argument("--dry-run", action="store_true", help="print the train.py commands still to run, run nothing")
    args = parser.parse_args(argv)
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    sys.path.insert(0, ROOT)
    tasks = TASKS if args.task == "all" else (args.task,)
    missing = list(dict.fromkeys(DATA_FILES[name] for name in tasks if not os.path.isfile(data_file(args, name))))
    if missing and not args.dry_run:
        parser.error(f"--data-dir {args.data_dir}: {', '.join(missing)} not found")
    for name in tasks:
        task_args = argparse.Namespace(**vars(args))
        if args.task == "all":
            task_args.out = os.path.join(args.out, name)
        for key, value in DEFAULTS[args.device][name].items():
            if getattr(task_args, key) is None:
                setattr(task_args, key, value)
        if task_args.labels < 1 or task_args.evals < 1:
            parser.error("--labels and --evals must be positive")
        print(f"== {name}: seeds {args.seeds}, {task_args.labels} labels per run, out {task_args.out}", flush=True)
        run_task(TASK_SPECS[name], task_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
