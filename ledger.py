"""The reproducibility ledger: the papers' result tables row by row, each number with the table it was read from, the
command that reproduces the row and the run folders it writes, and a column "ours" that only measured runs fill.

`render()` is the whole of docs/REPRODUCIBILITY.md (a test holds the two equal); `report.py --ledger` passes it the
measured cells. `python ledger.py` rewrites the doc, `python ledger.py --check` only compares.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

METRICS = ("FAA", "CAA", "FFM")
NOT_FOUND = "not found in a retrievable source"
NOT_RUN = "not yet run"
NO_SCRIPT = "no script yet"
BLANK = "—†"  # a paper value that was looked for and not found
DOC = Path(__file__).resolve().parent / "docs" / "REPRODUCIBILITY.md"


@dataclass(frozen=True)
class PaperValue:
    value: float | None  # None: not found in a retrievable source
    source: str | None = None  # e.g. "arXiv 2310.07234 v2 Table 1"; required when value is not None

    def __post_init__(self) -> None:
        # a number without the table it came from is exactly what the ledger exists to keep out
        if self.value is not None and not (self.source or "").strip():
            raise ValueError(f"paper value {self.value} has no source: name the paper and table it was read from")
        if self.value is not None and not 0 <= self.value <= 100:
            raise ValueError(f"paper value {self.value} is not a percentage in [0, 100]")


@dataclass(frozen=True)
class LedgerRow:
    table: str  # the section: which paper, which table
    dataset: str
    backbone: str
    method: str
    command: str  # the shell command that reproduces it, or NO_SCRIPT
    runs: str  # glob of the run folders it writes, relative to the repository; "" without a script
    paper: Mapping[str, PaperValue] = field(hash=False)  # by METRICS name, read-only


def _not_found() -> Mapping[str, PaperValue]:
    return MappingProxyType({metric: PaperValue(None) for metric in METRICS})


# --- the rows -----------------------------------------------------------------------------------------------------

HIDE_MAIN = "HiDe-Prompt (arXiv 2310.07234): Split CIFAR-100 and Split ImageNet-R, five pre-trained backbones"
HIDE_MORE = "HiDe-Prompt (arXiv 2310.07234): 5-Datasets and Split CUB-200"
GENERAL = "General framework (arXiv 2310.13888): HiDe-Prompt, HiDe-Adapter and HiDe-LoRA"

# backbone as the papers name it -> the key the scripts and their output folders use
BACKBONES = {"Sup-21K": "vit", "iBOT-21K": "ibot21k", "iBOT-1K": "ibot", "DINO-1K": "dino", "MoCo-1K": "mocov3"}
# prompt baseline as the papers name it -> its subcommand method
BASELINES = {"L2P": "l2p", "DualPrompt": "dualprompt", "S-Prompt++": "sprompt"}
# dataset as the papers name it -> (subcommand key, the folder prefix of HiDe's scripts, processes, seeds)
DATASETS = {
    "Split CIFAR-100": ("cifar100", "cifar100", 8, "42 40 44"),
    "Split ImageNet-R": ("imr", "imr", 8, "42 40 44"),
    "5-Datasets": ("five_datasets", "5datasets", 4, "42 40 44"),
    "Split CUB-200": ("cub", "cub", 8, "42"),
}


def _seeds(seeds: str) -> str:
    return f'SEEDS="{seeds}"' if " " in seeds else f"SEEDS={seeds}"


def _hide_prompt_row(table: str, dataset: str, backbone: str) -> LedgerRow:
    """HiDe-Prompt as train_<dataset>_<backbone>.sh runs it; its stage-2 folders are the row's runs."""
    _, prefix, nproc, seeds = DATASETS[dataset]
    name = f"{prefix}_{BACKBONES[backbone]}"
    command = f"NPROC={nproc} DATA_PATH=./datasets {_seeds(seeds)} bash training_script/train_{name}.sh"
    return LedgerRow(table, dataset, backbone, "HiDe-Prompt", command, f"output/{name}_pe_seed*", _not_found())


