"""People label the pairs, a round at a time, between training runs (`oracle=human`).

When a step needs verdicts nobody has given yet, the oracle writes the round into
<run_dir>/labeling/:
- `round-NNNN.jsonl`: one pair per line, {"id", "prompt", "response_a", "response_b", "reference"};
- `round-NNNN.labelstudio.json`: the same pairs as Label Studio tasks (the labelling config is in the
  README).
It then pauses the run (utils.RunPaused): the trainer checkpoints the step that waits, and train.py
prints where to put the answers and exits with code 3. `resume=<run_dir>` reads them from either:
- `round-NNNN.answers.jsonl`: one line per pair, {"id": ..., "winner": "A" | "B" | "tie"};
- `round-NNNN.answers.json`: a Label Studio JSON export of the round's project (choice A, B or tie).
Answers that are missing, malformed or for pairs the round does not hold stop the run with one line
naming the file and the row. Earlier rounds stay in their files and in the ledger. A tie is no label.
"""
import glob
import json
import os
import re
from typing import Dict, List, Optional

from oracles.base import Judgment, OnResult, Oracle, Query
from oracles.ledger import ledger_key
from utils import RunPaused, UserError, atomic_write_text, read_jsonl

VERDICTS = {"A": "A", "B": "B", "tie": None}
ANSWER_FORMAT = '{"id": "<id of the pair>", "winner": "A" | "B" | "tie"}'


def pair_id(query: Query) -> str:
    """A pair's id in the round files: stable across resumes (a hash of the pair's texts)."""
    return ledger_key("human", query)[:16]


def label_studio_tasks(rows: List[Dict]) -> List[Dict]:
    """Label Studio import tasks for the round's rows (the fields the labelling config shows)."""
    return [{"data": {"pair_id": r["id"], "prompt": r["prompt"], "response_a": r["response_a"],
                      "response_b": r["response_b"]}} for r in rows]


def read_jsonl_answers(path: str, known: Dict[str, int]) -> Dict[str, str]:
    """{pair id: 'A' | 'B' | 'tie'} from our JSONL answers; known: the round's ids -> their line."""
    answers = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {line_number}: not JSON; expected {ANSWER_FORMAT}") from None
            if not isinstance(row, dict) or row.get("winner") not in VERDICTS or not isinstance(row.get("id"), str):
                raise UserError(f"{path} line {line_number}: expected {ANSWER_FORMAT}, got {line.strip()[:80]}")
            answers[row["id"]] = row["winner"]
    return check_answers(path, answers, known, "line")


def read_label_studio_answers(path: str, known: Dict[str, int]) -> Dict[str, str]:
    """{pair id: verdict} from a Label Studio JSON export: each task's data.pair_id and the choice of its
    first annotation that was not cancelled."""
    try:
        tasks = json.load(open(path))
    except ValueError as e:
        raise UserError(f"{path}: not a Label Studio JSON export ({e})") from None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: a Label Studio JSON export is a list of tasks")
    answers = {}
    for number, task in enumerate(tasks, 1):
        where = f"{path} task {number}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict) or "pair_id" not in task["data"]:
            raise UserError(f"{where}: no data.pair_id (import round-NNNN.labelstudio.json to label the round)")
        done = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        if not done:
            continue   # reported as missing below
        choices = [(r.get("value") or {}).get("choices") for r in done[0].get("result") or []
                   if isinstance(r, dict) and r.get("type") == "choices"]
        if len(choices) != 1 or not isinstance(choices[0], list) or len(choices[0]) != 1 or choices[0][0] not in VERDICTS:
            raise UserError(f"{where}: expected one choice of A, B or tie in its annotation, got {choices}")
        answers[str(task["data"]["pair_id"])] = choices[0][0]
    return check_answers(path, answers, known, "task")


def check_answers(path: str, answers: Dict[str, str], known: Dict[str, int], row: str) -> Dict[str, str]:
    unknown = [i for i in answers if i not in known]
    if unknown:
        raise UserError(f"{path}: answers a pair the round does not hold (id {unknown[0]}); answer the pairs of "
                        f"{os.path.basename(path).split('.')[0]}.jsonl")
    missing = [i for i in known if i not in answers]
    if missing:
        raise UserError(f"{path}: no answer for {len(missing)} of the {len(known)} pairs, e.g. id {missing[0]} "
                        f"(line {known[missing[0]]} of the round); every pair needs one ({row} per pair)")
    return answers


class HumanOracle(Oracle):
    """See the module docstring."""
    name = "human"
    pauses_run = True

    def __init__(self):
        self.directory: Optional[str] = None
        self.run_dir: Optional[str] = None
        self.answers: Dict[str, str] = {}

    def open(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.directory = os.path.join(run_dir, "labeling")
        os.makedirs(self.directory, exist_ok=True)
        for round_path in self.rounds():
            known = {row["id"]: n for n, row in enumerate(read_jsonl(round_path), 1)}
            stem = round_path[:-len(".jsonl")]
            for suffix, read in ((".answers.jsonl", read_jsonl_answers), (".answers.json", read_label_studio_answers)):
                if os.path.exists(stem + suffix):
                    self.answers.update(read(stem + suffix, known))
                    break

    def rounds(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.directory, "round-[0-9][0-9][0-9][0-9].jsonl")))

    def judge_many(self, queries: List[Query], on_result: Optional[OnResult] = None) -> List[Judgment]:
        if self.directory is None:
            raise RuntimeError("HumanOracle.open(run_dir) must be called before judging")
        ids = [pair_id(q) for q in queries]
        waiting = [(i, q) for i, q in zip(ids, queries) if i not in self.answers]
        if waiting:
            self.pause(dict(waiting))
        results = []
        for k, i in enumerate(ids):
            winner = VERDICTS[self.answers[i]]
            j = (Judgment(winner=winner, judge=self.name) if winner else
                 Judgment(winner=None, judge=self.name, error="tie"))
            if on_result is not None:
                on_result(k, j)
            results.append(j)
        return results

    def pause(self, waiting: Dict[str, Query]) -> None:
        """Write the round of the pairs that wait (or find it written by the attempt before) and pause."""
        rows = [{"id": i, "prompt": q.prompt, "response_a": q.response_a, "response_b": q.response_b,
                 "reference": q.reference} for i, q in waiting.items()]
        path = next((p for p in self.rounds() if [r["id"] for r in read_jsonl(p)] == list(waiting)), None)
        if path is None:
            path = os.path.join(self.directory, f"round-{len(self.rounds()) + 1:04d}.jsonl")
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            atomic_write_text(path.replace(".jsonl", ".labelstudio.json"),
                              json.dumps(label_studio_tasks(rows), ensure_ascii=False, indent=1))
        stem = path[:-len(".jsonl")]
        number = int(re.search(r"round-(\d{4})", path).group(1))
        raise RunPaused(f"labelling round {number}: {len(rows)} pairs "
                        f"in {path} (Label Studio import: {stem}.labelstudio.json); put the answers in "
                        f"{stem}.answers.jsonl ({ANSWER_FORMAT} per line) or a Label Studio JSON export in "
                        f"{stem}.answers.json, then run: python -u train.py resume={self.run_dir}")
