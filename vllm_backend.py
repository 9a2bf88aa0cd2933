"""Sampling on a vLLM server: the online loop's `generation.backend=vllm`.

The server (`make vllm-server`, scripts/vllm_server.sh) runs vLLM's OpenAI-compatible server with
LoRA on loopback, from its own venv (.venv-vllm), since vLLM pins other torch and transformers
versions than this project. One server holds both roles:
- the reference is the base model it serves, or the frozen SFT adapter (the policy's 'reference'
  adapter), loaded once as `reference-<run tag>`;
- the policy is the trainable LoRA adapter, saved after each optimizer step and loaded under a new
  name `policy-s<step>-<run tag>`, the previous one unloaded. A name is never loaded twice: vLLM
  keys its prefix cache by adapter name and would serve the old adapter's cached states.

Requests send token ids and get token ids back, with every sampling parameter explicit and one seed
per prompt and role (generation.call_seed of its position in the prompt stream). Every step the
log-probs the server returns are checked against the HF scorer's on the same tokens
(`check_logps`); a mismatch beyond generation.vllm.logprob_tolerance stops the run in one line,
as it means a stale adapter or another base model. Under torchrun rank 0 alone talks to the server
and broadcasts the samples.
"""
import atexit
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import distributed
from generation import call_seed
from utils import UserError

ADAPTER_DIR = "vllm_adapters"   # under the run directory: the adapter files the server reads


@dataclass
class Completion:
    """One sampled continuation: its token ids (EOS included when it stopped there) and the server's
    log-prob of each of them under the model that sampled it (raw, before temperature/top-k), nats."""
    token_ids: List[int]
    logprobs: List[float]


class VLLMClient:
    """The endpoints of vLLM's OpenAI-compatible server this project uses, over plain HTTP."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url.rstrip("/"), float(timeout_s)

    def _call(self, path: str, body: Optional[Dict] = None) -> Dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"},
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise UserError(f"vLLM server {self.url}{path}: HTTP {e.code}: {error_message(e.read().decode())}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"generation.vllm.url={self.url}: no vLLM server answers ({reason}); start one with "
                            "`make vllm-server MODEL=<the run's model>` (scripts/vllm_server.sh)") from None
        try:
            return json.loads(text)
        except ValueError:      # adapter (un)loading answers in plain text ("Success: ...")
            return {"message": text}

    def base_model(self) -> str:
        """The name under which the server serves its base model (the one model without a parent)."""
        bases = [m["id"] for m in self._call("/v1/models").get("data", []) if m.get("parent") is None]
        if len(bases) != 1:
            raise UserError(f"vLLM server {self.url} serves {len(bases)} base models ({', '.join(bases)}); expected one")
        return bases[0]

    def load_adapter(self, name: str, path: str) -> None:
        self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": os.path.abspath(path)})

    def unload_adapter(self, name: str) -> None:
        self._call("/v1/unload_lora_adapter", {"lora_name": name})

    def complete(self, model: str, prompt_ids: List[int], n: int, sampling: Dict, seed: int) -> List[Completion]:
        """n continuations of one prompt (token ids) from `model` (the base's name or an adapter's)."""
        body = {"model": model, "prompt": prompt_ids, "n": n, "seed": seed, "logprobs": 0, "return_token_ids": True,
                "echo": False, "stream": False, **sampling}
        choices = sorted(self._call("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise UserError(f"vLLM server {self.url}: asked for n={n} completions, got {len(choices)}")
        try:
            return [Completion(list(c["token_ids"]), [float(x) for x in c["logprobs"]["token_logprobs"]]) for c in choices]
        except (KeyError, TypeError):
            raise UserError(f"vLLM server {self.url}: a completion lacks token_ids or logprobs.token_logprobs (a vLLM "
                            "that honours return_token_ids is needed; make vllm-venv installs one)") from None


def error_message(body: str) -> str:
    """The message of an OpenAI-style error body, else the body itself (first line)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip().splitlines()[0] if body.strip() else "(empty body)"


def request_sampling(generation, eos_token_id: int) -> Dict:
    """The sampling fields of a completions request: every one explicit, so that the server's own
    defaults (and any generation_config.json it read) play no part. Greedy when temperature is 0."""
    greedy = float(generation.temperature) <= 0
    return {"temperature": 0.0 if greedy else float(generation.temperature),
            "top_p": 1.0 if greedy else float(generation.top_p),
            "top_k": 0 if greedy else int(generation.top_k),          # 0 = off, in both libraries
            "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "max_tokens": int(generation.max_new_tokens), "stop_token_ids": [int(eos_token_id)],
            "ignore_eos": False, "skip_special_tokens": True}


def logprob_gap(server: List[float], scorer: float) -> float:
    """Mean |difference| per token (nats) between the server's log-probs of a sample's tokens and the
    scorer's sum over the same tokens; |sum(server) - scorer| / tokens."""
    return abs(sum(server) - scorer) / max(1, len(server))


