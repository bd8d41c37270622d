"""The run's curves: the logger interface, TensorBoard's tags and values (checked against results.json), and the
optional Weights & Biases logger with a stand-in `wandb` module (the package is not installed)."""
from __future__ import annotations

import socket
import sys
import types
from pathlib import Path

import pytest
import torch

import wandb_logger
from config.cli import parse_args
from config.resolved import config_to_dict
from conftest import fails_with_one_line, read_json, run_main
from run_files import check_same_settings
from run_logger import MultiLogger, RunLogger, TensorBoardLogger

HIDE = ["digits_hideprompt", "--device", "cpu", "--num_tasks", "2", "--epochs", "2", "--tii_epochs", "1",
        "--crct_epochs", "2", "--larger_prompt_lr"]
WANDB_FLAGS = ["--wandb", "--wandb_project", "p", "--wandb_entity", "e", "--wandb_name", "n", "--wandb_mode",
               "offline"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


class Recorder(RunLogger):
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def log_scalars(self, values, step):
        self.calls.append((self.name, "scalars", dict(values), step))

    def log_text(self, tag, text, step):
        self.calls.append((self.name, "text", tag, text, step))

    def close(self):
        self.calls.append((self.name, "close"))


def test_multi_logger_fans_out_in_order_and_the_base_logs_nothing():
    calls: list = []
    logger = MultiLogger([Recorder("a", calls), RunLogger(), Recorder("b", calls)])
    logger.log_scalars({"x": 1.0}, 3)
    logger.log_text("t", "hi", 1)
    logger.log_image("m", torch.zeros(3, 2, 2), 1)  # neither recorder takes images: the base drops them
    logger.flush()
    logger.close()
    assert calls == [("a", "scalars", {"x": 1.0}, 3), ("b", "scalars", {"x": 1.0}, 3), ("a", "text", "t", "hi", 1),
                     ("b", "text", "t", "hi", 1), ("a", "close"), ("b", "close")]


def test_tensorboard_opens_its_event_file_at_the_first_use(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = tmp_path / "tb"
    logger = TensorBoardLogger(folder)
    logger.log_config({"lr": 0.5})
    logger.flush()
    logger.close()
    assert not folder.exists()  # no value logged: no event file, no folder, whatever the config
    logger = TensorBoardLogger(folder)
    logger.log_config({"lr": 0.5})
    logger.log_scalars({"a/b": 2.5, "c": -1.0}, 7)
    logger.log_image("img", torch.rand(3, 4, 4), 7)
    logger.close()
    assert _scalars(folder) == {"a/b": [(7, 2.5)], "c": [(7, -1.0)]}
    events = EventAccumulator(str(folder))
    events.Reload()
    assert events.Tags()["images"] == ["img"]
    assert '"lr": 0.5' in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.parametrize(("tag", "metric"), [("train/tii/loss", "step/train/tii"), ("eval/avg_acc", "step/eval"),
                                             ("accuracy_3", "step/task"), ("time/task_seconds", "step/time")])
def test_each_wandb_tag_family_has_its_own_step(tag, metric):
    assert wandb_logger.step_metric(tag) == metric


def test_wandb_mode_auto_follows_wandb_mode_then_the_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_logger.resolve_mode("online") == "online"

    def unreachable(address, timeout):
        assert address == ("api.wandb.ai", 443) and timeout == 2.0
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    assert wandb_logger.resolve_mode("auto") == "offline"
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: socket.socket())
    assert wandb_logger.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_logger.resolve_mode("auto") == "disabled"


def test_wandb_flags_are_result_neutral():
    plain = config_to_dict(parse_args(["digits_linear", "--device", "cpu"]))
    cfg = parse_args(["digits_linear", "--device", "cpu", *WANDB_FLAGS])
    assert (cfg.run.wandb, cfg.run.wandb_project, cfg.run.wandb_entity, cfg.run.wandb_name,
            cfg.run.wandb_mode) == (True, "p", "e", "n", "offline")
    check_same_settings(plain, cfg)  # a resume may switch W&B on or off


def test_wandb_without_the_package_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(out), "--device", "cpu", "--wandb")
    assert err == "error: --wandb needs the wandb package (pip install wandb), or drop --wandb"
    assert not out.exists()


def test_a_bad_wandb_mode_is_refused(capsys, tmp_path):
    err = fails_with_one_line(capsys, "digits_linear", "--output_dir", str(tmp_path / "r"), "--wandb_mode", "cloud")
    assert "--wandb_mode 'cloud'" in err and "auto, online, offline" in err


