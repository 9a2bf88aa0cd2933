"""Multi-process runs launched with torchrun: the process group, which rank does what, how the policy
is wrapped (DDP, or FSDP2 `fully_shard` on each transformer block), and the few collectives the
pipeline needs.

The design that keeps results independent of the world size: every rank runs the same batch source
with the same seeds, so every rank holds the same global batch, pool and selection; the work inside
a step is split, not the data stream. Scoring and generation shard their inputs across ranks and
gather the results (`sharded` / `gathered`); the training step trains each rank on its rows of the
global batch, weighted so that the averaged gradient is that of the global batch's mean loss. Only
rank 0 talks to the oracle, writes files and logs; what it decides is broadcast.

Under FSDP every rank must call the model the same number of times (each call all-gathers the
blocks' weights), so shards are padded to equal length with copies that are computed and dropped.
One process (no torchrun, or WORLD_SIZE=1) takes none of these paths.
"""
import contextlib
import datetime
import math
import os
import sys
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from utils import ConfigError

STRATEGIES = ("ddp", "fsdp")
# Waits on rank 0 alone, each with its own limit (distributed.<phase>_timeout_s): the other ranks wait
# on the rendezvous store, not in a collective, so a rank past the limit raises PhaseTimeout naming the
# phase on NCCL too (where a collective past its timeout is ended by NCCL's watchdog).
PHASES = ("startup", "checkpoint", "oracle")


class PhaseTimeout(RuntimeError):
    """A rank waited on rank 0 longer than the phase allows."""


def launched() -> bool:
    """Started by torchrun (or srun + torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def strategy(config) -> Optional[str]:
    """'ddp' or 'fsdp' in a multi-process run (ddp unless distributed.strategy says otherwise), None alone."""
    if world_size() == 1:
        return None
    return config.distributed.strategy or "ddp"


def in_lockstep() -> bool:
    """Whether every rank must make the same model calls: FSDP shards the blocks' weights, so each
    forward is a collective (and generate() needs synced_gpus)."""
    return _STATE["strategy"] == "fsdp"


_STATE: Dict[str, Any] = {"strategy": None, "store": None, "limits": {}, "waits": {}}


def setup(config) -> torch.device:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU, collectives that
    wait longer than distributed.timeout_s raise instead of hanging); return this rank's device.
    Ranks other than 0 write nothing to stdout (their progress and notes would repeat rank 0's)."""
    cuda = torch.cuda.is_available()
    if not launched():
        return torch.device("cuda" if cuda else "cpu")
    backend = config.distributed.backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("distributed.backend=nccl needs CUDA, and no GPU is visible; use gloo (or null) on CPU")
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if backend == "nccl" and local_world > torch.cuda.device_count():
        raise ConfigError(f"{local_world} ranks on this node and {torch.cuda.device_count()} GPU(s): NCCL needs one GPU "
                          "per rank; launch --nproc_per_node<=GPUs, or distributed.backend=gloo to share GPUs (slow, for checks)")
    # gloo may put several ranks on one GPU; it moves CUDA tensors through host memory
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(config.distributed.timeout_s)),
                                **({"device_id": device} if backend == "nccl" else {}))
    _STATE["strategy"] = strategy(config)
    _STATE["limits"] = {phase: float(config.distributed[f"{phase}_timeout_s"]) for phase in PHASES}
    _STATE["waits"] = dict.fromkeys(PHASES, 0)
    _STATE["store"] = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=max(_STATE["limits"].values())),
                                    wait_for_workers=False)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE.update(strategy=None, store=None)


