"""End to end on tiny data: every baseline, frozen-parameter invariants, resume, re-evaluation, exact DDP eval."""
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, read_json, run_cli, run_main

FAST = ["--epochs", "1", "--device", "cpu"]


def _checkpoint(out: Path, task: int) -> dict:
    return torch.load(out / "checkpoint" / f"task{task}_checkpoint.pth", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["finetune", "fix", "joint", "linear", "ncm"])  # prompt methods: own file
def test_every_baseline_runs_on_split_digits(tmp_path, method):
    out = tmp_path / method
    assert run_main(f"digits_{method}", "--output_dir", str(out), *FAST) == 0
    results = read_json(out / "results.json")
    tasks = 1 if method == "joint" else 5
    assert results["completed_tasks"] == tasks and len(results["tasks"]) == tasks
    matrix = results["acc_matrix"]
    assert all(matrix[i][c] is None for i in range(tasks) for c in range(i))  # lower triangle undefined
    assert all(0.0 <= matrix[i][c] <= 100.0 for i in range(tasks) for c in range(i, tasks))
    assert results["final"]["test_images"] == 540  # every test image, once
    # the final A_t is the mean of the last column, as the metric says
    assert results["final"]["avg_acc"] == pytest.approx(sum(r[-1] for r in matrix) / tasks)
    assert (out / "config.json").is_file() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [f"task{t}_checkpoint.pth"
                                                                      for t in range(1, tasks + 1)]
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.slow
def test_methods_save_and_train_only_what_they_should(tmp_path):
    runs = {}
    for method in ("linear", "fix", "ncm"):
        out = tmp_path / method
        assert run_main(f"digits_{method}", "--output_dir", str(out), *FAST, "--num_tasks", "2") == 0
        runs[method] = [_checkpoint(out, t)["model"] for t in (1, 2)]
    # linear: only the head is saved (the frozen backbone is never in a checkpoint)
    assert set(runs["linear"][0]) == {"head.weight", "head.bias"}
    assert not torch.equal(runs["linear"][0]["head.weight"], runs["linear"][1]["head.weight"])
    # fix: the backbone trains on task 1 only, the head keeps learning
    fix1, fix2 = runs["fix"]
    backbone = [k for k in fix1 if k.startswith("backbone.")]
    assert backbone and all(torch.equal(fix1[k], fix2[k]) for k in backbone)
    assert not torch.equal(fix1["head.weight"], fix2["head.weight"])
    # ncm: class statistics only; task 2 adds the counts of classes 5..9 and leaves classes 0..4 as they were
    ncm1, ncm2 = runs["ncm"]
    assert set(ncm1) == {"class_sums", "class_counts"}
    assert ncm1["class_counts"][5:].sum() == 0
    assert ncm2["class_counts"][:5].tolist() == ncm1["class_counts"][:5].tolist()
    assert ncm2["class_counts"][5:].sum() > 0


