"""From runs to a paper's table: `python report.py RUN_DIR_OR_GLOB [...]`.

Finds runs (folders holding a results.json, searched recursively), groups those whose settings are the same apart from
the seed (and settings that change no result: output folder, device, workers, logging...), and prints one row per
group with the number of seeds and the mean ± sample standard deviation (n - 1) of each metric over them. Runs that
did not finish every task are listed apart, never averaged; runs whose settings differ are never merged.

    python report.py output/demo                         # a terminal table
    python report.py 'output/cifar100_*' --format latex   # a booktabs table for a paper
    python report.py output/demo --plots figures --pdf   # and the figures, as PNG and PDF
    python report.py --ledger output                     # docs/REPRODUCIBILITY.md with "ours" filled from the runs
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from config.resolved import flat_settings
from run_files import RESULT_NEUTRAL
from text_table import aligned_table
from utils import UserError

# (column, key in a results.json task entry, what it is)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("FAA", "avg_acc", "final average accuracy: mean over all tasks of their accuracy after the last task (A_last)"),
    ("CAA", "avg_incremental_acc", "cumulative average accuracy: mean over tasks t of the average accuracy after t"),
    ("FFM", "forgetting", "final forgetting: best accuracy over all columns up to the last minus the last (>= 0)"),
    ("FFM_std", "forgetting_standard", "final forgetting, standard convention: best earlier accuracy minus the last"),
    ("BWT", "bwt", "backward transfer: mean over earlier tasks of final minus just-learnt accuracy"),
    ("TII", "avg_tii_acc", "final task-identity accuracy: share of test images whose inferred task is right"),
)
# the online protocol's own, shown when a run has them
ONLINE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("ACC_any", "anytime_accuracy_seen_avg", "anytime accuracy: mean over every evaluation during training of the "
     "accuracy on the tasks seen so far (online)"),
    ("FWT", "forward_transfer", "forward transfer: mean accuracy on tasks before they are trained (online)"),
    ("TTT", "prequential_accuracy", "test-then-train accuracy: each training batch predicted before it is learnt "
     "from (online)"),
)
# Not part of what defines an experiment: the seed (what a group spans), settings that change no result, the class
# order (it follows from the seed) and the folders of upstream runs (one per seed)
NOT_GROUPED = RESULT_NEUTRAL | {"seed", "class_order", "trained_original_model", "vanilla_model_output_dir",
                                "shared_model_output_dir"}
# follow from other settings or are in the method's name already: they group runs, but naming a row by them would
# only repeat what the row says
DERIVED = frozenset({"effective_lr", "lr_scale", "global_batch_size", "reference_switches", "reference_mode"})
FORMATS = ("table", "markdown", "csv", "latex")
PROVENANCE_KEY = "provenance"


class ReportError(Exception):
    """Bad input: one line for the user, exit code 2."""


@dataclass(frozen=True)
class Run:
    folder: Path
    results: dict[str, Any]

    @cached_property
    def settings(self) -> dict[str, Any]:
        return flat_settings(self.results.get("config") or {})

    @property
    def seed(self) -> Any:
        return self.settings.get("seed")

    @property
    def complete(self) -> bool:
        return self.results.get("final") is not None and self.results["completed_tasks"] == self.results["num_tasks"]

    @property
    def experiment(self) -> dict[str, Any]:
        """The settings that define the experiment: every one apart from NOT_GROUPED."""
        return {k: v for k, v in self.settings.items() if k not in NOT_GROUPED}

    @property
    def identity(self) -> tuple[str, str, str]:
        """(method label, dataset, backbone): what names a row before any other setting."""
        settings = self.settings
        method = self.results.get("method") or settings.get("method", "?")
        for extra in (settings.get("part"), settings.get("stage")):
            if extra not in (None, "", "auto"):  # HiDe's stage-1 and stage-2 runs share a method
                method += f" ({extra})"
        if settings.get("reference_mode"):
            method += " [reference mode]"
        if settings.get("protocol") == "online":
            method += " online"
        dataset = self.results.get("dataset") or settings.get("dataset", "?")
        if settings.get("scenario") not in (None, "class"):
            dataset += f" ({settings['scenario']})"
        backbone = settings.get("backbone") or self.results.get("model") or settings.get("model", "?")
        return method, dataset, backbone


@dataclass
class Group:
    """Complete runs of one experiment, one per seed."""
    runs: list[Run]
    distinguishing: dict[str, Any] = field(default_factory=dict)  # settings that tell it from its namesakes

    @property
    def identity(self) -> tuple[str, str, str]:
        return self.runs[0].identity

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]

    @property
    def settings_text(self) -> str:
        return " ".join(f"{k}={_plain_text(v)}" for k, v in sorted(self.distinguishing.items()) if k not in DERIVED)

    @property
    def label(self) -> str:
        method, dataset, backbone = self.identity
        return " ".join(x for x in (method, dataset, backbone, self.settings_text) if x)

    def short_label(self, others: Sequence[Group]) -> str:
        """The label without the dataset or backbone when every group shares it (figure legends and titles)."""
        method, *shared = self.identity
        parts = [method] + [x for k, x in enumerate(shared) if any(g.identity[k + 1] != x for g in others)]
        return " ".join([*parts, *([self.settings_text] if self.settings_text else [])])

    def values(self, get: Callable[[Run], Any]) -> list[Any]:
        return [get(run) for run in self.runs]


def _plain_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# ----------------------------------------------------------------------------------------------------------------
# Finding and grouping runs
# ----------------------------------------------------------------------------------------------------------------
def _expand(path: str) -> list[Path]:
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise ReportError(f"nothing matches {path}; give run folders, folders holding runs, or a glob that matches")
        return [Path(m) for m in matches]
    if not Path(path).exists():
        raise ReportError(f"{path} does not exist; give a run's --output_dir or a folder holding runs")
    return [Path(path)]


def find_result_files(paths: Sequence[str]) -> list[Path]:
    """Every results.json at or below `paths` (folders, files or globs), each once, in path order."""
    found: dict[Path, None] = {}
    for path in paths:
        for match in _expand(path):
            files = [match] if match.is_file() else sorted(match.rglob("results.json"))
            if not files:
                raise ReportError(f"no results.json in {match} or below; give a run's --output_dir or a folder "
                                  f"holding runs")
            found.update((f.resolve(), None) for f in files)
    return list(found)


def load_run(path: Path) -> Run:
    try:
        results = json.loads(path.read_text())
        results["num_tasks"], results["completed_tasks"]  # noqa: B018 -- the keys every run has
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ReportError(f"{path} is not a run's results.json ({type(err).__name__}: {err}); leave it out") from err
    return Run(path.parent, results)


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Complete runs grouped by identical experiment settings, in the order their first run was given; each group
    named by the settings that tell it from other groups of the same method, dataset and backbone."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.experiment, sort_keys=True, default=str)
        groups.setdefault(key, Group([])).runs.append(run)
    result = list(groups.values())
    for group in result:
        namesakes = [g for g in result if g.identity == group.identity and g is not group]
        mine = group.runs[0].experiment
        group.distinguishing = {k: mine.get(k) for k in sorted(set(mine).union(*(g.runs[0].experiment
                                                                                for g in namesakes)))
                                if any(g.runs[0].experiment.get(k) != mine.get(k) for g in namesakes)}
    return result


def duplicate_seed_notes(groups: Iterable[Group]) -> list[str]:
    notes = []
    for group in groups:
        seeds = group.seeds
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}, key=str):
            folders = ", ".join(str(r.folder) for r in group.runs if r.seed == seed)
            notes.append(f"note: {group.label} has seed {seed} more than once ({folders}); each run counts")
    return notes


# ----------------------------------------------------------------------------------------------------------------
# Columns and aggregation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    get: Callable[[Run], Any]
    numeric: bool = True


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1; none for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _final(key: str) -> Callable[[Run], Any]:
    return lambda run: run.results["final"].get(key)


def _phase_final(phase: str) -> Callable[[Run], Any]:
    return lambda run: (run.results["final"].get("phases") or {}).get(phase, {}).get("avg_acc")


def phase_title(phase: str) -> str:
    """`wtp_pre_alignment` -> `wtp before TAP`: an earlier phase's result, or one before task-adaptive prediction."""
    return phase.replace("_pre_alignment", " before TAP")


