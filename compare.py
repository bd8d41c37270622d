"""Print one table comparing finished runs: `python compare.py OUTPUT_DIR [OUTPUT_DIR ...]`.

Reads each run's results.json; a run still in progress shows the tasks it has finished. "task id." is the final
task-identity accuracy: the share of test images whose inferred task (HiDe's TII model, or the task of the predicted
class) is right.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from config.resolved import flat_settings


def load_row(output_dir: str) -> list[str]:
    path = Path(output_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"error: cannot read {path} ({type(err).__name__}); "
                         f"is {output_dir} a run's --output_dir?") from err
    final = results["final"] or {}

    def fmt(key: str) -> str:
        value = final.get(key)
        return "-" if value is None else f"{value:.2f}"

    name = results["subcommand"]
    stage = flat_settings(results["config"]).get("stage", "auto")
    if stage not in (None, "auto"):  # HiDe's stage-1 and stage-2 runs share a subcommand
        name += f" ({stage})"
    return [name, f"{results['completed_tasks']}/{results['num_tasks']}", fmt("avg_acc"),
            fmt("avg_incremental_acc"), fmt("forgetting"), fmt("forgetting_standard"), fmt("bwt"),
            fmt("avg_tii_acc")]


def format_table(rows: list[list[str]]) -> str:
    header = ["run", "tasks", "A_last", "avg inc.", "forgetting", "forg. (std)", "BWT", "task id."]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python compare.py OUTPUT_DIR [OUTPUT_DIR ...]")
    print(format_table([load_row(d) for d in sys.argv[1:]]))