@pytest.mark.slow
def test_fix_backbone_really_changed_on_the_first_task(tmp_path):
    from models.vit import create_backbone
    out = tmp_path / "fix"
    assert run_main("digits_fix", "--output_dir", str(out), *FAST, "--num_tasks", "2") == 0
    torch.manual_seed(42)  # the seed main.py creates the model under
    init = create_backbone("vit_tiny_patch16_224", False, 32).state_dict()
    trained = _checkpoint(out, 1)["model"]
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], trained["backbone.blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_resume_after_a_stop_equals_an_uninterrupted_run(tmp_path, capsys):
    full, split = tmp_path / "full", tmp_path / "split"
    assert run_main("digits_linear", "--output_dir", str(full), *FAST) == 0
    assert run_main("digits_linear", "--output_dir", str(split), *FAST, "--stop_after_task", "2") == 0
    stopped = read_json(split / "results.json")
    assert stopped["completed_tasks"] == 2 and stopped["acc_matrix"][0][2] is None
    assert run_main("digits_linear", "--output_dir", str(split), *FAST, "--resume") == 0
    assert "resuming from" in capsys.readouterr().out
    assert read_json(split / "results.json")["acc_matrix"] == read_json(full / "results.json")["acc_matrix"]
    assert torch.equal(_checkpoint(split, 5)["model"]["head.weight"], _checkpoint(full, 5)["model"]["head.weight"])


@pytest.mark.slow
def test_resume_with_another_experiment_is_refused_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("digits_linear", "--output_dir", str(out), *FAST, "--stop_after_task", "1") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run_main("digits_linear", "--output_dir", str(out), *FAST, "--resume", "--shuffle") == 2
    err = capsys.readouterr().err
    assert "belongs to another experiment (class_order:" in err and "new --output_dir" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_eval_of_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("digits_ncm", "--output_dir", str(out), *FAST, "--num_tasks", "2") == 0
    path = out / "checkpoint" / "task2_checkpoint.pth"
    path.write_bytes(path.read_bytes()[:200])
    assert run_main("digits_ncm", "--output_dir", str(out), *FAST, "--num_tasks", "2", "--eval") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"cannot read checkpoint {path}" in err


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_evaluation_is_exact_with_odd_shards(tmp_path, fake_cifar):
    """Train once, then re-evaluate the same checkpoints with 1 and with 2 gloo processes: 4 tasks x 25 classes x 3
    test images = 75 images per task, an odd number, so a padding sampler would count an image twice."""
    out = tmp_path / "run"
    args = ["cifar100_linear", "--data-path", str(fake_cifar), "--output_dir", str(out), "--num_tasks", "4",
            "--batch-size", "8", *TINY, "--epochs", "1"]
    assert run_main(*args) == 0
    trained = read_json(out / "results.json")
    assert run_main(*args, "--eval") == 0
    single = read_json(out / "eval_results.json")
    result = run_cli([*args, "--eval"], nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    double = read_json(out / "eval_results.json")
    assert [t["test_images"] for t in double["tasks"]] == [75, 150, 225, 300]
    assert double["acc_matrix"] == single["acc_matrix"] == trained["acc_matrix"]


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_under_torchrun_with_two_processes(tmp_path):
    """The README's main job: HiDe-Prompt's two launches, then baselines and prompt methods, under torchrun (2 gloo
    processes), each run in <name>_seed42, then the report's table (one seed: a row per run) with the task-identity
    accuracy."""
    import subprocess
    out = tmp_path / "demo"
    result = subprocess.run(["bash", "training_script/demo.sh", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the report failed" not in result.stderr, result.stderr[-3000:]
    assert "test\\after" in result.stdout  # the accuracy matrix is printed
    _, *table = result.stdout[result.stdout.rindex("Split Digits, 2 processes, final metrics"):].splitlines()
    # the output ends with the report: its header, then the rows, nothing of the runs after the heading
    assert any(all(column in line for column in ("FAA", "TII", "seeds")) for line in table), table
    assert not [line for line in table if "################" in line or "test\\after" in line]
    text = "\n".join(table)
    for name in ("hideprompt_stage1", "hideprompt", "ncm", "linear", "dualprompt"):
        results = read_json(out / f"{name}_seed42" / "results.json")
        assert results["completed_tasks"] == results["num_tasks"] == 5
        assert results["config"]["context"]["world_size"] == 2 and results["config"]["run"]["seed"] == 42
        assert results["method"] in text
        assert f"{results['final']['avg_acc']:.2f}" in text and f"{results['final']['avg_tii_acc']:.2f}" in text
        assert list((out / f"{name}_seed42" / "tensorboard").glob("events.out.tfevents.*"))
    stage1, stage2 = (read_json(out / f"{name}_seed42" / "results.json")
                      for name in ("hideprompt_stage1", "hideprompt"))
    assert stage2["config"]["hide"]["trained_original_model"] == str(out / "hideprompt_stage1_seed42")
    # stage 2 picks each test image's prompt with stage 1's task prediction: the same task-identity accuracy
    assert stage2["final"]["tii_acc"] == stage1["final"]["tii_acc"]
