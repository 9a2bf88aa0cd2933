"""Where the time of an online step goes: median seconds of generation, candidate scoring, oracle and
the DPO update over the train steps of a run (from its metrics.jsonl).

    python scripts/online_step_times.py RUN_DIR [RUN_DIR ...]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import read_jsonl  # noqa: E402

PARTS = (("generation", "time/generation_s"), ("scoring", "time/scoring_s"), ("oracle", "time/oracle_s"),
         ("DPO update", "time/step_s"))


def step_time_split(records):
    """Median seconds per part over train steps (the first step is skipped as warm-up when there are
    more); returns [(part, seconds)] plus the total."""
    steps = [r for r in records if r.get("split") == "train" and "time/generation_s" in r]
    if len(steps) > 1:
        steps = steps[1:]
    if not steps:
        raise SystemExit("error: no online train steps (time/generation_s) in this run's metrics.jsonl")
    split = [(name, statistics.median(r[key] for r in steps)) for name, key in PARTS]
    return split + [("total", sum(s for _, s in split))], len(steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        split, n = step_time_split(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
        total = split[-1][1]
        print(f"{run_dir} (median of {n} steps)")
        for name, seconds in split:
            print(f"  {name:12s} {seconds:8.2f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