def _baseline_row(table: str, dataset: str, backbone: str, method: str) -> LedgerRow:
    """A prompt baseline as train_prompt_methods.sh runs it: Sup-21K only, since its folders
    (<dataset>_vit_<method>_seed<seed>) do not name the backbone a MODEL=... run would use."""
    if backbone != "Sup-21K":
        return LedgerRow(table, dataset, backbone, method, NO_SCRIPT, "", _not_found())
    key = DATASETS[dataset][0]
    command = (f"NPROC=8 DATA_PATH=./datasets SEEDS=42 METHODS={BASELINES[method]} "
               f"bash training_script/train_prompt_methods.sh {key}")
    return LedgerRow(table, dataset, backbone, method, command, f"output/{key}_vit_{BASELINES[method]}_seed*",
                     _not_found())


def _method_rows(table: str, datasets: Sequence[str], backbones: Sequence[str]) -> list[LedgerRow]:
    return [row for dataset in datasets for backbone in backbones
            for row in [*(_baseline_row(table, dataset, backbone, method) for method in BASELINES),
                        _hide_prompt_row(table, dataset, backbone)]]


def _general_rows() -> list[LedgerRow]:
    rows = []
    for dataset in ("Split CIFAR-100", "Split ImageNet-R"):
        key = DATASETS[dataset][0]
        rows += [_hide_prompt_row(GENERAL, dataset, "Sup-21K"),
                 LedgerRow(GENERAL, dataset, "Sup-21K", "HiDe-Adapter", NO_SCRIPT, "", _not_found()),
                 LedgerRow(GENERAL, dataset, "Sup-21K", "HiDe-LoRA",
                           f"NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_{key}_lora.sh",
                           f"output/{key}_hidelora_seed*", _not_found())]
    return rows


ROWS: tuple[LedgerRow, ...] = (
    *_method_rows(HIDE_MAIN, ("Split CIFAR-100", "Split ImageNet-R"), tuple(BACKBONES)),
    *_method_rows(HIDE_MORE, ("5-Datasets", "Split CUB-200"), ("Sup-21K", "iBOT-21K")),
    *_general_rows(),
)

SECTION_NOTES = {
    HIDE_MAIN: (
        "The paper's main comparison: every method on each of the five pre-trained ViT-B/16 backbones. Only Sup-21K "
        "has a script for the prompt baselines: `train_prompt_methods.sh` takes `MODEL=...`, but its folders "
        "(`<dataset>_vit_<method>_seed<seed>`) do not name the backbone, so a run on another backbone could not be "
        "told apart from the Sup-21K one."
    ),
    HIDE_MORE: (
        "The backbones are those the reference's scripts run on these benchmarks (Sup-21K and iBOT-21K); the paper's "
        "table could not be read to confirm them. HiDe-Prompt on 5-Datasets runs 4 processes (`NPROC=4`, the "
        "reference's 4 x 32)."
    ),
    GENERAL: (
        "The paper's tables could not be read: the rows follow the settings the reference's scripts run (Sup-21K), "
        "and rows the paper may hold for other backbones are not listed. HiDe-Prompt is the same run as in the "
        "first section. HiDe-LoRA's scripts run continual LoRA first (`output/<dataset>_continual_lora_seed*`, not a "
        "row here), then a stage 1 on the Sup-21K ViT-B/16 (`..._lora_tii_multi_centroid_mlp_2_seed*`), then "
        "HiDe-LoRA on timm's AugReg in21k->in1k ViT-B/16, the model the reference's LoRA code loaded under the name "
        "`vit_base_patch16_224`. The suite has no adapter method, so HiDe-Adapter has no script.\n\n"
        "Its few-shot results (upstream LoRA, then 5-way 5-shot episodes on held-out ImageNet-R classes) are episode "
        "accuracies, not FAA / CAA / FFM, so they are not ledger rows: `NPROC=8 DATA_PATH=./datasets SEEDS=42 bash "
        "training_script/train_imr_ibot21k_few_shot.sh` writes `output/imr_ibot21k_few_shot_seed42/few_shot_*.json` "
        "(mean accuracy and its 95% interval); the paper's numbers were " + NOT_FOUND + " either."
    ),
}

