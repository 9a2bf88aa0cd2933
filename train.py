"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|dpo exp_name=... [active/online flags]`.

The pipeline: check the config and the data (one-line errors, before any model loads), build the
judges, the models (models.py), the batch source (data_selection.py) and the evaluator
(evaluation.py), then run the trainer (trainers.py).
"""
import os
import sys
import time
from typing import Dict, List, Sequence

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

import distributed
import utils
from utils import ConfigError, UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
LOSSES = ("sft", "dpo", "ipo")


# ----------------------------------------------------------------------------------------------
# Config checks

def check_config(config: DictConfig) -> None:
    """Raise ConfigError (one line, naming the key and the allowed values) for a config that cannot run."""
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"required key {missing[0]} is missing: set it on the command line, e.g. {missing[0]}=...")
    if config.loss.name not in LOSSES:
        raise ConfigError(f"loss={config.loss.name} is unknown; allowed: {', '.join(LOSSES)}")
    if config.active and config.online:
        raise ConfigError("active=true and online=true are exclusive: choose offline (active) or online selection")
    if config.loss.name == "sft" and (config.active or config.online):
        raise ConfigError("loss=sft cannot be combined with active=true or online=true; use loss=dpo (or ipo)")
    if config.active or config.online:
        from strategies import STRATEGIES, strategy_names
        from scoring import ESTIMATORS, MONTE_CARLO_ESTIMATORS
        mode = "online" if config.online else "offline"
        allowed = strategy_names(mode)
        if config.selection_strategy is None:
            config.selection_strategy = allowed[0]
        if config.selection_strategy not in allowed:
            flag = "online=true" if config.online else "active=true"
            raise ConfigError(f"selection_strategy={config.selection_strategy} is not allowed with {flag}; allowed: {', '.join(allowed)}")
        strategy = STRATEGIES[config.selection_strategy]
        if not isinstance(config.selection_ratio, int) or config.selection_ratio < 1:
            raise ConfigError(f"selection_ratio={config.selection_ratio} must be an integer >= 1")
        if strategy.ratio_one and config.selection_ratio != 1:
            raise ConfigError(f"selection_strategy={config.selection_strategy} requires selection_ratio=1 (got {config.selection_ratio})")
        if config.uncertainty_method not in ESTIMATORS:
            raise ConfigError(f"uncertainty_method={config.uncertainty_method} is unknown; allowed: {', '.join(ESTIMATORS)}")
        if strategy.needs_spread and config.uncertainty_method in MONTE_CARLO_ESTIMATORS and int(config.mc_samples) < 2:
            raise ConfigError(f"mc_samples={config.mc_samples} must be >= 2 to estimate a variance")
    elif config.selection_strategy is not None:
        raise ConfigError(f"selection_strategy={config.selection_strategy} needs active=true (offline) or online=true")
    if config.online_loss not in ("dpo", "sft_winner"):
        raise ConfigError(f"online_loss={config.online_loss} is unknown; allowed: dpo, sft_winner")
    for key in ("seed", "split_seed"):
        if isinstance(config[key], bool) or not isinstance(config[key], int):
            raise ConfigError(f"{key}={config[key]} must be an integer")
    if not 0.0 <= float(config.pretrain_fraction) < 1.0:
        raise ConfigError(f"pretrain_fraction={config.pretrain_fraction} must be in [0, 1)")
    from scoring import LAPLACE_PRIORS, laplace_prior_rule
    config.laplace_prior = laplace_prior_rule(config)   # the run's config.yaml records the rule's choice
    if config.laplace_prior not in LAPLACE_PRIORS:
        raise ConfigError(f"laplace_prior={config.laplace_prior} is unknown; allowed: {', '.join(LAPLACE_PRIORS)}")
    if not float(config.laplace_prior_std) > 0:
        raise ConfigError(f"laplace_prior_std={config.laplace_prior_std} must be > 0 (the prior std of the laplace estimator)")
    if not 0.0 <= float(config.llm_dropout) < 1.0:
        raise ConfigError(f"llm_dropout={config.llm_dropout} must be in [0, 1)")
    if not isinstance(getattr(torch.optim, str(config.optimizer), None), type):
        raise ConfigError(f"optimizer={config.optimizer} is not a torch.optim class (e.g. RMSprop, Adam, AdamW, SGD)")
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "max_length", "max_prompt_length"):
        if int(config[key]) < 1:
            raise ConfigError(f"{key}={config[key]} must be a positive integer")
    if config.gradient_accumulation_steps > config.batch_size:
        raise ConfigError(f"gradient_accumulation_steps={config.gradient_accumulation_steps} exceeds batch_size={config.batch_size}")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length={config.max_prompt_length} must be smaller than max_length={config.max_length}")
    if config.n_examples is not None and int(config.n_examples) < 1:
        raise ConfigError(f"n_examples={config.n_examples} must be a positive integer or null")
    if not config.datasets:
        raise ConfigError("datasets is empty; e.g. datasets=[hh] or datasets=[path/to/pairs.jsonl]")
    from preference_datasets import DATASET_NAMES
    for name in config.datasets:
        if name not in DATASET_NAMES and not str(name).endswith((".jsonl", ".json")):
            raise ConfigError(f"datasets: {name} is neither a known dataset ({', '.join(DATASET_NAMES)}) nor a .jsonl/.json file")
    if "haikus" in config.datasets and not config.online and config.loss.name != "sft":
        raise ConfigError("datasets=[haikus] has no preference pairs: use it with loss=sft or online=true")
    if config.trainer != "BasicTrainer":
        raise ConfigError(f"trainer={config.trainer} is unknown; allowed: BasicTrainer")
    if config.lora and config.qlora:
        raise ConfigError("lora=true and qlora=true are exclusive (qlora already adds LoRA adapters)")
    fsdp = distributed.launched() and config.distributed.strategy == "fsdp"
    if config.model.policy_dtype in ("bfloat16", "float16") and not (config.lora or config.qlora or fsdp):
        raise ConfigError(f"model.policy_dtype={config.model.policy_dtype} with a full fine-tune keeps no fp32 master weights "
                          f"(at lr={config.lr} most updates round away): use lora=true, model.policy_dtype=float32, or "
                          "torchrun with distributed.strategy=fsdp (fp32 weights, half-precision compute)")
    top_k = config.generation.top_k
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ConfigError(f"generation.top_k={top_k} must be an integer >= 0 (0 = off)")
    if config.generation.backend not in ("hf", "vllm"):
        raise ConfigError(f"generation.backend={config.generation.backend} is unknown; allowed: hf, vllm")
    if config.generation.backend == "vllm":
        if not config.online:
            raise ConfigError("generation.backend=vllm samples the online loop's candidates: set online=true (eval answers use hf)")
        if not config.lora or config.qlora:
            raise ConfigError("generation.backend=vllm needs lora=true: the server holds the base and loads the policy's "
                              "adapter each step (full fine-tunes and qlora's 4-bit base cannot be synced to it)")
        if not float(config.generation.vllm.logprob_tolerance) > 0:
            raise ConfigError(f"generation.vllm.logprob_tolerance={config.generation.vllm.logprob_tolerance} must be > 0")
    if int(config.generation.prompts_per_call) < 1:
        raise ConfigError(f"generation.prompts_per_call={config.generation.prompts_per_call} must be a positive integer")
    distributed.check_config(config)


def check_model_preset(argv: List[str]) -> None:
    """Hydra's own message for an unknown preset is a page long; say it in one line first."""
    for arg in argv:
        if arg.startswith("model="):
            name = arg.split("=", 1)[1]
            available = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONFIG_DIR, "model")))
            if name not in available:
                raise ConfigError(f"model={name} is not a preset; available: {', '.join(available)} "
                                  "(or model=blank_model model.name_or_path=ORG/NAME)")