def leave(code: int) -> None:
    """End a torchrun rank with exit status `code` after teardown, without the interpreter's
    finalisation: gloo's worker threads, still held by a wrapped model after destroy_process_group,
    aborted ranks there in about 1 run in 10 ("terminate called without an active exception").
    Returns (does nothing) outside torchrun."""
    if not launched():
        return
    teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_config(config) -> None:
    """One-line errors for distributed settings that cannot run."""
    name = config.distributed.strategy
    if name is not None and name not in STRATEGIES:
        raise ConfigError(f"distributed.strategy={name} is unknown; allowed: {', '.join(STRATEGIES)} (or null: ddp under torchrun)")
    if config.distributed.backend not in (None, "nccl", "gloo"):
        raise ConfigError(f"distributed.backend={config.distributed.backend} is unknown; allowed: nccl, gloo "
                          "(or null: nccl on CUDA, gloo on CPU)")
    dtype = config.distributed.fsdp_compute_dtype
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"distributed.fsdp_compute_dtype={dtype} is unknown; allowed: float32, bfloat16, float16 "
                          "(or null: bfloat16 on CUDA, the weights' dtype on CPU)")
    for key in ("timeout_s",) + tuple(f"{phase}_timeout_s" for phase in PHASES):
        if not float(config.distributed[key]) > 0:
            raise ConfigError(f"distributed.{key}={config.distributed[key]} must be > 0 (seconds)")
    if launched() and name == "fsdp" and config.qlora:
        raise ConfigError("qlora=true cannot be sharded with distributed.strategy=fsdp (4-bit weights are not "
                          "FSDP parameters); use distributed.strategy=ddp for QLoRA, or lora=true with fsdp")


# ----------------------------------------------------------------------------------------------
# Collectives on Python objects (small: scores, texts, verdicts, metrics)

def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> List:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device) -> bool:
    """Whether `flag` holds on any rank (a collective: every rank calls it), e.g. a row still sampling."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def after_main(phase: str) -> None:
    """Rank 0 says it is done with `phase`; the other ranks wait for that, at most the phase's limit,
    and raise PhaseTimeout past it. Every rank calls it once per occurrence of the phase."""
    if world_size() == 1:
        return
    _STATE["waits"][phase] += 1
    key = f"active-dpo/{phase}/{_STATE['waits'][phase]}"
    if is_main():
        _STATE["store"].set(key, "done")
        return
    limit = _STATE["limits"][phase]
    try:
        _STATE["store"].wait([key], datetime.timedelta(seconds=limit))
    except (RuntimeError, dist.DistError) as e:
        if "timeout" not in str(e).lower():
            raise
        raise PhaseTimeout(f"waited {limit:g} s for rank 0 in the {phase} phase (distributed.{phase}_timeout_s={limit:g}; "
                           f"raise it, also on resume=, if rank 0 is slow rather than gone)") from None


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. converting a model or training a tokenizer into the cache),
    the others after it (within distributed.startup_timeout_s), reading what it wrote."""
    if is_main():
        yield
        after_main("startup")
    else:
        after_main("startup")
        yield


def shard_bounds(n: int, index: Optional[int] = None, parts: Optional[int] = None) -> Tuple[int, int]:
    """[lo, hi) of part `index` (default: this rank) when n rows are split into `parts` (default: the
    world size) contiguous parts whose sizes differ by at most one."""
    index, parts = (rank() if index is None else index), (world_size() if parts is None else parts)
    return round(index * n / parts), round((index + 1) * n / parts)


def sharded(items: List) -> Tuple[List, int]:
    """This rank's contiguous share of `items` (ceil(n / world) of them), padded with copies of
    items[0] to the same length on every rank so that all ranks make the same model calls.
    Returns (share, how many of its items are real); the padding's results are dropped by `gathered`."""
    if world_size() == 1 or not items:
        return list(items), len(items)
    per = math.ceil(len(items) / world_size())
    share = list(items[rank() * per:(rank() + 1) * per])
    return share + [items[0]] * (per - len(share)), len(share)


def gathered(values: List) -> List:
    """The concatenation, in rank order, of every rank's list (the real part of its `sharded` share)."""
    if world_size() == 1:
        return list(values)
    return [v for part in gather(list(values)) for v in part]


