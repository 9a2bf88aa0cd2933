"""The public command line: the seed commands parse, and bad configs fail in one line before any model loads."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, compose_config, tiny_overrides
from train import check_config, check_model_preset
from utils import ConfigError

SEED_COMMANDS = [
    "model=gpt2-large datasets=[hh] loss=dpo loss.beta=0.1 model.archive=sft_policy.pt exp_name=hh_borda_gpt2-large "
    "gradient_accumulation_steps=2 batch_size=32 eval_batch_size=16 trainer=BasicTrainer sample_during_eval=true "
    "online=true selection_strategy=borda",
    "model=gpt2-large datasets=[hh] loss=dpo loss.beta=0.1 model.archive=sft_policy.pt exp_name=hh_uniref_gpt2-large "
    "gradient_accumulation_steps=2 batch_size=32 eval_batch_size=16 trainer=BasicTrainer sample_during_eval=true "
    "online=true selection_ratio=1 selection_strategy=uniref",
    "model=gpt2-large datasets=[hh] loss=dpo loss.beta=0.1 model.archive=sft_policy exp_name=hh_ae_gpt2-large "
    "gradient_accumulation_steps=2 batch_size=32 eval_batch_size=16 trainer=BasicTrainer sample_during_eval=true "
    "pretrain_fraction=0.3 active=true qlora=true selection_strategy=ae",
    "model=gpt2-large datasets=[hh] loss=dpo loss.beta=0.1 model.archive=sft_policy exp_name=hh_us_gpt2-large "
    "gradient_accumulation_steps=2 batch_size=32 eval_batch_size=16 trainer=BasicTrainer sample_during_eval=true "
    "pretrain_fraction=0.3 active=true qlora=true selection_strategy=us",
    "model=pythia28 datasets=[hh] loss=sft exp_name=sft_pythia",
]


@pytest.mark.parametrize("command", SEED_COMMANDS)
def test_seed_commands_parse_and_pass_checks(command):
    config = compose_config(command.split())
    check_config(config)
    given = dict(arg.split("=", 1) for arg in command.split())
    # every setting typed on the command line is the one the run gets
    assert config.loss.name == given["loss"] and config.exp_name == given["exp_name"]
    assert config.model.name == given["model"] and list(config.datasets) == [given["datasets"].strip("[]")]
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "selection_ratio", "pretrain_fraction"):
        if key in given:
            assert str(config[key]) == given[key], key
    for key in ("online", "active", "qlora", "sample_during_eval"):
        assert config[key] is (given.get(key) == "true"), key
    assert config.selection_strategy == given.get("selection_strategy")
    if "model.archive" in given:
        assert config.model.archive == given["model.archive"] and config.loss.beta == float(given["loss.beta"])


def test_demo_preset_passes_checks():
    config = compose_config(["experiment=demo"])
    check_config(config)
    assert config.online and config.selection_strategy == "borda" and config.model.name == "smollm2-135m"


@pytest.mark.parametrize("overrides, needle", [
    (["loss=dpo", "active=true", "selection_strategy=bogus"], "selection_strategy=bogus is not allowed with active=true; allowed: uniform, us, ae"),
    (["loss=dpo", "online=true", "selection_strategy=ae"], "allowed: uniref, borda"),
    (["loss=dpo", "active=true", "selection_ratio=0"], "selection_ratio=0 must be an integer >= 1"),
    (["loss=dpo", "online=true", "selection_strategy=uniref", "selection_ratio=3"], "uniref requires selection_ratio=1"),
    (["loss=dpo", "active=true", "online=true"], "active=true and online=true are exclusive"),
    (["loss=sft", "active=true"], "loss=sft cannot be combined"),
    (["loss=dpo", "optimizer=Bogus"], "optimizer=Bogus is not a torch.optim class"),
    (["loss=dpo", "datasets=[nope]"], "datasets: nope is neither a known dataset"),
    (["loss=dpo", "datasets=[haikus]"], "has no preference pairs"),
    (["model=blank_model"], "required key model.name_or_path is missing"),
    (["loss=dpo", "split_seed=abc"], "split_seed=abc must be an integer"),
    (["loss=dpo", "laplace_prior_std=0"], "laplace_prior_std=0 must be > 0"),
    (["loss=dpo", "generation.top_k=null"], "generation.top_k=None must be an integer >= 0"),
    (["loss=dpo", "generation.top_k=-1"], "generation.top_k=-1 must be an integer >= 0"),
    (["loss=dpo", "active=true", "uncertainty_method=ensemble"],
     "uncertainty_method=ensemble is unknown; allowed: head, full, head_analytic, laplace"),
])
def test_config_errors_are_one_line(overrides, needle):
    overrides = overrides + ([] if any(o.startswith("exp_name") for o in overrides) else ["exp_name=x"])
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(overrides))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_exp_name_is_named():
    with pytest.raises(ConfigError, match="exp_name"):
        check_config(compose_config([]))


def test_unknown_model_preset_is_one_line():
    with pytest.raises(ConfigError, match="model=gpt5 is not a preset; available: .*tiny"):
        check_model_preset(["model=gpt5"])


def test_cli_prints_one_line_and_exits_2(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    result = subprocess.run([sys.executable, "train.py", "loss=sft", "active=true", "exp_name=x"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: loss=sft cannot be combined with active=true or online=true; use loss=dpo (or ipo)"]


def test_unreachable_hub_model_is_one_line(tmp_path):
    """Offline, a hub preset that is not cached ends in one line naming the key, not a library traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "train.py", "model=blank_model", f"model.name_or_path={tmp_path}/no_such_model",
                             "datasets=[tests/fixtures/user_pairs.jsonl]", "loss=sft", "exp_name=x",
                             f"local_dirs=[{tmp_path}/runs]", "wandb.enabled=false"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.name_or_path=") and "cannot load" in lines[0]


