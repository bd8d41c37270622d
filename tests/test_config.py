"""The configuration as a contributor meets it: typed settings groups, one preset table, frozen resolved configs,
help, one-line errors, an acyclic module graph, a method added in one file, and configs of the older layout."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.cli import field_index, parse_args
from config.resolved import config_to_dict, flat_settings
from conftest import REPO, read_json, run_main
from run_files import checkpoint_path


def _fails_with_one_line(capsys, *args) -> str:
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# --- settings and presets ------------------------------------------------------------------------------------------
def test_every_flag_name_is_one_field_of_one_group():
    index = field_index()  # raises nothing, and every name maps to exactly one (group, field)
    names = [f.name for group in {g for g, _ in index.values()} for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)) == len(index)


def test_the_resolved_config_is_frozen_and_holds_only_the_groups_the_method_reads():
    cfg = parse_args(["cifar100_linear"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.context.world_size = 8
    saved = config_to_dict(cfg)
    assert {"run", "optim", "data", "backbone", "dist", "context"} <= set(saved)
    assert not {"prompt_pool", "hide", "lora", "few_shot", "compat"} & set(saved)  # no lora_*, fs_*, tii_* here
    # exactly the fields of the groups it reads, the run context and the four top-level keys (no other method's)
    read = {f.name for g in cfg.groups for f in dataclasses.fields(g) if f.metadata.get("saved", True)}
    context = {f.name for f in dataclasses.fields(cfg.context)}
    assert set(flat_settings(saved)) == read | context | {"layout", "subcommand", "dataset_key", "method"}
    assert len(read) < 70  # the common groups and the stream settings (online protocol, scenarios)
    hide = config_to_dict(parse_args(["cifar100_hideprompt"]))
    assert {"hide", "tii", "tap", "e_prompt", "hideprompt", "query", "slots"} <= set(hide)


def test_a_phase_gets_its_own_config_and_the_runs_stays_as_parsed():
    cfg = parse_args(["digits_hideprompt", "--device", "cpu", "--tii_epochs", "3", "--tii_lr", "0.2"])
    from datasets import build_scenario
    from models import create_method
    method = create_method(cfg, build_scenario(10, 5, False, 0, "digits"))
    tii = method.set_phase("tii")
    assert (tii.optim.epochs, tii.optim.lr, tii.optim.sched) == (3, 0.2, "constant")
    assert tii.context.effective_lr == pytest.approx(0.2 * 16 / 256)
    assert method.set_phase("wtp") is cfg and (cfg.optim.epochs, cfg.optim.lr) == (2, 0.03)


def test_constants_that_are_settings_have_flags_with_the_reference_values():
    hide = parse_args(["digits_hideprompt", "--stage", "both"])
    assert (hide.head_lr_scale, hide.ca_stage2_batches_per_centroid, hide.tii_clip_grad) == (0.1, 5, None)
    assert parse_args(["digits_hidelora"]).tii_clip_grad == 1.0  # HiDe-Prompt's stage-1 clipping
    assert parse_args(["digits_few_shot_lora"]).shared_lora_lr_scale == 0.1


def test_backbone_and_stage_rows_of_the_preset_table():
    ibot = ["--model", "vit_base_patch16_224_21k_ibot"]
    stage2 = parse_args(["cifar100_hideprompt", *ibot, "--trained_original_model", "x"])
    assert (stage2.epochs, stage2.sched, stage2.prompt_momentum, stage2.reg, stage2.length) == (20, "step", 0.1, 0.1, 5)
    stage1 = parse_args(["cifar100_hideprompt", *ibot, "--train_inference_task_only"])
    assert (stage1.epochs, stage1.lr, stage1.sched) == (20, 0.0005, "step")
    sup = parse_args(["cifar100_hideprompt", "--trained_original_model", "x"])
    assert (sup.epochs, sup.sched, sup.prompt_momentum) == (50, "step", 0.01)
    assert parse_args(["cifar100_hideprompt", *ibot, "--epochs", "7", "--trained_original_model", "x"]).epochs == 7


# --- help and errors -------------------------------------------------------------------------------------------------
def test_help_lists_the_groups_the_method_reads_with_this_subcommands_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["cifar100_hideprompt", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--length INT  (default: 5)" in out and "--reg FLOAT  (default: 0.1)" in out
    assert "--batch-size INT  (default: 24)" in out and "--lora_rank" not in out and "--top_k" not in out
    with pytest.raises(SystemExit):
        parse_args(["cifar100_hideprompt", "--train_inference_task_only", "--help"])
    assert "--epochs INT  (default: 20)" in capsys.readouterr().out  # stage 1's launch
    with pytest.raises(SystemExit):
        parse_args(["cifar100_hideprompt", "--help-all"])
    out = capsys.readouterr().out
    assert "--lora_rank INT  (default: 4)" in out and "--top_k INT  (default: 1)" in out


def test_mistyped_flags_and_subcommands_get_the_closest_names(capsys):
    err = _fails_with_one_line(capsys, "cifar100_linear", "--learning_rate_", "0.1")
    assert "unrecognized flag --learning_rate_" in err
    err = _fails_with_one_line(capsys, "cifar100_linear", "--batchsize", "8")
    assert "did you mean --batch-size" in err
    err = _fails_with_one_line(capsys, "cifar100_hidepromt")
    assert "did you mean cifar100_hideprompt" in err
    err = _fails_with_one_line(capsys, "cifar100_linear", "--epochs", "three")
    assert "--epochs" in err and "invalid int value: 'three'" in err
    err = _fails_with_one_line(capsys, "cifar100_linear", "--amp", "fp8")
    assert "unknown --amp 'fp8'; use one of auto, none, bf16, fp16" in err


# --- the module graph ------------------------------------------------------------------------------------------------
def _project_modules() -> dict[str, Path]:
    modules = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in {"tests", ".venv", "venv", "output", "data"} or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imported_names(node: ast.AST, package: str) -> list[str]:
    """The absolute module names an import statement names (relative ones resolved against `package`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(p for p in [*parts, base] if p)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _owning_module(target: str, modules: dict[str, Path]) -> str:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {_owning_module(t, modules) for node in ast.walk(ast.parse(path.read_text()))
             for t in _imported_names(node, package)} - {"", name}
    # importing a.b from outside the package a runs a/__init__.py first
    for target in list(found):
        parent = target.rpartition(".")[0]
        while parent:
            if not name.startswith(parent + ".") and parent != name:
                found.add(parent)
            parent = parent.rpartition(".")[0]
    return found


def test_the_module_graph_has_no_cycles():
    modules = _project_modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "engine" not in {dep for name in graph if name.startswith("models") for dep in graph[name]}
    assert not {d for d in graph["models"] if d.startswith("config.cli")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*trail, node, dep])}")
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert graph["config.settings"] == set() and graph["config"] == set()  # leaves: models import them