def gathered_tensors(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every rank's CPU tensors of one key concatenated along the last dimension, in rank order."""
    if world_size() == 1:
        return values
    parts = gather(values)
    return {k: torch.cat([p[k] for p in parts], dim=-1) for k in values}


# ----------------------------------------------------------------------------------------------
# The policy under DDP or FSDP2

class SequenceLogps(torch.nn.Module):
    """The training forward (summed response log-probs, as scoring.response_logps) as one module call,
    so DDP's forward hooks see it and its gradients are all-reduced."""

    def __init__(self, model, logps: Callable):
        super().__init__()
        self.model, self.logps = model, logps

    def forward(self, input_ids, attention_mask, labels):
        return self.logps(self.model, input_ids, attention_mask, labels)


def transformer_blocks(model, block_name: Optional[str]) -> List[torch.nn.Module]:
    blocks = [m for m in model.modules() if type(m).__name__ == block_name] if block_name else []
    if not blocks:
        raise ConfigError(f"distributed.strategy=fsdp: model.block_name={block_name} matches no module of "
                          f"{type(model).__name__}; set model.block_name to its transformer block class")
    return blocks


def builds_on_meta() -> bool:
    """Under FSDP every rank but 0 builds the model on the meta device (no memory, no file reads):
    rank 0 alone loads the weights, and `shard_model` sends each rank its shards."""
    return in_lockstep() and not is_main()


def compute_dtype(config, device) -> Optional[torch.dtype]:
    """The dtype FSDP gathers the weights in and computes with: distributed.fsdp_compute_dtype, else
    bfloat16 on CUDA and the weights' own dtype (None) on CPU."""
    name = config.distributed.fsdp_compute_dtype
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else None


def shard_model(model, config, device) -> None:
    """FSDP2 on `model` (in place), as torch documents it: `fully_shard` on each transformer block, then
    on the root (embeddings, final norm, head), under one MixedPrecisionPolicy for the whole model
    (compute in `compute_dtype`, gradients reduced in fp32). Each rank allocates only its shards on
    its device; rank 0, which loaded the weights, fills them (set_model_state_dict from rank 0) and
    sends its buffers (rotary tables are not in the state dict) and its random state.

    Under LoRA the trainable adapters stay replicated (their gradients are averaged by
    `average_replicated_grads`): FSDP2 loses the gradients of a block that mixes frozen and trainable
    weights once a forward pass has run without grad (the eval before the first step).

    Scoring calls the trunk and the head directly rather than the model's forward; the root gathers
    its weights for them in `run_unsharded(fn, *args)`, registered as an FSDP forward method."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    full = root.state_dict() if is_main() else {}
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(config, device), reduce_dtype=torch.float32)
    ignored = {p for p in model.parameters() if p.requires_grad} if hasattr(model, "peft_config") else None
    for block in transformer_blocks(root, config.model.block_name):
        fully_shard(block, mp_policy=policy, ignored_params=ignored)
    fully_shard(root, mp_policy=policy, ignored_params=ignored)
    if is_main():
        model.to(device)
    else:
        model.to_empty(device=device)
    set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for _, buffer in root.named_buffers():
        dist.broadcast(buffer, src=0)
    # initialising the weights drew random numbers on rank 0 only (meta tensors draw none)
    torch.set_rng_state(broadcast(torch.get_rng_state()))
    if device.type == "cuda":
        torch.cuda.set_rng_state(broadcast(torch.cuda.get_rng_state().cpu()).to(torch.uint8))
    root.run_unsharded = types.MethodType(_run_unsharded, root)
    register_fsdp_forward_method(root, "run_unsharded")


def _run_unsharded(root, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def prepare(policy, config, device, logps: Callable) -> Callable:
    """The training forward for this run's strategy: (input_ids, attention_mask, labels) -> (B,) summed
    log-probs; under DDP the policy wrapped so that backward all-reduces its gradients (FSDP's
    sharding is done when the models are built, `shard_model`)."""
    if _STATE["strategy"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # every rank built the same weights from the same seed; buffers (rotary tables) never change
        return DistributedDataParallel(SequenceLogps(policy, logps), device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    return lambda input_ids, attention_mask, labels: logps(policy, input_ids, attention_mask, labels)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


@contextlib.contextmanager
def gradient_sync(forward, policy, enabled: bool):
    """Inside, backward passes accumulate gradients locally (enabled=False) or synchronise them: the
    microbatches of one step sync only on the last."""
    if _STATE["strategy"] == "ddp" and not enabled:
        with forward.no_sync():
            yield
        return
    if _STATE["strategy"] == "fsdp":
        for module in policy.modules():
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(enabled, recurse=False)
    yield


def average_replicated_grads(parameters: List[torch.nn.Parameter]) -> None:
    """FSDP2: the replicated (unsharded) trainable parameters' gradients averaged over the ranks in
    one all-reduce, as FSDP does for the sharded ones."""
    if _STATE["strategy"] != "fsdp":
        return
    grads = [p.grad for p in parameters if p.grad is not None and not _is_dtensor(p.grad)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm(parameters: List[torch.nn.Parameter], max_norm: float) -> float:
    """torch's clip_grad_norm_, also for a mix of sharded (DTensor) and replicated gradients; returns
    the total norm before clipping."""
    if _STATE["strategy"] != "fsdp":
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = [(g.float().norm() ** 2) for g in grads]
    total = math.sqrt(sum(float(s.full_tensor() if _is_dtensor(s) else s) for s in squares))
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for g in grads:
            g.mul_(coefficient)
    return total


def shards_checkpoints(policy) -> bool:
    """Whether checkpoints hold the weights and the optimizer as each rank's shards (torch.distributed.checkpoint):
    a full fine-tune under FSDP. Under LoRA the trainable adapters are replicated and the base is frozen,
    so rank 0 saves the adapters whole and nothing else of the model."""
    return _STATE["strategy"] == "fsdp" and not hasattr(policy, "peft_config")


def sharded_state(policy, optimizer, weights: bool = True) -> Dict:
    """This rank's shards of the weights (unless weights=False) and of the optimizer's state, by parameter
    name (views, no copies; allocated if the optimizer has not stepped yet), for checkpoints.save_shards
    and load_shards. Alone: the whole of both."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {**({"model": get_model_state_dict(policy)} if weights else {}),
            "optimizer": get_optimizer_state_dict(policy, optimizer)}


