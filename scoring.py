"""Log-probabilities of responses under a causal LM: the deterministic path, the reference, and the
uncertainty estimators behind one call.

Every consumer (SFT/DPO losses, reference scoring, the offline and online selectors) goes through
`response_logps` or `score_sequences`, so there is exactly one way a sequence gets scored.

Memory: a (B, T, V) logits tensor for a 49k vocabulary is 0.4 GB at B=8, T=255 in fp32, and the
backward keeps several of them alive. We run the network trunk once, keep only the hidden states of
the response positions (N, H), and project them onto the vocabulary in chunks of `chunk_size` rows;
under autograd each chunk is checkpointed, so at most one chunk of logits exists at a time.

Logits: some architectures rescale the head's output in their forward (Granite divides by
`logits_scaling`, Cohere multiplies by `logit_scale`, Gemma soft-caps). `calibrate_logit_transform`
measures that scale once at load against the model's own forward, so these log-probs equal the
forward's, and refuses models whose forward does something else.
"""
import contextlib
import functools
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from preference_datasets import collate
from utils import ConfigError

# fp32 logits per projected chunk. Under autograd the backward keeps about three chunks alive, so they
# are small (16 MiB, ~85 rows of a 49k vocabulary: peak memory); without grad only one chunk lives at
# a time, and larger chunks read the head's weights fewer times (scoring speed).
CHUNK_BYTES_GRAD = 16 << 20
CHUNK_BYTES_NO_GRAD = 64 << 20


def default_chunk(vocab_size: int, grad: bool) -> int:
    """Rows of hidden states projected onto the vocabulary at once."""
    return max(64, (CHUNK_BYTES_GRAD if grad else CHUNK_BYTES_NO_GRAD) // (4 * vocab_size))


# ----------------------------------------------------------------------------------------------
# The model's parts and its logit transform

@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * head(h) / softcap), or scale * head(h) without a softcap."""
    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def whole_model(fn: Callable) -> Callable:
    """For functions fn(model, ...) that call the trunk and the head directly: under FSDP they run
    inside the root's `run_unsharded` (distributed.shard_model), which gathers the root's own weights
    (embeddings, final norm, head) for the call and its backward, as the model's forward would."""
    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        root = _hf_model(model)
        run = getattr(root, "run_unsharded", None)
        if run is None or getattr(root, "_unsharded_depth", 0):
            return fn(model, *args, **kwargs)
        root._unsharded_depth = 1
        try:
            return run(fn, model, *args, **kwargs)
        finally:
            root._unsharded_depth = 0
    return call


def causal_lm_parts(model) -> Tuple[torch.nn.Module, torch.nn.Module, LogitTransform]:
    """(trunk, head, transform) of a causal LM, also under PEFT. The trunk maps input_ids to the final
    (normalised) hidden states, the head maps them to raw logits, the transform to the forward's logits."""
    hf_model = _hf_model(model)
    transform = getattr(hf_model, "scoring_logit_transform", None)
    if transform is None:
        config = getattr(hf_model, "config", None)
        transform = LogitTransform(softcap=getattr(config, "final_logit_softcapping", None) if config is not None else None)
    return hf_model.base_model, hf_model.get_output_embeddings(), transform


@torch.no_grad()
@whole_model
def calibrate_logit_transform(model, input_ids: torch.Tensor, tolerance: float = 1e-3) -> LogitTransform:
    """Measure how the model's forward maps head outputs to logits on a short probe (1, T) and store it
    on the model for every later scoring call. Raises ConfigError (one line) when no scale (with the
    config's softcap) reproduces the forward's log-probs within `tolerance` nats (fp32; 50x for half
    precision)."""
    hf_model = _hf_model(model)
    was_training = hf_model.training
    hf_model.eval()
    try:
        trunk, head, _ = causal_lm_parts(model)
        mask = torch.ones_like(input_ids)
        raw = head(trunk(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state).float()
        target = hf_model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        hf_model.train(was_training)
    softcap = getattr(hf_model.config, "final_logit_softcapping", None)
    pre = target
    if softcap:
        pre = softcap * torch.atanh((target / softcap).clamp(-1 + 1e-6, 1 - 1e-6))
    scale = float((pre * raw).sum() / (raw * raw).sum().clamp(min=1e-12))
    if abs(scale - 1.0) < 1e-5:
        scale = 1.0  # a plain head: leave the logits untouched (bit-identical to the forward)
    transform = LogitTransform(scale=scale, softcap=softcap)
    error = float((transform(raw).log_softmax(-1) - target.log_softmax(-1)).abs().max())
    if next(hf_model.parameters()).dtype in (torch.float16, torch.bfloat16):
        tolerance *= 50
    if error > tolerance:
        raise ConfigError(f"model {type(hf_model).__name__}: its forward transforms the head's logits in a way "
                          f"scoring cannot reproduce (log-probs {error:.3g} nats off the forward on a probe); "
                          "this architecture is not supported")
    hf_model.scoring_logit_transform = transform
    return transform


# ----------------------------------------------------------------------------------------------
# Deterministic log-probs

def _target_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """hidden (N, H), targets (N,) -> log p(target) (N,) in fp32."""
    logits = transform(head(hidden).float())
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                chunk_size: Optional[int] = None, transform: LogitTransform = LogitTransform()) -> torch.Tensor:
    """Chunked log p(targets | hidden). hidden (..., N, H), targets (N,) -> (..., N).

    Leading dims of `hidden` (e.g. K dropout masks) share the same targets."""
    chunk_size = chunk_size or default_chunk(getattr(head, "out_features", None) or head.weight.shape[0],
                                             grad=torch.is_grad_enabled() and hidden.requires_grad)
    lead = hidden.shape[:-2]
    n = hidden.shape[-2]
    flat = hidden.reshape(-1, n, hidden.shape[-1])
    out = []
    for h in flat:
        parts = []
        for start in range(0, n, chunk_size):
            h_chunk, t_chunk = h[start:start + chunk_size], targets[start:start + chunk_size]
            if torch.is_grad_enabled() and h_chunk.requires_grad:
                parts.append(checkpoint(_target_logps, h_chunk, head, t_chunk, transform, use_reentrant=False))
            else:
                parts.append(_target_logps(h_chunk, head, t_chunk, transform))
        out.append(torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32))
    return torch.stack(out).reshape(*lead, n)