def metric_columns(groups: Sequence[Group]) -> list[Column]:
    """The metrics, then the final average accuracy of every earlier phase any run reports (HiDe's stages)."""
    columns = [Column(name, _final(key)) for name, key, _ in METRICS]
    finals = [run.results["final"] for group in groups for run in group.runs]
    columns += [Column(name, _final(key)) for name, key, _ in ONLINE_METRICS if any(key in f for f in finals)]
    phases: dict[str, None] = {}
    for final in finals:
        phases.update(dict.fromkeys(final.get("phases") or {}))
    return columns + [Column(f"FAA {phase_title(p)}", _phase_final(p)) for p in phases]


def _lookup(run: Run, name: str) -> tuple[bool, Any]:
    """A column asked for by --columns: a provenance field, a results.json field (dotted paths go deeper), a final
    metric, or a setting by flag name."""
    places = (run.results.get(PROVENANCE_KEY) or {}, run.results, run.results.get("final") or {}, run.settings)
    for place in places:
        if name in place:
            return True, place[name]
    value: Any = run.results
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def extra_columns(names: Sequence[str], runs: Sequence[Run]) -> list[Column]:
    columns = []
    for name in names:
        found = [_lookup(run, name) for run in runs]
        if not any(ok for ok, _ in found):
            raise ReportError(f"--columns {name}: no run has it; name a provenance field (e.g. torch, world_size, "
                              f"wall_seconds), a results.json field (dotted for nested ones) or a setting (e.g. lr)")
        values = [v for ok, v in found if ok]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        columns.append(Column(name, lambda run, n=name: _lookup(run, n)[1], numeric))
    return columns


