"""--compile: the compiled training step and evaluation forward give the uncompiled results.

Graph capture (dynamo, AOTAutograd, the graph breaks around the feature caches) is checked with the aot_eager
backend, which runs the captured graphs without generating code; one test runs inductor itself (C++ code generation,
tens of seconds on 2 CPU cores: `slow`).
"""
from __future__ import annotations

import re

import pytest
import torch

import compilation
import engine
from config.cli import parse_args
from conftest import REPO, read_json, run_cli, run_main
from datasets import build_scenario
from models import create_method
from utils import DistContext, UserError

CPU = torch.device("cpu")
MODEL = ["--model", "test_vit", "--original_model", "test_vit"]
# fp32 (--amp none): the captured graphs run the same kernels in another order at most
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(compilation, "BACKEND", "aot_eager")


def _twins(subcommand: str, *flags: str):
    """Two identical methods (same seed), their config and a batch of its data shape."""
    cfg = parse_args([subcommand, "--device", "cpu", "--amp", "none", *MODEL, *flags])
    scenario = build_scenario(cfg.num_classes, cfg.num_tasks, False, cfg.seed, cfg.dataset)
    twins = []
    for _ in range(2):
        torch.manual_seed(0)
        twins.append(create_method(cfg, scenario))
    return twins, cfg, scenario


def _train_step(method, cfg, t: int, compiled: bool, images, targets):
    """One engine training step (forward, backward, clipping, optimizer step): loss, logits, gradients, and the
    trained parameters after the step."""
    groups = [g for g in method.begin_task(t) if g["params"]]
    optimizer = engine.create_optimizer(groups, cfg)
    params = [p for g in groups for p in g["params"]]
    model = engine.wrap_for_training(method, DistContext(), compiled)
    if compiled:
        model = compilation.training_forward(method, model, "training step", CPU)
    method.train()
    loss, logits = model(images, targets, t)
    engine.optimizer_step(loss, optimizer, torch.amp.GradScaler("cpu", enabled=False), params, cfg.optim.clip_grad)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    trained = {n: p.detach().clone() for n, p in method.named_parameters() if p.requires_grad}
    return loss.detach(), logits.detach(), grads, trained


def _evaluate(method, compiled: bool, batches):
    """The engine's evaluation forward over `batches` (keyed, so the feature caches fill and then serve)."""
    method.eval()
    forward = compilation.evaluation_forward(method, engine.predict_batch, CPU) if compiled else engine.predict_batch
    outputs = []
    with torch.no_grad():
        for key, images in batches:
            outputs.append(forward(method, images, key))
    return outputs


def _close(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif a is None:
        assert b is None
    elif a.dtype in (torch.int64, torch.int32, torch.bool):
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, **TOLERANCE)


def _check_twins(subcommand: str, *flags: str, t: int = 0, phase: str | None = None, prepare=None):
    (eager, compiled), cfg, scenario = _twins(subcommand, *flags)
    generator = torch.Generator().manual_seed(1)
    size = cfg.backbone.input_size
    images = torch.randn(8, 3, size, size, generator=generator)
    targets = torch.tensor(scenario.task_classes[t])[torch.randint(len(scenario.task_classes[t]), (8,),
                                                                    generator=generator)]
    # full batches, a shorter last one (one recompile, batch dimension dynamic), then the first again (cached)
    batches = [(("test", 0, 0), images), (("test", 0, 1), images[:5].flip(0)), (("test", 0, 0), images)]
    results = []
    for method, compiling in ((eager, False), (compiled, True)):
        if phase is not None:
            method.set_phase(phase)
        if prepare is not None:
            prepare(method)
        results.append((_train_step(method, cfg, t, compiling, images, targets),
                        _evaluate(method, compiling, batches)))
    _close(results[0], results[1])
    return results


@pytest.mark.parametrize("subcommand", [pytest.param("digits_l2p", marks=pytest.mark.slow),
                                        pytest.param("digits_dualprompt", marks=pytest.mark.slow),
                                        "digits_continual_lora"])
def test_a_compiled_training_step_and_evaluation_match_uncompiled(aot_eager, subcommand):
    _check_twins(subcommand)


@pytest.mark.slow
def test_hideprompt_stage_two_compiled_matches_uncompiled(aot_eager):
    """Stage 2 (wtp) of task 2: prompt momentum, the contrastive term, per-image slots from the TII model."""
    prototypes = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))  # as if task 1 had statistics

    def prepare(method):
        method.wtp_stats.prototypes = lambda: prototypes

    _check_twins("digits_hideprompt", "--prompt_momentum", "0.1", "--reg", "0.1", t=1, phase="wtp", prepare=prepare)