SEARCH_RECORD = """\
Each paper cell names the paper, version and table it was read from; a number read where another paper quotes it says
"as quoted in" that paper. A cell with no source reachable from here is left blank, "—†", never filled from memory.

The search (public stored copies of web pages, documentation, GitHub code and issue threads) found no retrievable copy
of the papers' result tables, so every paper cell is blank for now:

- arXiv 2310.07234 (https://arxiv.org/abs/2310.07234v1, https://arxiv.org/html/2310.07234v1,
  https://ar5iv.labs.arxiv.org/html/2310.07234), its NeurIPS 2023 page
  (https://papers.nips.cc/paper_files/paper/2023/hash/d9f8b5abc8e0926539ecbb492af7b2f1-Abstract-Conference.html) and
  OpenReview (https://openreview.net/forum?id=9XieH21Tlf): only the title and abstract are retrievable. The abstract
  gives HiDe-Prompt's lead over the best other method ("up to 15.01% and 9.61%" on Split CIFAR-100 and Split
  ImageNet-R), a difference, not a table value.
- arXiv 2310.13888 (https://ar5iv.labs.arxiv.org/html/2310.13888): abstract and the opening of the introduction only.
- The authors' README (github.com/thu-ml/HiDe-Prompt, both stored versions): datasets, checkpoints and command lines,
  no result numbers.
- GitHub issue threads (thu-ml/HiDe-Prompt and the prompt baselines' repositories): none quotes the tables.
- Later papers and notes that repeat single HiDe-Prompt numbers: none retrievable here states which table it quotes,
  so none is used.

To fill a cell, give its `PaperValue` the number and its source (e.g. "arXiv 2310.07234 v2 Table 1", with "as quoted
in <paper>, <table>" for a re-quote) in `ledger.py`, then run `python ledger.py`."""


# --- rendering ----------------------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    """Table-safe: a pipe would split the cell, a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _paper_cell(value: PaperValue, sources: list[str]) -> str:
    if value.value is None:
        return BLANK
    if value.source not in sources:
        sources.append(value.source)
    return f"{value.value:.2f} [{sources.index(value.source) + 1}]"


def _intro() -> str:
    return f"""\
# Reproducibility ledger

The result tables of the papers this suite reproduces, row by row: HiDe-Prompt (arXiv 2310.07234, NeurIPS 2023,
"Hierarchical Decomposition of Prompt-Based Continual Learning: Rethinking Obscured Sub-optimality"), its general
framework (arXiv 2310.13888: HiDe-Prompt, HiDe-Adapter, HiDe-LoRA) and the prompt baselines L2P, DualPrompt and
S-Prompt++ as those papers' tables report them. Each row gives the paper's numbers with the table each was read from,
the command that reproduces the row, the run folders the command writes, and ours.

This file is generated: it is exactly `ledger.render()`, and a test fails when the two differ. Edit `ledger.py` and
run `python ledger.py` to rewrite it.

## Metrics

With a[i, t] the accuracy (%) on task i's test set after training task t, over T tasks:

- **FAA**, final average accuracy: the mean of a[i, T] over all tasks i, after the last task.
- **CAA**, cumulative average accuracy: the mean over t = 1 … T of the average accuracy over the tasks seen after
  task t.
- **FFM**, final forgetting, in the reference's convention: for each task before the last, its best accuracy after any
  task up to the last, the last included (earlier or current), minus its final accuracy; averaged over those tasks. It
  is never negative. (Chaudhry et al.'s forgetting leaves the last column out of the best; it is
  `forgetting_standard` in `results.json`, not this column.)

A run's `results.json` holds them as the last task's `avg_acc`, `avg_incremental_acc` and `forgetting` (`final`).

## Seeds

Each command spells its seeds. The scripts run seeds 42, 40 and 44 for HiDe-Prompt on Split CIFAR-100, Split
ImageNet-R and 5-Datasets (every backbone), and seed 42 alone for HiDe-Prompt on Split CUB-200, for HiDe-LoRA, for
few-shot LoRA and for the prompt baselines (`train_prompt_methods.sh`), as the reference's scripts and README do.
`SEEDS="..."` runs others.

## Ours

"Ours" is filled only from measured runs: `python report.py --ledger ./output` prints this ledger with each row's
cells computed from the finished runs its glob finds under `./output` (mean ± sample standard deviation over the
seeds, and how many). A row without such a run, and every row of this committed file, says "{NOT_RUN}"; a row whose
command says "{NO_SCRIPT}" has no glob and stays so. The globs name HiDe's stage-2 folders (`..._pe_seed*`,
`..._hidelora_seed*`): its stage-1 folders (`..._multi_centroid_mlp_2_seed*`) are never a row.

## Where the papers' numbers come from

{SEARCH_RECORD}
"""


