"""scripts/compare_runs.py on synthetic run directories whose expected numbers are worked out by hand."""
import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import yaml

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "compare_runs.py")
_spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)

LABELS = (0, 100, 200)
# Per seed: values at labels 0, 100, 200.
ACC = {"uniform": [[0.5, 0.6, 0.7], [0.5, 0.6, 0.8], [0.5, 0.6, 0.6]],
       "ae": [[0.5, 0.8, 0.85], [0.5, 0.7, 0.9], [0.5, 0.9, 0.95]]}
LOSS = {"uniform": [[1.0, 0.8, 0.6], [1.0, 0.8, 0.7], [1.0, 0.8, 0.5]],
        "ae": [[1.0, 0.9, 0.75], [1.0, 0.9, 0.8], [1.0, 0.9, 0.85]]}


def write_run(path, strategy, seed, evals, labels=LABELS):
    """A run directory as train.py leaves it: config.yaml, metrics.jsonl with train lines between the
    eval lines, summary.json, and a checkpoint dir that has its own config.yaml but no metrics."""
    os.makedirs(os.path.join(path, "step-2"))
    config = {"exp_name": f"{strategy}_{seed}", "seed": seed, "active": strategy != "none", "online": False,
              "selection_strategy": None if strategy == "none" else strategy, "datasets": ["hh"]}
    for d in (path, os.path.join(path, "step-2")):
        with open(os.path.join(d, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, label in enumerate(labels):
            f.write(json.dumps({"step": 2 * i, "labels": label, **{k: v[i] for k, v in evals.items()}}) + "\n")
            if i + 1 < len(labels):
                f.write(json.dumps({"step": 2 * i + 1, "labels": label + 50, "loss/train": 9.0,
                                    "rewards_train/accuracies": 0.0}) + "\n")
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"labels": labels[-1]}, f)


@pytest.fixture
def sweep(tmp_path):
    """2 strategies x 3 seeds at different depths; only the ae runs log a haiku metric."""
    root = tmp_path / "multirun"
    for strategy in ("uniform", "ae"):
        for seed in range(3):
            evals = {"rewards_eval/accuracies": ACC[strategy][seed], "loss/eval": LOSS[strategy][seed]}
            if strategy == "ae":
                evals["haiku/strict_valid_rate"] = [0.0, 0.1, 0.2]
            depth = "a/b" if seed == 2 else str(seed)
            write_run(str(root / strategy / depth / f"run_{seed}"), strategy, seed, evals)
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return {(r["metric"], r["strategy"]): r for r in csv.DictReader(f)}


