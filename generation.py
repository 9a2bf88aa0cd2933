"""Sampling responses: the online loop's candidates and the evaluator's greedy answers.

`Generator.sample(prompt_ids, n, start)` is the one interface the online loop uses: n samples per
prompt from the policy and n from the reference, seeded by the prompts' position in the prompt
stream, so that the samples do not depend on how the calls are shared among torchrun ranks.
Every sampling parameter is explicit (`generation.*` in config/config.yaml); nothing is left to a
library default.

Under LoRA the reference is the policy's own base (or its frozen 'reference' adapter), so with
`generation.joint_roles=true` both roles sample in one generate() call: a mixed-adapter batch in
which the reference rows skip the trainable adapter. That halves the decoding steps of a step's
generation; greedy outputs are the same as with one call per role (tests/test_generation.py).
"""
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import distributed
from preference_datasets import tokenize_prompt, tokenize_response, truncation_mode_for
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


def call_seed(seed: int, role: str, position: int) -> int:
    """The torch seed of one generate() call: a function of the run's seed, who samples and the
    position in the prompt stream of the call's first prompt only."""
    return random.Random(f"{seed}|{role}|{position}").getrandbits(63)


def joint_roles_possible(reference) -> bool:
    """Both roles fit one generate() call when the reference is the policy's own PEFT base."""
    return reference.model is None and hasattr(reference.policy, "peft_config")


class Generator:
    """The online loop's sampler: `sample` -> (policy texts, reference texts), each [P][n].

    Prompts are taken in calls of generation.prompts_per_call, each under its own seed (call_seed; the
    global RNG is left as it was); under torchrun the calls are shared among the ranks and the texts
    gathered, so every rank gets every sample."""

    def __init__(self, policy, reference, tokenizer, generation, device, seed: int):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.generation, self.device, self.seed = generation, device, seed
        self.joint = bool(generation.joint_roles) and joint_roles_possible(reference)
        # one process only, as CandidateScorer.share_prompts (scripts/bench_online.py also turns it off,
        # to time the path without it)
        self.reuse_prompt = distributed.world_size() == 1

    def sample(self, prompt_ids: List[List[int]], n: int, start: int, step: int = 0) -> Tuple[List[List[str]], List[List[str]]]:
        """prompt_ids: the step's prompts, the first at position `start` of the prompt stream; step: the
        optimizer steps taken so far (the vLLM backend names its adapter by it; unused here)."""
        if self.joint:
            both = self._in_calls(prompt_ids, lambda ids: self._sample_joint(ids, n), "joint", start)
            return [row[:n] for row in both], [row[n:] for row in both]
        policy = self._in_calls(prompt_ids, lambda ids: self._sample(self.policy, ids, n), "policy", start)
        with self.reference.active() as model:
            reference = self._in_calls(prompt_ids, lambda ids: self._sample(model, ids, n), "reference", start)
        return policy, reference

    def stats(self) -> Dict[str, float]:
        return {}

    def _sample(self, model, prompt_ids, n):
        return sample_responses(model, self.tokenizer, prompt_ids, n, self.generation, self.device,
                                reuse_prompt=self.reuse_prompt)

    def _sample_joint(self, prompt_ids, n):
        """One call: the policy's rows under its active adapter, the reference's under BASE_ADAPTER (or
        the frozen 'reference' adapter). Returns [P][2n], the policy's n first."""
        peft = self.policy.peft_config
        reference_adapter = "reference" if "reference" in peft else BASE_ADAPTER
        policy_adapter = self.policy.active_adapter
        texts = sample_responses(self.policy, self.tokenizer, prompt_ids + prompt_ids, n, self.generation, self.device,
                                 adapter_names=[policy_adapter] * len(prompt_ids) + [reference_adapter] * len(prompt_ids),
                                 reuse_prompt=self.reuse_prompt)
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
