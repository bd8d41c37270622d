"""benchmarks/gpu_check.sh: its plan covers every method, its pair comparison sees a difference, and its quick form
runs end to end on CPU."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
import torch

from conftest import REPO, load_script, read_json
from test_pipeline_benchmark import one_thread


def _gpu_check() -> ModuleType:
    return load_script("gpu_check", REPO / "benchmarks" / "gpu_check.py")


def test_the_plan_runs_every_method_the_registry_offers_for_digits(tmp_path):
    from config.cli import subcommands
    check = _gpu_check()
    runs = {run.key: run for run in check.plan("cpu", quick=False, out=tmp_path)}
    digits = [s for s in subcommands() if s.startswith("digits_") and s != "digits_few_shot_lora"]
    assert set(digits) <= set(runs) and len(digits) == 11
    from utils import cpu_has_native_bf16
    amp = "bf16" if cpu_has_native_bf16() else "none"  # emulated bf16 would only slow the CPU runs down
    assert all(runs[s].args[:5] == (s, "--device", "cpu", "--amp", amp) for s in digits)
    assert all(r.args[4] == "bf16" for r in check.plan("cuda", quick=False, out=tmp_path) if r.key in digits)
    assert runs["digits_dualprompt_fp16"].skip == "skipped: fp16 needs CUDA"
    assert not {r.key: r for r in check.plan("cuda", quick=False, out=tmp_path)}["digits_dualprompt_fp16"].skip
    stage1, stage2 = runs["digits_hideprompt_stage1_torchrun"], runs["digits_hideprompt_stage2_torchrun"]
    assert stage1.torchrun and stage2.torchrun and "--train_inference_task_only" in stage1.args
    assert stage2.args[-2:] == ("--trained_original_model", str(tmp_path / stage1.key))
    assert "--nproc_per_node=1" in check.command(stage1, tmp_path)
    assert runs["deterministic_1"].args == runs["deterministic_2"].args and "--deterministic" in runs[
        "deterministic_1"].args
    assert "covariance" in runs["digits_hideprompt_covariance"].args


def test_quick_runs_shorten_only_the_flags_a_run_reads(tmp_path):
    check = _gpu_check()
    runs = {run.key: run for run in check.plan("cpu", quick=True, out=tmp_path)}
    assert [k for k in runs if k in ("digits_ncm", "digits_linear", "digits_l2p")] == ["digits_linear", "digits_ncm"]
    assert runs["digits_linear"].args[5:] == ("--epochs", "1")
    assert "--num_episodes" in runs["digits_few_shot_lora_flow"].args
    assert "--tii_epochs" in runs["digits_hideprompt_covariance"].args
    assert "--tii_epochs" not in runs["digits_hideprompt_stage1_torchrun"].args  # a one-stage launch refuses it


def _fake_run(folder: Path, matrix_value: float, weight: float) -> None:
    (folder / "checkpoint").mkdir(parents=True)
    final = {"avg_acc": matrix_value, "train_loss": 0.5}
    (folder / "results.json").write_text(json.dumps({"acc_matrix": [[matrix_value, None], [None, 50.0]],
                                                     "final": final}))
    for task in (1, 2, 10):
        torch.save({"model": {"w": torch.full((2,), weight * task)}}, folder / "checkpoint" /
                   f"task{task}_checkpoint.pth")


def test_the_pair_comparison_names_the_largest_difference(tmp_path):
    check = _gpu_check()
    ok = [check.Outcome(f"deterministic_{i}", "", "ok") for i in (1, 2)]
    _fake_run(tmp_path / "deterministic_1", 60.0, 1.0)
    _fake_run(tmp_path / "deterministic_2", 60.0, 1.0)
    assert check.compare_pair(*ok, tmp_path)["identical"]
    _fake_run(tmp_path / "b" / "deterministic_1", 60.0, 1.0)
    _fake_run(tmp_path / "b" / "deterministic_2", 60.25, 1.5)
    pair = check.compare_pair(*ok, tmp_path / "b")
    assert not pair["identical"] and pair["metrics_max_difference"] == 0.25
    assert pair["tensors_max_difference"] == 5.0  # the last task's checkpoint (task10, not task2)
    failed = check.Outcome("deterministic_2", "", "FAILED (exit 1)")
    assert check.compare_pair(ok[0], failed, tmp_path) == {"identical": False,
                                                          "text": "not compared: a run of the pair failed"}


def test_a_run_past_its_time_is_stopped():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert _gpu_check()._wait(proc, timeout=0.2) is None and proc.returncode == -15  # SIGTERM was enough


def test_the_throughput_section_measures_each_phase_and_estimates_the_paper_run():
    check = _gpu_check()
    with one_thread():
        section = check.throughput_section("cpu", quick=True)
    assert section["error"] is None and section["bf16_matmul_flops"] > 0
    rows = {(r["method"], r["phase"], r["precision"]): r for r in section["rows"]}
    assert list(rows) == [(m, p, q) for m, p in (("l2p", "train"), ("hideprompt", "tii"), ("hideprompt", "wtp"))
                          for q in ("bf16", "none")]
    for row in rows.values():
        for kind in ("train", "eval"):
            assert row[f"{kind}_images_per_second"] > 0 and row[f"{kind}_flops_per_image"] > 0
            assert row[f"{kind}_peak_percent"] > 0
        assert row["peak_mib"] is None  # GPU memory only
    l2p = rows["l2p", "train", "bf16"]
    assert l2p["train_flops_per_image"] > l2p["eval_flops_per_image"]  # the backward of the prompted pass
    tii, wtp = rows["hideprompt", "tii", "bf16"], rows["hideprompt", "wtp", "bf16"]
    [bf16, _] = section["estimate"]
    assert bf16["stage1_train_seconds"] == pytest.approx(20 * 50_000 / (8 * tii["train_images_per_second"]))
    assert bf16["stage2_train_seconds"] == pytest.approx(50 * 50_000 / (8 * wtp["train_images_per_second"]))
    assert bf16["eval_seconds"] == pytest.approx(55_000 / 8 * (1 / tii["eval_images_per_second"] +
                                                               1 / wtp["eval_images_per_second"]))
    text = "\n".join(check.throughput_lines(section, "cpu"))
    assert "| hideprompt | wtp | none |" in text and "20 x 50,000 / (8 x tii train img/s)" in text


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_error_line(tmp_path):
    check = _gpu_check()
    outcome = check.execute(check.Run("bad", "a mistyped flag", ("digits_ncm", "--batchsize", "4")), tmp_path, 120)
    assert (outcome.status, outcome.exit_code, outcome.final_acc) == ("FAILED (exit 2)", 2, None)
    [line] = check.failure_excerpt(outcome.log)
    assert line == "error: unrecognized flag --batchsize; did you mean --batch-size?"
    assert outcome.peak_mib > 0  # the child writes its peak however the run ends


@pytest.mark.slow
@pytest.mark.distributed
def test_the_quick_check_passes_on_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = read_json(out / "gpu_check.json")
    statuses = {run["key"]: run["status"] for run in report["runs"]}
    assert statuses.pop("digits_dualprompt_fp16") == "skipped: fp16 needs CUDA"
    assert set(statuses) == {"digits_linear", "digits_ncm", "digits_hideprompt_covariance",
                             "digits_few_shot_lora_flow", "digits_hideprompt_stage1_torchrun",
                             "digits_hideprompt_stage2_torchrun", "deterministic_1", "deterministic_2"}
    assert set(statuses.values()) == {"ok"}
    assert all(run["peak_mib"] > 0 and 0 <= run["final_acc"] <= 100 for run in report["runs"] if run["seconds"])
    assert report["deterministic_pair"]["identical"] and report["passed"]
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {key} |" in table for key in [*statuses, "digits_dualprompt_fp16"])
    assert "Deterministic pair: identical" in table and table in proc.stdout
    throughput = report["throughput"]
    assert throughput["error"] is None and {(r["method"], r["phase"]) for r in throughput["rows"]} == {
        ("l2p", "train"), ("hideprompt", "tii"), ("hideprompt", "wtp")}
    assert all(r["train_images_per_second"] > 0 and r["eval_images_per_second"] > 0 for r in throughput["rows"])
    assert "| l2p | train | bf16 |" in table and "Paper-run estimate" in table
