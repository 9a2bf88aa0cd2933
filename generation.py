"""Sampling responses: the online loop's candidates and the evaluator's greedy answers.

`Generator.sample(prompt_ids, n, start)` is the one interface the online loop uses: n samples per
prompt from the policy and n from the reference, seeded by the prompts' position in the prompt
stream, so that the samples do not depend on how the calls are shared among torchrun ranks.
Every sampling parameter is explicit (`generation.*` in config/config.yaml); nothing is left to a
library default.

The online samples come from `decode`, a sampling loop of its own rather than generate(): it reads
each prompt once for its n samples, drops a row from the batch when it has sampled EOS, cuts the
nucleus (top_p) within the top_k tokens instead of sorting the vocabulary, and, in one process, keeps
what scoring would compute again (`scoring.SamplingStates`: each prompt's key/value cache and the final
hidden states of every sampled response under the model that sampled it). Its greedy answers are
generate()'s (tests/test_generation.py).

Under LoRA the reference is the policy's own base (or its frozen 'reference' adapter), so with
`generation.joint_roles=true` both roles sample in one call: a mixed-adapter batch in which the
reference rows skip the trainable adapter. That halves the decoding steps of a step's generation.
"""
import contextlib
import inspect
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import distributed
from preference_datasets import tokenize_prompt, tokenize_response, truncation_mode_for
from scoring import SamplingStates
from utils import append_jsonl, end_torn_line, read_jsonl

BASE_ADAPTER = "__base__"   # PEFT's name for "no adapter" in a mixed-adapter batch


def sampling_kwargs(generation) -> Dict:
    """generate() keyword arguments of a `generation` config: greedy when temperature is 0, else
    temperature, top_p and top_k (0 = off) exactly as configured."""
    temperature = float(generation.temperature)
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": float(generation.top_p), "top_k": int(generation.top_k)}


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: List[List[int]], n: int, generation, device,
                     adapter_names: Optional[List[str]] = None, reuse_prompt: bool = True) -> List[List[str]]:
    """n sampled continuations per prompt (greedy when generation.temperature is 0), in eval mode with
    the KV cache, stopping at EOS. prompt_ids: token ids per prompt (BOS included). adapter_names: one
    PEFT adapter name per prompt (a mixed-adapter batch; BASE_ADAPTER = none), or None for the model
    as it is. reuse_prompt: compute each prompt's cache once for its n samples (prompt_cache; the same
    samples). Returns texts, [len(prompt_ids)][n]."""
    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id
    # each prompt repeated n times, as generate(num_return_sequences=n) would, so that adapter names
    # can follow the rows (PEFT expands them for beams only)
    rows = [p for p in prompt_ids for _ in range(n)]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
    extra = {} if adapter_names is None else {"adapter_names": [a for a in adapter_names for _ in range(n)]}
    if reuse_prompt and n > 1 and width > 1:
        extra["past_key_values"] = prompt_cache(model, ids[::n], mask[::n], n, adapter_names)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(generation.max_new_tokens),
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                         synced_gpus=distributed.in_lockstep(), **sampling_kwargs(generation), **extra)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, n: int, adapter_names: Optional[List[str]]):
    """The key/value cache of each prompt but its last token, computed once and repeated for its n
    samples, from which generate() continues (the prompt is the larger part of a step's tokens).
    ids, mask (P, W) left-padded; positions as generate() numbers them (from the attention mask)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
                  **extra).past_key_values
    cache.batch_repeat_interleave(n)
    return cache


def sampling_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The distribution one token is sampled from: softmax(logits / temperature) restricted to the top_k
    tokens (0 = all) and within them to the nucleus top_p (the smallest set, most likely first, whose mass
    reaches top_p; 1 = all), as transformers' temperature, top-k and top-p warpers compose them, without
    sorting the vocabulary when top_k is set. logits (R, V) fp32, temperature > 0. Returns probabilities
    and token ids (R, K), K = top_k or V, most likely first (tokens cut by top_p have probability 0)."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        values, indices = logits.topk(top_k, dim=-1)            # sorted, largest first
    else:
        values, indices = logits.sort(dim=-1, descending=True)
    if top_p < 1.0:
        probs = values.softmax(-1)
        mass_before = probs.cumsum(-1) - probs                  # of the tokens more likely than each
        values = values.masked_fill(mass_before >= top_p, float("-inf"))
    return values.softmax(-1), indices


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of logits (R, V) fp32: argmax when temperature is 0, else a draw from
    sampling_distribution with the global torch RNG. Returns token ids (R,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs, indices = sampling_distribution(logits, temperature, top_k, top_p)
    return indices.gather(-1, torch.multinomial(probs, 1)).squeeze(-1)


@dataclass
class Decoded:
    """decode's output. tokens: per row (prompt-major, n rows per prompt) the sampled ids, EOS included
    when sampled. With states: hidden, per row (L, H), the final hidden states at the positions that
    predict its response tokens, EOS appended when it was not sampled (L = len(tokens) or + 1); prompt_cache,
    per prompt and layer, the (keys, values) (1, heads, len - 1, dim) of the prompt but its last token."""
    tokens: List[List[int]]
    hidden: Optional[List[torch.Tensor]] = None
    prompt_cache: Optional[List[List[Tuple[torch.Tensor, torch.Tensor]]]] = None


def _plain_cache(cache) -> bool:
    """Whether every layer of a key/value cache is a plain growing one (keys, values of every position),
    which scoring can read again; sliding-window and other caches are not kept."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))