@dataclass(frozen=True)
class Cell:
    """One group's value of one column: mean and std over its runs, or the distinct texts."""
    mean: float | None = None
    std: float | None = None
    text: str | None = None

    def formatted(self, plus_minus: str = "±") -> str:
        if self.text is not None:
            return self.text
        if self.mean is None:
            return "-"
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} {plus_minus} {self.std:.2f}"


def aggregate(group: Group, column: Column) -> Cell:
    values = group.values(column.get)
    if not column.numeric:
        return Cell(text=", ".join(dict.fromkeys(_plain_text(v) for v in values)))
    if any(v is None for v in values):  # e.g. forgetting of a one-task run: undefined, not zero
        return Cell()
    return Cell(*mean_std([float(v) for v in values]))


# ----------------------------------------------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    groups: list[Group]
    columns: list[Column]

    @property
    def with_settings(self) -> bool:
        return any(g.distinguishing for g in self.groups)

    def label_header(self) -> list[str]:
        return ["method", "dataset", "backbone", *(["settings"] if self.with_settings else []), "seeds"]

    def label_cells(self, group: Group) -> list[str]:
        return [*group.identity, *([group.settings_text] if self.with_settings else []), str(len(group.runs))]

    def cells(self, group: Group) -> list[Cell]:
        return [aggregate(group, c) for c in self.columns]