class SamplingStates:
    """What sampling computed that scoring would compute again, per role ('policy', 'reference'): each
    prompt's key/value cache but its last token, per layer (keys, values) (1, heads, len - 1, dim), and
    the final hidden states (L, H) at the positions that predict each sampled response's L tokens (EOS
    included). Filled by generation.decode in one process; read by SharedPrompts.reading for candidates
    whose tokens are the sampled ones (a text that tokenises otherwise, or a response cut to max_length,
    is computed as usual)."""

    def __init__(self):
        self.prompts: Dict[str, Dict[Tuple[int, ...], List]] = {"policy": {}, "reference": {}}
        self.responses: Dict[str, Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], torch.Tensor]] = {"policy": {}, "reference": {}}

    def add_prompt(self, role: str, prompt_ids: List[int], layers: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prompts[role][tuple(prompt_ids)] = layers

    def add_response(self, role: str, prompt_ids: List[int], tokens: List[int], hidden: torch.Tensor, eos_token_id: int) -> None:
        """tokens as sampled; a response cut at max_new_tokens is scored with EOS appended (hidden has its row)."""
        labels = tuple(tokens) if tokens and tokens[-1] == eos_token_id else tuple(tokens) + (eos_token_id,)
        self.responses[role][(tuple(prompt_ids), labels)] = hidden


@dataclass
class SharedPrompts:
    """Prompts that several sequences of a minibatch share, so the trunk reads each prompt once.

    ids, mask (G, W): each prompt but its last token, left-padded; keys: each prompt's ids, whole. rows (B,):
    the prompt of each sequence. The batch that goes with it holds, per sequence, the prompt's last token
    then the response (right-padded); the trunk continues from the prompts' key/value cache. The cache is
    made by the model it is read with, so policy and reference (adapters off) each get their own.
    `reading` adds what sampling kept for one of them (SamplingStates): cache, per layer (keys, values)
    (G, heads, W, dim), read instead of computed; known (B, T, H) final hidden states of the rows where
    known_rows (B,), which the trunk then skips."""
    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    keys: List[Tuple[int, ...]] = field(default_factory=list)
    cache: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None
    known: Optional[torch.Tensor] = None
    known_rows: Optional[torch.Tensor] = None

    def reading(self, states: SamplingStates, role: str, sequences: List[Dict], length: int) -> "SharedPrompts":
        """This batch with what `role`'s sampling kept for it; sequences: the batch's (B), length: its T."""
        stored = [states.prompts[role].get(key) for key in self.keys]
        cache = None
        if stored and all(s is not None for s in stored):
            width, cache = self.ids.shape[1], []
            for layer in range(len(stored[0])):
                keys, values = (stored[0][layer][i].new_zeros(len(stored), stored[0][layer][i].shape[1], width,
                                                              stored[0][layer][i].shape[3]) for i in (0, 1))
                for g, prompt in enumerate(stored):
                    k, v = prompt[layer]
                    keys[g, :, width - k.shape[2]:], values[g, :, width - v.shape[2]:] = k[0], v[0]
                cache.append((keys, values))
        hidden = []
        for seq in sequences:
            n = prompt_length(seq)
            hidden.append(states.responses[role].get((tuple(seq["input_ids"][:n]), tuple(seq["labels"][n:]))))
        known, known_rows = None, torch.tensor([h is not None for h in hidden], device=self.rows.device)
        if bool(known_rows.any()):
            first = next(h for h in hidden if h is not None)
            known = first.new_zeros(len(hidden), length, first.shape[-1])
            for b, h in enumerate(hidden):
                if h is not None:
                    known[b, :len(h)] = h
        return replace(self, cache=cache, known=known, known_rows=known_rows if known is not None else None)

    def continue_trunk(self, trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T) of the suffixes input_ids, attention_mask (B, T), as if each
        followed its full prompt in one sequence."""
        todo = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device) if self.known is None else ~self.known_rows
        if not bool(todo.any()):
            return self.known
        if self.cache is not None:
            cache = DynamicCache(ddp_cache_data=self.cache)
        else:
            positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
            cache = trunk(input_ids=self.ids, attention_mask=self.mask, position_ids=positions, use_cache=True).past_key_values
        rows = self.rows[todo]
        cache.batch_select_indices(rows)
        lengths = self.mask.sum(-1)[rows]
        positions = lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        mask = torch.cat([self.mask[rows], attention_mask[todo]], dim=1)
        hidden = trunk(input_ids=input_ids[todo], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).last_hidden_state
        if self.known is None:
            return hidden
        out = self.known.clone()
        out[todo] = hidden.to(out.dtype)
        return out


def _response_hidden(model, input_ids, attention_mask, labels, prompts: Optional[SharedPrompts] = None):
    """Run the trunk once; return hidden states of the positions that predict response tokens.

    input_ids, attention_mask, labels: (B, T); labels are -100 on prompt and padding. With `prompts`,
    the rows are suffixes of the prompts there (SharedPrompts).
    Returns hidden (N, H), targets (N,), row index (N,) of each position, head, transform."""
    trunk, head, transform = causal_lm_parts(model)
    if prompts is None:
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    else:
        hidden = prompts.continue_trunk(trunk, input_ids, attention_mask)
    shifted = labels[:, 1:]
    mask = shifted != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(shifted)[mask]
    return hidden[:, :-1][mask], shifted[mask], rows, head, transform


def _sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """values (..., N), rows (N,) -> (..., n_rows): per-sequence sums."""
    out = values.new_zeros(*values.shape[:-1], n_rows)
    return out.index_add_(-1, rows, values)


@whole_model
def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk_size: Optional[int] = None, prompts: Optional[SharedPrompts] = None) -> torch.Tensor:
    """Sum of log p(response tokens) per sequence, (B,) fp32. Prompt/padding (labels -100) excluded,
    EOS included. Gradients flow when called under autograd."""
    hidden, targets, rows, head, transform = _response_hidden(model, input_ids, attention_mask, labels, prompts)
    return _sum_per_row(token_logps(hidden, head, targets, chunk_size, transform), rows, labels.shape[0])


# ----------------------------------------------------------------------------------------------
# The reference

@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, a PEFT model computes as the reference: its frozen 'reference' adapter (the SFT stage's
    adapter) if it has one, else the base with adapters off."""
    if "reference" in model.peft_config:
        active = model.active_adapter
        model.set_adapter("reference")
        try:
            yield
        finally:
            model.set_adapter(active)  # also restores requires_grad: only the active adapter trains
    else:
        with model.disable_adapter():
            yield


class Reference:
    """Deterministic reference log-probs: a separate frozen model, or the policy's own base with
    adapters disabled under LoRA (no second copy of the weights). Always eval mode, no grad.

    free=True (loss.reference_free): every reference log-prob is 0, for the loss and for selection
    alike; a model is then only needed to sample reference responses (online)."""

    def __init__(self, policy, reference_model=None, free: bool = False):
        if reference_model is None and not hasattr(policy, "disable_adapter") and not free:
            raise ValueError("a reference model is required unless the policy is a PEFT model or the loss is reference-free")
        self.policy, self.model, self.free = policy, reference_model, free

    @property
    def can_generate(self) -> bool:
        return self.model is not None or hasattr(self.policy, "disable_adapter")

    @contextlib.contextmanager
    def active(self):
        """The reference as a model (for sampling), in eval mode without grad."""
        if not self.can_generate:
            raise ValueError("this run has no reference model to sample from (reference-free, full fine-tuning)")
        model = self.model if self.model is not None else self.policy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (adapters_disabled(model) if self.model is None else contextlib.nullcontext()):
                yield model
        finally:
            model.train(was_training)

    def logps(self, input_ids, attention_mask, labels, prompts: Optional[SharedPrompts] = None) -> torch.Tensor:
        """(B,) fp32 summed response log-probs under the reference (zeros when reference-free)."""
        if self.free:
            return torch.zeros(input_ids.shape[0], device=input_ids.device)
        with self.active() as model:
            return response_logps(model, input_ids, attention_mask, labels, prompts=prompts)


# ----------------------------------------------------------------------------------------------
# Uncertainty of log pi(a|x): MC dropout

def mean_and_variance(samples: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """samples (K, B) -> mean (B,), unbiased variance (B,) (zero when K == 1)."""
    if samples.shape[0] < 2:
        return samples.mean(0), torch.zeros_like(samples[0])
    return samples.mean(0), samples.var(0, unbiased=True)


@dataclass
class RowSeeds:
    """One seed per sequence, in place of a generator: each sequence's dropout masks come from its own
    seed, so a candidate's masks do not depend on the batch, the rank or the number of ranks that score
    it (selection is the same at every world size)."""
    seeds: List[int]

    def take(self, members: List[int]) -> "RowSeeds":
        return RowSeeds([self.seeds[i] for i in members])

    def draw(self, index: int) -> "RowSeeds":
        """The seeds of the index-th of several separate draws ('full' masks each pass on its own)."""
        return RowSeeds([random.Random(f"{seed}|{index}").getrandbits(62) for seed in self.seeds])


def _dropout(hidden: torch.Tensor, p: float, generator, k: Optional[int] = None,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverted dropout: (N, H) -> (N, H), or (K, N, H) when k is given. Masks drawn from `generator` (a
    torch.Generator, None for the global RNG), or with RowSeeds the positions of row r (rows (N,): the
    row of each position, positions of a row in token order) from a generator seeded by its seed."""
    shape = hidden.shape if k is None else (k,) + hidden.shape
    if p <= 0:
        return hidden if k is None else hidden.unsqueeze(0).expand(*shape)
    keep = 1.0 - p
    masks = torch.empty(shape, device=hidden.device, dtype=hidden.dtype)
    if isinstance(generator, RowSeeds):
        for r, seed in enumerate(generator.seeds):
            where = (rows == r).nonzero().squeeze(-1)
            if where.numel():
                own = torch.Generator(device=hidden.device)
                own.manual_seed(seed)
                part = torch.empty(shape[:-2] + (where.numel(), shape[-1]), device=hidden.device, dtype=hidden.dtype)
                masks[..., where, :] = part.bernoulli_(keep, generator=own)
    else:
        masks.bernoulli_(keep, generator=generator)
    return hidden * masks / keep


@torch.no_grad()
def mc_dropout_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                     k: int, p: float, method: str = "head", chunk_size: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MC-dropout estimate of log pi(response | prompt): mean (B,) and unbiased variance (B,), in nats,
    of the K draws of mc_dropout_samples."""
    return mean_and_variance(mc_dropout_samples(model, input_ids, attention_mask, labels, k, p, method, chunk_size, generator))


@torch.no_grad()
@whole_model
def mc_dropout_samples(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       k: int, p: float, method: str = "head", chunk_size: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, prompts: Optional[SharedPrompts] = None) -> torch.Tensor:
    """K MC-dropout draws of log pi(response | prompt): (K, B) summed response log-probs, in nats.

    method='head': one trunk pass in eval mode, then K independent dropout masks (rate p) on the final
    hidden state, each projected by the output head. Only response positions are projected: the
    masks on other positions cannot change these log-probs, so the distribution is the same as
    masking every position.
    method='full': K full forward passes in train mode (every dropout in the network active, LoRA
    dropout included) plus the head dropout p; restores the model's previous mode afterwards.
    Every mask comes from `generator`: a torch.Generator, or RowSeeds (one seed per sequence, so that
    'head' gives each sequence the same draws however it is batched; the network's own dropout modules
    draw from a torch RNG seeded from it, inside a fork that leaves the global RNG untouched). `prompts` (SharedPrompts): 'head'
    only, since under 'full' every sequence draws its own masks on its prompt too.
    """
    if method not in ("head", "full"):
        raise ValueError(f"uncertainty method must be 'head' or 'full', got {method!r}")
    if method == "full" and prompts is not None:
        raise ValueError("method='full' draws dropout on each sequence's prompt: it cannot share prompts")
    was_training = model.training
    if method == "head":
        model.eval()
        try:
            hidden, targets, rows, head, transform = _response_hidden(model, input_ids, attention_mask, labels, prompts)
        finally:
            model.train(was_training)
        return _sum_per_row(token_logps(_dropout(hidden, p, generator, k, rows), head, targets, chunk_size, transform),
                            rows, labels.shape[0])

    # the network's own dropout masks a whole batch at once: seeded per call, so 'full' (unlike 'head')
    # depends on how the sequences are batched and sharded
    if isinstance(generator, RowSeeds):
        seed = generator.seeds[0]
    else:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    model.train()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            samples = []
            for draw in range(k):
                hidden, targets, rows, head, transform = _response_hidden(model, input_ids, attention_mask, labels)
                masks = generator.draw(draw) if isinstance(generator, RowSeeds) else generator
                logps = token_logps(_dropout(hidden, p, masks, rows=rows), head, targets, chunk_size, transform)
                samples.append(_sum_per_row(logps, rows, labels.shape[0]))
    finally:
        model.train(was_training)
    return torch.stack(samples)


# ----------------------------------------------------------------------------------------------
# Head dropout without its Monte Carlo noise: the linearised log-prob and a control variate

@whole_model
def _head_gradients(model, input_ids, attention_mask, labels, chunk_size: Optional[int] = None,
                    prompts: Optional[SharedPrompts] = None):
    """One trunk pass in eval mode and one backward through the head only.

    Returns hidden (N, H) of the response positions, targets (N,), rows (N,), head, transform, the
    deterministic token log-probs (N,) and their gradients g = d log p(y_t | h_t) / d h_t (N, H): the
    direction in which a perturbation of the final hidden state moves each log-prob (softcap included)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden, targets, rows, head, transform = _response_hidden(model, input_ids, attention_mask, labels, prompts)
    finally:
        model.train(was_training)
    with torch.enable_grad():
        h = hidden.detach().float().requires_grad_(True)
        logps = token_logps(h.to(hidden.dtype), head, targets, chunk_size, transform)
        (grad,) = torch.autograd.grad(logps.sum(), h) if logps.numel() else (torch.zeros_like(h),)
    return hidden, targets, rows, head, transform, logps.detach(), grad


def linearised_dropout_variance(hidden: torch.Tensor, grad: torch.Tensor, p: float) -> torch.Tensor:
    """First-order (delta-method) variance of log p(y_t | dropout(h_t)) per token and dimension, (N, H)
    from hidden and grad (N, H): inverted dropout perturbs h_i by delta_i with Var(delta_i) =
    p / (1 - p) h_i^2, independently over i, so to first order each dimension adds p / (1 - p) (g_i h_i)^2
    (nats^2). Alone it is a poor estimate: dropping one of the few large dimensions of h moves the logits
    far outside the linear range, where log-softmax saturates."""
    return p / (1.0 - p) * (grad.float() * hidden.float()).pow(2)


def exact_dimension_variance(raw: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             dims: torch.Tensor, p: float, transform: LogitTransform) -> torch.Tensor:
    """Exact variance of log p(y_t) when only dimension i of h_t is dropped out, for the dimensions `dims`.

    raw (N, V) head outputs at h, hidden (N, H), weight (V, H) of the (linear) head, targets (N,), dims
    (N, M) indices. Dimension i scales h_i by m_i / (1 - p), m_i ~ Bernoulli(1 - p), so it takes two values:
    h_i dropped (probability p) or h_i / (1 - p); the head's output moves along weight[:, i], and
    Var = p (1 - p) (f_dropped - f_kept)^2 with f = log p(y_t) after the logit transform. Returns (N, M)."""
    h = hidden.float().gather(1, dims)                                   # (N, M)
    columns = weight.float().T[dims]                                      # (N, M, V)
    values = []
    for shift in (-h, h * (p / (1.0 - p))):
        logits = transform(raw[:, None, :] + shift[..., None] * columns)
        values.append(logits.gather(-1, targets[:, None, None].expand(-1, dims.shape[1], 1)).squeeze(-1)
                      - torch.logsumexp(logits, dim=-1))
    return p * (1.0 - p) * (values[0] - values[1]).pow(2)


# Dimensions per token whose dropout effect is computed exactly (the rest to first order). Spearman of
# the spread against 2000 Monte Carlo masks on 48 SmolLM2 Jeopardy responses (scripts/bench_reliability.py):
# 0 (first order alone) -0.47, 2 0.931, 4 0.948, 8 0.959, 32 0.957; all 576 0.981 (at ~10x the cost).
EXACT_DIMS = 8


@torch.no_grad()
@whole_model
def analytic_head_dropout(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                          p: float, exact_dims: int = EXACT_DIMS, tokens_per_chunk: int = 32,
                          prompts: Optional[SharedPrompts] = None) -> Dict[str, torch.Tensor]:
    """Head-dropout moments of log pi(response | prompt) without Monte Carlo: the K -> infinity limit of
    `head` dropout (rate p), centred on the deterministic log-prob (the mean of the draws sits below it,
    log-softmax being concave).

    Masks are independent across positions and dimensions, so the variance is the sum over tokens and
    dimensions of each dimension's own effect (interactions, of order p^2, are left out): exact
    (exact_dimension_variance) for the `exact_dims` dimensions with the largest first-order effect of
    each token, first order (linearised_dropout_variance) for the others. Requires a linear output head.
    Returns 'logp' (B,) deterministic summed log-probs and 'var' (B,) their dropout variance (nats^2)."""
    hidden, targets, rows, head, transform, logps, grad = _head_gradients(model, input_ids, attention_mask, labels,
                                                                          prompts=prompts)
    b = labels.shape[0]
    per_dim = linearised_dropout_variance(hidden, grad, p)              # (N, H)
    per_token = per_dim.sum(-1)
    m = min(exact_dims, hidden.shape[-1])
    if p > 0 and m > 0 and hidden.shape[0]:
        if not isinstance(head, torch.nn.Linear):
            raise ValueError("analytic head dropout needs a linear output head")
        dims = per_dim.topk(m, dim=-1).indices                          # (N, M)
        exact = []
        for start in range(0, hidden.shape[0], tokens_per_chunk):
            part = slice(start, start + tokens_per_chunk)
            raw = head(hidden[part]).float()
            exact.append(exact_dimension_variance(raw, hidden[part], head.weight, targets[part], dims[part], p, transform))
        per_token = per_token - per_dim.gather(1, dims).sum(-1) + torch.cat(exact).sum(-1)
    return {"logp": _sum_per_row(logps, rows, b), "var": _sum_per_row(per_token, rows, b)}


# ----------------------------------------------------------------------------------------------
# Epistemic uncertainty: a Laplace posterior over a shift of the final hidden state

@torch.no_grad()
@whole_model
def head_features(model, input_ids, attention_mask, labels, generator=None,
                  prompts: Optional[SharedPrompts] = None) -> Dict[str, torch.Tensor]:
    """The deterministic log-prob 'mu' (B,) and the features 'psi' (H, B) of each sequence: psi = the sum
    over its response tokens of d log p(y_t) / d h_t, how the log-prob moves when the final hidden state
    is shifted (nats per unit of h). One trunk pass and one backward through the head."""
    hidden, targets, rows, head, transform, logps, grad = _head_gradients(model, input_ids, attention_mask, labels,
                                                                          prompts=prompts)
    b = labels.shape[0]
    return {"mu": _sum_per_row(logps, rows, b), "psi": grad.new_zeros(b, grad.shape[-1]).index_add_(0, rows, grad).float().T}


def _logistic_laplace(kernel: torch.Tensor, offset: torch.Tensor, outcome: torch.Tensor, beta: float,
                      iterations: int = 50, start: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, float]:
    """Laplace approximation of a logistic model with a Gaussian prior on the latent values f ~ N(0, kernel):
    P(outcome_n = 1) = sigmoid(beta (offset_n + f_n)). kernel (n, n), offset (n,), outcome (n,) in {0, 1}.
    Newton's method in the stable form of Rasmussen & Williams (2006), algorithm 3.1. Returns the mode f
    (n,) and the approximate log marginal likelihood log p(outcome) (their eq. 3.32). `start`: an initial f."""
    n = kernel.shape[0]
    f = kernel.new_zeros(n) if start is None else start.clone()
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    objective = -math.inf
    for _ in range(iterations):
        pi = torch.sigmoid(beta * (offset + f))
        w = beta ** 2 * pi * (1 - pi)
        root = w.sqrt()
        chol = torch.linalg.cholesky(eye + root[:, None] * kernel * root[None, :])
        b = w * f + beta * (outcome - pi)
        a = b - root * torch.cholesky_solve((root * (kernel @ b))[:, None], chol).squeeze(-1)
        f = kernel @ a
        log_lik = float(torch.nn.functional.logsigmoid(beta * (2 * outcome - 1) * (offset + f)).sum())
        previous, objective = objective, -0.5 * float(a @ f) + log_lik
        if abs(objective - previous) < 1e-7 * max(1.0, abs(objective)):
            break
    pi = torch.sigmoid(beta * (offset + f))
    root = (beta ** 2 * pi * (1 - pi)).sqrt()
    chol = torch.linalg.cholesky(eye + root[:, None] * kernel * root[None, :])
    return f, objective - float(torch.log(torch.diagonal(chol)).sum())


def evidence_prior_std(differences: torch.Tensor, margins: torch.Tensor, first_won: torch.Tensor, beta: float,
                       low: float = 1e-3, high: float = 1e3, steps: int = 24) -> float:
    """The prior std s of the shift u that maximises the evidence of the labels bought (type-II maximum
    likelihood), under the model P(first wins) = sigmoid(beta (margin + d . u)), u ~ N(0, s^2 I).

    differences (n, H): d = psi(first) - psi(second) of each bought pair; margins (n,): the policy's
    implicit-reward logit (log pi - log ref of first minus that of second, nats) when the pair was bought;
    first_won (n,) bool. The prior on f = D u is N(0, s^2 D D^T), so each evaluation is a logistic
    Laplace approximation in the n latent values; log s is searched by golden section over [low, high].
    Labels explained by the margins alone (what the policy already predicts) push s down; labels that a
    shift along the pairs' features explains push it up."""
    d = differences.double()
    gram = d @ d.T
    offset, outcome = margins.double(), first_won.double()

    last = {}

    def log_evidence(log_s: float) -> float:
        # warm start: the mode at a nearby s, scaled as the prior variance of f is
        near = last and abs(log_s - last["log_s"]) < 0.5
        start = last["f"] * math.exp(2 * (log_s - last["log_s"])) if near else None
        last["f"], value = _logistic_laplace(math.exp(2 * log_s) * gram, offset, outcome, beta, start=start)
        last["log_s"] = log_s
        return value

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = log_evidence(x1), log_evidence(x2)
    for _ in range(steps):
        if f1 >= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = log_evidence(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = log_evidence(x2)
    return math.exp((a + b) / 2)


LAPLACE_PRIORS = ("unit_logit", "fixed", "evidence")   # how LaplaceEstimator sets its prior std

# The evidence is refitted after every purchase while few pairs are bought, then whenever their number
# has grown by this share (each fit costs O(n^3) in the n pairs bought).
REFIT_ALL_UNTIL = 512
REFIT_GROWTH = 0.1


class LaplaceEstimator:
    """Epistemic spread of log pi that shrinks along the pairs bought, as fast as its prior std s allows
    (below; a neural-linear / last-layer Laplace model). The policy's uncertain part is a shift u (H,) of its final hidden state, shared by every
    position, with prior u ~ N(0, s^2 I). To first order log pi_u(a) = log pi(a) + u . psi(a) (head_features).
    Each bought pair (a, b) is a DPO observation of u . (psi(a) - psi(b)) through sigmoid(beta * .), whose
    Fisher information is at most beta^2 / 4 * d d^T; so the posterior precision is
        Lambda = I / s^2 + beta^2 / 4 * sum_pairs d d^T,    d = psi(a) - psi(b),
    and the spread of a candidate is sqrt(psi^T Lambda^-1 psi) (nats).

    One pair shrinks the variance along its direction by 1 / (1 + beta^2 / 4 s^2 |d|^2), so s decides whether
    the posterior moves within a budget of labels. How s is set (`prior`):
    'unit_logit' (label-free): s = 1 / (beta rms|d|) over the first pairs bought, the prior under which a
        typical pair's implicit-reward logit beta d . u has std 1; each pair then shrinks its direction's
        variance by about 1 / 1.25. Until the first purchase s = prior_std.
    'fixed' (label-free): s = prior_std throughout.
    'evidence': s starts at prior_std and is refitted after purchases to maximise the evidence of their
        labels (evidence_prior_std, reading the labels and the policy's margins of the pairs bought). It is
        identifiable only once the pairs outnumber the feature directions they span.
    The label-free rules read the pairs bought, never which side won.
    Either way it is deterministic and shrinks only along the feature directions of the pairs bought:
    D-optimal selection in the space of the last layer."""

    def __init__(self, prior_std: float, beta: float, prior: str = "fixed"):
        """fitted_at: pairs seen when s was last set by the rule (0: not yet)."""
        if prior not in LAPLACE_PRIORS:
            raise ValueError(f"laplace prior must be one of {', '.join(LAPLACE_PRIORS)}, got {prior!r}")
        self.prior_std, self.beta, self.prior = float(prior_std), float(beta), prior
        self.fisher: Optional[torch.Tensor] = None       # (H, H) float64: beta^2 / 4 sum d d^T
        self.differences: Optional[torch.Tensor] = None  # (n, H) float32, evidence only
        self.margins = torch.zeros(0)
        self.first_won = torch.zeros(0, dtype=torch.bool)
        self.fitted_at = 0
        self.n_observed = 0
        self._covariance: Optional[torch.Tensor] = None

    def _ensure(self, hidden_size: int, device) -> None:
        if self.fisher is None:
            self.fisher = torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device)
        self.fisher = self.fisher.to(device)

    @property
    def precision(self) -> torch.Tensor:
        return torch.eye(self.fisher.shape[0], dtype=torch.float64, device=self.fisher.device) / self.prior_std ** 2 + self.fisher

    def covariance(self) -> torch.Tensor:
        if self._covariance is None:
            self._covariance = torch.cholesky_inverse(torch.linalg.cholesky(self.precision))
        return self._covariance

    @torch.no_grad()
    def __call__(self, model, input_ids, attention_mask, labels, generator=None, prompts=None) -> Dict[str, torch.Tensor]:
        """mu (B,) deterministic log-prob, sigma (B,) posterior spread, sigma_prior (B,) the spread before
        any label (s |psi|), psi (H, B) features."""
        out = head_features(model, input_ids, attention_mask, labels, prompts=prompts)
        psi = out["psi"].T.double()
        self._ensure(psi.shape[-1], psi.device)
        variance = ((psi @ self.covariance()) * psi).sum(-1).clamp(min=0.0)
        return {**out, "sigma": variance.sqrt().float(), "sigma_prior": (self.prior_std * psi.norm(dim=-1)).float()}

    def observe(self, first: torch.Tensor, second: torch.Tensor, margins: Optional[torch.Tensor] = None,
                first_won: Optional[torch.Tensor] = None) -> None:
        """Add bought pairs: first, second (n, H) features psi of each pair's responses; for prior='evidence'
        also margins (n,) (the policy's implicit-reward logit of first over second when bought, nats) and
        first_won (n,) bool, the labels."""
        d = (first - second).double()
        self._ensure(d.shape[-1], d.device)
        self.fisher = self.fisher + self.beta ** 2 / 4.0 * d.T @ d
        self.n_observed += len(d)
        self._covariance = None
        if self.prior == "unit_logit" and not self.fitted_at and len(d):
            self.prior_std = 1.0 / (self.beta * float(d.pow(2).sum(-1).mean().sqrt().clamp(min=1e-12)))
            self.fitted_at = len(d)
        if self.prior != "evidence":
            return
        if margins is None or first_won is None:
            raise ValueError("laplace prior='evidence' needs the margins and labels of the pairs bought")
        self.differences = d.float().cpu() if self.differences is None else torch.cat([self.differences, d.float().cpu()])
        self.margins = torch.cat([self.margins, margins.float().cpu()])
        self.first_won = torch.cat([self.first_won, first_won.bool().cpu()])
        n = self.n_observed
        if n <= REFIT_ALL_UNTIL or n >= (1 + REFIT_GROWTH) * self.fitted_at:
            self.prior_std = evidence_prior_std(self.differences, self.margins, self.first_won, self.beta)
            self.fitted_at = n

    def stats(self) -> Dict[str, float]:
        return {"selection/laplace_prior_std": self.prior_std, "selection/laplace_pairs": float(self.n_observed)}

    def state_dict(self) -> Dict:
        return {"laplace_fisher": None if self.fisher is None else self.fisher.cpu(), "laplace_prior_std": self.prior_std,
                "laplace_differences": self.differences, "laplace_margins": self.margins,
                "laplace_first_won": self.first_won, "laplace_fitted_at": self.fitted_at,
                "laplace_pairs": self.n_observed}

    def load_state_dict(self, state: Dict) -> None:
        self.fisher, self._covariance = state.get("laplace_fisher"), None
        if self.fisher is None and state.get("laplace_precision") is not None:   # checkpoints of the fixed prior only
            precision = state["laplace_precision"]
            self.fisher = precision - torch.eye(precision.shape[0], dtype=precision.dtype) / self.prior_std ** 2
        self.prior_std = float(state.get("laplace_prior_std", self.prior_std))
        self.differences = state.get("laplace_differences")
        self.margins = state.get("laplace_margins", torch.zeros(0))
        self.first_won = state.get("laplace_first_won", torch.zeros(0, dtype=torch.bool))
        self.fitted_at = int(state.get("laplace_fitted_at", 0))
        self.n_observed = int(state.get("laplace_pairs", self.margins.numel()))


# ----------------------------------------------------------------------------------------------
# Estimators by name, and the one scoring call

Estimator = Callable[..., Dict[str, torch.Tensor]]


def mc_dropout_estimator(method: str) -> Callable[[object], Estimator]:
    """The paper's estimator (factory: config -> f(model, ids, mask, labels, generator) -> scores of
    (B,) sequences): 'mu' and 'sigma', the mean and std of K MC-dropout draws of log pi (nats), and,
    with K >= 4, 'mu_halves' and 'sigma_halves' (2, B) from two disjoint halves of the draws: two
    independent estimates, from which a selection's reproducibility is measured at no extra cost."""
    def build(config) -> Estimator:
        k, p = int(config.mc_samples), float(config.llm_dropout)

        def estimate(model, input_ids, attention_mask, labels, generator=None, prompts=None):
            samples = mc_dropout_samples(model, input_ids, attention_mask, labels, k=k, p=p, method=method,
                                         generator=generator, prompts=prompts)
            mu, var = mean_and_variance(samples)
            out = {"mu": mu, "sigma": var.sqrt()}
            if k >= 4:
                halves = [mean_and_variance(part) for part in (samples[:k // 2], samples[k // 2:])]
                out["mu_halves"] = torch.stack([m for m, _ in halves])
                out["sigma_halves"] = torch.stack([v.sqrt() for _, v in halves])
            return out
        estimate.shares_prompts = method == "head"
        return estimate
    return build


def analytic_head_estimator(config) -> Estimator:
    """Head dropout (rate llm_dropout) in closed form: deterministic, so no halves (its reliability is 1;
    scripts/bench_reliability.py reports it against Monte Carlo)."""
    p = float(config.llm_dropout)

    def estimate(model, input_ids, attention_mask, labels, generator=None, prompts=None):
        moments = analytic_head_dropout(model, input_ids, attention_mask, labels, p=p, prompts=prompts)
        return {"mu": moments["logp"], "sigma": moments["var"].sqrt()}
    return estimate


def laplace_prior_rule(config) -> str:
    """config.laplace_prior, or for null: unit_logit offline; fixed online, where Borda's preference
    probabilities sigmoid(beta (mu_i - mu_j +- gamma (sigma_i + sigma_j))) saturate once the prior is widened."""
    return config.laplace_prior or ("fixed" if config.get("online") else "unit_logit")


def laplace_estimator(config) -> LaplaceEstimator:
    return LaplaceEstimator(prior_std=float(config.laplace_prior_std), beta=float(config.loss.beta),
                            prior=laplace_prior_rule(config))


def policy_logps(model, input_ids, attention_mask, labels, generator=None, prompts=None) -> Dict[str, torch.Tensor]:
    """No uncertainty: the deterministic log-prob 'mu' (B,), for selectors that read only the policy."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {"mu": response_logps(model, input_ids, attention_mask, labels, prompts=prompts)}
    finally:
        model.train(was_training)


# name -> factory(config) -> estimator. Each estimator returns at least the centre 'mu' and the spread
# 'sigma' (nats) of log pi(a|x) per sequence, optionally two independent half estimates; selectors
# read nothing else, so a new estimator is one entry here. An estimator that learns from the labels
# bought has observe(first, second) and state_dict / load_state_dict (saved with checkpoints).
MONTE_CARLO_ESTIMATORS = ("head", "full")  # the ones that read mc_samples
ESTIMATORS: Dict[str, Callable[[object], Estimator]] = {
    "head": mc_dropout_estimator("head"),          # the paper's: one trunk pass, K dropout masks on the final hidden state
    "full": mc_dropout_estimator("full"),          # the paper's research code: K full passes with every dropout active
    "head_analytic": analytic_head_estimator,      # head dropout's K -> infinity limit in closed form, no draws
    "laplace": laplace_estimator,                  # epistemic: Laplace posterior on the last layer, learns from the pairs bought
}


def prompt_length(sequence: Dict) -> int:
    """Tokens before the first response label of a sequence (its prompt)."""
    return next((i for i, label in enumerate(sequence["labels"]) if label != -100), len(sequence["labels"]))


def prompt_groups(sequences: List[Dict], batch_size: int) -> List[List[int]]:
    """Minibatches of sequence indices, at most batch_size each, that keep the sequences of one prompt
    together (a prompt with more than batch_size sequences is cut), shortest prompts first."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(tuple(seq["input_ids"][:prompt_length(seq)]), []).append(i)
    batches: List[List[int]] = [[]]
    for prompt in sorted(groups, key=len):
        members = groups[prompt]
        for start in range(0, len(members), batch_size):
            part = members[start:start + batch_size]
            if len(batches[-1]) + len(part) > batch_size:
                batches.append([])
            batches[-1].extend(part)
    return [b for b in batches if b]


def shared_prompt_batch(sequences: List[Dict], pad_token_id: int, device) -> Tuple[SharedPrompts, Dict[str, torch.Tensor]]:
    """(SharedPrompts, suffix batch) of sequences whose prompts have >= 2 tokens: the suffix of each is
    its prompt's last token then its response, right-padded (input_ids, attention_mask, labels (B, T))."""
    keys, rows, prefixes = {}, [], []
    for seq in sequences:
        n = prompt_length(seq)
        key = tuple(seq["input_ids"][:n])
        if key not in keys:
            keys[key] = len(prefixes)
            prefixes.append(list(key[:-1]))
        rows.append(keys[key])
    width = max(len(p) for p in prefixes)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prefixes], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes], device=device)
    suffixes = []
    for seq in sequences:
        n = prompt_length(seq)
        suffixes.append({"input_ids": seq["input_ids"][n - 1:], "attention_mask": seq["attention_mask"][n - 1:],
                         "labels": [-100] + list(seq["labels"][n:])})
    return SharedPrompts(ids, mask, torch.tensor(rows, device=device), list(keys)), collate(suffixes, pad_token_id)


def shared_prompt_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       pad_token_id: int) -> Optional[Tuple[SharedPrompts, Dict[str, torch.Tensor]]]:
    """shared_prompt_batch of a collated, right-padded batch (B, T) (e.g. a DPO step's chosen and rejected
    rows, which share their prompts), on its device; None when a prompt is shorter than 2 tokens."""
    sequences = []
    for ids, mask, row_labels in zip(input_ids.tolist(), attention_mask.tolist(), labels.tolist()):
        n = sum(mask)
        sequences.append({"input_ids": ids[:n], "attention_mask": mask[:n], "labels": row_labels[:n]})
    if any(prompt_length(seq) < 2 for seq in sequences):
        return None
    prompts, batch = shared_prompt_batch(sequences, pad_token_id, input_ids.device)
    return prompts, {k: batch[k].to(input_ids.device) for k in ("input_ids", "attention_mask", "labels")}


def score_sequences(policy, reference: Optional[Reference], sequences: List[Dict], *, estimator: Optional[Estimator],
                    pad_token_id: int, batch_size: int, device, generator=None,
                    share_prompts: bool = True, states: Optional[SamplingStates] = None) -> Dict[str, torch.Tensor]:
    """Centre and spread of log pi under the policy (`estimator`, skipped when None) and the reference
    log-prob (skipped when `reference` is None) of each sequence (prompt + one response, as lists).

    Minibatches of `batch_size` sequences. With share_prompts (and an estimator that allows it: not
    MC dropout 'full'), the sequences of one prompt go together and the trunk reads each prompt once
    per model (SharedPrompts): online, 2m candidates per prompt; offline, chosen and rejected. Else the
    sequences are sorted by length, so each minibatch is padded to a length close to its own.
    states: what sampling the sequences kept (SamplingStates), read instead of computed where prompts are
    shared: each model then reads only the other model's samples, from its own prompt caches.
    generator: the estimator's randomness, a torch.Generator or RowSeeds with one seed per sequence.
    Returns the estimator's keys (mu (S,), sigma (S,), optionally mu_halves / sigma_halves (2, S),
    features psi (H, S)), ref (S,) and n_tokens (S,) response tokens: CPU fp32 (nats), in the order of
    `sequences`; the sequence is always the last dimension.
    """
    share = share_prompts and getattr(estimator, "shares_prompts", True) and all(prompt_length(s) >= 2 for s in sequences)
    if share:
        batches = prompt_groups(sequences, batch_size)
    else:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    out: Dict[str, List[torch.Tensor]] = {}
    for members in batches:
        chosen = [sequences[i] for i in members]
        prompts = None
        if share:
            prompts, batch = shared_prompt_batch(chosen, pad_token_id, device)
        else:
            batch = collate(chosen, pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        readers = {role: {} if prompts is None else {"prompts": prompts if states is None
                                                     else prompts.reading(states, role, chosen, ids.shape[1])}
                   for role in ("policy", "reference")}
        draws = generator.take(members) if isinstance(generator, RowSeeds) else generator
        scores = dict(estimator(policy, ids, mask, labels, generator=draws, **readers["policy"])) if estimator is not None else {}
        if reference is not None:
            scores["ref"] = reference.logps(ids, mask, labels, **readers["reference"])
        scores["n_tokens"] = (labels[:, 1:] != -100).sum(-1).float()
        for key, value in scores.items():
            out.setdefault(key, []).append(value.float().cpu())
    order = [i for members in batches for i in members]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return {k: torch.cat(v, dim=-1)[..., inverse] for k, v in out.items()}
