"""Beyond task-by-task training: the online protocol (test-then-train, anytime evaluation), the task-free Gaussian
stream, domain-incremental runs on Split Digits' domains and on a fake CORe50 tree, and the Python API."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, fails_with_one_line, read_json, run_cli, run_main, write_fake_core50

ONLINE = ["--protocol", "online", "--num_tasks", "2", "--unscale_lr", "False"]


# ----------------------------------------------------------------------------------------------------------------
# The loop on a hand-built stream, with a learner whose answers are known
# ----------------------------------------------------------------------------------------------------------------
class ScriptedLearner:
    """Predicts class 0 for every image; "learns" nothing; counts what the loop asks of it."""

    def __init__(self, num_classes: int):
        self.ctx = SimpleNamespace(device=torch.device("cpu"))
        self.cfg = SimpleNamespace(data=SimpleNamespace(eval_all_classes=False))
        self.seen = torch.zeros(num_classes, dtype=torch.bool)
        self.calls: list[str] = []

    def on_task_start(self, t: int) -> None:
        self.calls.append(f"start{t}")

    def predict(self, images: torch.Tensor, batch_key=None) -> torch.Tensor:
        return torch.zeros(len(images), dtype=torch.long)

    def train_batch(self, images, labels, weight=1.0) -> torch.Tensor:
        self.calls.append("train")
        return torch.tensor(1.0)

    def on_task_end(self, t: int, data=None) -> None:
        self.calls.append(f"end{t}")


def batches(labels: list[int], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(len(labels[i:i + size]), 1), torch.tensor(labels[i:i + size]))
            for i in range(0, len(labels), size)]


def test_prequential_and_anytime_matrix_on_a_hand_built_stream():
    from online import run_online
    # task 0: labels 0,0,1,1,0,1 (3 of 6 are 0: right); task 1: 2,2,0,2 (1 of 4 right)
    train = [batches([0, 0, 1, 1, 0, 1], 1), batches([2, 2, 0, 2], 1)]  # batches of one image
    test = [batches([0, 1, 0, 0], 4), batches([2, 0], 2)]  # always-0 scores 75% and 50%
    learner = ScriptedLearner(3)
    results = run_online(learner, train, test, continual_evaluations=3, eval_window=4)
    assert results.prequential_accuracy == pytest.approx(100 * 4 / 10)
    assert results.prequential_task_accuracy == pytest.approx([50.0, 25.0])
    # windows of 4 in stream order: [0,0,1,1] -> 2/4, [0,1,2,2] -> 1/4; ends at 4 (task 0, 4/6) and 8 (task 1, 2/4)
    assert results.windowed_accuracy == pytest.approx([50.0, 25.0])
    assert results.window_task_index == pytest.approx([4 / 6, 1.5])
    anytime = np.array(results.anytime_accuracy_matrix)
    assert anytime.shape == (2, 3, 2)  # T x H x T
    assert np.allclose(anytime, [75.0, 50.0])
    assert np.array(results.accuracy_matrix).shape == (2, 2)
    assert results.forward_transfer == pytest.approx(50.0)  # R[0][1]
    assert learner.calls.count("train") == 10 and learner.calls[0] == "start0" and learner.calls[-1] == "end1"


def test_evaluation_points_are_even_and_end_at_the_end():
    from online import evaluation_points, gaussian_plan, stream_batches
    from utils import UserError
    assert evaluation_points(16, 4) == [4, 8, 12, 16]
    assert evaluation_points(10, 3) == [3, 7, 10]
    with pytest.raises(UserError, match="only 2 batches"):
        evaluation_points(2, 3)
    assert sorted(gaussian_plan(10, 4).at_task_ends) == [1, 4, 7, 9]  # round(2.5, 5, 7.5, 10) - 1
    cut = stream_batches(np.arange(11), 4, 4)  # a last batch of 3 < 4 processes joins the one before
    assert [len(b) for b in cut] == [4, 7] and np.array_equal(np.concatenate(cut), np.arange(11))


# ----------------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("subcommand", "extra", "needle"), [
    ("digitsgaussian_dualprompt", [], "refuses the task-free (gaussian) scenario: it trains slot t on task t"),
    ("digitsgaussian_hideprompt", [], "hideprompt does not run the gaussian scenario: its stages"),
    ("digitsgaussian_hidelora", [], "hidelora does not run the gaussian scenario"),
    ("cifar100gaussian_ncm", [], "ncm does not run the gaussian scenario: it takes no gradient steps"),
    ("digits_hideprompt", ["--protocol", "online"], "hideprompt does not run the online protocol"),
    ("digitsgaussian_l2p", ["--protocol", "offline"], "single-pass stream of episodes: drop --protocol offline"),
    ("digits_l2p", ["--protocol", "online", "--sched", "cosine"], "use --sched constant"),
    ("digits_l2p", ["--protocol", "online", "--resume"], "an online run is one pass"),
    ("digits_l2p", ["--scenario", "domain"], "Split-Digits has no domains"),
    ("digitsdomain_l2p", ["--num_tasks", "5"], "Digits-Domains has 3 domains, one task each"),
])
def test_streams_refused_with_one_line(capsys, tmp_path, subcommand, extra, needle):
    err = fails_with_one_line(capsys, subcommand, *extra, "--output_dir", str(tmp_path / "out"))
    assert needle in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_online_digits_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert run_main("digits_linear", *ONLINE, "--continual_evaluations", "3", "--output_dir", str(out)) == 0
    results = read_json(out / "results.json")
    online = results["online"]
    assert results["protocol"] == "online" and results["completed_tasks"] == 2
    assert np.array(online["anytime_accuracy_matrix"]).shape == (2, 3, 2)
    assert online["n_samples"] == 1257 and online["n_continual_evaluations"] == 3  # every image once
    assert len(results["evaluations"]) == 6
    r = np.array(online["accuracy_matrix"])
    assert r[0, 1] == 0.0  # a task not started: none of its classes can be predicted
    assert online["accuracy_final"] == pytest.approx(r[1].mean())
    assert results["final"]["avg_acc"] == pytest.approx(r[1].mean())
    from run_files import checkpoint_path, load_checkpoint
    saved = load_checkpoint(checkpoint_path(out, 1))  # after each task, what it trained
    assert saved["task"] == 1 and saved["protocol"] == "online" and "head.weight" in saved["model"]
    assert (out / "config.json").is_file() and list((out / "tensorboard").iterdir())
    report = subprocess.run([sys.executable, "report.py", str(out)], cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0 and "linear online" in report.stdout and "TTT" in report.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_online_one_and_two_processes_agree(tmp_path):
    """The stream cut into the same global batches, each process a share, the mean gradient of the whole batch; the
    evaluation counts every test image once: the metrics of 1 and 2 processes agree."""
    common = ["digits_linear", *ONLINE, *TINY, "--continual_evaluations", "2", "--online_batch_size", "16"]
    one = run_cli([*common, "--batch-size", "16", "--output_dir", str(tmp_path / "one")])
    two = run_cli([*common, "--batch-size", "8", "--output_dir", str(tmp_path / "two")], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-800:] + two.stderr[-800:]
    a, b = (read_json(tmp_path / name / "results.json")["online"] for name in ("one", "two"))
    assert a["n_samples"] == b["n_samples"] == 1257
    for key in ("accuracy_final", "anytime_accuracy_seen_avg", "prequential_accuracy", "backward_transfer"):
        assert a[key] == pytest.approx(b[key], abs=0.25), key  # a tie broken the other way moves one image at most


@pytest.mark.slow
def test_gaussian_digits_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert run_main("digitsgaussian_linear", "--continual_evaluations", "3", "--output_dir", str(out)) == 0
    results = read_json(out / "results.json")
    from datasets.gaussian import gaussian_schedule
    assert results["scenario"] == "gaussian" and results["task_classes"] == gaussian_schedule(10, 10, -1, 1.0, 42)
    online = results["online"]
    assert len(online["anytime_accuracy"]) == 3 and online["anytime_task_index"][-1] == 10.0
    assert online["accuracy_final"] == online["anytime_accuracy"][-1]
    counts = [int(np.isin(np.asarray(read_train_targets()), labels).sum()) for labels in results["task_classes"]]
    assert online["n_samples"] == sum(counts)  # each episode: every training image of its label set, once


def read_train_targets() -> np.ndarray:
    from datasets import load_benchmark
    return load_benchmark("Split-Digits", "unused", 8).train_targets


def test_gaussian_scenario_masks_are_the_label_sets():
    from datasets.scenario import StreamShape, build_scenario
    scenario = build_scenario(10, 10, False, 3, "Split-Digits", shape=StreamShape("gaussian", -1, 1.0))
    from datasets.gaussian import gaussian_schedule
    assert scenario.task_classes == gaussian_schedule(10, 10, -1, 1.0, 3)
    assert scenario.common_test_set and scenario.evaluated_sets(7) == [0] and not scenario.has_task_identity
    for t, labels in enumerate(scenario.task_classes):
        assert torch.equal(scenario.class_mask(t).nonzero().flatten(), torch.tensor(labels))


@pytest.mark.slow
def test_domain_incremental_digits_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert run_main("digitsdomain_linear", "--epochs", "1", "--output_dir", str(out)) == 0
    results = read_json(out / "results.json")
    matrix = results["acc_matrix"]
    assert len(matrix) == 3 and matrix[2][0] is None and matrix[0][2] is not None  # a test set per domain
    assert results["final"]["avg_tii_acc"] is None  # every class in every domain: no task identity
    assert results["task_classes"] == [list(range(10))] * 3


@pytest.mark.slow
def test_core50_runs_domain_incremental_with_one_test_set(tmp_path, core50_tree):
    out = tmp_path / "out"
    args = ["core50_linear", *TINY, "--data-path", str(core50_tree), "--epochs", "1", "--batch-size", "50",
            "--output_dir", str(out)]
    assert run_main(*args) == 0
    results = read_json(out / "results.json")
    assert results["num_tasks"] == 8 and len(results["acc_matrix"]) == 1  # one common test set
    row = results["acc_matrix"][0]
    assert all(isinstance(v, float) for v in row)
    final = results["final"]
    assert final["avg_acc"] == pytest.approx(row[-1]) and final["bwt"] is None
    assert final["forgetting_standard"] == pytest.approx(max(row[:-1]) - row[-1])
    assert results["tasks"][0]["test_images"] == 50 * 4  # sessions 3 and 10 hold one image per object, 7 two


@pytest.fixture
def core50_tree(tmp_path):
    return write_fake_core50(tmp_path / "data")


# ----------------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------------
def test_importing_the_api_has_no_side_effects():
    code = "import learner, online, torch.distributed as d; print(d.is_initialized())"
    done = subprocess.run([sys.executable, "-c", code, "--bogus-flag"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "False\n" and done.stderr == ""


def test_create_learner_refuses_unknown_settings():
    from learner import create_learner
    from utils import UserError
    with pytest.raises(UserError, match="l2p has no setting lora_rank"):
        create_learner("l2p", num_classes=4, task_mask=[[0, 1], [2, 3]], lora_rank=4)
    with pytest.raises(UserError, match="unknown method"):
        create_learner("l3p", num_classes=4, task_mask=[[0, 1]])


def test_learner_trains_and_predicts_among_seen_classes():
    from learner import create_learner
    learner = create_learner("linear", num_classes=4, task_mask=[[0, 1], [2, 3]], backbone="vit_tiny_patch16_224",
                             pretrained=False, input_size=32, amp="none", lr=0.5)
    images, labels = torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    learner.on_task_start(0)
    before = learner.method.head.weight.detach().clone()
    loss = learner.train_batch(images, labels)
    assert torch.isfinite(loss) and not torch.equal(before, learner.method.head.weight)
    assert set(learner.predict(images).tolist()) <= {0, 1}  # task 1's classes cannot be predicted yet
    state = learner.state_dict()
    assert state["task"] == 0 and torch.equal(state["seen"], torch.tensor([True, True, False, False]))


@pytest.mark.slow
def test_python_api_example_runs_from_the_docs(tmp_path):
    page = (REPO / "docs" / "python_api.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-1500:]
    final = re.search(r"final accuracy (\d+\.\d\d)", done.stdout)
    assert final and 0.0 <= float(final.group(1)) <= 100.0
    assert "over 1257 images" in done.stdout
    matrix = json.loads(done.stdout.split("R: ")[1].replace("'", '"'))
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
