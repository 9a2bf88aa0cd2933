"""generation.backend=vllm against a loopback server with vLLM's endpoints (tests/fake_vllm_server.py):
the samples are the HF backend's under greedy decoding, the adapter is reloaded under a new name each
step, a stale adapter or another base stops the run in one line, requests carry every sampling field
and one seed per prompt, and a killed run resumes by replaying its journal without buying a label
twice. A marked test runs against a real `vllm serve` when .venv-vllm exists."""
import copy
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, add_reference_adapter, compose_config, tiny_overrides
from fake_vllm_server import FakeVLLMServer
from generation import Generator, call_seed
from utils import ConfigError, UserError, read_jsonl
from vllm_backend import ADAPTER_DIR, VLLMGenerator, logprob_gap, request_sampling


def generation_config(url="http://127.0.0.1:9", **kw):
    base = {"backend": "vllm", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12,
            "prompts_per_call": 3, "joint_roles": True, "keep_states": True,
            "vllm": {"url": url, "timeout_s": 30, "logprob_tolerance": 1e-3}}
    return OmegaConf.create({**base, **kw})


def base_of(policy):
    """The policy's base weights as a plain model: what the server serves."""
    return copy.deepcopy(policy).unload()


@pytest.fixture
def served(lora_policy):
    """(tokenizer, policy, reference, prompt ids, a server of the policy's base, its URL)."""
    tokenizer, policy, reference, ids = lora_policy
    server = FakeVLLMServer(base_of(policy))
    url = server.start()
    yield tokenizer, policy, reference, ids, server, url
    server.stop()


def test_greedy_samples_are_the_hf_backends_and_requests_are_explicit(served, tmp_path):
    tokenizer, policy, reference, ids, server, url = served
    cfg = generation_config(url)
    vllm = VLLMGenerator(policy, reference, tokenizer, cfg, "cpu", seed=5, run_dir=str(tmp_path))
    hf = Generator(policy, reference, tokenizer, cfg, "cpu", seed=5)
    pol_v, ref_v = vllm.sample(ids, 2, start=10, step=0)
    pol_h, ref_h = hf.sample(ids, 2, start=10)
    assert (pol_v, ref_v) == (pol_h, ref_h)
    assert pol_v != ref_v, "the adapter must change the answers, or this test shows nothing"
    assert vllm.last_gap < 1e-4                                   # fp32 on both sides
    # one request per prompt and role, seeded by the prompt's position; the reference is the base
    bodies = server.completions
    assert len(bodies) == 2 * len(ids)
    seeds = {(b["model"], tuple(b["prompt"])): b["seed"] for b in bodies}
    for i, prompt in enumerate(ids):
        assert seeds[(vllm.policy_name, tuple(prompt))] == call_seed(5, "policy", 10 + i)
        assert seeds[("base-model", tuple(prompt))] == call_seed(5, "reference", 10 + i)
    explicit = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "max_tokens", "stop_token_ids", "seed", "n"}
    assert all(explicit <= b.keys() and b["n"] == 2 for b in bodies)


def test_sampled_requests_carry_the_config_and_repeat_under_their_seeds(served, tmp_path):
    tokenizer, policy, reference, ids, server, url = served
    cfg = generation_config(url, temperature=0.8, top_p=0.9, top_k=7)
    assert request_sampling(cfg, 2) == {
        "temperature": 0.8, "top_p": 0.9, "top_k": 7, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "max_tokens": 12, "stop_token_ids": [2], "ignore_eos": False, "skip_special_tokens": True}
    vllm = VLLMGenerator(policy, reference, tokenizer, cfg, "cpu", seed=0, run_dir=str(tmp_path))
    first = vllm.sample(ids, 3, start=0, step=0)
    assert first == vllm.sample(ids, 3, start=0, step=0)         # same adapter, same seeds
    assert first != vllm.sample(ids, 3, start=len(ids), step=0)  # other positions, other seeds
    assert len(server.loaded) == 1                                # the same step loads nothing new


def test_the_adapter_is_reloaded_under_a_new_name_every_step(served, tmp_path):
    tokenizer, policy, reference, ids, server, url = served
    vllm = VLLMGenerator(policy, reference, tokenizer, generation_config(url), "cpu", seed=0, run_dir=str(tmp_path))
    before, _ = vllm.sample(ids, 1, start=0, step=0)
    with torch.no_grad():   # an optimizer step
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    after, _ = vllm.sample(ids, 1, start=0, step=1)
    assert before != after and after == Generator(policy, reference, tokenizer, generation_config(url), "cpu", 0).sample(ids, 1, 0)[0]
    tag = vllm.tag
    assert server.loaded == [f"policy-s0-{tag}", f"policy-s1-{tag}"] and server.unloaded == [f"policy-s0-{tag}"]
    assert os.listdir(os.path.join(tmp_path, ADAPTER_DIR)) == [f"policy-s1-{tag}"]   # the old files go too
    vllm.close()
    assert server.unloaded[-1] == f"policy-s1-{tag}" and not server.adapters