# ----------------------------------------------------------------------------------------------
# The run: pre-flight checks, run directory, wiring

# What a resumed run may change: how long its ranks wait (a slow judge or filesystem), nothing it computes
RESUME_OVERRIDES = ("distributed.timeout_s", "distributed.startup_timeout_s", "distributed.checkpoint_timeout_s",
                    "distributed.oracle_timeout_s")


def resume_config(run_dir: str, overrides: Sequence[str] = ()) -> DictConfig:
    """`resume=RUN_DIR` continues with the run's own saved config; of the command line's other
    overrides only RESUME_OVERRIDES apply, and any other is refused in one line."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"resume={run_dir}: no config.yaml there (expected a run directory made by train.py)")
    config = OmegaConf.load(path)
    config.resume = run_dir
    if "split_seed" not in config:  # runs from before split_seed split their data by seed
        config.split_seed = config.seed
        config.allow_archive_overlap = False
    if "distributed" not in config:  # runs from before torchrun support: one process, one generate() per pool
        config.distributed = {"strategy": None, "timeout_s": 1800}
        config.generation.prompts_per_call = 1_000_000
    for phase, seconds in (("startup", 3600), ("checkpoint", 1800), ("oracle", 7200)):   # runs from before phase limits
        config.distributed.setdefault(f"{phase}_timeout_s", seconds)
    for key in ("fsdp_compute_dtype", "backend"):   # runs from before these keys: their defaults
        config.distributed.setdefault(key, None)
    if "backend" not in config.generation:  # runs from before the vLLM backend
        config.generation.backend = "hf"
    config.generation.setdefault("keep_states", True)   # runs from before the sampling states were kept
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "resume":
            continue
        if key not in RESUME_OVERRIDES:
            raise ConfigError(f"resume={run_dir} continues with the run's saved config; {key} cannot be changed "
                              f"(allowed on resume: {', '.join(RESUME_OVERRIDES)})")
        OmegaConf.update(config, key, yaml.safe_load(value))
    return config


def make_run_dir(config: DictConfig) -> str:
    """The run directory: made by rank 0 alone and shared with the other ranks."""
    path = _make_run_dir(config) if distributed.is_main() else None
    return distributed.broadcast(path)


def _make_run_dir(config: DictConfig) -> str:
    if config.resume:
        if not os.path.isdir(os.path.join(config.resume, "LATEST")):
            raise ConfigError(f"resume={config.resume} has no LATEST checkpoint to continue from")
        return config.resume
    for base in config.local_dirs:
        try:
            os.makedirs(base, exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK):
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{time.time_ns() % 1_000_000:06d}"
            path = os.path.join(base, f"{config.exp_name}_{stamp}")
            os.makedirs(path)
            return path
    raise ConfigError(f"local_dirs={list(config.local_dirs)}: none is writable")


def check_archive_data(config: DictConfig, data) -> None:
    """A run that starts from `model.archive` must not evaluate on prompts the archive trained on, and,
    when it splits off an SFT share (pretrain_fraction > 0), must not select from prompts its SFT
    stage trained on. The archive's own saved config says what it trained on (archives from before
    split_seed existed split by their seed). One line naming both settings, unless
    allow_archive_overlap=true."""
    from data_selection import prompt_subset
    from models import archive_directory
    from preference_datasets import load_datasets, trained_prompts
    if not config.model.archive or config.allow_archive_overlap:
        return
    path = os.path.join(archive_directory(config.model.archive), "config.yaml")
    if not os.path.exists(path):
        return  # a bare policy.pt from elsewhere: nothing says what it saw
    stage = OmegaConf.load(path)
    missing = [key for key in ("datasets", "dataset_files", "pretrain_fraction", "loss", "online") if key not in stage]
    if missing:
        raise ConfigError(f"model.archive={config.model.archive}: its config.yaml ({path}) lacks {', '.join(missing)}, so what "
                          "it trained on is unknown; set allow_archive_overlap=true to start from it anyway")
    stage_split_seed = int(stage.get("split_seed", stage.get("seed", 0)))
    try:
        stage_data = load_datasets(list(stage.datasets), "train", seed=int(stage.seed), split_seed=stage_split_seed,
                                   data_files=dict(stage.dataset_files), cache_dir=config.cache_dir, silent=True)
        seen = trained_prompts(stage_data, split_seed=stage_split_seed, prompt_subset=prompt_subset(stage),
                               pretrain_fraction=float(stage.pretrain_fraction))
    except UserError as e:
        raise ConfigError(f"model.archive={config.model.archive}: cannot read the data it was trained on to check for "
                          f"overlap ({e}); set allow_archive_overlap=true to skip the check") from e
    test = {prompt for _, split in data["test"] for prompt in split}
    pool = set()
    if float(config.pretrain_fraction) > 0 and not config.online and stage.loss.name == "sft":
        pool = trained_prompts(data["train"], split_seed=int(config.split_seed), prompt_subset="pool",
                               pretrain_fraction=float(config.pretrain_fraction))
    if seen & test or seen & pool:
        raise ConfigError(
            f"model.archive={config.model.archive}: its training prompts include {len(seen & pool)} of this run's "
            f"{len(pool)} pool prompts and {len(seen & test)} of its {len(test)} test prompts (archive: split_seed={stage_split_seed}, "
            f"pretrain_fraction={stage.pretrain_fraction}, loss={stage.loss.name}; this run: split_seed={config.split_seed}, "
            f"pretrain_fraction={config.pretrain_fraction}); use the SFT stage's split_seed and pretrain_fraction "
            "(and loss=sft there with the same pretrain_fraction), or set allow_archive_overlap=true")


def check_unlabelled_data(config: DictConfig, data) -> bool:
    """Whether the run buys the labels of an unlabelled pool (user files with response_a/response_b,
    used with active=true); one line for the runs that cannot use such a file."""
    from preference_datasets import unlabelled_files
    files = unlabelled_files(data["train"])
    if not files or config.online:
        return False
    what = f"datasets: {files[0]} holds pairs without a preference (response_a, response_b)"
    if config.loss.name == "sft":
        raise ConfigError(f"{what}, and loss=sft needs preferred responses to train on")
    if not config.active:
        raise ConfigError(f"{what}: buy the labels of the pairs a strategy selects with active=true and an oracle "
                          "(e.g. oracle=reward_model oracle.model=...)")
    from strategies import STRATEGIES
    if STRATEGIES[config.selection_strategy].uses_labels:
        raise ConfigError(f"{what}: selection_strategy={config.selection_strategy} reads labels, and this pool has none")
    return True


def build_judges(config: DictConfig, needs_oracle: bool):
    """(training oracle, eval judge), built before any model loads so that a missing API key or a bad
    oracle setting fails in one line first. The training oracle labels online pairs and unlabelled
    pools (needs_oracle). The eval judge is `eval_oracle` (a name or a mapping of oracle keys), else
    the training oracle, else none."""
    from oracles.build import build_oracle
    name, seed = config.datasets[0], int(config.seed)
    oracle = build_oracle(config.oracle, name, seed) if needs_oracle else None
    if config.eval_oracle is None or config.loss.name == "sft":
        # people label training pairs; they are not asked for the win rate of every eval
        return oracle, (oracle if config.loss.name != "sft" and not (oracle and oracle.pauses_run) else None)
    spec = {"name": config.eval_oracle} if isinstance(config.eval_oracle, str) else config.eval_oracle
    return oracle, build_oracle(spec, name, seed)


def main_with(config: DictConfig) -> Dict:
    """Everything after Hydra has composed the config; returns the run summary."""
    check_config(config)
    from data_selection import build_source, load_run_data
    from evaluation import build_evaluator
    from models import build_models
    from scoring import response_logps
    from trainers import BasicTrainer

    data = load_run_data(config)
    unlabelled = check_unlabelled_data(config, data)
    oracle, judge = build_judges(config, needs_oracle=bool(config.online or unlabelled))
    check_archive_data(config, data)
    device = distributed.setup(config)
    utils.set_seed(int(config.seed))
    run_dir = make_run_dir(config)
    if not config.resume and distributed.is_main():
        utils.atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(config, resolve=True))
    for judging in {oracle, judge} - {None}:
        judging.open(run_dir)
    latest = os.path.realpath(os.path.join(run_dir, "LATEST")) if config.resume else None
    tokenizer, policy, reference = build_models(config, device, data["train"], trained_weights=latest)
    forward = distributed.prepare(policy, config, device, response_logps)
    logger = utils.RunLogger(config, run_dir, enabled=distributed.is_main())
    source = build_source(config, data, policy, reference, tokenizer, device, run_dir, oracle)
    evaluator = build_evaluator(config, data, tokenizer, device, reference, run_dir, judge)
    trainer = BasicTrainer(policy, reference, tokenizer, config, run_dir, source, evaluator, logger, device, forward)
    if latest:
        trainer.load_training_state(latest)
    print(f"run directory: {run_dir}" + (f" ({distributed.world_size()} processes, {distributed.strategy(config)})"
                                          if distributed.world_size() > 1 else ""))
    summary = trainer.train()
    logger.finish()
    print_summary(summary)
    distributed.barrier()   # every rank leaves together (then without interpreter finalisation: see main)
    return summary


def print_summary(summary: Dict) -> None:
    first, final = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    print("\n==== summary ====")
    print(f"steps {summary['steps']}, labels/examples {summary['labels']}, time {summary['train_time_s']} s")
    for key in sorted(final):
        if key in first and isinstance(final[key], (int, float)):
            print(f"  {key:32s} before {first[key]:10.4f}   after {final[key]:10.4f}")
    if "selection_split_half_spearman" in summary:
        print(f"selection reproducibility (mean split-half Spearman of the acquisition ranking): "
              f"{summary['selection_split_half_spearman']:.3f}")
    print(f"checkpoint: {summary['checkpoint']}")


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    code = 0
    try:
        if config.resume:
            from hydra.core.hydra_config import HydraConfig
            config = resume_config(config.resume, HydraConfig.get().overrides.task)
        main_with(config)
    except utils.RunPaused as e:
        print(f"paused: {e}", flush=True)
        code = utils.PAUSED_EXIT_CODE
    except UserError as e:
        print(f"error: {where()}{e}", file=sys.stderr)
        code = 2
    except Exception as e:
        if not distributed.launched():
            raise
        # one line per failing rank; torchrun then stops the other ranks (their collectives would wait)
        print(f"error: {where()}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        distributed.teardown()
    distributed.leave(code)
    if code:
        sys.exit(code)


def where() -> str:
    """'rank R of W: ' in a torchrun launch, else nothing."""
    return f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: " if distributed.launched() else ""


if __name__ == "__main__":
    try:
        check_model_preset(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
