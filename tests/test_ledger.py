"""The reproducibility ledger: the committed doc is render(), every paper number carries its source, every command
runs a real script, and every runs glob matches exactly the folders that script writes for its row."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from types import MappingProxyType

import pytest

import ledger
from conftest import REPO, script_commands
from ledger import METRICS, NO_SCRIPT, NOT_RUN, ROWS, LedgerRow, PaperValue, render

# the model each paper's backbone name means, as the row's --original_model (for HiDe-LoRA: its task-identity model)
ORIGINAL_MODEL = {"Sup-21K": "vit_base_patch16_224.orig_in21k", "iBOT-21K": "vit_base_patch16_224.ibot_in22k",
                  "iBOT-1K": "vit_base_patch16_224.ibot_in1k", "DINO-1K": "vit_base_patch16_224.dino",
                  "MoCo-1K": "vit_base_patch16_224.mocov3_in1k"}
METHOD = {"L2P": "l2p", "DualPrompt": "dualprompt", "S-Prompt++": "sprompt", "HiDe-Prompt": "hideprompt",
          "HiDe-LoRA": "hidelora"}
DATASET = {"Split CIFAR-100": "cifar100", "Split ImageNet-R": "imr", "5-Datasets": "five_datasets",
           "Split CUB-200": "cub"}
RESULT_ROW = re.compile(r"^\| (\d+) \| ")


def parse_command(command: str) -> tuple[dict[str, str], str, list[str]]:
    """`A=1 B="x y" bash training_script/s.sh args` -> ({A: 1, B: x y}, s.sh, args)."""
    words = shlex.split(command)
    bash = words.index("bash")
    env = dict(word.split("=", 1) for word in words[:bash])
    assert words[bash + 1].startswith("training_script/"), command
    return env, words[bash + 1].removeprefix("training_script/"), words[bash + 2:]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def folder(argv: list[str]) -> str:
    """The launch's --output_dir as a runs glob sees it, relative to the repository."""
    return flag(argv, "--output_dir").removeprefix("./")


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> dict[str, list[list[str]]]:
    """Each distinct command's main.py launches, run under a fake torchrun (nothing trains, nothing is written)."""
    tmp = tmp_path_factory.mktemp("scripts")
    result = {}
    for command in dict.fromkeys(row.command for row in ROWS if row.command != NO_SCRIPT):
        env, script, args = parse_command(command)
        result[command] = script_commands(script, *args, tmp_path=tmp, env=env)
    return result


def result_cells(doc: str) -> dict[int, list[str]]:
    """Each results-table line by its row number: its cells after '#' (dataset, backbone, method, paper/ours x 3)."""
    cells = {}
    for line in doc.splitlines():
        parts = re.split(r"(?<!\\) \| ", line.strip()[2:-2]) if RESULT_ROW.match(line) else []
        if len(parts) == 10:
            cells[int(parts[0])] = parts[1:]
    return cells


def test_committed_doc_is_render():
    assert (REPO / "docs" / "REPRODUCIBILITY.md").read_text(encoding="utf-8") == render()


def test_every_paper_value_has_a_source_and_is_a_percentage():
    assert len(ROWS) == 62
    for row in ROWS:
        assert tuple(row.paper) == METRICS, row
        for value in row.paper.values():
            assert value.value is None or (value.source.strip() and 0 <= value.value <= 100), row


@pytest.mark.parametrize("value, source, problem", [(92.61, None, "no source"), (92.61, "  ", "no source"),
                                                    (101.0, "arXiv 2310.07234 Table 1", "not a percentage"),
                                                    (-0.5, "arXiv 2310.07234 Table 1", "not a percentage")])
def test_a_paper_value_without_source_or_out_of_range_is_refused(value, source, problem):
    with pytest.raises(ValueError, match=problem):
        PaperValue(value, source)


def test_a_paper_value_renders_with_its_numbered_source_and_a_blank_with_the_mark():
    table1 = "arXiv 2310.07234 v2 Table 1 (https://arxiv.org/abs/2310.07234v2)"
    quoted = "as quoted in arXiv 0000.00000 Table 3"
    paper = MappingProxyType({"FAA": PaperValue(92.61, table1), "CAA": PaperValue(None),
                              "FFM": PaperValue(1.5, quoted)})
    other = MappingProxyType({"FAA": PaperValue(75.0, table1), "CAA": PaperValue(80.125, quoted),
                              "FFM": PaperValue(None)})
    rows = [LedgerRow("T", "Split CIFAR-100", "Sup-21K", "HiDe-Prompt", NO_SCRIPT, "", paper),
            LedgerRow("T", "Split ImageNet-R", "Sup-21K", "HiDe-Prompt", NO_SCRIPT, "", other)]
    doc = render(rows=rows)
    cells = result_cells(doc)
    assert cells[0][3::2] == ["92.61 [1]", "—†", "1.50 [2]"]
    assert cells[1][3::2] == ["75.00 [1]", "80.12 [2]", "—†"]  # 80.125 rounds half to even
    assert doc.endswith(f"## Sources\n\n1. {table1}\n2. {quoted}\n")