class FakeWandb(types.ModuleType):
    """Records what the logger asks of wandb: init's arguments, each logged row, the step metrics, finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.rows: list[dict] = []
        self.metrics: dict[str, str] = {}
        self.finished = 0
        fake = self

        class Run:
            config: dict = {}

            def log(self, row):
                fake.rows.append(dict(row))

            def define_metric(self, name, step_metric):
                fake.metrics[name] = step_metric

            def finish(self):
                fake.finished += 1

        self.Run = Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()

    @staticmethod
    def Image(data):  # noqa: N802 (wandb's name)
        return ("image", data.shape)

    @staticmethod
    def Html(text):  # noqa: N802
        return ("html", text)


@pytest.mark.slow
def test_wandb_gets_the_scalars_tensorboard_gets_and_the_config(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "digits run"
    assert run_main("digits_linear", "--output_dir", str(out), "--device", "cpu", "--epochs", "1", "--num_tasks",
                    "2", "--wandb", "--wandb_mode", "offline") == 0
    assert len(fake.inits) == 1 and fake.finished == 1
    init = fake.inits[0]
    assert (init["project"], init["entity"], init["name"], init["mode"], init["dir"]) == (
        "hide-cl", None, "digits run", "offline", str(out))
    results = read_json(out / "results.json")
    assert init["config"]["optim"] == results["config"]["optim"]
    assert init["config"]["provenance"]["git_commit"] == results["provenance"]["git_commit"]
    tensorboard = _scalars(out / "tensorboard")
    logged: dict[str, list[tuple[int, float]]] = {}
    for row in fake.rows:
        for tag, value in row.items():
            if not tag.startswith("step/") and isinstance(value, float):
                logged.setdefault(tag, []).append((row[fake.metrics[tag]], value))
    assert set(logged) == set(tensorboard)
    assert "train/train/loss" in logged and "eval/avg_acc" in logged and "time/train/train_seconds" in logged
    for tag, points in tensorboard.items():
        assert [step for step, _ in logged[tag]] == [step for step, _ in points], tag
        assert [value for _, value in logged[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag
    images = [(row["acc_matrix"], row["step/task"]) for row in fake.rows if "acc_matrix" in row]
    # the annotated matrix figure, HWC: 2 tasks give (2.0 + 0.5 x 2) x (3.0 + 0.6 x 2) inches at 100 dpi
    assert images == [(("image", (300, 420, 3)), 1), (("image", (300, 420, 3)), 2)]
    texts = [row["text/acc_matrix"] for row in fake.rows if "text/acc_matrix" in row]
    assert len(texts) == 2 and texts[1][0] == "html" and texts[1][1].startswith("<pre>")


@pytest.mark.slow
def test_tensorboard_holds_the_training_curves_and_equals_results_json(tmp_path):
    """HiDe-Prompt in one launch, 2 tasks: phase tii 1 epoch, phase wtp 2 epochs, 2 alignment epochs from task 2 on,
    the head at a tenth of the prompts' LR (--larger_prompt_lr)."""
    out = tmp_path / "run"
    assert run_main(*HIDE, "--output_dir", str(out)) == 0
    results = read_json(out / "results.json")
    tasks = results["tasks"]
    scalars = _scalars(out / "tensorboard")

    def steps(tag: str) -> list[int]:
        return [step for step, _ in scalars[tag]]

    def values(tag: str) -> list[float]:
        return [value for _, value in scalars[tag]]

    for phase, epochs in (("tii", 1), ("wtp", 2)):
        for name in ("loss", "acc", "lr", "lr_group0", "images_per_second"):
            assert steps(f"train/{phase}/{name}") == list(range(1, 2 * epochs + 1)), (phase, name)
        assert steps(f"tap/{phase}/loss") == [3, 4]  # task 2's two alignment epochs: t * epochs + e + 1
        assert steps(f"tap/{phase}/final_loss") == [2] and values(f"tap/{phase}/final_loss") == values(
            f"tap/{phase}/loss")[-1:]
        for part in ("train", "statistics", "evaluate"):
            assert values(f"time/{phase}/{part}_seconds") == pytest.approx(
                [task["phase_seconds"][phase][part] for task in tasks], rel=1e-6)
        assert values(f"time/{phase}/align_seconds") == pytest.approx([tasks[1]["phase_seconds"][phase]["align"]])
        assert values(f"stats/{phase}/classes") == [5.0, 10.0]  # 5 classes per task, statistics of every seen one
        assert steps(f"stats/{phase}/seconds") == [1, 2]
    # the last epoch of each task's training equals what results.json reports for it
    assert values("train/wtp/loss")[1::2] == pytest.approx([task["train_loss"] for task in tasks], rel=1e-6)
    assert values("train/tii/loss") == pytest.approx([task["phases"]["tii"]["train_loss"] for task in tasks],
                                                     rel=1e-6)
    lr = results["config"]["context"]["effective_lr"]
    assert values("train/wtp/lr") == values("train/wtp/lr_group0") == pytest.approx([lr] * 4, rel=1e-6)
    assert values("train/wtp/lr_group1") == pytest.approx([lr / 10] * 4, rel=1e-6)
    assert "train/tii/lr_group1" not in scalars
    for key in ("avg_acc", "avg_incremental_acc", "overall_acc", "avg_tii_acc"):
        assert values(f"eval/{key}") == pytest.approx([task[key] for task in tasks], rel=1e-6), key
    assert values("avg_acc") == values("eval/avg_acc")  # the untagged names the L2P README gives stay
    for key in ("forgetting", "forgetting_standard", "bwt"):
        assert scalars[f"eval/{key}"] == [(2, pytest.approx(tasks[1][key], rel=1e-6))]
    assert scalars["forgetting"] == scalars["eval/forgetting"]
    assert values("accuracy_1") == values("eval/accuracy_1") == pytest.approx(
        [results["acc_matrix"][0][0], results["acc_matrix"][0][1]], rel=1e-6)
    assert steps("accuracy_2") == [2]
    assert values("eval/tii/avg_acc") == pytest.approx([task["phases"]["tii"]["avg_acc"] for task in tasks],
                                                       rel=1e-6)
    for phase in ("tii_pre_alignment", "wtp_pre_alignment"):
        assert scalars[f"eval/{phase}/avg_acc"] == [(2, pytest.approx(tasks[1]["phases"][phase]["avg_acc"]))]
    assert values("time/task_seconds") == pytest.approx([task["wall_seconds"] for task in tasks], rel=1e-6)
    # the matrix image is the annotated figure the report draws (2 tasks: 420 x 300 px), one per task
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [(e.step, e.width, e.height) for e in events.Images("acc_matrix")] == [(1, 420, 300), (2, 420, 300)]
