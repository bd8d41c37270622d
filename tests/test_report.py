"""report.py and plots.py on fabricated results.json files whose metrics are computed by hand: grouping over seeds,
mean and sample standard deviation, the four output formats parsed back, incomplete runs, errors, figures."""
from __future__ import annotations

import csv
import io
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import metrics
import plots
import report
from config.cli import parse_args
from config.resolved import config_to_dict
from conftest import REPO

# 2 tasks, acc[i][t]. Per seed by hand: FAA = mean of the last column, CAA = mean(acc[0][0], FAA),
# FFM = acc[0][0] - acc[0][1], BWT = -FFM
LINEAR = {1: [[90.0, 80.0], [None, 70.0]], 2: [[94.0, 86.0], [None, 78.0]], 3: [[92.0, 84.0], [None, 74.0]]}
# FAA 75, 82, 79 -> mean 236/3, sample std sqrt(((75-236/3)^2 + (82-236/3)^2 + (79-236/3)^2) / 2) = sqrt(37/3)
LINEAR_FAA = (236 / 3, math.sqrt(37 / 3))
# CAA 82.5, 88, 85.5 -> mean 256/3; deviations -17/6, 8/3, 1/6
LINEAR_CAA = (256 / 3, math.sqrt(((17 / 6) ** 2 + (8 / 3) ** 2 + (1 / 6) ** 2) / 2))
# FFM 10, 8, 8 -> mean 26/3, sample std sqrt((16/9 + 4/9 + 4/9) / 2) = sqrt(4/3)
LINEAR_FFM = (26 / 3, math.sqrt(4 / 3))
L2P = {1: [[99.0, 97.0], [None, 95.0]], 2: [[99.0, 95.0], [None, 93.0]]}  # FAA 96, 94 -> 95 +- sqrt(2)


def fabricate(folder: Path, argv: list[str], acc: list[list[float | None]], completed: int | None = None,
              tii: list[float] | None = None, provenance: dict | None = None,
              phases: dict | None = None) -> Path:
    """A results.json as a run writes it: the real config of `argv`, the matrix, per-task entries with the metrics."""
    cfg = parse_args([*argv, "--output_dir", str(folder)])
    n = len(acc)
    done = n if completed is None else completed
    matrix = np.array([[np.nan if v is None else v for v in row] for row in acc])
    tasks = []
    for t in range(done):
        entry = {"task": t + 1, **metrics.summarize(matrix, t), "tii_acc": tii or [100.0] * (t + 1),
                 "avg_tii_acc": float(np.mean(tii or [100.0]))}
        if phases:
            entry["phases"] = phases
        tasks.append(entry)
    results = {"subcommand": cfg.subcommand, "method": cfg.method, "dataset": cfg.data.dataset,
               "model": cfg.backbone.model, "num_tasks": n, "completed_tasks": done,
               "acc_matrix": [[v if c < done else None for c, v in enumerate(row)] for row in acc],
               "tasks": tasks, "final": tasks[-1] if tasks else None, "config": config_to_dict(cfg),
               **({"provenance": provenance} if provenance else {})}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "output"
    for seed, acc in LINEAR.items():
        fabricate(root / f"linear_seed{seed}", ["digits_linear", "--seed", str(seed)], acc,
                  provenance={"torch": "2.14.1", "wall_seconds": 10.0 * seed})
    for seed, acc in L2P.items():
        fabricate(root / f"l2p_seed{seed}", ["digits_l2p", "--seed", str(seed)], acc)
    fabricate(root / "linear_seed4", ["digits_linear", "--seed", "4"], LINEAR[1], completed=1)  # stopped early
    fabricate(root / "linear_lr_seed1", ["digits_linear", "--seed", "1", "--lr", "0.01"], LINEAR[2])  # other lr
    return root


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = report.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def csv_rows(capsys, *args: str) -> list[dict[str, str]]:
    code, out, _ = run_report(capsys, *args, "--format", "csv")
    assert code == 0
    return list(csv.DictReader(io.StringIO(out)))


