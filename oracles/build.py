"""Construction of an oracle from the `oracle` config group (config/oracle/*.yaml)."""
from typing import Any, Dict, Mapping

from omegaconf import DictConfig, OmegaConf

from oracles.base import Oracle
from oracles.human import HumanOracle
from oracles.llm_judge import build_openai_judge
from oracles.reward_model import build_reward_model_oracle
from oracles.rules import HaikuJudge, JeopardyJudge
from utils import ConfigError, check_number


ORACLE_NAMES = ("openai", "haiku", "jeopardy", "reward_model", "human", "auto")


def _plain(cfg: Any, key: str) -> Dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"{key} must be a mapping of settings, got {cfg!r}")


def build_oracle(cfg: Any, dataset_name: str, seed: int) -> Oracle:
    """Oracle for config group `oracle` (keys in config/oracle/*.yaml). `auto` picks `haiku` for the
    dataset 'haikus', `jeopardy` for 'jeopardy' and `openai` otherwise. Raises ConfigError (one line,
    naming the key) for an unknown name, a bad value or a missing API key."""
    settings = _plain(cfg, "oracle")
    name = settings.get("name")
    if name not in ORACLE_NAMES:
        raise ConfigError(f"oracle.name must be one of {', '.join(ORACLE_NAMES)}; got {name!r}")
    check_number("oracle.max_queries", settings.get("max_queries"), 0, integer=True, allow_none=True)
    if name == "auto":
        name = {"haikus": "haiku", "jeopardy": "jeopardy"}.get(dataset_name, "openai")
    if name == "openai":
        return build_openai_judge(settings, "oracle", dataset_name, seed)
    if name == "reward_model":
        return build_reward_model_oracle(settings, seed)
    if name == "human":
        return HumanOracle()
    if name == "haiku":
        tb_cfg = settings.get("tie_breaker")
        tie_breaker = None
        if tb_cfg is not None:
            tb = _plain(tb_cfg, "oracle.tie_breaker")
            if tb.get("name", "openai") != "openai":
                raise ConfigError(f"oracle.tie_breaker.name must be openai (or absent); got {tb.get('name')!r}")
            tie_breaker = build_openai_judge(tb, "oracle.tie_breaker", "haikus", seed)
        return HaikuJudge(seed=seed, tie_breaker=tie_breaker)
    return JeopardyJudge()
