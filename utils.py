"""Small helpers shared by every module: errors, seeding, run directories, atomic files, padding."""
import contextlib
import json
import os
import random
import shutil
import tempfile
from typing import Any, Dict, Iterable, List

import numpy as np
import torch


class UserError(Exception):
    """An error caused by the user's config or data. `train.py` prints it as one line and exits 2."""


class ConfigError(UserError):
    """A config key is missing or holds a value outside the allowed set."""


class DataError(UserError):
    """A data file is missing, unreadable or lacks the expected fields. The message names the file."""


class RunPaused(Exception):
    """The run stops on purpose, checkpointed, to be resumed later (a labelling round waits for people).
    `train.py` prints its message (what to do) in one line and exits with PAUSED_EXIT_CODE."""


PAUSED_EXIT_CODE = 3


def check_number(key: str, value: Any, minimum: float, integer: bool = False, allow_none: bool = False) -> None:
    """Raise ConfigError naming config key `key` unless `value` is a number (an int with `integer`;
    bools are not numbers here) >= `minimum`, or None where `allow_none`."""
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """Every RNG state a resumed run needs to continue bit-for-bit."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    # plain lists and tensors only, so checkpoints load with torch.load(weights_only=True)
    state = {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pad_to_length(tensor: torch.Tensor, length: int, pad_value: int, dim: int = -1) -> torch.Tensor:
    """Right-pad `tensor` along `dim` to `length` with `pad_value`."""
    if tensor.size(dim) >= length:
        return tensor
    pad_size = list(tensor.shape)
    pad_size[dim] = length - tensor.size(dim)
    return torch.cat([tensor, torch.full(pad_size, pad_value, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that a crash leaves either the old or the new file, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_directory(target: str):
    """Build a cache directory under a private temporary name and publish it with one rename.

    Yields the temporary path to write into. Several processes may build the same entry at once (two
    benchmark runs started together, torchrun ranks on several nodes); each writes its own copy, the first
    rename wins, and the others drop theirs, so no process ever reads a half-written directory."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.tmp-")
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    """Append one JSON line and fsync, so a record that was reported is on disk before we go on."""
    with open(path, "a") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def end_torn_line(path: str) -> None:
    """After a kill mid-write a JSONL file ends inside a record; without a newline the next record
    would be glued to that fragment and lost too."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Read a JSONL file written by `append_jsonl`; a torn last line (killed mid-write) is ignored."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def chunks(items: List[Any], size: int) -> Iterable[List[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class RunLogger:
    """wandb when enabled (offline into the run directory when there is no account), else nothing.
    Metrics always also go to <run_dir>/metrics.jsonl (written by the trainer)."""

    def __init__(self, config, run_dir: str, enabled: bool = True):
        """enabled=False: log nothing (the ranks other than 0 of a torchrun launch)."""
        self.run = None
        if not enabled or not config.wandb.enabled or config.debug:
            return
        import wandb
        from omegaconf import OmegaConf
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not os.environ.get("WANDB_API_KEY") and not _wandb_logged_in():
            mode = "offline"
            print("wandb: no WANDB_API_KEY or login found; logging offline to the run directory "
                  "(`wandb sync` uploads it later)")
        if mode == "disabled":
            return
        self.run = wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name,
                              dir=run_dir, mode=mode, config=OmegaConf.to_container(config, resolve=True))

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if not k.startswith("_")}, step=step)

    def table(self, name: str, columns: List[str], rows: List[List[Any]], step: int) -> None:
        if self.run is not None:
            import wandb
            self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _wandb_logged_in() -> bool:
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()
