"""train.py's entry point for the multi-process tests, with test-only instrumentation from the environment:

RECORD_BATCHES=path  rank 0 appends the prompts of every training batch (one JSON list per step): the selection
FAIL_RANK=r FAIL_STEP=s FAIL_MODE=raise|hang  rank r raises (or hangs) when it reaches step s
ORACLE_DELAY_S=t     rank 0 takes t seconds longer over each batch of oracle queries

Run as `python -m torch.distributed.run --nproc_per_node=2 tests/dist_entry.py OVERRIDES` or, for the
one-process run it is compared with, `python tests/dist_entry.py OVERRIDES`.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import trainers  # noqa: E402

_train_step = trainers.BasicTrainer.train_step


def train_step(self, batch):
    if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0") and self.step == int(os.environ.get("FAIL_STEP", "0")):
        if os.environ.get("FAIL_MODE", "raise") == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure at step {self.step}")
    if os.environ.get("RECORD_BATCHES") and os.environ.get("RANK", "0") == "0":
        with open(os.environ["RECORD_BATCHES"], "a") as f:
            f.write(json.dumps(list(batch["prompt"])) + "\n")
    return _train_step(self, batch)


trainers.BasicTrainer.train_step = train_step

if os.environ.get("ORACLE_DELAY_S"):
    import data_selection
    _judge = data_selection.judge_with_budget

    def slow_judge(*args, **kwargs):
        time.sleep(float(os.environ["ORACLE_DELAY_S"]))
        return _judge(*args, **kwargs)

    data_selection.judge_with_budget = slow_judge

if __name__ == "__main__":
    import runpy
    sys.argv[0] = os.path.join(ROOT, "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")  # as `python train.py`, so Hydra finds config/ beside it