def _section(title: str, indexed: Sequence[tuple[int, LedgerRow]], ours: Mapping[int, Mapping[str, str]],
             sources: list[str]) -> str:
    results = ["| # | Dataset | Backbone | Method | " + " | ".join(f"{m} paper | {m} ours" for m in METRICS) + " |",
               "|---" * (4 + 2 * len(METRICS)) + "|"]
    commands = ["| # | Command | Runs |", "|---|---|---|"]
    for i, row in indexed:
        measured = ours.get(i, {})
        cells = [f"{_paper_cell(row.paper[m], sources)} | {_cell(measured.get(m, NOT_RUN))}" for m in METRICS]
        results.append(f"| {i} | {row.dataset} | {row.backbone} | {row.method} | " + " | ".join(cells) + " |")
        command = row.command if row.command == NO_SCRIPT else f"`{row.command}`"
        commands.append(f"| {i} | {command} | " + (f"`{row.runs}`" if row.runs else "") + " |")
    notes = "\n\n".join(textwrap.fill(paragraph, 120, break_on_hyphens=False, break_long_words=False)
                          for paragraph in SECTION_NOTES.get(title, "").split("\n\n") if paragraph)
    return "\n".join([f"## {title}", "", *([notes, ""] if notes else []), *results, "",
                      f"{BLANK} {NOT_FOUND} (see \"Where the papers' numbers come from\").", "", *commands, ""])


def render(ours: Mapping[int, Mapping[str, str]] | None = None, *, rows: Sequence[LedgerRow] = ROWS) -> str:
    """The whole docs/REPRODUCIBILITY.md. `ours[i][metric]` is the report's text for ROWS[i] (e.g. "92.10 ± 0.31
    (3 seeds)"); rows without it say "not yet run"."""
    ours = ours or {}
    unknown = sorted(set(ours) - set(range(len(rows))))
    if unknown:
        raise ValueError(f"ours names rows {unknown} the ledger does not have (0..{len(rows) - 1})")
    sections: dict[str, list[tuple[int, LedgerRow]]] = {}
    for i, row in enumerate(rows):
        sections.setdefault(row.table, []).append((i, row))
    sources: list[str] = []
    body = [_section(title, indexed, ours, sources) for title, indexed in sections.items()]
    cited = [f"{n}. {source}" for n, source in enumerate(sources, 1)] or ["None yet: every paper cell is blank."]
    return "\n".join([_intro(), *body, "## Sources", "", *cited, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/REPRODUCIBILITY.md from the ledger (ours: not yet run).")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the doc is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"error: {DOC} differs from ledger.render(); run python ledger.py to rewrite it", file=sys.stderr)
            return 1
        return 0
    from utils import UserError, atomic_write_text  # utils pulls in torch, which rendering never needs
    try:
        atomic_write_text(text, DOC)
    except UserError as err:
        print(f"error: cannot write {DOC} ({err.__cause__}): free space or fix permissions, then run python "
              f"ledger.py again", file=sys.stderr)
        return 2
    print(f"wrote {DOC} ({len(ROWS)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
