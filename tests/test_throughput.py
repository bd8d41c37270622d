"""benchmarks/throughput.py, run in-process on the tiny digits config (random inputs, no data on disk)."""
import importlib.util
from types import ModuleType

import pytest

from conftest import REPO, read_json


def _throughput() -> ModuleType:
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, subcommand: str) -> dict:
    path = tmp_path / f"{subcommand}.json"
    code = _throughput().main([subcommand, "--device", "cpu", "--steps", "2", "--warmup", "1",
                               "--precisions", "none", "--matmul_size", "256", "--json", str(path)])
    assert code == 0
    saved = read_json(path)
    assert saved["subcommand"] == subcommand and saved["device"] == "cpu"
    assert [row["precision"] for row in saved["results"]] == ["none"]
    assert saved["bf16_matmul_flops"] > 0
    for kind in ("train", "eval"):  # each rate's FLOP/s as a share of the measured bf16 matmul rate
        rate, flops = saved["results"][0][f"{kind}_images_per_second"], saved["results"][0][f"{kind}_flops_per_image"]
        if rate is not None:
            assert saved["results"][0][f"{kind}_peak_percent"] == pytest.approx(
                100 * rate * flops / saved["bf16_matmul_flops"])
    return saved["results"][0]


def test_linear_reports_train_and_eval_throughput(tmp_path, capsys):
    row = _run(tmp_path, "digits_linear")
    assert row["train_images_per_second"] > 0
    assert row["eval_images_per_second"] > 0
    assert row["train_forward_ms"] > 0 and row["train_backward_ms"] > 0
    # the linear probe's step: the frozen backbone's forward, then the head's forward and backward only
    assert row["eval_flops_per_image"] < row["train_flops_per_image"] < 1.01 * row["eval_flops_per_image"]
    assert row["train_vit_passes_per_image"] == row["eval_vit_passes_per_image"] == 1
    out = capsys.readouterr().out
    assert "digits_linear" in out and "train img/s" in out


def test_ncm_has_no_training_row(tmp_path):
    row = _run(tmp_path, "digits_ncm")
    assert row.get("train_images_per_second") is None
    assert row["eval_images_per_second"] > 0


def test_config_errors_exit_2(capsys):
    assert _throughput().main(["digits_linear", "--num_tasks", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --num_tasks 3")


def test_prompt_methods_count_the_query_pass_and_the_prompted_pass(tmp_path):
    # L2P selects its prompts by key matching in training too: the query pass, then the prompted pass
    row = _run(tmp_path, "digits_l2p")
    assert row["train_vit_passes_per_image"] == row["eval_vit_passes_per_image"] == 2
    # and its backward runs through the prompted pass alone: more than the forward's FLOPs, fewer than twice them
    assert 1.2 * row["eval_flops_per_image"] < row["train_flops_per_image"] < 2 * row["eval_flops_per_image"]


def test_few_shot_shared_model_is_one_lora_pass_per_image(tmp_path):
    # the shared upstream model of a single dataset: slot 0 for every image, no vanilla pass at test time
    row = _run(tmp_path, "digits_few_shot_lora")
    assert row["train_images_per_second"] > 0
    assert row["train_vit_passes_per_image"] == row["eval_vit_passes_per_image"] == 1


@pytest.mark.slow
def test_rolling_state_benchmark_times_both_variants_per_phase_and_sizes_the_state(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rolling_state_benchmark", REPO / "benchmarks" / "rolling_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "rolling.json"
    assert module.main(["digits_hideprompt", "--device", "cpu", "--images", "48", "--repeats", "1", "--epochs", "1",
                        "--tii_epochs", "1", "--json", str(path)]) == 0
    saved = read_json(path)
    assert saved["images"] == 48 and saved["epochs"] == 1
    assert [row["phase"] for row in saved["results"]] == ["tii", "wtp"]
    for row in saved["results"]:
        assert row["epoch_seconds_without"] > 0 and row["epoch_seconds_with"] > 0 and row["state_mb"] > 0.1
        expected = 100 * (row["epoch_seconds_with"] - row["epoch_seconds_without"]) / row["epoch_seconds_without"]
        assert abs(row["overhead_percent"] - expected) < 1e-9
        assert 0 < row["blocked_seconds_per_epoch"] < row["epoch_seconds_with"]
    assert "waited" in capsys.readouterr().out