def as_text(table: Table, markdown: bool = False) -> str:
    header = [*table.label_header(), *(c.name for c in table.columns)]
    rows = [[*table.label_cells(g), *(c.formatted() for c in table.cells(g))] for g in table.groups]
    if not markdown:
        return aligned_table([header, *rows], left=len(table.label_header()))
    lefts = len(table.label_header())
    rule = ["---" if i < lefts else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def as_csv(table: Table) -> str:
    """Full precision, one mean and one std column per metric, and the seeds, for further processing."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [n for c in table.columns for n in ((c.name + "_mean", c.name + "_std") if c.numeric else (c.name,))]
    writer.writerow([*table.label_header(), "seed_values", *names])
    for group in table.groups:
        values: list[Any] = []
        for cell, column in zip(table.cells(group), table.columns, strict=True):
            values += [cell.text] if not column.numeric else [_csv_number(cell.mean), _csv_number(cell.std)]
        writer.writerow([*table.label_cells(group), " ".join(map(str, group.seeds)), *values])
    return out.getvalue().rstrip("\n")


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


PM_LATEX = r"\pm"


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def as_latex(table: Table) -> str:
    """A booktabs tabular (\\usepackage{booktabs}); numbers as $mean \\pm std$."""
    lefts = len(table.label_header())
    header = [latex_escape(h) for h in [*table.label_header(), *(c.name for c in table.columns)]]
    lines = [r"\begin{tabular}{" + "l" * lefts + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule"]
    for group in table.groups:
        numbers = [latex_escape(c.formatted()) if c.text is not None or c.mean is None
                   else "$" + c.formatted(PM_LATEX) + "$" for c in table.cells(group)]
        lines.append(" & ".join([*(latex_escape(x) for x in table.label_cells(group)), *numbers]) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])


def render(table: Table, fmt: str) -> str:
    if fmt == "csv":
        return as_csv(table)
    if fmt == "latex":
        return as_latex(table)
    return as_text(table, markdown=fmt == "markdown")


def incomplete_lines(runs: Iterable[Run]) -> list[str]:
    return [f"  {run.folder}: {run.results['completed_tasks']}/{run.results['num_tasks']} tasks "
            f"({' '.join(run.identity)}, seed {run.seed})" for run in runs]


# ----------------------------------------------------------------------------------------------------------------
# The reproducibility ledger
# ----------------------------------------------------------------------------------------------------------------
def ledger_cells(groups: Sequence[Group], runs_pattern: str) -> dict[str, str]:
    """The report's text for one ledger row: the complete runs whose folders match the row's glob, if they form one
    group; otherwise nothing (a row is never filled from runs of different settings)."""
    if not runs_pattern:
        return {}
    matching = [g for g in groups if any(r.folder.match(runs_pattern) for r in g.runs)]
    if len(matching) != 1:
        return {}
    group = matching[0]
    runs = [r for r in group.runs if r.folder.match(runs_pattern)]
    seeds = f"({len(runs)} seed{'s' if len(runs) > 1 else ''})"
    sub = Group(runs)
    return {name: f"{aggregate(sub, Column(name, _final(key))).formatted()} {seeds}" for name, key, _ in METRICS}


def ledger_text(groups: Sequence[Group]) -> str:
    import ledger
    return ledger.render({i: cells for i, row in enumerate(ledger.ROWS) if (cells := ledger_cells(groups, row.runs))})


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="report.py", description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="metrics: " + "; ".join(f"{n}: {d}" for n, _, d in (*METRICS, *ONLINE_METRICS))
               + ". FAA <phase> columns: the final average accuracy of an earlier phase (HiDe's stage 1 `tii`) or "
               "before task-adaptive prediction.")
    parser.add_argument("paths", nargs="*", metavar="RUN_DIR_OR_GLOB",
                        help="run folders (each holding results.json), folders searched recursively, or globs")
    parser.add_argument("--format", choices=FORMATS, default="table", help="terminal table (default), markdown, "
                        "csv (full precision, mean and std columns) or latex (booktabs)")
    parser.add_argument("--columns", default="", metavar="NAME[,NAME...]",
                        help="extra columns: provenance fields (torch, git_commit, world_size, wall_seconds...), "
                             "settings by flag name (lr, epochs...) or results.json fields (dotted paths)")
    parser.add_argument("--plots", metavar="DIR", help="write the figures (PNG) into DIR")
    parser.add_argument("--pdf", action="store_true", help="with --plots: a PDF of every figure too")
    parser.add_argument("--ledger", action="store_true",
                        help="print docs/REPRODUCIBILITY.md with the column 'ours' filled from the runs found "
                             "(default path: ./output)")
    args = parser.parse_args(argv)
    if not args.paths and not args.ledger:
        parser.error("give at least one run folder, folder holding runs, or glob")
    if args.pdf and not args.plots:
        parser.error("--pdf needs --plots DIR")
    return args


def _print_notes(lines: list[str], fmt: str) -> None:
    """Notes go to stdout with a human-readable table, to stderr where stdout must stay parseable."""
    if lines:
        print("\n".join(lines), file=sys.stdout if fmt in ("table", "markdown") else sys.stderr)


def report(args: argparse.Namespace) -> None:
    runs = [load_run(path) for path in find_result_files(args.paths or ["output"])]
    groups = group_runs(r for r in runs if r.complete)
    if args.ledger:
        print(ledger_text(groups))
        return
    if not groups:
        raise ReportError(f"none of the {len(runs)} run(s) found has finished every task: nothing to average")
    names = [n.strip() for n in args.columns.split(",") if n.strip()]
    table = Table(groups, metric_columns(groups) + extra_columns(names, [r for g in groups for r in g.runs]))
    print(render(table, args.format))
    incomplete = [r for r in runs if not r.complete]
    notes = duplicate_seed_notes(groups)
    if incomplete:
        notes += ["incomplete runs (not averaged):", *incomplete_lines(incomplete)]
    if args.plots:
        import plots
        written = plots.write_report_figures([(g.short_label(groups), [r.results for r in g.runs]) for g in groups],
                                             Path(args.plots), pdf=args.pdf)
        notes.append(f"{len(written)} figures in {args.plots}: " + ", ".join(p.name for p in written))
    _print_notes(notes, args.format)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report(args)
    except (ReportError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # piped into `head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
