"""What a user sees on a run: no library noise they cannot act on."""
import os
import subprocess
import sys

from conftest import ROOT, write_synthetic_pairs


def test_a_lora_run_prints_no_bitsandbytes_or_peft_noise(tmp_path):
    pairs = write_synthetic_pairs(tmp_path / "pairs.jsonl", n=16)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONWARNINGS="default")
    result = subprocess.run(
        [sys.executable, "-u", os.path.join(ROOT, "train.py"), "model=tiny", f"datasets=[{pairs}]", "loss=dpo", "lora=true",
         "exp_name=quiet", f"local_dirs=[{tmp_path}/runs]", f"cache_dir={tmp_path}/cache", "wandb.enabled=false",
         "model.architecture.hidden_size=32", "model.architecture.intermediate_size=64", "model.architecture.vocab_size=300",
         "batch_size=4", "n_examples=4", "max_length=48", "max_prompt_length=24", "do_first_eval=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "==== summary ====" in output
    for noise in ("gemm_4bit_forward", "is_gradient_checkpointing", "FutureWarning"):
        assert noise not in output, noise
