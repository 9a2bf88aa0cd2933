"""scripts/bench_sample_efficiency.py without training: the train.py commands it builds are valid
configs, its haiku data split keeps prompts out of training, and it skips, resumes, restarts and
prunes runs the way its help says (so a long benchmark can be re-run after an interruption)."""
import argparse
import csv
import os
import shutil
import sys

import pytest

from conftest import FIXTURES, ROOT, compose_config

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_sample_efficiency as bench  # noqa: E402


def train_overrides(output: str):
    """The override lists of the `python -u train.py ...` lines a --dry-run printed (the SFT
    checkpoint a later run starts from is not known yet and printed as a placeholder)."""
    output = output.replace("<SFT run directory>", "SFT_RUN_DIR")
    return [line.split(" train.py ", 1)[1].split() for line in output.splitlines() if " train.py " in line]


def test_dry_run_prints_every_run_as_a_valid_config(tmp_path, capsys):
    from train import check_config, check_model_preset
    assert bench.main(["--task", "all", "--seeds", "0", "1", "--out", str(tmp_path), "--dry-run",
                       "--set", "lr=1e-4"]) == 0
    runs = train_overrides(capsys.readouterr().out)
    # jeopardy: 6 strategies (ablations and headroom included) x 2 seeds; jeopardy-online: 2 x 2;
    # haikus: 1 shared SFT + 2 x 2; hh: 1 shared SFT (split_seed fixes its share) + 5 x 2
    assert len(runs) == 12 + 4 + 5 + 11
    names = [next(o for o in overrides if o.startswith("exp_name=")) for overrides in runs]
    assert len(set(names)) == len(names)
    for overrides in runs:
        check_model_preset(overrides)
        config = compose_config(overrides)
        check_config(config)
        if config.loss.name != "sft":
            assert config.lr == 1e-4  # --set comes last, so it wins over the task's own lr
            assert config.n_examples == {"jeopardy": 240, "haikus": 256, "hh": 120}[config.datasets[0]]
            assert config.do_first_eval
    assert bench.main(["--task", "hh", "--seeds", "3", "--labels", "64", "--evals", "2", "--out", str(tmp_path),
                       "--dry-run"]) == 0
    sft, *dpo = train_overrides(capsys.readouterr().out)
    assert "loss=sft" in sft and "model=smollm2-135m" in sft
    assert all("seed=3" in o and "n_examples=64" in o and "eval_every=32" in o for o in dpo)


