"""oracle=human: a round of the selected pairs is written (JSONL and a Label Studio import), the run
checkpoints and exits with code 3; answers in our JSONL or a Label Studio export continue it with
resume=, round after round, to the run an automatic oracle with the same verdicts gives. Bad answer
files stop the run in one line naming the file and row, and lose nothing already answered."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, tiny_overrides
from oracles.base import Query
from oracles.human import HumanOracle, pair_id
from utils import PAUSED_EXIT_CODE, RunPaused, UserError, read_jsonl

POOL = os.path.join(FIXTURES, "unlabelled_pairs.jsonl")
RUN = ["loss=dpo", f"datasets=[{POOL}]", "active=true", "selection_strategy=ae", "uncertainty_method=laplace",
       "batch_size=2", "selection_ratio=3", "n_examples=4", "eval_every=100", "oracle=human"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def sure(row) -> str:
    """The verdict a person gives here: the answer that is sure of itself."""
    return "A" if "sure" in row["response_a"] else "B"


def train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def label_studio_export(tasks, verdict):
    """What Label Studio exports for the imported tasks once someone picked a choice in each."""
    return [{"id": n, "data": task["data"], "annotations": [{"id": n, "was_cancelled": False, "result": [
        {"from_name": "preference", "to_name": "response_a", "type": "choices", "value": {"choices": [verdict(task["data"])]}}]}]}
        for n, task in enumerate(tasks, 1)]


def test_a_human_round_trip_in_both_answer_formats(tmp_path):
    first = train(*tiny_overrides(tmp_path, *RUN, "exp_name=people"))
    assert first.returncode == PAUSED_EXIT_CODE, first.stderr[-2000:]
    [run_dir] = [os.path.join(tmp_path, "runs", d) for d in os.listdir(tmp_path / "runs")]
    labeling = os.path.join(run_dir, "labeling")
    line = [l for l in first.stdout.splitlines() if l.startswith("paused: ")]
    assert len(line) == 1 and "labelling round 1: 2 pairs" in line[0] and f"resume={run_dir}" in line[0]
    round1 = read_jsonl(os.path.join(labeling, "round-0001.jsonl"))
    tasks = json.load(open(os.path.join(labeling, "round-0001.labelstudio.json")))
    assert len(round1) == 2 and [t["data"]["pair_id"] for t in tasks] == [r["id"] for r in round1]
    assert os.path.islink(os.path.join(run_dir, "LATEST"))          # checkpointed before it stopped

    again = train(f"resume={run_dir}")                               # no answers yet: the same round, again
    assert again.returncode == PAUSED_EXIT_CODE and "labelling round 1: 2 pairs" in again.stdout
    assert sorted(os.listdir(labeling)) == ["round-0001.jsonl", "round-0001.labelstudio.json"]

    with open(os.path.join(labeling, "round-0001.answers.jsonl"), "w") as f:
        for r in round1:
            f.write(json.dumps({"id": r["id"], "winner": sure(r)}) + "\n")
    second = train(f"resume={run_dir}")
    assert second.returncode == PAUSED_EXIT_CODE and "labelling round 2: 2 pairs" in second.stdout
    tasks = json.load(open(os.path.join(labeling, "round-0002.labelstudio.json")))
    json.dump(label_studio_export(tasks, sure), open(os.path.join(labeling, "round-0002.answers.json"), "w"))
    done = train(f"resume={run_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    ledger = read_jsonl(os.path.join(run_dir, "oracle_ledger.jsonl"))
    assert len(ledger) == 4 and {r["judge"] for r in ledger} == {"human"}
    assert all(r["winner"] == sure(r) for r in ledger)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["labels"] == 4 and summary["steps"] == 2


def answered_oracle(tmp_path, rows):
    oracle = HumanOracle()
    oracle.open(str(tmp_path))
    with pytest.raises(RunPaused):
        oracle.judge_many([Query(r["prompt"], r["response_a"], r["response_b"]) for r in rows])
    return os.path.join(tmp_path, "labeling")


ROWS = [{"prompt": f"Q{i}", "response_a": f"a{i}, I am sure", "response_b": f"b{i}"} for i in range(3)]


@pytest.mark.parametrize("answers,message", [
    (lambda ids: ['{"id": "%s", "winner": "A"}' % ids[0], "not json", ""], r"round-0001.answers.jsonl line 2: not JSON"),
    (lambda ids: ['{"id": "%s", "winner": "left"}' % ids[0]], r"round-0001.answers.jsonl line 1: expected \{\"id\""),
    (lambda ids: ['{"id": "%s", "winner": "A"}' % i for i in ids[:2]], r"no answer for 1 of the 3 pairs, e.g. id .* \(line 3 of the round\)"),
    (lambda ids: ['{"id": "%s", "winner": "A"}' % i for i in ids] + ['{"id": "0123456789abcdef", "winner": "B"}'],
     r"answers a pair the round does not hold \(id 0123456789abcdef\)"),
])
def test_bad_answer_files_are_one_line_and_lose_nothing(tmp_path, answers, message):
    labeling = answered_oracle(tmp_path, ROWS)
    ids = [r["id"] for r in read_jsonl(os.path.join(labeling, "round-0001.jsonl"))]
    path = os.path.join(labeling, "round-0001.answers.jsonl")
    open(path, "w").write("\n".join(answers(ids)) + "\n")
    with pytest.raises(UserError, match=message) as err:
        HumanOracle().open(str(tmp_path))
    assert "\n" not in str(err.value) and path in str(err.value)
    # the answers file and the round are left as they were: fixed, the same round is read
    assert open(path).read().startswith(answers(ids)[0])
    open(path, "w").write("".join(json.dumps({"id": i, "winner": "tie" if n == 1 else "A"}) + "\n" for n, i in enumerate(ids)))
    fixed = HumanOracle()
    fixed.open(str(tmp_path))
    verdicts = fixed.judge_many([Query(r["prompt"], r["response_a"], r["response_b"]) for r in ROWS])
    assert [(j.winner, j.error) for j in verdicts] == [("A", None), (None, "tie"), ("A", None)]   # a tie is no label


def test_a_bad_label_studio_export_is_one_line(tmp_path):
    labeling = answered_oracle(tmp_path, ROWS)
    tasks = json.load(open(os.path.join(labeling, "round-0001.labelstudio.json")))
    export = label_studio_export(tasks, lambda data: "A")
    export[1]["annotations"][0]["result"][0]["value"]["choices"] = ["A", "B"]
    json.dump(export, open(os.path.join(labeling, "round-0001.answers.json"), "w"))
    with pytest.raises(UserError, match=r"round-0001.answers.json task 2: expected one choice of A, B or tie"):
        HumanOracle().open(str(tmp_path))
    export = label_studio_export(tasks, lambda data: "B")
    export[2]["annotations"][0]["was_cancelled"] = True
    json.dump(export, open(os.path.join(labeling, "round-0001.answers.json"), "w"))
    with pytest.raises(UserError, match="no answer for 1 of the 3 pairs"):
        HumanOracle().open(str(tmp_path))
    assert pair_id(Query("Q0", ROWS[0]["response_a"], ROWS[0]["response_b"])) == read_jsonl(
        os.path.join(labeling, "round-0001.jsonl"))[0]["id"]