class VLLMGenerator:
    """generation.Generator's interface (`sample` -> (policy texts, reference texts), each [P][n]) on a
    vLLM server; see the module docstring."""

    def __init__(self, policy, reference, tokenizer, generation, device, seed: int, run_dir: str):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.generation, self.device, self.seed = generation, device, seed
        self.tolerance = float(generation.vllm.logprob_tolerance)
        self.sampling = request_sampling(generation, tokenizer.eos_token_id)
        self.adapter_dir = os.path.join(run_dir, ADAPTER_DIR)
        self.tag = uuid.uuid4().hex[:8]     # names are unique per process: a resumed run never reuses one
        self.client = VLLMClient(generation.vllm.url, generation.vllm.timeout_s) if distributed.is_main() else None
        self.base = self.client.base_model() if self.client else None
        self.reference_name: Optional[str] = None
        self.policy_name: Optional[str] = None
        self.synced_step: Optional[int] = None
        self.last_gap = 0.0
        if self.client:
            atexit.register(self.close)

    # -- adapters ------------------------------------------------------------------------------

    def _save(self, adapter: str, name: str, weights) -> str:
        """Write one adapter's files for the server; returns the directory holding adapter_config.json."""
        path = os.path.join(self.adapter_dir, name)
        self.policy.save_pretrained(path, selected_adapters=[adapter], **({"state_dict": weights} if weights else {}))
        # PEFT writes adapters other than 'default' into a subfolder of their name
        return path if adapter == "default" else os.path.join(path, adapter)

    def sync(self, step: int) -> None:
        """Make the server's policy adapter the policy's current weights (a collective under FSDP)."""
        if step == self.synced_step:
            return
        weights = distributed.adapter_state(self.policy)
        if self.client:
            if self.reference_name is None and "reference" in self.policy.peft_config:
                name = f"reference-{self.tag}"
                self.client.load_adapter(name, self._save("reference", name, weights))
                self.reference_name = name
            name = f"policy-s{step}-{self.tag}"
            self.client.load_adapter(name, self._save(self.policy.active_adapter, name, weights))
            previous, self.policy_name = self.policy_name, name
            if previous:
                self.client.unload_adapter(previous)
                shutil.rmtree(os.path.join(self.adapter_dir, previous), ignore_errors=True)
        self.synced_step = step

    def close(self) -> None:
        """Unload this run's adapters (best effort: the server may be gone already)."""
        for name in (self.policy_name, self.reference_name):
            if name:
                try:
                    self.client.unload_adapter(name)
                except UserError:
                    pass
        self.policy_name = self.reference_name = None

    def stats(self) -> Dict[str, float]:
        return {"generation/vllm_logprob_gap": self.last_gap}

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, prompt_ids: List[List[int]], n: int, start: int, step: int = 0) -> Tuple[List[List[str]], List[List[str]]]:
        """prompt_ids: the step's prompts, the first at position `start` of the prompt stream; step: the
        optimizer steps taken so far (names the adapter)."""
        self.sync(step)
        samples = distributed.broadcast(self._request_all(prompt_ids, n, start) if self.client else None)
        self.check_logps(prompt_ids[0], samples["policy"][0], samples["reference"][0], step)
        decode = lambda row: [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in row]
        return [decode(row) for row in samples["policy"]], [decode(row) for row in samples["reference"]]

    def _request_all(self, prompt_ids: List[List[int]], n: int, start: int) -> Dict[str, List[List[Completion]]]:
        models = {"policy": self.policy_name, "reference": self.reference_name or self.base}
        jobs = [(role, i) for role in models for i in range(len(prompt_ids))]
        # one request per prompt and role (a seed is per request); the server batches them
        with ThreadPoolExecutor(max_workers=min(64, len(jobs))) as pool:
            results = list(pool.map(lambda job: self.client.complete(
                models[job[0]], prompt_ids[job[1]], n, self.sampling, call_seed(self.seed, job[0], start + job[1])), jobs))
        out = {role: [] for role in models}
        for (role, _), completions in zip(jobs, results):
            out[role].append(completions)
        return out

    @torch.no_grad()
    def check_logps(self, prompt_ids: List[int], policy: List[Completion], reference: List[Completion], step: int) -> None:
        """The HF scorer's log-probs of one prompt's samples (policy's under the policy, reference's under
        the reference) against the server's; raises UserError beyond the tolerance. Every rank computes
        it on the same broadcast samples (a collective under FSDP)."""
        from scoring import response_logps
        rows = [(c, "policy") for c in policy] + [(c, "reference") for c in reference]
        width = max(len(prompt_ids) + len(c.token_ids) for c, _ in rows)
        pad = self.tokenizer.pad_token_id

        def batch(completions):
            ids = [prompt_ids + c.token_ids for c in completions]
            tensor = lambda rows_, fill: torch.tensor([r + [fill] * (width - len(r)) for r in rows_], device=self.device)
            return (tensor(ids, pad), tensor([[1] * len(r) for r in ids], 0),
                    tensor([[-100] * len(prompt_ids) + c.token_ids for c in completions], -100))

        was_training = self.policy.training
        self.policy.eval()
        try:
            scorer_policy = response_logps(self.policy, *batch(policy))
            with self.reference.active() as model:
                scorer_reference = response_logps(model, *batch(reference))
        finally:
            self.policy.train(was_training)
        gaps = [logprob_gap(c.logprobs, float(s)) for c, s in zip(policy, scorer_policy)]
        gaps += [logprob_gap(c.logprobs, float(s)) for c, s in zip(reference, scorer_reference)]
        self.last_gap = max(gaps)
        if self.last_gap > self.tolerance:
            worst = gaps.index(self.last_gap)
            role, name = ("policy", self.policy_name) if worst < len(policy) else ("reference", self.reference_name or self.base)
            raise UserError(f"step {step}: vLLM's log-probs of the {role}'s samples ({name}) differ from the HF scorer's by "
                            f"{self.last_gap:.4f} nats/token (generation.vllm.logprob_tolerance={self.tolerance}): the server "
                            "serves a stale adapter or another base model than model.name_or_path")