def test_groups_by_settings_and_averages_over_seeds(runs, capsys):
    rows = csv_rows(capsys, str(runs))
    by_name = {(r["method"], r["settings"]): r for r in rows}
    assert set(by_name) == {("linear", "lr=0.3"), ("linear", "lr=0.01"), ("l2p", "")}  # the default lr is 0.3
    linear = by_name[("linear", "lr=0.3")]
    assert linear["seeds"] == "3" and linear["seed_values"] == "1 2 3"  # the incomplete seed 4 is not averaged
    for column, (mean, std) in (("FAA", LINEAR_FAA), ("CAA", LINEAR_CAA), ("FFM", LINEAR_FFM),
                                ("BWT", (-LINEAR_FFM[0], LINEAR_FFM[1]))):
        assert float(linear[f"{column}_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(linear[f"{column}_std"]) == pytest.approx(std, abs=1e-12)
    l2p = by_name[("l2p", "")]
    assert (float(l2p["FAA_mean"]), float(l2p["FAA_std"])) == pytest.approx((95.0, math.sqrt(2)))
    single = by_name[("linear", "lr=0.01")]  # one seed: a mean, no standard deviation
    assert float(single["FAA_mean"]) == 82.0 and single["FAA_std"] == ""
    assert all(r["dataset"] == "Split-Digits" and r["backbone"].startswith("vit_") for r in rows)


def test_markdown_table_and_the_incomplete_runs_apart(runs, capsys):
    code, out, _ = run_report(capsys, str(runs), "--format", "markdown")
    assert code == 0
    lines = out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["method", "dataset", "backbone", "settings", "seeds"]
    assert header[5:11] == ["FAA", "CAA", "FFM", "FFM_std", "BWT", "TII"]
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
             for line in lines[2:5]]
    linear = next(r for r in table if r["method"] == "linear" and r["settings"] == "lr=0.3")
    assert linear["FAA"] == f"{LINEAR_FAA[0]:.2f} ± {LINEAR_FAA[1]:.2f}" == "78.67 ± 3.51"
    assert linear["seeds"] == "3" and linear["TII"] == "100.00 ± 0.00"
    rest = "\n".join(lines[5:])
    assert "incomplete runs (not averaged):" in rest and f"{runs / 'linear_seed4'}: 1/2 tasks" in rest


def test_terminal_table_is_the_default(runs, capsys):
    code, out, _ = run_report(capsys, str(runs / "linear_seed*"), str(runs / "l2p_seed1"))
    assert code == 0
    header, rule, *rows, incomplete, seed4 = out.splitlines()
    assert header.split("|")[0].strip() == "method" and set(rule) <= {"-", "+"}
    assert len(rows) == 2  # linear over seeds 1-3 (the lr=0.01 run does not match the glob), l2p seed 1
    assert incomplete == "incomplete runs (not averaged):" and "linear_seed4: 1/2 tasks" in seed4
    assert "78.67 ± 3.51" in rows[0] and "96.00" in rows[1] and "±" not in rows[1].split("|")[5]


def test_latex_is_a_booktabs_table_with_one_row_per_group(runs, capsys):
    code, out, err = run_report(capsys, str(runs), "--format", "latex")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{lllll") and lines[-1] == r"\end{tabular}"
    assert lines[1] == r"\toprule" and lines[3] == r"\midrule" and lines[-2] == r"\bottomrule"
    assert lines[2].startswith(r"method & dataset & backbone & settings & seeds & FAA & CAA & FFM & FFM\_std")
    body = lines[4:-2]
    assert len(body) == 3 and all(line.endswith(r" \\") and line.count(" & ") == lines[2].count(" & ")
                                  for line in body)
    linear = next(line for line in body if "lr=0.3" in line)
    assert r"$78.67 \pm 3.51$" in linear and r"vit\_tiny" in linear and "_" not in linear.replace(r"\_", "")
    assert "incomplete runs" in err  # stdout stays the table alone


def test_extra_columns_from_provenance_settings_and_dotted_paths(runs, capsys):
    rows = csv_rows(capsys, str(runs / "linear_seed[123]"), "--columns", "torch,wall_seconds,lr,final.task")
    assert len(rows) == 1
    row = rows[0]
    assert row["torch"] == "2.14.1" and row["final.task_mean"] == "2.0"  # numbers: a mean and std column each
    assert (float(row["lr_mean"]), float(row["lr_std"])) == (0.3, 0.0)
    assert (float(row["wall_seconds_mean"]), float(row["wall_seconds_std"])) == (20.0, 10.0)


def test_shuffled_class_orders_of_different_seeds_are_one_group(tmp_path, capsys):
    for seed, acc in LINEAR.items():
        fabricate(tmp_path / f"s{seed}", ["digits_linear", "--seed", str(seed), "--shuffle", "True"], acc)
    orders = {json.dumps(json.loads((tmp_path / f"s{s}" / "results.json").read_text())["config"]["context"]
                         ["class_order"]) for s in LINEAR}
    assert len(orders) > 1  # the seed did shuffle the classes differently
    rows = csv_rows(capsys, str(tmp_path))
    assert [r["seeds"] for r in rows] == ["3"]


def test_a_seed_given_twice_is_said(runs, capsys):
    fabricate(runs / "copy" / "linear_seed1", ["digits_linear", "--seed", "1"], LINEAR[1])
    code, out, _ = run_report(capsys, str(runs))
    assert code == 0 and "has seed 1 more than once" in out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/absent"], "does not exist"),
    (["{tmp}/empty"], "no results.json in"),
    (["{tmp}/nothing*"], "nothing matches"),
    (["{tmp}/broken"], "is not a run's results.json"),
    (["{tmp}/ok", "--columns", "no_such_field"], "--columns no_such_field: no run has it"),
    (["{tmp}/partial"], "has finished every task"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    fabricate(tmp_path / "ok", ["digits_linear"], LINEAR[1])
    fabricate(tmp_path / "partial", ["digits_linear"], LINEAR[1], completed=1)
    code, out, err = run_report(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_help_of_report_and_of_its_former_name(capsys, monkeypatch):
    for script in ("report.py", "compare.py"):
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(REPO / script), run_name="__main__")
        assert stop.value.code == 0
        out = capsys.readouterr().out
        assert "usage: report.py" in out and "FAA" in out and "--format" in out


def test_phase_columns_and_figures_of_a_hide_group(tmp_path, capsys):
    phases = {"tii": {"avg_acc": 60.0}, "wtp_pre_alignment": {"avg_acc": 50.0}}
    for seed, acc in LINEAR.items():
        fabricate(tmp_path / "runs" / f"hide{seed}", ["digits_hideprompt", "--seed", str(seed)], acc,
                  tii=[80.0 + seed, 70.0], phases=phases)
    rows = csv_rows(capsys, str(tmp_path / "runs"), "--plots", str(tmp_path / "fig"), "--pdf")
    assert rows[0]["FAA tii_mean"] == "60.0" and rows[0]["FAA wtp before TAP_mean"] == "50.0"
    assert float(rows[0]["TII_mean"]) == 76.0  # per seed mean(80 + seed, 70): 75.5, 76, 76.5
    files = sorted(p.name for p in (tmp_path / "fig").iterdir())
    label = "hideprompt_both"
    assert files == sorted(f"{name}.{ext}" for name in (f"matrix_{label}", f"alignment_{label}", "average_accuracy",
                                                         "task_identity") for ext in ("png", "pdf"))
    for name in files:
        data = (tmp_path / "fig" / name).read_bytes()
        assert data.startswith(b"\x89PNG" if name.endswith(".png") else b"%PDF")
    expected = {f"matrix_{label}.png": (420, 300), f"alignment_{label}.png": (700, 450),
                "average_accuracy.png": (700, 450), "task_identity.png": (700, 450)}
    for name, size in expected.items():
        assert Image.open(tmp_path / "fig" / name).size == size


def test_matrix_figure_writes_every_defined_value_with_its_std():
    mean = plots.as_array([[90.0, 85.5], [None, 70.25]])
    std = plots.as_array([[1.0, 2.04], [None, 0.5]])
    fig = plots.matrix_figure(mean, std, "title")
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(0, 0): "90.0\n±1.0", (0, 1): "85.5\n±2.0", (1, 1): "70.2\n±0.5"}
    assert ax.get_xlabel() == "after training task" and ax.get_ylabel() == "evaluated task"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    colorbar = fig.axes[1]
    assert colorbar.get_ylabel() == "accuracy (%)" and colorbar.get_ylim() == (0.0, 100.0)


def test_run_matrix_figure_shows_only_what_was_evaluated_by_task_t():
    acc = np.array([[90.0, 80.0, 70.0], [0.0, 60.0, 50.0], [0.0, 0.0, 40.0]])
    ax = plots.run_matrix_figure(acc, 1).axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(0, 0): "90.0", (0, 1): "80.0", (1, 1): "60.0"}


def test_ledger_fills_ours_only_from_one_group_of_finished_runs(tmp_path, capsys):
    import ledger
    rows = [i for i, r in enumerate(ledger.ROWS) if r.runs == "output/cifar100_vit_pe_seed*"]  # in two tables
    for seed, acc in LINEAR.items():
        fabricate(tmp_path / "output" / f"cifar100_vit_pe_seed{seed}", ["digits_linear", "--seed", str(seed)], acc)
    fabricate(tmp_path / "output" / "imr_vit_pe_seed1", ["digits_linear", "--seed", "1"], LINEAR[1])
    fabricate(tmp_path / "output" / "imr_vit_pe_seed2", ["digits_linear", "--seed", "2", "--lr", "0.01"], LINEAR[2])
    code, out, _ = run_report(capsys, "--ledger", str(tmp_path / "output"))
    assert code == 0
    filled = {i: cells for i in range(len(ledger.ROWS))
              if (cells := report.ledger_cells(report.group_runs(
                  report.load_run(p) for p in report.find_result_files([str(tmp_path / "output")])),
                  ledger.ROWS[i].runs))}
    assert list(filled) == rows  # ImageNet-R's two runs differ in settings: never merged into one cell
    for row in rows:
        assert filled[row]["FAA"] == "78.67 ± 3.51 (3 seeds)" and filled[row]["FFM"] == "8.67 ± 1.15 (3 seeds)"
    assert out == ledger.render(filled) + "\n"
    assert out.count("not yet run") == ledger.render().count("not yet run") - len(rows) * len(ledger.METRICS)


def test_a_run_in_reference_mode_says_so_in_its_row(tmp_path, capsys):
    fabricate(tmp_path / "ours", ["digits_linear"], LINEAR[1])
    fabricate(tmp_path / "theirs", ["digits_linear", "--reference_mode"], LINEAR[2])
    rows = csv_rows(capsys, str(tmp_path))
    assert sorted(r["method"] for r in rows) == ["linear", "linear [reference mode]"] and "settings" not in rows[0]
