"""torchrun on CPU (gloo, 2 processes, the tiny model): DDP and FSDP2 select, label and train as the
one-process run does; a failing rank ends the job in one line; a killed run resumes exactly, at its
world size and at another.

Launched as `python -m torch.distributed.run` (accelerate's launcher silently starts one process on
CPU) through tests/dist_entry.py, which records the training batches and can make a rank fail."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, tiny_overrides, write_synthetic_pairs
from utils import read_jsonl

ENTRY = os.path.join(ROOT, "tests", "dist_entry.py")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def launch(out, nproc: int, overrides, timeout: float = 150, **env) -> subprocess.CompletedProcess:
    """train.py with `overrides` as exp_name=t in out/runs, alone (nproc=1) or on nproc ranks; the batches
    go to out/batches.jsonl."""
    os.makedirs(out, exist_ok=True)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = overrides if any(o.startswith("resume=") for o in overrides) else [
        *(o for o in overrides if not o.startswith("local_dirs=")), f"local_dirs=[{out}/runs]", "exp_name=t"]
    return subprocess.run([*launcher, ENTRY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, "RECORD_BATCHES": f"{out}/batches.jsonl", **env})


def finished(out, proc) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(glob.glob(f"{out}/runs/t_*")) == 1, proc.stderr[-3000:]
    return glob.glob(f"{out}/runs/t_*")[0]


def batches(out):
    return [json.loads(line) for line in open(f"{out}/batches.jsonl")]


def weights(run_dir):
    from checkpoints import read_weights
    return read_weights(os.path.join(run_dir, "LATEST"))


def max_difference(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def ledger(run_dir):
    return [(r["key"], r["winner"]) for r in read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))]


def resumed_copy(run_dir, name) -> str:
    """A copy of a killed run's directory, to resume it once more (a resume continues in its directory)."""
    copy = os.path.join(os.path.dirname(run_dir), name)
    shutil.copytree(run_dir, copy, symlinks=True)
    return copy


# Weights of runs at different world sizes differ by fp32 summation order, which Adam amplifies where a
# gradient is near zero (its update is ~ lr * g / (|g| + eps)): up to 3.7e-5 was measured on one CPU for a
# 3-step full fine-tune at lr 1e-2. A real fault (a row trained twice, a microbatch misweighted) moves
# weights by about lr.
ACROSS_WORLD_SIZES = 1e-4

OFFLINE = ["loss=dpo", "active=true", "selection_strategy=ae", "batch_size=5", "gradient_accumulation_steps=3",
           "n_examples=15", "eval_every=5", "n_eval_examples=20", "lr=1e-2"]
ONLINE = ["datasets=[haikus]", f"dataset_files.haikus={ROOT}/data/haiku_keywords.txt", "loss=dpo", "online=true",
          "selection_strategy=borda", "oracle=haiku", "lora=true", "batch_size=2", "selection_ratio=2",
          "num_action_samples=2", "n_examples=8", "eval_every=4", "generation.max_new_tokens=8",
          "n_eval_model_samples=3", "generation.prompts_per_call=1"]


@pytest.mark.parametrize("strategy,lora,estimator", [("ddp", False, "laplace"), ("fsdp", True, "laplace"),
                                                     ("ddp", False, "head"), ("ddp", True, "head_analytic")])
