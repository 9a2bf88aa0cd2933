"""Checkpoint files: `step-N/` directories written atomically, the LATEST link, and strict loading.

A checkpoint holds the trained weights, `tokenizer/`, `training_state.pt` (optimizer, scheduler,
trainer counters, data position and selection state once, each rank's RNG) and `config.yaml`. The
weights are `adapter/` (PEFT format: the adapters only, never the frozen base) under LoRA, `policy.pt`
(full state dict) for a full fine-tune, or, for a full fine-tune sharded by FSDP, `sharded/`: the
weights and the optimizer as torch.distributed.checkpoint shards, each rank writing its own and any
world size (one process included) reading them. Everything loads with weights_only=True; weights of
another model fail in one line naming the first mismatching key.
"""
import contextlib
import os
import shutil
import warnings
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf

from utils import ConfigError, atomic_write_text

TRAINING_STATE = "training_state.pt"
SHARDED = "sharded"


def begin_checkpoint(run_dir: str, step: int) -> Optional[str]:
    """An empty temporary directory to write run_dir/step-{step}/ into, or None when that step is
    saved already (a resumed run reaching a step it had saved: the directory is kept as it is)."""
    if os.path.exists(os.path.join(run_dir, f"step-{step}")):
        return None
    tmp = os.path.join(run_dir, f".tmp-step-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def finish_checkpoint(run_dir: str, step: int, tmp: str, policy, tokenizer, training_state: Dict, config,
                      weights: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Complete `tmp` (from begin_checkpoint) as run_dir/step-{step}/ (rename) and point LATEST at it;
    returns its path. weights: the adapters' tensors when the module's own are sharded (LoRA under
    FSDP); None when its state dict is whole, or when `tmp` holds the weights as shards already."""
    name = f"step-{step}"
    final = os.path.join(run_dir, name)
    if not os.path.isdir(os.path.join(tmp, SHARDED)):
        save_policy(policy, tmp, weights)
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
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


def save_shards(state: Dict, directory: str) -> None:
    """Every rank writes its shards of `state` (nested dicts of tensors and DTensors) into
    directory/sharded/ (a collective)."""
    import torch.distributed.checkpoint as dcp
    with one_process_quiet():
        dcp.save(state, checkpoint_id=os.path.join(directory, SHARDED))


def load_shards(state: Dict, directory: str, alone: bool = False) -> None:
    """Fill `state` (allocated: this rank's shards, or whole tensors) in place from directory/sharded/,
    whatever world size wrote it; each rank reads only what it holds. A collective under torchrun,
    unless `alone` (one rank reading whole tensors by itself)."""
    import torch.distributed.checkpoint as dcp
    with one_process_quiet():
        dcp.load(state, checkpoint_id=os.path.join(directory, SHARDED), no_dist=alone)


@contextlib.contextmanager
def one_process_quiet():
    """Without DCP's warning that a process without a process group saves or loads alone (intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def saved_shapes(directory: str) -> Dict[str, torch.Size]:
    """The name and shape of every weight in a checkpoint's sharded/ (from its metadata; nothing loaded)."""
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(os.path.join(directory, SHARDED)).read_metadata().state_dict_metadata
    return {k[len("model."):]: v.size for k, v in metadata.items() if k.startswith("model.") and hasattr(v, "size")}


def read_weights(directory: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's trained weights by name, whole, without building a model: the adapters' tensors
    under LoRA, else the full state dict (policy.pt, or sharded/ read by this process alone)."""
    adapter = os.path.join(directory, "adapter", "adapter_model.safetensors")
    if os.path.exists(adapter):
        from safetensors.torch import load_file
        return load_file(adapter)
    if os.path.isdir(os.path.join(directory, SHARDED)):
        import tempfile
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        with tempfile.TemporaryDirectory() as tmp, one_process_quiet():
            dcp_to_torch_save(os.path.join(directory, SHARDED), os.path.join(tmp, "whole.pt"))
            return torch.load(os.path.join(tmp, "whole.pt"), weights_only=True)["model"]
    return torch.load(os.path.join(directory, "policy.pt"), map_location="cpu", weights_only=True)


def load_archive(model, directory: str) -> None:
    """Load a full fine-tune's weights strictly (policy.pt, or the shards of sharded/ read by this
    process alone), with one line naming what does not match."""
    path = os.path.join(directory, "policy.pt")
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        shapes = {k: v.shape for k, v in state.items()}
    elif os.path.isdir(os.path.join(directory, SHARDED)):
        path, state, shapes = os.path.join(directory, SHARDED), None, saved_shapes(directory)
    else:
        raise ConfigError(f"model.archive: {directory} holds no policy.pt (nor sharded/ weights)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [k for k in expected if k in shapes and shapes[k] != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: archive {tuple(shapes[k])} vs model {tuple(expected[k].shape)})")
        raise ConfigError(f"model.archive={path} does not match model={model.config.model_type}: " + "; ".join(parts))
    if state is None:
        load_shards({"model": expected}, directory, alone=True)   # into the parameters' own storage
    else:
        model.load_state_dict(state, strict=True)


def save_policy(policy, directory: str, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """policy.pt (full state dict) or adapter/ (PEFT adapter). `weights` replaces the module's own
    state dict (the adapters' whole tensors of a sharded policy); the files are the same."""
    if hasattr(policy, "peft_config"):
        policy.save_pretrained(os.path.join(directory, "adapter"), **({"state_dict": weights} if weights is not None else {}))
    else:
        torch.save(weights if weights is not None else policy.state_dict(), os.path.join(directory, "policy.pt"))