def test_paper_preset_restores_the_papers_estimator_in_one_override():
    default = compose_config(["exp_name=x"])
    assert (default.uncertainty_method, default.laplace_prior_std) == ("laplace", 0.25)
    paper = compose_config(["exp_name=x", "uncertainty=paper"])
    assert (paper.uncertainty_method, paper.mc_samples, paper.llm_dropout, paper.active_beta) == ("head", 5, 0.05, 2.0)
    assert compose_config(["exp_name=x", "uncertainty=paper_full"]).uncertainty_method == "full"
    # a key given on the command line still wins over the preset
    assert compose_config(["exp_name=x", "uncertainty=paper", "mc_samples=20"]).mc_samples == 20


@pytest.mark.parametrize("overrides, rule", [([], "unit_logit"), (["active=true", "selection_strategy=ae"], "unit_logit"),
                                             (["online=true", "selection_strategy=borda"], "fixed"),
                                             (["online=true", "selection_strategy=borda", "laplace_prior=evidence"], "evidence")])
def test_laplace_prior_null_resolves_by_mode_and_is_recorded(overrides, rule):
    """The run's config records the rule laplace used: Borda (online) keeps the fixed prior, whose spreads
    keep its preference probabilities unsaturated; an explicit choice wins."""
    config = compose_config(["exp_name=x", "loss=dpo", "datasets=[tests/fixtures/user_pairs.jsonl]", *overrides])
    assert config.laplace_prior is None or overrides[-1].startswith("laplace_prior")
    check_config(config)
    assert config.laplace_prior == rule
    from scoring import laplace_estimator
    assert laplace_estimator(config).prior == rule


def test_resume_takes_only_the_wait_limits_from_the_command_line(tmp_path):
    """A resumed run keeps its saved config; the limits of its waits may be raised (a slow judge), and any
    other override is refused in one line rather than silently ignored."""
    from omegaconf import OmegaConf
    from train import resume_config
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = compose_config(tiny_overrides(tmp_path, "loss=dpo", "exp_name=x"))
    OmegaConf.save(saved, run_dir / "config.yaml")
    config = resume_config(str(run_dir), [f"resume={run_dir}", "distributed.oracle_timeout_s=14400",
                                          "distributed.checkpoint_timeout_s=60.5"])
    assert config.distributed.oracle_timeout_s == 14400 and config.distributed.checkpoint_timeout_s == 60.5
    assert config.lr == saved.lr and config.resume == str(run_dir)
    with pytest.raises(ConfigError, match=r"lr cannot be changed \(allowed on resume: distributed.timeout_s, ") as err:
        resume_config(str(run_dir), [f"resume={run_dir}", "lr=1"])
    assert "\n" not in str(err.value)