def test_offline_ae_on_two_ranks_selects_and_trains_like_one_process(tmp_path, strategy, lora, estimator):
    """Batch 5 over 2 ranks in 3 microbatches (uneven rows, a weight-0 filler): the selected pairs are the
    one-process run's for every estimator (MC-dropout masks are seeded per candidate, not per rank), the
    weights agree to fp32 rounding (summation order), the eval metrics too."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, f"uncertainty_method={estimator}",
                               *(["lora=true"] if lora else []), *(["llm_dropout=0.2"] if estimator == "head" else []))
    one = finished(tmp_path / "one", launch(tmp_path / "one", 1, overrides))
    two = finished(tmp_path / "two", launch(tmp_path / "two", 2, [*overrides, f"distributed.strategy={strategy}"]))
    assert batches(tmp_path / "two") == batches(tmp_path / "one") and len(batches(tmp_path / "one")) == 3
    assert max_difference(weights(one), weights(two)) < ACROSS_WORLD_SIZES
    final = lambda d: json.load(open(os.path.join(d, "summary.json")))["final_eval"]
    assert final(one).keys() == final(two).keys()
    assert all(abs(final(one)[k] - final(two)[k]) < 1e-4 for k in final(one))


@pytest.fixture(scope="module")
def online_one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("online_one")
    return out, finished(out, launch(out, 1, tiny_overrides(out, *ONLINE)))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_online_borda_on_two_ranks_buys_the_one_process_labels(tmp_path, online_one_process, strategy):
    """Generation and scoring shared by the ranks, the oracle asked by rank 0 alone: the ledger holds every
    query once and equals the one-process ledger, and the weights agree."""
    one_out, one = online_one_process
    two = finished(tmp_path, launch(tmp_path, 2, [*tiny_overrides(tmp_path, *ONLINE), f"distributed.strategy={strategy}"]))
    assert ledger(two) == ledger(one) and len(ledger(two)) == 8
    assert len({key for key, _ in ledger(two)}) == 8
    assert batches(tmp_path) == batches(one_out)
    assert max_difference(weights(one), weights(two)) < ACROSS_WORLD_SIZES


def test_killed_two_rank_run_resumes_on_two_ranks_and_alone_to_the_same_weights_and_ledger(tmp_path, online_one_process):
    """Rank 1 dies at step 3 (the last checkpoint is at step 2, 4 labels): the job ends with rank 1's
    error in one line. Resumed on 2 ranks, and (a copy) resumed by one process, it buys only the missing
    labels and ends with the weights and ledger of the uninterrupted run."""
    one_out, one = online_one_process
    killed = launch(tmp_path, 2, tiny_overrides(tmp_path, *ONLINE), FAIL_RANK="1", FAIL_STEP="3")
    assert killed.returncode != 0
    assert "error: rank 1 of 2: RuntimeError: injected failure at step 3" in killed.stderr
    run_dir = glob.glob(f"{tmp_path}/runs/t_*")[0]
    assert os.readlink(os.path.join(run_dir, "LATEST")) == "step-2"
    copy = resumed_copy(run_dir, "alone")

    for directory, nproc in ((run_dir, 2), (copy, 1)):
        start = len(batches(tmp_path))
        resumed = launch(tmp_path, nproc, [f"resume={directory}"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert batches(tmp_path)[:2] + batches(tmp_path)[start:] == batches(one_out), nproc
        assert ledger(directory) == ledger(one)            # 8 labels, none bought twice
        assert max_difference(weights(one), weights(directory)) < ACROSS_WORLD_SIZES


def test_killed_fsdp_full_fine_tune_writes_shards_and_resumes_at_its_world_size_and_alone(tmp_path):
    """A full fine-tune under FSDP, rank 1 killed at step 2: its checkpoint holds each rank's shards of the
    weights and optimizer (no gathered copy) and the trainer state once, with each rank's RNG. Resumed on
    2 ranks, and (a copy) by one process reading the shards whole, it ends with the uninterrupted
    one-process run's weights (fp32 summation order) and draws the same batches."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, "uncertainty_method=laplace")
    one = finished(tmp_path / "one", launch(tmp_path / "one", 1, overrides))
    killed = launch(tmp_path / "two", 2, [*overrides, "distributed.strategy=fsdp"], FAIL_RANK="1", FAIL_STEP="2")
    assert killed.returncode != 0 and "injected failure at step 2" in killed.stderr
    run_dir = glob.glob(f"{tmp_path}/two/runs/t_*")[0]
    latest = os.path.join(run_dir, "LATEST")
    assert os.readlink(latest) == "step-2"                 # steps 0 and 1 done
    assert sorted(os.listdir(os.path.join(latest, "sharded"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not os.path.exists(os.path.join(latest, "policy.pt"))
    state = torch.load(os.path.join(latest, "training_state.pt"), weights_only=True)
    assert state["optimizer"] is None and "trainer_by_rank" not in state and len(state["rng_by_rank"]) == 2
    assert state["trainer"]["source"]["laplace_pairs"] == 10 and state["trainer"]["world_size"] == 2
    copy = resumed_copy(run_dir, "alone")

    for directory, nproc in ((run_dir, 2), (copy, 1)):
        start = len(batches(tmp_path / "two"))
        resumed = launch(tmp_path / "two", nproc, [f"resume={directory}"])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert batches(tmp_path / "two")[:2] + batches(tmp_path / "two")[start:] == batches(tmp_path / "one"), nproc
        assert max_difference(weights(one), weights(directory)) < ACROSS_WORLD_SIZES
    assert "was saved by 2 process(es) (fsdp), continuing on 1 (no torchrun)" in resumed.stdout + resumed.stderr


def test_one_process_full_fine_tune_resumes_sharded_on_two_ranks(tmp_path):
    """The other way: a full fine-tune killed alone at step 2 (policy.pt, the optimizer by parameter name)
    resumes under 2-rank FSDP, each rank taking its shards, to the uninterrupted run's weights."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, "uncertainty_method=laplace",
                               "distributed.strategy=fsdp")
    one = finished(tmp_path / "one", launch(tmp_path / "one", 1, overrides))
    killed = launch(tmp_path / "two", 1, overrides, FAIL_RANK="0", FAIL_STEP="2")
    assert killed.returncode != 0 and "injected failure at step 2" in killed.stderr
    run_dir = glob.glob(f"{tmp_path}/two/runs/t_*")[0]
    assert os.path.exists(os.path.join(run_dir, "LATEST", "policy.pt"))
    assert len(batches(tmp_path / "two")) == 2             # the failure came before step 2's batch was recorded
    resumed = launch(tmp_path / "two", 2, [f"resume={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert batches(tmp_path / "two") == batches(tmp_path / "one")
    assert os.path.isdir(os.path.join(run_dir, "LATEST", "sharded"))
    assert max_difference(weights(one), weights(run_dir)) < ACROSS_WORLD_SIZES


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_ends_the_whole_job_in_one_line(tmp_path, mode):
    """A rank that raises, or hangs (distributed.timeout_s=5), ends both processes: one line naming the
    rank and the error, within the collective timeout, never a hang."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    start = time.time()
    proc = launch(tmp_path, 2, tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, "distributed.timeout_s=5"),
                  timeout=120, FAIL_RANK="1", FAIL_STEP="1", FAIL_MODE=mode)
    assert proc.returncode != 0 and time.time() - start < 90
    if mode == "raise":
        assert "error: rank 1 of 2: RuntimeError: injected failure at step 1" in proc.stderr
    else:   # rank 0 waits for rank 1's gradients, gives up after 5 s and says so
        assert "error: rank 0 of 2: RuntimeError:" in proc.stderr and "Timed out" in proc.stderr


def test_a_slow_oracle_past_its_limit_ends_the_job_in_one_line_naming_the_phase(tmp_path):
    """Rank 0 takes 8 s over the oracle; with distributed.oracle_timeout_s=2 rank 1 stops waiting after 2 s
    and says which phase and which key sets its limit; the collective timeout (timeout_s, 1800 s) plays no part."""
    proc = launch(tmp_path, 2, [*tiny_overrides(tmp_path, *ONLINE), "distributed.oracle_timeout_s=2"], ORACLE_DELAY_S="8")
    assert proc.returncode != 0
    assert ("error: rank 1 of 2: PhaseTimeout: waited 2 s for rank 0 in the oracle phase "
            "(distributed.oracle_timeout_s=2;") in proc.stderr


def test_qlora_under_ddp_trains_like_one_process(tmp_path):
    """4-bit base + LoRA on 2 ranks: same selection; eval metrics within 1e-3 (the CPU 4-bit kernels
    round differently at another batch shape)."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", "loss=dpo", "active=true", "selection_strategy=ae", "batch_size=4",
                     "n_examples=8", "eval_every=4", "n_eval_examples=16", "qlora=true",
                     "model.architecture.hidden_size=64", "model.architecture.intermediate_size=128")
    one = finished(tmp_path / "one", launch(tmp_path / "one", 1, overrides))
    two = finished(tmp_path / "two", launch(tmp_path / "two", 2, overrides))
    assert batches(tmp_path / "two") == batches(tmp_path / "one")
    final = lambda d: json.load(open(os.path.join(d, "summary.json")))["final_eval"]
    assert all(abs(final(one)[k] - final(two)[k]) < 1e-3 for k in final(one))


def test_microbatch_weights_give_the_global_mean_at_any_world_size(monkeypatch):
    """Rows split unevenly (7 over 3 ranks), 2 microbatches per rank: sum over ranks and microbatches of
    weight * microbatch mean, divided by the world size (DDP's average), is the global mean; a rank
    with fewer rows than microbatches fills in at weight 0."""
    import distributed
    from trainers import rank_microbatches
    values = torch.arange(7, dtype=torch.float32) ** 2
    batch = {"chosen_input_ids": values[:, None], "prompt": [str(i) for i in range(7)]}
    for world, parts in ((3, 2), (4, 2), (8, 1)):
        total, seen = 0.0, []
        for r in range(world):
            monkeypatch.setattr(distributed, "world_size", lambda: world)
            monkeypatch.setattr(distributed, "rank", lambda: r)
            micro = rank_microbatches(batch, parts)
            assert len(micro) == parts
            total += sum(w * float(m["chosen_input_ids"].mean()) for m, w in micro)
            seen += [p for m, w in micro if w > 0 for p in m["prompt"]]
        assert total / world == pytest.approx(float(values.mean()))
        assert seen == batch["prompt"]


@pytest.mark.parametrize("architecture,block,policy_dtype,reference_dtype,lora", [
    ("llama", "LlamaDecoderLayer", "bfloat16", "bfloat16", False), ("gpt2", "GPT2Block", "float32", "float16", False),
    ("gpt_neox", "GPTNeoXLayer", "float32", "float16", True)])
def test_fsdp_trains_every_preset_dtype_pair_with_bf16_compute(tmp_path, architecture, block, policy_dtype,
                                                               reference_dtype, lora):
    """The casts a GPU run makes, forced on CPU (distributed.fsdp_compute_dtype=bfloat16): each block and
    the root sharded, half-precision reference beside an fp32 or bf16 policy, full fine-tune or LoRA. The run
    trains to finite weights, and a full fine-tune keeps its master weights in fp32."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    overrides = tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, "uncertainty_method=laplace",
                               f"model.architecture.model_type={architecture}", f"model.block_name={block}",
                               f"model.policy_dtype={policy_dtype}",
                               f"model.reference_dtype={reference_dtype}", *(["lora=true"] if lora else []),
                               "distributed.strategy=fsdp", "distributed.fsdp_compute_dtype=bfloat16")
    run = finished(tmp_path, launch(tmp_path, 2, overrides))
    trained = weights(run)
    assert all(torch.isfinite(w.float()).all() for w in trained.values())
    if not lora:
        assert {w.dtype for w in trained.values()} == {torch.float32}
    final = json.load(open(os.path.join(run, "summary.json")))["final_eval"]
    assert all(v == v for v in final.values() if isinstance(v, float))


def test_half_precision_full_fine_tune_without_fsdp_is_a_one_line_error():
    from conftest import compose_config
    from train import check_config
    from utils import ConfigError
    with pytest.raises(ConfigError, match="model.policy_dtype=bfloat16 with a full fine-tune keeps no fp32 master weights"):
        check_config(compose_config(["exp_name=x", "model.policy_dtype=bfloat16"]))
    check_config(compose_config(["exp_name=x", "model.policy_dtype=bfloat16", "lora=true"]))


def test_fsdp_computes_in_the_configured_dtype_and_in_bf16_on_cuda():
    from conftest import compose_config
    from distributed import compute_dtype
    config = compose_config(["exp_name=x"])
    assert compute_dtype(config, torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype(config, torch.device("cpu")) is None
    config = compose_config(["exp_name=x", "distributed.fsdp_compute_dtype=float16"])
    assert compute_dtype(config, torch.device("cpu")) == torch.float16


def test_fsdp_with_qlora_and_unknown_strategies_are_one_line_errors(monkeypatch):
    from conftest import compose_config
    from train import check_config
    from utils import ConfigError
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="use distributed.strategy=ddp for QLoRA"):
        check_config(compose_config(["exp_name=x", "qlora=true", "distributed.strategy=fsdp"]))
    with pytest.raises(ConfigError, match="distributed.strategy=zero3 is unknown; allowed: ddp, fsdp"):
        check_config(compose_config(["exp_name=x", "distributed.strategy=zero3"]))
    with pytest.raises(ConfigError, match="distributed.backend=mpi is unknown; allowed: nccl, gloo"):
        check_config(compose_config(["exp_name=x", "distributed.backend=mpi"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_nccl_without_a_gpu_is_one_line_on_every_rank(tmp_path):
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl")
    proc = launch(tmp_path, 2, tiny_overrides(tmp_path, f"datasets=[{pairs}]", *OFFLINE, "distributed.backend=nccl"), timeout=120)
    assert proc.returncode != 0
    assert re.search(r"^error: rank [01] of 2: distributed.backend=nccl needs CUDA, and no GPU is visible; use gloo "
                     r"\(or null\) on CPU$", proc.stderr, re.M), proc.stderr[-3000:]


def test_dist_check_reads_figures_of_each_case(tmp_path):
    """scripts/dist_check.py (what gpu_check.sh runs on GPUs) on CPU: a killed 2-rank run resumed on 2 ranks
    and alone, compared with the one-process run by its chosen pairs, eval loss and weights; a case whose
    figures are off fails (here: a weight tolerance no run meets)."""
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", 128)
    settings = [*tiny_overrides(tmp_path, f"datasets=[{pairs}]", "batch_size=8", "n_examples=32", "eval_every=16",
                                "n_eval_examples=32")]
    settings = [o for o in settings if not o.startswith("local_dirs=")]
    command = [sys.executable, os.path.join(ROOT, "scripts", "dist_check.py"), "--cases", "fsdp_full_fp32",
               "ddp_lora_bf16", "--work", str(tmp_path / "work"), "--", *settings]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fsdp_full_fp32 (2 ranks, killed at step 2, resumed on 1): pairs 4/4 steps as alone")
               and line.endswith(": ok") for line in lines), proc.stdout
    assert any(line.startswith("ddp_lora_bf16 (2 ranks, killed at step 2, resumed on 2)") and "first step same" in line
               for line in lines), proc.stdout
    assert lines[-1] == "dist_check: 2/2 cases pass (none failed)"

    # the 2-rank fp32 weights differ from one process's by ~1e-6 (summation order): no tolerance fails the case
    strict = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import dist_check; "
                             "dist_check.TOLERANCE = 0.0; sys.argv = sys.argv[1:]; dist_check.main()",
                             "dist_check.py", *command[2:4], "--work", str(tmp_path / "strict"), "--", *settings],
                            cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, **ENV})
    assert strict.returncode == 1 and "dist_check: 0/1 cases pass (fsdp_full_fp32)" in strict.stdout, strict.stdout


def test_sbatch_files_parse():
    files = glob.glob(os.path.join(ROOT, "scripts", "slurm", "*.sbatch"))
    assert any("multi_node" in f for f in files) and any("multi_gpu" in f for f in files)
    for path in files:
        subprocess.run(["bash", "-n", path], check=True)