def test_a_stale_adapter_stops_the_run_in_one_line(lora_policy, tmp_path):
    tokenizer, policy, reference, ids = lora_policy
    server = FakeVLLMServer(base_of(policy), stale=True)
    url = server.start()
    try:
        vllm = VLLMGenerator(policy, reference, tokenizer, generation_config(url, logprob_tolerance=0.05), "cpu",
                             seed=0, run_dir=str(tmp_path))
        vllm.sample(ids, 2, start=0, step=0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.mul_(-3.0)
        with pytest.raises(UserError, match=r"step 1: vLLM's log-probs of the policy's samples \(policy-s1-.*stale adapter") as err:
            vllm.sample(ids, 2, start=0, step=1)
        assert "\n" not in str(err.value)
    finally:
        server.stop()


def test_another_base_model_on_the_server_stops_the_run(lora_policy, tmp_path):
    tokenizer, policy, reference, ids = lora_policy
    other = base_of(policy)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    server = FakeVLLMServer(other)
    url = server.start()
    try:
        vllm = VLLMGenerator(policy, reference, tokenizer, generation_config(url, logprob_tolerance=0.05), "cpu",
                             seed=0, run_dir=str(tmp_path))
        with pytest.raises(UserError, match="another base model"):
            vllm.sample(ids, 2, start=0, step=0)
    finally:
        server.stop()


def test_a_frozen_reference_adapter_is_loaded_once_and_samples_the_reference(served, tmp_path):
    tokenizer, policy, reference, ids, server, url = served
    add_reference_adapter(policy)
    cfg = generation_config(url)
    vllm = VLLMGenerator(policy, reference, tokenizer, cfg, "cpu", seed=0, run_dir=str(tmp_path))
    for step in range(2):
        pol, ref = vllm.sample(ids, 1, start=0, step=step)
    assert (pol, ref) == Generator(policy, reference, tokenizer, cfg, "cpu", seed=0).sample(ids, 1, start=0)
    assert server.loaded == [f"reference-{vllm.tag}", f"policy-s0-{vllm.tag}", f"policy-s1-{vllm.tag}"]
    assert {b["model"] for b in server.completions} == {f"reference-{vllm.tag}", f"policy-s0-{vllm.tag}", f"policy-s1-{vllm.tag}"}
    assert policy.active_adapter == "default" and vllm.last_gap < 1e-4


def test_no_server_and_server_errors_are_one_line(lora_policy, tmp_path):
    tokenizer, policy, reference, ids = lora_policy
    with pytest.raises(UserError, match=r"generation.vllm.url=http://127.0.0.1:9: no vLLM server answers .*make vllm-server"):
        VLLMGenerator(policy, reference, tokenizer, generation_config(), "cpu", seed=0, run_dir=str(tmp_path))
    server = FakeVLLMServer(base_of(policy))
    url = server.start()
    try:
        vllm = VLLMGenerator(policy, reference, tokenizer, generation_config(url), "cpu", seed=0, run_dir=str(tmp_path))
        with pytest.raises(UserError, match="HTTP 404: The model `nope` does not exist"):
            vllm.client.complete("nope", ids[0], 1, request_sampling(generation_config(), 2), seed=0)
        old_complete = server.complete
        server.complete = lambda body: (200, {"choices": [{"index": 0, "text": "x", "logprobs": None}]})
        with pytest.raises(UserError, match="a completion lacks token_ids or logprobs.token_logprobs") as err:
            vllm.client.complete(vllm.base, ids[0], 1, request_sampling(generation_config(), 2), seed=0)
        assert "\n" not in str(err.value)
        server.complete = old_complete
        vllm.sync(0)
        with pytest.raises(UserError, match="HTTP 400: The lora adapter .* has already been loaded"):
            vllm.client.load_adapter(vllm.policy_name, os.path.join(tmp_path, ADAPTER_DIR, vllm.policy_name))
    finally:
        server.stop()


def test_logprob_gap_is_per_token():
    assert logprob_gap([-1.0, -2.0, -0.5], -3.8) == pytest.approx(0.3 / 3)
    assert logprob_gap([], 0.0) == 0.0


@pytest.mark.parametrize("overrides,message", [
    (["online=true", "selection_strategy=uniref", "selection_ratio=1"], "needs lora=true"),
    (["online=true", "selection_strategy=uniref", "selection_ratio=1", "qlora=true"], "needs lora=true"),
    (["active=true"], "set online=true"),
])
def test_configs_the_vllm_backend_cannot_serve_are_refused(tmp_path, overrides, message):
    from train import check_config
    config = compose_config(tiny_overrides(tmp_path, "loss=dpo", "exp_name=x", "generation.backend=vllm", *overrides))
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    config = compose_config(tiny_overrides(tmp_path, "loss=dpo", "exp_name=x", "generation.backend=sglang"))
    with pytest.raises(ConfigError, match="generation.backend=sglang is unknown; allowed: hf, vllm"):
        check_config(config)


# ----------------------------------------------------------------------------------------------
# End to end: train.py with the backend, killed and resumed

ONLINE = ["datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo", "online=true",
          "selection_strategy=borda", "oracle=haiku", "lora=true", "batch_size=2", "selection_ratio=2",
          "num_action_samples=2", "n_examples=8", "eval_every=4", "generation.max_new_tokens=8",
          "n_eval_model_samples=2", "generation.backend=vllm", "generation.vllm.logprob_tolerance=1e-3"]


@pytest.fixture
def run_server(tmp_path):
    """A server of the base that a run with ONLINE builds (the same seed, the same tiny weights)."""
    from fake_vllm_server import run_base
    server = FakeVLLMServer(run_base(tiny_overrides(tmp_path, *ONLINE, "exp_name=base")))
    url = server.start()
    yield server, url
    server.stop()


def test_online_run_on_the_vllm_backend_resumes_from_its_journal(tmp_path, monkeypatch, run_server):
    """Killed in its third step (checkpoint after the second), resumed: the third step's samples are replayed
    from candidates.jsonl (no request reaches the server for them), its labels come from the ledger, the
    fourth step samples anew, and the run ends as the uninterrupted one."""
    from test_train import run, run_killed_at_step
    from train import resume_config
    server, url = run_server
    overrides = tiny_overrides(tmp_path, *ONLINE, f"generation.vllm.url={url}", "eval_every=2")
    full = run(compose_config(overrides + ["exp_name=full"]))
    full_dir = os.path.dirname(full["checkpoint"])
    train = [r for r in read_jsonl(os.path.join(full_dir, "metrics.jsonl")) if r.get("split") == "train"]
    assert len(train) == 4 and all(r["generation/vllm_logprob_gap"] < 1e-4 for r in train)
    assert len(read_jsonl(os.path.join(full_dir, "candidates.jsonl"))) == 4

    run_dir = run_killed_at_step(monkeypatch, tmp_path, overrides, 2)
    assert os.readlink(os.path.join(run_dir, "LATEST")) == "step-2"
    requests_before = len(server.completions)
    resumed = run(resume_config(run_dir))
    # the third step replayed, the fourth asked the server: 4 prompts x 2 roles
    assert len(server.completions) - requests_before == 4 * 2
    ledger = lambda d: [(r["key"], r["winner"]) for r in read_jsonl(os.path.join(d, "oracle_ledger.jsonl"))]
    assert ledger(run_dir) == ledger(full_dir) and len(ledger(run_dir)) == 8
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(s["checkpoint"], "adapter/adapter_model.safetensors")) for s in (full, resumed))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    replayed = [r["counters/steps_replayed"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("split") == "train"]
    assert replayed[-2:] == [1, 0]


def test_two_ranks_on_the_vllm_backend_buy_the_one_process_labels(tmp_path):
    """Under torchrun rank 0 alone talks to the server (one adapter load per step, one request per prompt
    and role) and broadcasts the samples: the ledger and weights are the one-process run's."""
    from test_distributed import finished, launch, ledger, max_difference, weights
    out = tmp_path / "server"
    out.mkdir()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fake_vllm_server.py"),
                               *tiny_overrides(out, *ONLINE, "exp_name=base")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        stats = lambda: json.load(urllib.request.urlopen(url + "/fake/stats"))
        overrides = [*tiny_overrides(out, *ONLINE, f"generation.vllm.url={url}"), "generation.prompts_per_call=1"]
        one = finished(tmp_path / "one", launch(tmp_path / "one", 1, overrides))
        after_one = stats()
        two = finished(tmp_path / "two", launch(tmp_path / "two", 2, overrides))
        after_two = stats()
        assert ledger(two) == ledger(one) and len(ledger(two)) == 8
        assert max_difference(weights(one), weights(two)) < 1e-5
        # 4 steps: 4 adapter loads and 4 x 4 prompts x 2 roles requests, as many as the one-process run
        assert after_one == {"loaded": 4, "completions": 32}
        assert {k: after_two[k] - after_one[k] for k in after_two} == {"loaded": 4, "completions": 32}
    finally:
        server.kill()


# ----------------------------------------------------------------------------------------------
# A real vLLM server (.venv-vllm; `make vllm-venv`)

VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")


@pytest.mark.vllm
@pytest.mark.skipif(not os.path.exists(VLLM_PYTHON), reason="no .venv-vllm (make vllm-venv)")
def test_a_real_vllm_server_samples_what_the_hf_scorer_scores(tmp_path):
    """SmolLM2 on `vllm serve` (scripts/vllm_server.sh): greedy samples agree with HF generate() (first
    differing token within the other's top 5, as vLLM's own tests judge), and the log-prob guard passes."""
    script = os.path.join(ROOT, "scripts", "vllm_agreement.py")
    proc = subprocess.run([os.path.join(ROOT, ".venv", "bin", "python"), script, "--port", "8017", "--prompts", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import re
    for role in ("reference", "policy"):
        close, total = map(int, re.search(rf"greedy agreement, {role}: \d+/\d+ identical, (\d+)/(\d+) within top 5",
                                          proc.stdout).groups())
        assert close == total == 8, proc.stdout
    gap = float(re.search(r"log-prob guard: largest gap (\S+) nats/token", proc.stdout).group(1))
    assert gap < 1e-3, proc.stdout     # fp32 on both sides