def set_sharded_optimizer(policy, optimizer, state: Dict) -> None:
    """Load `sharded_state`'s optimizer part, filled by checkpoints.load_shards, into the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=state["optimizer"])


def adapter_state(policy) -> Optional[Dict[str, torch.Tensor]]:
    """LoRA under FSDP: the adapters' weights, whole, on every rank (the trainable ones are replicated; a
    frozen one, e.g. an SFT reference adapter, is sharded and gathered here: a collective). The base is
    neither gathered nor saved. None otherwise: the module's own state dict is whole."""
    if _STATE["strategy"] != "fsdp" or not hasattr(policy, "peft_config"):
        return None
    return {name: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu()
            for name, p in policy.named_parameters() if "lora_" in name}


def optimizer_state(policy, optimizer) -> Dict:
    """The optimizer's state keyed by parameter name, whole (on rank 0 under FSDP, a collective), so that
    it loads at any world size and under either strategy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    fsdp = _STATE["strategy"] == "fsdp"
    return get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=fsdp, cpu_offload=fsdp))


def load_optimizer_state(policy, optimizer, state: Dict) -> None:
    """`optimizer_state`'s dict into this rank's optimizer (each rank read the whole of it)."""
    groups = state["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
        optimizer.load_state_dict(state)   # checkpoints from before parameter names: torch's own indices
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=_STATE["strategy"] == "fsdp"))