def common_prefix_length(prompt_ids: List[List[int]]) -> int:
    """How many first tokens every prompt shares."""
    first = prompt_ids[0]
    length = min(len(p) for p in prompt_ids)
    for i in range(length):
        if any(p[i] != first[i] for p in prompt_ids):
            return i
    return length


def prompt_batch(prompt_ids: List[List[int]], common: int, pad_token_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """ids, mask (P, W) of prompts that share their first `common` tokens: those tokens, then each prompt's
    rest left-padded, so every prompt ends in the last column (padding mid-row when common > 0)."""
    width = max(len(p) for p in prompt_ids) - common
    ids = [p[:common] + [pad_token_id] * (width - len(p) + common) + p[common:] for p in prompt_ids]
    mask = [[1] * common + [0] * (width - len(p) + common) + [1] * (len(p) - common) for p in prompt_ids]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


@contextlib.contextmanager
def rows_under_adapters(model, names: Optional[List[str]]):
    """PEFT's mixed-adapter batch (row i under adapter names[i]) with its hooks set once for a whole decode,
    where passing adapter_names to each forward walks every module per call. `names` is read at each
    forward: change it in place when rows leave the batch. None: the model as it is."""
    if names is None:
        yield
        return
    from peft.tuners.lora import LoraLayer
    hook = lambda module, args, kwargs: (args, {**kwargs, "adapter_names": names})
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def decode(model, prompt_ids: List[List[int]], n: int, generation, eos_token_id: int, pad_token_id: int, device,
           adapter_names: Optional[List[str]] = None, keep_states: bool = False) -> Decoded:
    """n samples per prompt, in eval mode with the key/value cache: each prompt is read once and its cache
    repeated for its samples; a row leaves the batch when it samples EOS (under FSDP, where every forward
    is a collective, rows stay until every rank is done); at most generation.max_new_tokens tokens.
    prompt_ids: token ids per prompt (BOS included). adapter_names: one PEFT adapter per prompt (a mixed-
    adapter batch; BASE_ADAPTER = none), or None for the model as it is. keep_states: also return what
    scoring reads (Decoded), at one more forward pass for the rows cut at max_new_tokens (for the EOS
    appended to them)."""
    was_training = model.training
    model.eval()
    temperature, top_k, top_p = float(generation.temperature), int(generation.top_k), float(generation.top_p)
    limit, lockstep = int(generation.max_new_tokens), distributed.in_lockstep()
    # the prompts' common first tokens (a system prompt, an instruction) are read once per adapter; under FSDP
    # every rank must make the same forward calls, so there each prompt is read whole
    common = 0 if lockstep else min(common_prefix_length(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    ids, mask = prompt_batch(prompt_ids, common, pad_token_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf_model.forward).parameters else {}
    names = None if adapter_names is None else list(adapter_names)   # per row of the batch, kept in step below

    def forward(input_ids, attention_mask, position_ids, cache):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, output_hidden_states=keep_states, **last_only)
        return out.logits[:, -1].float(), (out.hidden_states[-1][:, -1] if keep_states else None), out.past_key_values

    with rows_under_adapters(model, names):
        cache = None
        if common > 0:
            adapters = [None] if names is None else list(dict.fromkeys(names))
            if names is not None:
                names[:] = adapters
            _, _, cache = forward(ids[:len(adapters), :common], mask[:len(adapters), :common],
                                  positions[:len(adapters), :common], None)
            cache.batch_select_indices(torch.tensor([0] * len(prompt_ids) if names is None else
                                                    [adapters.index(a) for a in adapter_names], device=device))
            if names is not None:
                names[:] = adapter_names
        logits, hidden, cache = forward(ids[:, common:], mask, positions[:, common:], cache)
        keep_states = keep_states and _plain_cache(cache)
        prompt_cache = None
        if keep_states:   # each prompt's real positions but its last
            columns = [row.nonzero().squeeze(-1)[:-1] for row in mask]
            prompt_cache = [[(layer.keys[p:p + 1, :, columns[p]], layer.values[p:p + 1, :, columns[p]])
                             for layer in cache.layers] for p in range(len(prompt_ids))]
        rows = len(prompt_ids) * n
        logits = logits.repeat_interleave(n, 0)
        cache.batch_repeat_interleave(n)
        mask, position = mask.repeat_interleave(n, 0), positions[:, -1].repeat_interleave(n)
        if names is not None:
            names[:] = [a for a in adapter_names for _ in range(n)]
        tokens = torch.full((rows, limit), pad_token_id, dtype=torch.long, device=device)
        lengths = torch.full((rows,), limit, dtype=torch.long, device=device)
        states = None
        if keep_states:
            states = hidden.new_zeros(rows, limit + 1, hidden.shape[-1])
            states[:, 0] = hidden.repeat_interleave(n, 0)
        alive = torch.arange(rows, device=device)        # the batch's rows, as indices of all rows
        ended = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in range(limit):
            token = next_tokens(logits, temperature, top_k, top_p)
            token = torch.where(ended[alive], pad_token_id, token)   # rows kept in lockstep after their EOS
            tokens[alive, t] = token
            just_ended = (token == eos_token_id) & ~ended[alive]
            lengths[alive[just_ended]] = t + 1
            ended[alive[just_ended]] = True
            if t == limit - 1:
                if not keep_states:
                    break
                stay = ~ended[alive]                      # cut at the limit: EOS is appended, and scored
            elif lockstep:
                if not distributed.any_rank(bool((~ended[alive]).any()), device):
                    break
                stay = torch.ones_like(just_ended)
            else:
                stay = ~ended[alive]
            if not bool(stay.any()):
                break
            if not bool(stay.all()):
                kept = stay.nonzero().squeeze(-1)
                cache.batch_select_indices(kept)
                alive, token, mask, position = alive[kept], token[kept], mask[kept], position[kept]
                if names is not None:
                    names[:] = [names[i] for i in kept.tolist()]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            position = position + 1
            logits, hidden, cache = forward(token[:, None], mask, position[:, None], cache)
            if keep_states:
                states[alive, t + 1] = hidden
    model.train(was_training)
    sampled = [row[:length] for row, length in zip(tokens.tolist(), lengths.tolist())]
    if not keep_states:
        return Decoded(sampled)
    hidden_rows = [states[r, :len(row) + (0 if row and row[-1] == eos_token_id else 1)] for r, row in enumerate(sampled)]
    return Decoded(sampled, hidden_rows, prompt_cache)


def call_seed(seed: int, role: str, position: int) -> int:
    """The torch seed of one sampling call: a function of the run's seed, who samples and the position
    in the prompt stream of the call's first prompt only."""
    return random.Random(f"{seed}|{role}|{position}").getrandbits(63)


def joint_roles_possible(reference) -> bool:
    """Both roles fit one call when the reference is the policy's own PEFT base."""
    return reference.model is None and hasattr(reference.policy, "peft_config")


class Generator:
    """The online loop's sampler: `sample` -> (policy texts, reference texts), each [P][n].

    Prompts are taken in calls of generation.prompts_per_call, each under its own seed (call_seed; the
    global RNG is left as it was); under torchrun the calls are shared among the ranks and the texts
    gathered, so every rank gets every sample. In one process, with generation.keep_states, `states`
    holds what the last `sample` computed that scoring can read again (scoring.SamplingStates)."""

    def __init__(self, policy, reference, tokenizer, generation, device, seed: int):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.generation, self.device, self.seed = generation, device, seed
        self.joint = bool(generation.joint_roles) and joint_roles_possible(reference)
        # one process only: under torchrun a rank scores other candidates than the ones it sampled
        # (scripts/bench_online.py also turns it off, to time the path without it)
        self.keep_states = bool(generation.keep_states) and distributed.world_size() == 1
        self.states: Optional[SamplingStates] = None

    def sample(self, prompt_ids: List[List[int]], n: int, start: int, step: int = 0) -> Tuple[List[List[str]], List[List[str]]]:
        """prompt_ids: the step's prompts, the first at position `start` of the prompt stream; step: the
        optimizer steps taken so far (the vLLM backend names its adapter by it; unused here)."""
        self.states = SamplingStates() if self.keep_states else None
        if self.joint:
            both = self._in_calls(prompt_ids, lambda ids: self._sample_joint(ids, n), "joint", start)
            return [row[:n] for row in both], [row[n:] for row in both]
        policy = self._in_calls(prompt_ids, lambda ids: self._sample(self.policy, ids, n, "policy"), "policy", start)
        with self.reference.active() as model:
            reference = self._in_calls(prompt_ids, lambda ids: self._sample(model, ids, n, "reference"), "reference", start)
        return policy, reference

    def stats(self) -> Dict[str, float]:
        return {}

    def _decode(self, model, prompt_ids, n, roles: List[str], adapter_names=None) -> List[List[str]]:
        """decode, texts [P][n]; roles: who samples each prompt's rows (for the states kept)."""
        out = decode(model, prompt_ids, n, self.generation, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id,
                     self.device, adapter_names=adapter_names, keep_states=self.states is not None)
        if out.hidden is not None:
            for p, (ids, role) in enumerate(zip(prompt_ids, roles)):
                self.states.add_prompt(role, ids, out.prompt_cache[p])
                for r in range(p * n, (p + 1) * n):
                    self.states.add_response(role, ids, out.tokens[r], out.hidden[r], self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _sample(self, model, prompt_ids, n, role):
        return self._decode(model, prompt_ids, n, [role] * len(prompt_ids))

    def _sample_joint(self, prompt_ids, n):
        """One call: the policy's rows under its active adapter, the reference's under BASE_ADAPTER (or
        the frozen 'reference' adapter). Returns [P][2n], the policy's n first."""
        peft = self.policy.peft_config
        reference_adapter = "reference" if "reference" in peft else BASE_ADAPTER
        roles = ["policy"] * len(prompt_ids) + ["reference"] * len(prompt_ids)
        texts = self._decode(self.policy, prompt_ids + prompt_ids, n, roles,
                             adapter_names=[self.policy.active_adapter] * len(prompt_ids) + [reference_adapter] * len(prompt_ids))
        return [pol + ref for pol, ref in zip(texts[:len(prompt_ids)], texts[len(prompt_ids):])]

    def _in_calls(self, prompt_ids, sample: Callable, role: str, start: int) -> List[List[str]]:
        size = int(self.generation.prompts_per_call)
        calls = list(range(0, len(prompt_ids), size))
        share, real = distributed.sharded(calls)
        texts = []
        for offset in share:
            with torch.random.fork_rng(devices=[self.device] if torch.device(self.device).type == "cuda" else []):
                torch.manual_seed(call_seed(self.seed, role, start + offset))
                texts.append(sample(prompt_ids[offset:offset + size]))
        return [row for call in distributed.gathered(texts[:real]) for row in call]


@dataclass
class PromptTokens:
    """How the online loop and the eval answers tokenise: each prompt once (the context generation,
    scoring and training all share), each response once against it."""
    tokenizer: object
    max_length: int
    max_prompt_length: int
    prompt_format: Optional[Callable[[str], str]] = None

    def prompt(self, dataset: str, prompt: str) -> List[int]:
        text = self.prompt_format(prompt) if self.prompt_format else prompt
        return tokenize_prompt(text, self.tokenizer, self.max_prompt_length, truncation_mode_for(dataset))

    def response(self, prompt_ids: List[int], text: str) -> Dict[str, List[int]]:
        return tokenize_response(prompt_ids, text, self.tokenizer, self.max_length)


CANDIDATES_FILENAME = "candidates.jsonl"


class CandidatesJournal:
    """<run_dir>/candidates.jsonl: each online step's samples, keyed by the position of its first prompt
    in the prompt stream and n, written (rank 0, fsynced) before any of them is labelled. A resumed run
    replays the samples of the steps it repeats instead of sampling anew, so its queries are the ones
    the ledger already holds verdicts for and no label is bought twice, whatever the backend (a vLLM
    server's samples are not reproducible across adapter reloads). Every rank reads it; path None
    keeps it in memory only."""

    def __init__(self, path: Optional[str], write: bool):
        self.path, self.write = path, write
        self.entries: Dict[Tuple[int, int], Dict] = {}
        if path is not None:
            for rec in read_jsonl(path):
                self.entries[(rec["start"], rec["n"])] = rec
            if write:
                end_torn_line(path)

    def lookup(self, start: int, n: int) -> Optional[Tuple[List[List[str]], List[List[str]]]]:
        rec = self.entries.get((start, n))
        return None if rec is None else (rec["policy"], rec["reference"])

    def record(self, start: int, n: int, policy: List[List[str]], reference: List[List[str]]) -> None:
        rec = {"start": start, "n": n, "policy": policy, "reference": reference}
        if self.path is not None and self.write:
            append_jsonl(self.path, rec)
        self.entries[(start, n)] = rec


def journal_path(run_dir: Optional[str]) -> Optional[str]:
    return os.path.join(run_dir, CANDIDATES_FILENAME) if run_dir else None