def test_every_command_names_an_existing_script_or_says_no_script():
    for row in ROWS:
        if row.command == NO_SCRIPT:
            assert row.runs == "", row
            continue
        env, script, _ = parse_command(row.command)
        assert (REPO / "training_script" / script).is_file(), row.command
        assert env["SEEDS"].split(), row.command  # every command spells its seeds


def test_every_runs_glob_matches_exactly_its_rows_stage_2_folders(launches):
    written = {folder(argv) for argvs in launches.values() for argv in argvs}
    for row in (row for row in ROWS if row.runs):
        assert row.runs.startswith("output/") and row.runs.endswith("_seed*"), row.runs
        mine = [argv for argv in launches[row.command] if fnmatch(folder(argv), row.runs)]
        seeds = parse_command(row.command)[0]["SEEDS"].split()
        # one folder per seed, each the row's dataset, method, backbone and seed, never a stage-1 launch
        assert [flag(argv, "--seed") for argv in mine] == seeds, row.runs
        for argv in mine:
            assert argv[0] == f"{DATASET[row.dataset]}_{METHOD[row.method]}", (row.runs, argv[0])
            assert flag(argv, "--original_model") == ORIGINAL_MODEL[row.backbone], row.runs
            assert "--train_inference_task_only" not in argv, row.runs
        # and no folder any other row's command writes
        assert {d for d in written if fnmatch(d, row.runs)} == {folder(argv) for argv in mine}


def test_hide_rows_skip_the_stage_1_folders_their_scripts_also_write(launches):
    argvs = launches['NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_cifar100_vit.sh']
    assert [flag(argv, "--output_dir") for argv in argvs] == (
        [f"./output/cifar100_sup21k_multi_centroid_mlp_2_seed{s}" for s in (42, 40, 44)]
        + [f"./output/cifar100_vit_pe_seed{s}" for s in (42, 40, 44)])
    assert [row.runs for row in ROWS if row.command in launches and "train_cifar100_vit.sh" in row.command] == [
        "output/cifar100_vit_pe_seed*"] * 2  # the HiDe-Prompt paper's row and the general framework's


def test_ours_fills_only_its_row_and_metric():
    doc = render({0: {"FAA": "1.00 ± 0.00 (3 seeds)"}, 5: {"CAA": "a|b"}})
    cells = result_cells(doc)
    assert sorted(cells) == list(range(len(ROWS)))
    assert cells[0][4::2] == ["1.00 ± 0.00 (3 seeds)", NOT_RUN, NOT_RUN]
    assert cells[5][4::2] == [NOT_RUN, "a\\|b", NOT_RUN]  # a pipe cannot split the cell
    others = [cell for i, row in cells.items() if i not in (0, 5) for cell in row[4::2]]
    assert others == [NOT_RUN] * 3 * (len(ROWS) - 2)
    assert render().count(NOT_RUN) == doc.count(NOT_RUN) + 2


def test_ours_for_a_row_the_ledger_lacks_is_refused():
    with pytest.raises(ValueError, match=r"rows \[62\]"):
        render({62: {"FAA": "1.00"}})


def test_main_writes_the_doc_and_check_finds_it_stale(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "docs" / "REPRODUCIBILITY.md"
    monkeypatch.setattr(ledger, "DOC", doc)
    assert ledger.main(["--check"]) == 1  # missing
    assert ledger.main([]) == 0
    assert doc.read_text(encoding="utf-8") == render()
    assert ledger.main(["--check"]) == 0
    doc.write_text(render() + "edited\n", encoding="utf-8")
    capsys.readouterr()
    assert ledger.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "python ledger.py" in err
    assert sorted(p.name for p in doc.parent.iterdir()) == ["REPRODUCIBILITY.md"]  # no temporary left


def test_ledger_imports_without_torch():
    # report.py may render the ledger where importing torch is slow or absent: rendering must not need it
    code = "import sys, ledger; ledger.render(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_paper_mapping_is_read_only():
    with pytest.raises(TypeError):
        ROWS[0].paper["FAA"] = PaperValue(1.0, "x")  # type: ignore[index]
    assert isinstance(ROWS[0].paper, MappingProxyType) and Path(ledger.__file__).parent == REPO
