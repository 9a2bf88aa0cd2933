"""generation.backend=vllm on a real vLLM server against the HF backend: greedy agreement, the
log-prob guard, and tokens per second, for the demo's SmolLM2-135M-Instruct + LoRA.

    .venv/bin/python scripts/vllm_agreement.py [--prompts 16] [--port 8017 | --url http://127.0.0.1:8000]

Without --url it starts scripts/vllm_server.sh on the converted SmolLM2 directory (fp32, as the
policy) and stops it at the end. The policy's LoRA B matrices get random weights, so that the
adapter changes the answers and a server that ignored it would be caught.

- Greedy agreement, per role (reference = the base, policy = base + adapter): a pair of greedy
  answers agrees when the tokens are identical, or, as vLLM's own tests judge, when at the first
  token where they differ each side's token is within the other side's top 5.
- The guard: the largest gap (mean nats/token) between the server's log-probs of its samples and
  the HF scorer's, over every prompt's samples at the demo's temperature.
- Speed: Generator.sample (HF, joint roles, prompt cache) and VLLMGenerator.sample on the same
  prompts, 2 samples per role, alternating hf-vllm-hf-vllm; new tokens per second of wall time.
  On a CPU the server shares the cores with this process (it idles while HF runs).
"""
import argparse
import contextlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_selection import command_line  # noqa: E402


def compose(args, url):
    from hydra import compose as hydra_compose, initialize_config_dir
    overrides = ["experiment=demo", f"cache_dir={args.cache_dir}", "wandb.enabled=false", "generation.backend=vllm",
                 f"generation.vllm.url={url}", f"generation.max_new_tokens={args.max_new_tokens}"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "config"), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def wait_for(url: str, server: subprocess.Popen, limit_s: float) -> float:
    start = time.time()
    while time.time() - start < limit_s:
        if server is not None and server.poll() is not None:
            sys.exit(f"error: the vLLM server exited with {server.returncode} before answering (see its log)")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return time.time() - start
        except OSError:
            time.sleep(2)
    sys.exit(f"error: no answer from {url} within {limit_s} s")


def first_difference(a, b) -> int:
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hf_greedy(model, prompt_ids, max_new_tokens, eos, device):
    """Greedy token ids and the top-5 token ids at each step, from generate()."""
    out = model.generate(input_ids=torch.tensor([prompt_ids], device=device),
                         attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                         output_logits=True, return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt_ids):].tolist()
    ids = ids[:next((t + 1 for t, x in enumerate(ids) if x == eos), len(ids))]
    return ids, [set(step[0].topk(5).indices.tolist()) for step in out.logits[:len(ids)]]


def vllm_greedy(client, model, prompt_ids, sampling):
    body = {"model": model, "prompt": prompt_ids, "n": 1, "seed": 0, "logprobs": 5, "return_token_ids": True,
            "return_tokens_as_token_ids": True, **sampling}
    choice = client._call("/v1/completions", body)["choices"][0]
    top = [{int(k.split(":", 1)[1]) for k in step} for step in choice["logprobs"]["top_logprobs"]]
    return list(choice["token_ids"]), top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the HF side runs")
    parser.add_argument("--url", default=None, help="a running server of the SmolLM2 directory; else one is started")
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="timed generation rounds, alternating hf/vllm")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".cache"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from omegaconf import OmegaConf
    from data_selection import load_run_data, prompt_tokens
    from generation import Generator
    from models import build_models, smollm2_directory
    from preference_datasets import iterate_prompts
    from vllm_backend import VLLMGenerator, request_sampling

    url = args.url or f"http://127.0.0.1:{args.port}"
    config = compose(args, url)
    data = load_run_data(config)
    torch.manual_seed(0)
    tokenizer, policy, reference = build_models(config, args.device, data["train"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    server, log = None, None
    if args.url is None:
        log = open(os.path.join(tempfile.gettempdir(), f"vllm_server_{args.port}.log"), "w")
        server = subprocess.Popen([os.path.join(ROOT, "scripts", "vllm_server.sh"), smollm2_directory(config.model, config.cache_dir),
                                   str(args.port), "--dtype", "float32", "--max-model-len", str(config.max_length * 4),
                                   *(["--gpu-memory-utilization", "0.3"] if args.device == "cuda" else [])],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        startup = wait_for(url, server, 900)
        tokens = prompt_tokens(config, tokenizer)
        prompts = [tokens.prompt(name, prompt) for name, prompt, _ in itertools.islice(
            iterate_prompts(data["test"], "test", seed=0, shuffle=False, n_epochs=1), args.prompts)]
        run_dir = tempfile.mkdtemp(prefix="vllm_agreement_")
        vllm = VLLMGenerator(policy, reference, tokenizer, config.generation, args.device, 0, run_dir)
        vllm.sync(0)
        print(f"command: {command_line()}")
        print(f"server: {url} serving {vllm.base} (ready after {startup:.0f} s); {len(prompts)} held-out demo prompts, "
              f"up to {args.max_new_tokens} new tokens; HF on {args.device} ({args.threads} threads)")

        greedy = request_sampling(OmegaConf.merge(config.generation, {"temperature": 0.0}), tokenizer.eos_token_id)
        eos = tokenizer.eos_token_id
        policy.eval()
        for role, name in (("reference", vllm.base), ("policy", vllm.policy_name)):
            with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
                served = list(pool.map(lambda ids: vllm_greedy(vllm.client, name, ids, greedy), prompts))
            identical = close = 0
            for ids, (v_ids, v_top) in zip(prompts, served):
                with torch.no_grad(), (reference.active() if role == "reference" else contextlib.nullcontext(policy)) as model:
                    hf_ids, hf_top = hf_greedy(model, ids, args.max_new_tokens, eos, args.device)
                if hf_ids == v_ids:
                    identical += 1
                    continue
                t = first_difference(hf_ids, v_ids)
                close += int(t < len(hf_ids) and t < len(v_ids) and hf_ids[t] in v_top[t] and v_ids[t] in hf_top[t])
            print(f"greedy agreement, {role}: {identical}/{len(prompts)} identical, {identical + close}/{len(prompts)} "
                  "within top 5 at the first difference")

        gaps = []
        samples = vllm._request_all(prompts, 2, start=0)
        for ids, pol, ref in zip(prompts, samples["policy"], samples["reference"]):
            vllm.check_logps(ids, pol, ref, step=0)
            gaps.append(vllm.last_gap)
        print(f"log-prob guard: largest gap {max(gaps):.2e} nats/token, median {statistics.median(gaps):.2e}, over "
              f"{4 * len(prompts)} sampled sequences at temperature {config.generation.temperature} "
              f"(tolerance {config.generation.vllm.logprob_tolerance})")

        hf = Generator(policy, reference, tokenizer, config.generation, args.device, seed=0)
        rates = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            backend = ("hf", "vllm")[r % 2]
            start = time.perf_counter()
            pol, ref = (hf.sample(prompts, 2, start=0) if backend == "hf" else vllm.sample(prompts, 2, start=0, step=0))
            seconds = time.perf_counter() - start
            new_tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) + 1 for row in pol + ref for t in row)
            rates[backend].append(new_tokens / seconds)
        hf_rate, vllm_rate = statistics.mean(rates["hf"]), statistics.mean(rates["vllm"])
        print(f"tokens/s (new tokens of 2 samples per role per prompt, mean of {len(rates['hf'])} rounds each, "
              f"alternating): hf {hf_rate:.0f}, vllm {vllm_rate:.0f} (vllm/hf = {vllm_rate / hf_rate:.2f}x)")
        vllm.close()
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()


if __name__ == "__main__":
    main()