def test_auto_is_off_everywhere_until_measured_faster():
    assert parse_args(["digits_l2p"]).compile == "auto"
    assert not compilation.enabled("auto", CPU)
    assert not compilation.enabled("auto", torch.device("cuda"))
    assert compilation.enabled("on", CPU) and not compilation.enabled("off", CPU)
    with pytest.raises(UserError, match="unknown --compile 'yes'; use one of auto, on, off"):
        parse_args(["digits_l2p", "--compile", "yes"])


def test_a_failed_compilation_warns_once_and_the_run_continues_uncompiled(monkeypatch, capsys):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(compilation, "BACKEND", no_compiler)
    torch._dynamo.reset()  # nothing compiled by another test may serve this one
    try:
        _check_twins("digits_continual_lora")
    finally:
        torch._dynamo.reset()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--compile" in line]
    assert warnings == ["warning: --compile: the training step does not compile (BackendCompilerFailed: backend="
                        "'no_compiler' raised: RuntimeError: no working C++ compiler found); the run continues "
                        "uncompiled"]


def test_the_first_call_and_a_later_one_are_timed_and_logged_once(capsys):
    call = compilation.CompiledCall("evaluation forward", CPU, compilation.MethodCompilation())
    call.fn = lambda x: x + 1
    for _ in range(5):
        with compilation.timed(call):
            assert call(1) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--compile")]
    assert len(lines) == 1
    assert re.fullmatch(r"--compile: evaluation forward: first call \d+\.\d\d s \(compiling\), call 3 \d+\.\d{3} s",
                        lines[0])
    with compilation.timed(engine.predict_batch):  # an uncompiled function: nothing to time
        pass


@pytest.mark.slow
def test_a_run_with_compile_on_gives_the_uncompiled_results_and_logs_its_compile_time(aot_eager, tmp_path, capsys):
    common = ["digits_continual_lora", *MODEL, "--epochs", "1", "--stop_after_task", "1", "--amp", "none",
              "--tensorboard", "False"]
    assert run_main(*common, "--output_dir", str(tmp_path / "eager")) == 0
    capsys.readouterr()
    assert run_main(*common, "--compile", "on", "--output_dir", str(tmp_path / "compiled")) == 0
    out = capsys.readouterr().out
    assert re.search(r"^--compile: training step: first call .* s \(compiling\), call 3 .* s$", out, re.M)
    assert re.search(r"^--compile: evaluation forward: first call .* s \(compiling\), call 3 .* s$", out, re.M)
    eager, compiled = (read_json(tmp_path / name / "results.json") for name in ("eager", "compiled"))
    assert compiled["acc_matrix"] == eager["acc_matrix"]
    for ours, theirs in zip(compiled["tasks"], eager["tasks"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_inductor_evaluation_matches_uncompiled_in_fp32():
    """Inductor's generated C++ (fused kernels, its own order of summation), not only the captured graph."""
    (eager, compiled), _, _ = _twins("digits_continual_lora")
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batches = [(("test", 0, 0), images), (("test", 0, 1), images.flip(0))]
    _close(_evaluate(eager, False, batches), _evaluate(compiled, True, batches))


# main.py with the aot_eager backend, for a run under torchrun
AOT_EAGER_MAIN = """
import sys
sys.path.insert(0, {repo!r})
import compilation
compilation.BACKEND = "aot_eager"
import main
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_under_ddp_a_compiled_run_gives_the_uncompiled_results(tmp_path):
    """The method compiled, then wrapped by DDP (whose DDPOptimizer splits the graph at its buckets), with
    the DDP settings the prompt methods ask for, on 2 gloo processes."""
    script = tmp_path / "main_aot_eager.py"
    script.write_text(AOT_EAGER_MAIN.format(repo=str(REPO)))
    results = {}
    for setting in ("off", "on"):
        result = run_cli(["digits_dualprompt", *MODEL, "--epochs", "1", "--stop_after_task", "1", "--amp", "none",
                          "--tensorboard", "False", "--compile", setting, "--output_dir", str(tmp_path / setting)],
                         nproc=2, script=str(script))
        assert result.returncode == 0, result.stderr[-3000:]
        results[setting] = read_json(tmp_path / setting / "results.json")
    assert "--compile: training step: first call" in result.stdout
    assert results["on"]["acc_matrix"] == results["off"]["acc_matrix"]
    assert results["on"]["final"]["train_loss"] == pytest.approx(results["off"]["final"]["train_loss"], rel=1e-5)
