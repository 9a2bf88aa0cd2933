"""Checkpoint files: `step-N/` directories written atomically, the LATEST link, and strict loading.

A checkpoint holds `policy.pt` (full state dict) or `adapter/` (PEFT format), `tokenizer/`,
`training_state.pt` (optimizer, scheduler, trainer counters, RNG, data position) and `config.yaml`.
Everything loads with torch.load(weights_only=True); a state dict from another model fails in one
line naming the first mismatching key.
"""
import os
import shutil
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from utils import ConfigError, atomic_write_text

TRAINING_STATE = "training_state.pt"


def write_checkpoint(run_dir: str, step: int, policy, tokenizer, training_state: Dict, config,
                     weights: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write run_dir/step-{step}/ (temp dir, then rename) and point LATEST at it; returns its path.
    An existing step directory is kept as it is (a resumed run reaching a step it had saved).
    weights: the policy's full state dict when the module's own is sharded (FSDP), else None."""
    name = f"step-{step}"
    final = os.path.join(run_dir, name)
    if os.path.exists(final):
        return final
    tmp = os.path.join(run_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_policy(policy, tokenizer, tmp, weights)
    torch.save(training_state, os.path.join(tmp, TRAINING_STATE))
    atomic_write_text(os.path.join(tmp, "config.yaml"), OmegaConf.to_yaml(config, resolve=True))
    os.replace(tmp, final)
    link_tmp = os.path.join(run_dir, ".LATEST.tmp")
    if os.path.lexists(link_tmp):
        os.remove(link_tmp)
    os.symlink(name, link_tmp)
    os.replace(link_tmp, os.path.join(run_dir, "LATEST"))
    return final


def read_training_state(directory: str) -> Dict:
    return torch.load(os.path.join(directory, TRAINING_STATE), weights_only=True)


def load_trained_weights(policy, directory: str) -> None:
    """The trained weights of a checkpoint: the 'default' adapter under LoRA, else policy.pt (strict)."""
    adapter = os.path.join(directory, "adapter")
    if hasattr(policy, "peft_config"):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        result = set_peft_model_state_dict(policy, load_file(os.path.join(adapter, "adapter_model.safetensors")),
                                           adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(f"{adapter}: adapter does not match the model ({result.unexpected_keys[0]} unexpected)")
    else:
        load_archive(policy, directory)


def load_archive(model, directory: str) -> None:
    """Load policy.pt strictly, with one line naming what does not match."""
    path = os.path.join(directory, "policy.pt")
    if not os.path.exists(path):
        raise ConfigError(f"model.archive: {directory} holds no policy.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: archive {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})")
        raise ConfigError(f"model.archive={path} does not match model={model.config.model_type}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def save_policy(policy, tokenizer, directory: str, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """policy.pt (full state dict) or adapter/ (PEFT adapter), plus the tokenizer. `weights` replaces
    the module's own state dict (the gathered one of a sharded policy); the files are the same."""
    if hasattr(policy, "peft_config"):
        policy.save_pretrained(os.path.join(directory, "adapter"), **({"state_dict": weights} if weights is not None else {}))
    else:
        torch.save(weights if weights is not None else policy.state_dict(), os.path.join(directory, "policy.pt"))
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))