def test_strategies_carry_their_estimator(tmp_path, capsys):
    from train import check_config
    assert bench.main(["--task", "jeopardy", "--seeds", "0", "--out", str(tmp_path), "--dry-run",
                       "--strategies", "uniform", "ae/laplace", "ae/head_analytic", "headroom"]) == 0
    configs = [compose_config(o) for o in train_overrides(capsys.readouterr().out)]
    for config in configs:
        check_config(config)
    assert [(c.selection_strategy, c.uncertainty_method) for c in configs][1:3] == [("ae", "laplace"), ("ae", "head_analytic")]
    assert len({c.exp_name for c in configs}) == 4


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--task", "hh", "--seeds", "1", "1", "--out", str(tmp_path), "--dry-run"])
    assert exit_info.value.code == 2 and "--seeds: each seed once" in capsys.readouterr().err
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hh_sample.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:  # checked before any run starts, for every task
        bench.main(["--task", "all", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2
    assert err.endswith(f"--data-dir {tmp_path / 'data'}: jeopardy_clues.json, haiku_test.csv not found")
    assert not (tmp_path / "out").exists()


def test_haiku_source_without_its_columns_is_a_one_line_error(tmp_path):
    shutil.copy(os.path.join(FIXTURES, "haiku_wrong_columns.csv"), tmp_path / "haiku_test.csv")
    args = argparse.Namespace(data_dir=str(tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_info:
        bench.write_strict_haikus(args)
    message = str(exit_info.value)
    assert message.startswith(f"error: {tmp_path / 'haiku_test.csv'}: expected the statworx/haiku columns")
    assert "['id', 'poem', 'tags']" in message


def test_strict_haiku_split_keeps_test_prompts_out_of_training(tmp_path, capsys):
    from task_rules import is_strict_haiku
    from preference_datasets import _haiku_keywords
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(os.path.join(FIXTURES, "haiku.csv"), data / "haiku_test.csv")
    with open(data / "haiku_test.csv", "a", newline="") as f:  # three lines, but 2-2-2 syllables
        csv.writer(f).writerow(["1", "hand", "cold moon\nwhite snow\ndark night", "", "moon", "", "0.5", "--"])
    with open(data / "haiku_test.csv", newline="") as f:
        source = list(csv.DictReader(f))
    args = argparse.Namespace(data_dir=str(data), out=str(tmp_path / "out"))
    bench.write_strict_haikus(args)

    def read(split):
        with open(tmp_path / "out" / "data" / f"{split}.csv", newline="") as f:
            return list(csv.DictReader(f))
    train, test = read("train"), read("test")
    strict = [r for r in source if is_strict_haiku(r["text"], _haiku_keywords(r["keywords"]))]
    assert 0 < len(strict) < len(source)
    assert sorted(r["__hf_index_id"] for r in train + test) == sorted(r["__hf_index_id"] for r in strict)
    assert test and train
    assert not {r["keywords"] for r in train} & {r["keywords"] for r in test}
    assert list(train[0]) == list(source[0])  # the source's columns, so the haikus loader reads it
    os.remove(data / "haiku_test.csv")  # a second call reuses the split and never reads the source again
    bench.write_strict_haikus(args)
    assert read("test") == test


def runner(tmp_path, **flags):
    args = argparse.Namespace(out=str(tmp_path / "out"), threads=1, dry_run=False, keep_checkpoints=False)
    vars(args).update(flags)
    return bench.Runner(args)


def make_run(base, exp_name, stamp="2026-01-01_00-00-00_000000", finished=True, checkpoint=True):
    """A run directory as train.py leaves it."""
    run = base / f"{exp_name}_{stamp}"
    (run / "step-2").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "oracle_ledger.jsonl", "step-2/model.safetensors",
                 "step-2/training_state.pt", "step-2/tokenizer.json"):
        (run / name).write_text("x")
    if checkpoint:
        os.symlink("step-2", run / "LATEST")
    if finished:
        (run / "summary.json").write_text("{}")
    return run


def test_finished_runs_are_skipped_interrupted_ones_resumed_or_restarted(tmp_path, capsys):
    base = tmp_path / "runs"
    done = make_run(base, "hh_uniform_s0")
    make_run(base, "hh_uniform_s10")  # another seed's run, whose name starts with "hh_uniform_s1"
    interrupted = make_run(base, "hh_us_s0", finished=False)
    make_run(base, "hh_ae_s0", finished=False, checkpoint=False)
    dry = runner(tmp_path, dry_run=True)
    assert dry.ensure(str(base), "hh_uniform_s0", ["seed=0"]) == str(done)
    assert dry.ensure(str(base), "hh_us_s0", ["seed=0"]) is None
    assert dry.ensure(str(base), "hh_ae_s0", ["seed=0"]) is None
    assert dry.ensure(str(base), "hh_uniform_s1", ["seed=1"]) is None
    out = capsys.readouterr().out
    assert "[skip] hh_uniform_s0" in out
    assert f"train.py resume={interrupted}\n" in out
    assert f"train.py seed=0 exp_name=hh_ae_s0 local_dirs=[{base}] wandb.enabled=false\n" in out
    assert "exp_name=hh_uniform_s1 " in out and "[skip] hh_uniform_s1" not in out


def fake_train(base, commands, rc=0):
    """Stands in for subprocess.call(train.py ...): makes the run directory train.py would."""
    def call(command, cwd, env, stdout, stderr):
        commands.append((command, env))
        stdout.write("training...\n")
        if rc == 0:
            name = next(a for a in command if a.startswith("exp_name=")).split("=", 1)[1]
            make_run(base, name, stamp="2026-01-02_00-00-00_000000")
        return rc
    return call


def test_a_trained_run_is_pruned_to_its_results(tmp_path, monkeypatch):
    base = tmp_path / "runs"
    stale = make_run(base, "hh_ae_s0", finished=False, checkpoint=False)
    commands = []
    monkeypatch.setattr(bench.subprocess, "call", fake_train(base, commands))
    run = runner(tmp_path).ensure(str(base), "hh_ae_s0", ["seed=0"])
    assert not stale.exists()  # interrupted before its first checkpoint: started again
    assert sorted(os.listdir(run)) == ["config.yaml", "metrics.jsonl", "summary.json"]
    (command, env), = commands
    assert env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "$ " + " ".join(command) in (tmp_path / "out" / "logs" / "hh_ae_s0.log").read_text()

    sft = runner(tmp_path).ensure(str(base), "hh_sft_s0", ["seed=0"], keep_final_weights=True)
    # an SFT stage keeps what model.archive reads (LATEST and its weights), not the optimizer state
    assert sorted(os.listdir(sft)) == ["LATEST", "config.yaml", "metrics.jsonl", "step-2", "summary.json"]
    assert sorted(os.listdir(os.path.join(sft, "LATEST"))) == ["model.safetensors", "tokenizer.json"]


def test_a_failed_run_stops_the_benchmark_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.subprocess, "call", fake_train(tmp_path / "runs", [], rc=1))
    with pytest.raises(SystemExit) as exit_info:
        runner(tmp_path).ensure(str(tmp_path / "runs"), "hh_us_s1", ["seed=1"])
    message = str(exit_info.value)
    assert message.startswith("hh_us_s1 failed (exit code 1)") and "training..." in message


def test_without_held_out_answers_only_pair_metrics_are_compared():
    """--n-samples 0 logs no answer metrics; asking compare_runs for them would fail the whole sweep."""
    jeopardy = bench.TASK_SPECS["jeopardy"]
    assert bench.compared_metrics(jeopardy, 0) == ["rewards_eval/accuracies", "loss/eval"]
    assert bench.compared_metrics(jeopardy, 48) == jeopardy.metrics
    assert bench.compared_metrics(bench.TASK_SPECS["haikus"], 0) == []


def test_jeopardy_dev_and_validation_halves_split_by_show(tmp_path, capsys):
    """Every clue of a show lands in the same half, the halves are disjoint and cover the file, and the
    runs of --split dev read the dev half. Any clues file splits the same way (hash of show_number)."""
    import json
    rows = [{"category": f"C{i % 7}", "air_date": "2004-01-01", "question": f"'Clue {i}'", "value": "$200",
             "answer": f"A{i}", "round": "Jeopardy!", "show_number": str(4000 + i // 5)} for i in range(200)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "jeopardy_clues.json").write_text(json.dumps(rows))
    halves = {}
    for split in ("dev", "validation"):
        out = tmp_path / split
        assert bench.main(["--task", "jeopardy", "--split", split, "--seeds", "0", "--strategies", "uniform",
                           "--data-dir", str(data), "--out", str(out), "--dry-run"]) == 0
        (run,) = train_overrides(capsys.readouterr().out)
        assert f"dataset_files.jeopardy={out}/data/jeopardy_clues.{split}.json" in run
        args = argparse.Namespace(split=split, data_dir=str(data), out=str(out), dry_run=False)
        halves[split] = json.load(open(bench.jeopardy_clues(args)))
    shows = [{r["show_number"] for r in halves[s]} for s in ("dev", "validation")]
    assert shows[0] and shows[1] and not shows[0] & shows[1]
    assert len(halves["dev"]) + len(halves["validation"]) == len(rows)
    assert all(bench.jeopardy_split(r["show_number"]) == "dev" for r in halves["dev"])
    # another clues file in the same --data-dir is cut afresh into the same --out, never the stale half
    (data / "jeopardy_clues.json").write_text(json.dumps(rows[:100]))
    args = argparse.Namespace(split="dev", data_dir=str(data), out=str(tmp_path / "dev"), dry_run=False)
    again = json.load(open(bench.jeopardy_clues(args)))
    assert again == [r for r in rows[:100] if bench.jeopardy_split(r["show_number"]) == "dev"] != halves["dev"]


def test_strategy_specs_carry_overrides_into_their_runs(tmp_path, capsys):
    from train import check_config
    assert bench.main(["--task", "jeopardy", "--seeds", "0", "--out", str(tmp_path), "--dry-run", "--strategies",
                       "uniform@lr=5e-4", "uniform@lr=2e-3", "ae/laplace@laplace_prior=fixed", "gradnorm", "length"]) == 0
    configs = [compose_config(o) for o in train_overrides(capsys.readouterr().out)]
    for config in configs:
        check_config(config)
    assert [c.lr for c in configs[:2]] == [5e-4, 2e-3]
    assert configs[2].laplace_prior == "fixed" and configs[2].uncertainty_method == "laplace"
    assert [c.exp_name for c in configs] == ["jeopardy_uniform_lr5e-4_s0", "jeopardy_uniform_lr2e-3_s0",
                                             "jeopardy_ae-laplace_laplace_priorfixed_s0", "jeopardy_gradnorm_s0",
                                             "jeopardy_length_s0"]
    with pytest.raises(SystemExit, match="expected key=value"):
        bench.main(["--task", "jeopardy", "--seeds", "0", "--out", str(tmp_path), "--dry-run", "--strategies", "uniform@lr"])


def test_online_jeopardy_runs_borda_against_uniref_with_the_rule_oracle(tmp_path, capsys):
    from train import check_config
    assert bench.main(["--task", "jeopardy-online", "--split", "validation", "--seeds", "0", "1",
                       "--out", str(tmp_path), "--dry-run"]) == 0
    configs = [compose_config(o) for o in train_overrides(capsys.readouterr().out)]
    for config in configs:
        check_config(config)
    assert [(c.selection_strategy, c.selection_ratio, c.seed) for c in configs] == [
        ("uniref", 1, 0), ("borda", 3, 0), ("uniref", 1, 1), ("borda", 3, 1)]
    assert all(c.online and c.oracle.name == "jeopardy" and c.lora and c.model.name == "smollm2-135m" for c in configs)
    assert all(c.dataset_files.jeopardy.endswith("jeopardy_clues.validation.json") for c in configs)