def test_main_table_plots_and_report(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cr.main([str(sweep), "--out", str(out)]) == 0
    rows = read_csv(out / "comparison.csv")
    # haiku/strict_valid_rate is not logged by every run, loss/train is not an eval metric
    assert {m for m, _ in rows} == {"rewards_eval/accuracies", "loss/eval"}

    base, ae = rows["rewards_eval/accuracies", "uniform"], rows["rewards_eval/accuracies", "ae"]
    assert (base["direction"], base["n_seeds"], ae["n_seeds"]) == ("higher", "3", "3")
    assert float(base["final_mean"]) == pytest.approx(0.7) and float(base["final_std"]) == pytest.approx(0.1)
    assert float(ae["final_mean"]) == pytest.approx(0.9) and float(ae["final_std"]) == pytest.approx(0.05)
    # mean curves 0.5, 0.6, 0.7 and 0.5, 0.8, 0.9 over labels 0, 100, 200
    assert float(base["auc"]) == pytest.approx((0.55 * 100 + 0.65 * 100) / 200)
    assert float(ae["auc"]) == pytest.approx((0.65 * 100 + 0.85 * 100) / 200)
    assert float(ae["labels_to_reach"]) == pytest.approx(100 * (0.7 - 0.5) / (0.8 - 0.5))
    assert float(base["labels_to_reach"]) == pytest.approx(200)
    se2 = 0.05 ** 2 / 3 + 0.1 ** 2 / 3
    welch_t, welch_df = 0.2 / math.sqrt(se2), se2 ** 2 / ((0.05 ** 2 / 3) ** 2 / 2 + (0.1 ** 2 / 3) ** 2 / 2)
    assert float(ae["welch_t"]) == pytest.approx(welch_t)
    assert float(ae["welch_df"]) == pytest.approx(welch_df)
    # the two-sided p of that t (3.098) at that df (2.94): 0.0548
    assert float(ae["p_value"]) == pytest.approx(simpson_two_sided_p(welch_t, welch_df), abs=1e-6)
    assert base["p_value"] == "" and base["welch_t"] == ""

    # lower is better: ae ends at 0.8, never down to the baseline's 0.6
    base, ae = rows["loss/eval", "uniform"], rows["loss/eval", "ae"]
    assert base["direction"] == "lower" and ae["labels_to_reach"] == "never"
    assert float(base["final_mean"]) == pytest.approx(0.6) and float(ae["final_mean"]) == pytest.approx(0.8)
    assert float(base["auc"]) == pytest.approx((90 + 70) / 200) and float(ae["auc"]) == pytest.approx((95 + 85) / 200)
    assert float(base["labels_to_reach"]) == pytest.approx(200)

    for name in ("rewards_eval_accuracies.png", "loss_eval.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == cr.PNG_SIGNATURE
    printed = capsys.readouterr().out
    assert printed == (out / "comparison.md").read_text()
    assert "## loss/eval (lower is better)" in printed and "| ae | 3 | 0.8 ± 0.05 | 0.9 | never |" in printed
    assert "| ae | 3 | 0.9 ± 0.05 | 0.75 | 66.7 |" in printed


def test_metrics_option_and_explicit_baseline(sweep, tmp_path):
    out = tmp_path / "cmp"
    cr.main([str(sweep / "ae"), "--out", str(out), "--metrics", "haiku/strict_valid_rate", "--baseline", "ae"])
    rows = read_csv(out / "comparison.csv")
    assert list(rows) == [("haiku/strict_valid_rate", "ae")]
    assert float(rows["haiku/strict_valid_rate", "ae"]["auc"]) == pytest.approx(0.1)
    assert os.path.exists(out / "haiku_strict_valid_rate.png")
    with pytest.raises(SystemExit) as e:
        cr.main([str(sweep / "ae"), "--out", str(out), "--baseline", "uniform"])
    assert e.value.code == 2


def test_seeds_with_different_eval_points_are_aligned_on_the_common_range():
    records = {0: [(0, 0.0), (100, 1.0), (200, 2.0)], 1: [(0, 0.0), (50, 1.0), (150, 3.0)]}
    runs = [cr.make_run(f"r{s}", {"seed": s, "selection_strategy": "us"},
                        [{"step": i, "labels": x, "m/eval": y} for i, (x, y) in enumerate(pts)])
            for s, pts in records.items()]
    with pytest.warns(UserWarning, match="different label ranges"):
        c = cr.curves(cr.group_runs(runs), "m/eval")["us"]
    assert c.labels.tolist() == [0, 50, 100, 150]
    assert c.mean.tolist() == pytest.approx([0.0, 0.75, 1.5, 2.25])  # seed 0 at 50/150: 0.5, 1.5
    assert c.finals == [2.0, 3.0] and c.seeds == [0, 1]
    assert c.std[1] == pytest.approx(np.std([0.5, 1.0], ddof=1))


def test_grouping_rules():
    plain = cr.make_run("p", {"seed": 0, "selection_strategy": None}, [])
    assert plain.strategy == "none"
    with pytest.raises(cr.CompareError, match="seed=0"):
        cr.group_runs([plain, cr.make_run("q", {"seed": 0}, [])])
    assert cr.resolve_baseline({"borda": [], "uniref": []}, None) == "uniref"
    assert cr.resolve_baseline({"ae": [], "us": []}, None) is None
    # a resumed run repeats its last eval: the later record wins; NaN values are skipped
    x, y = cr.metric_series([{"labels": 0, "m": 1.0}, {"labels": 10, "m": float("nan")}, {"labels": 0, "m": 2.0}], "m")
    assert x.tolist() == [0.0] and y.tolist() == [2.0]


def test_metric_direction_and_eval_keys():
    assert cr.lower_is_better("loss/eval") and cr.lower_is_better("jeopardy/wrong_rate")
    assert cr.lower_is_better("haiku/mean_syllable_distance")
    assert not cr.lower_is_better("rewards_eval/accuracies") and not cr.lower_is_better("win_rate/win_rate")
    assert all(map(cr.is_eval_metric, ("loss/eval", "nll_per_token_eval", "jeopardy/correct_rate", "win_rate/ties")))
    assert not any(map(cr.is_eval_metric, ("loss/train", "time/step_s", "grad_norm")))


def test_labels_to_reach_and_auc():
    x, y = np.array([0.0, 10.0, 30.0]), np.array([1.0, 3.0, 2.0])
    assert cr.labels_to_reach(x, y, 2.0, lower_better=False) == pytest.approx(5.0)
    assert cr.labels_to_reach(x, y, 0.5, lower_better=False) == 0.0  # already there at the first eval
    assert cr.labels_to_reach(x, y, 3.5, lower_better=False) is None
    assert cr.labels_to_reach(x, y, 0.5, lower_better=True) is None
    assert cr.auc(x, y) == pytest.approx((2 * 10 + 2.5 * 20) / 30)
    assert cr.auc(np.array([5.0]), np.array([0.3])) == 0.3


def simpson_two_sided_p(t, df):
    """1 - 2 * integral_0^|t| of the Student t density, by Simpson's rule."""
    grid = np.linspace(0, abs(t), 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = np.exp(log_c) * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    h = grid[1] - grid[0]
    return 1 - 2 * h / 3 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())


def test_t_distribution_p_values():
    for t in (0.0, 0.3, 1.0, 4.0, 30.0):
        assert cr.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)  # Cauchy
        assert cr.t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    # non-integer df: against a Simpson integration of the t density
    assert cr.t_two_sided_p(2.3, 4.7) == pytest.approx(simpson_two_sided_p(2.3, 4.7), abs=1e-9)
    assert cr.welch_t_test([1.0, 1.0], [1.0, 1.0])[2] == 1.0 and cr.welch_t_test([2.0, 2.0], [1.0, 1.0])[2] == 0.0


def test_unfinished_runs_are_left_out_unless_asked_for(sweep, tmp_path):
    """A run still in progress has no summary.json; its last eval is not a final value."""
    running = sweep / "ae" / "0" / "run_0"
    os.remove(running / "summary.json")
    with pytest.warns(UserWarning, match=r"left out 1 unfinished run\(s\) without summary.json \(run_0\)"):
        assert cr.main([str(sweep), "--out", str(tmp_path / "a"), "--metrics", "loss/eval"]) == 0
    assert read_csv(tmp_path / "a" / "comparison.csv")[("loss/eval", "ae")]["n_seeds"] == "2"
    assert cr.main([str(sweep), "--out", str(tmp_path / "b"), "--metrics", "loss/eval", "--include-unfinished"]) == 0
    assert read_csv(tmp_path / "b" / "comparison.csv")[("loss/eval", "ae")]["n_seeds"] == "3"


def test_a_learning_rate_sweep_is_told_apart_and_the_tuned_baseline_is_found():
    """Runs of one strategy at two learning rates are two strategies, named by their lr; a strategy run at
    one lr keeps its plain name; --baseline matches the settings as numbers (5e-4 == 0.0005)."""
    runs = [cr.make_run(f"u{lr}_{seed}", {"seed": seed, "selection_strategy": "uniform", "lr": lr}, [])
            for lr in (5e-4, 1e-3) for seed in (0, 1)]
    runs += [cr.make_run(f"ae_{seed}", {"seed": seed, "selection_strategy": "ae", "uncertainty_method": "laplace",
                                        "lr": 1e-3}, []) for seed in (0, 1)]
    cr.name_variants(runs)
    groups = cr.group_runs(runs)      # no "two runs with the same strategy and seed" error
    assert sorted(groups) == ["ae/laplace", "uniform@lr=0.0005", "uniform@lr=0.001"]
    assert cr.resolve_baseline(groups, "uniform@lr=5e-4") == "uniform@lr=0.0005"
    with pytest.raises(cr.CompareError, match="uniform@lr=0.002"):
        cr.resolve_baseline(groups, "uniform@lr=0.002")
    # a strategy run at one lr has a plain name; the spec it was run as still finds it, by its runs' lr
    assert cr.resolve_baseline(groups, "ae/laplace@lr=1e-3") == "ae/laplace"
    with pytest.raises(cr.CompareError, match="ae/laplace@lr=2e-3"):
        cr.resolve_baseline(groups, "ae/laplace@lr=2e-3")