def test_no_comment_points_to_a_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.sh", "*.md"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    citing = [f for f in tracked if not f.startswith("tests/") and ("spec §" in (REPO / f).read_text()
                                                                  or "reference-spec" in (REPO / f).read_text())]
    assert citing == []


# --- a method added by a contributor ---------------------------------------------------------------------------------
TOY_METHOD = '''"""Toy: a linear probe whose head starts scaled by --toy_scale (a method written in one file)."""
from __future__ import annotations

from dataclasses import dataclass

from config.settings import SettingsGroup, setting

from .linear import Linear


@dataclass(frozen=True)
class ToySettings(SettingsGroup):
    title, key = "toy", "toy"
    toy_scale: float = setting(0.5, "initial scale of the head")
    toy_name: str = setting("plain", "a label")


class Toy(Linear):
    settings_groups = (ToySettings,)
'''


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and "output" not in p.parts}


@pytest.mark.slow
def test_a_new_method_is_one_file_and_one_registry_line(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    copy = tmp_path / "repo"
    for rel in tracked:
        if (REPO / rel).is_file():
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)
    before = _digest(copy)
    (copy / "models" / "toy.py").write_text(TOY_METHOD)
    registry = copy / "models" / "__init__.py"
    registry.write_text(registry.read_text().replace('    "linear": "linear:Linear",\n',
                                                     '    "linear": "linear:Linear",\n    "toy": "toy:Toy",\n'))
    after = _digest(copy)
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert changed == ["models/__init__.py", "models/toy.py"]
    assert len(registry.read_text().splitlines()) == len((REPO / "models/__init__.py").read_text().splitlines()) + 1

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def main(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "main.py", *args], cwd=copy, env=env, capture_output=True, text=True,
                              timeout=300)

    shown = main("digits_toy", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--toy_scale FLOAT  (default: 0.5)" in shown.stdout and "--toy_name STR  (default: plain)" in shown.stdout
    out = tmp_path / "out"
    done = main("digits_toy", "--toy_scale", "2.5", "--toy_name", "mine", "--device", "cpu", "--epochs", "1",
                "--num_tasks", "2", "--output_dir", str(out))
    assert done.returncode == 0, done.stderr
    assert read_json(out / "config.json")["toy"] == {"toy_scale": 2.5, "toy_name": "mine"}
    other = json.loads(main("digits_linear", "--toy_scale", "2", "--print_config").stdout)
    assert "toy" not in other and other["context"]["no_effect_flags"] == ["toy_scale"]  # warned about, not saved


# --- configs written before layout 2 --------------------------------------------------------------------------------
def _to_old_layout(path: Path, **changes) -> None:
    saved = torch.load(path, weights_only=False)
    flat = {k: v for k, v in flat_settings(saved["config"]).items() if k != "layout"}
    flat.update(stage="auto", **changes)  # layout 1 held every flag, HiDe's --stage too
    saved["config"] = flat
    torch.save(saved, path)


@pytest.mark.slow
def test_checkpoints_of_the_older_flat_layout_still_evaluate_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    fast = ["--device", "cpu", "--epochs", "1", "--num_tasks", "2", "--output_dir", str(out)]
    assert run_main("digits_linear", *fast) == 0
    first = read_json(out / "results.json")["acc_matrix"]
    for t in range(2):
        _to_old_layout(checkpoint_path(out, t))
    assert run_main("digits_linear", *fast, "--eval") == 0
    assert read_json(out / "eval_results.json")["acc_matrix"] == first
    checkpoint_path(out, 1).unlink()
    assert run_main("digits_linear", *fast, "--resume") == 0
    assert read_json(out / "results.json")["acc_matrix"] == first
    _to_old_layout(checkpoint_path(out, 1), seed=7)
    capsys.readouterr()
    err = _fails_with_one_line(capsys, "digits_linear", *fast, "--eval")
    assert "belongs to another experiment (seed: 7 there, 42 here)" in err
    assert json.loads((out / "config.json").read_text())["layout"] == 2
