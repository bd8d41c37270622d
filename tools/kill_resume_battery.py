"""Kill runs at random moments, resume them, and count what went wrong: corrupt files, resumes that start at the
wrong place, and final results that differ from a run never stopped (results.json apart from timings, every saved
tensor).

    python tools/kill_resume_battery.py --trials 20 [--nproc 2] [--seed 0] [--work /tmp/battery] -- <main.py args>

Without main.py arguments it runs HiDe-Prompt in one launch on Split Digits (two phases, statistics and
task-adaptive prediction per task). Each trial launches the run (under torchrun when --nproc > 1), waits a random
time within the uninterrupted run's duration, then sends one of: SIGKILL to every process, SIGKILL to one worker,
SIGKILL to the torchrun agent alone, SIGTERM or SIGUSR1 to the agent (to the process itself without torchrun); then
resumes until the run completes and compares it with the uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from run_files import RESULT_NEUTRAL  # noqa: E402

DEFAULT_RUN = ["digits_hideprompt", "--device", "cpu", "--epochs", "2", "--tii_epochs", "1", "--crct_epochs", "2",
               "--stop_after_task", "3", "--print_freq", "4", "--tensorboard", "False"]
KILLS = ("sigkill-all", "sigkill-worker", "sigkill-agent", "sigterm", "sigusr1")


def launch(args: list[str], out: Path, nproc: int, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={random.randint(20000, 60000)}"] if nproc > 1 else [sys.executable]
    command = [*launcher, "main.py", *args, "--output_dir", str(out), *(["--resume"] if resume else [])]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def send(process: subprocess.Popen, kill: str, nproc: int) -> None:
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    if kill == "sigkill-all":  # torchrun starts its workers in sessions of their own: each gets its signal
        for pid in [process.pid, *map(int, workers)]:
            os.kill(pid, signal.SIGKILL)
    elif kill == "sigkill-worker" and nproc > 1 and workers:
        os.kill(int(random.choice(workers)), signal.SIGKILL)
    elif kill in ("sigkill-agent", "sigkill-worker"):
        process.send_signal(signal.SIGKILL)
    else:
        process.send_signal(signal.SIGTERM if kill == "sigterm" else signal.SIGUSR1)


def untimed(obj: Any) -> Any:
    """A results file without timings, provenance (times, command lines, launches) and settings that change no result
    (a run killed before it wrote anything is started anew by its resume: its configuration is then the resume's,
    --resume included)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items()
                if "second" not in k and k != "provenance" and k not in RESULT_NEUTRAL}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def same_tensors(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def readable(out: Path) -> bool:
    """Every checkpoint, rolling state and JSON file in the folder loads."""
    try:
        for path in out.rglob("*.pth"):
            torch.load(path, map_location="cpu", weights_only=False)
        for path in out.glob("*.json"):
            json.loads(path.read_text())
    except Exception:  # any failure to read is a corrupt file
        return False
    return True


def compare(expected: Path, out: Path) -> str:
    """'' when the run in `out` equals the uninterrupted one, else what differs."""
    if not (out / "results.json").is_file():
        return "no results.json"
    if untimed(json.loads((out / "results.json").read_text())) != untimed(json.loads((expected / "results.json")
                                                                                     .read_text())):
        return "results.json differs"
    names = sorted(p.name for p in (expected / "checkpoint").iterdir())
    if sorted(p.name for p in (out / "checkpoint").iterdir()) != names:
        return "other checkpoint files"
    for name in names:
        mine, theirs = (torch.load(d / "checkpoint" / name, weights_only=False) for d in (out, expected))
        if not same_tensors(mine["model"], theirs["model"]):
            return f"{name} holds other tensors"
    return ""


def trial(args: list[str], out: Path, nproc: int, duration: float, expected: Path) -> dict[str, Any]:
    kill = random.choice(KILLS)
    delay = random.uniform(0.1, 0.95) * duration
    process = launch(args, out, nproc, resume=False)
    time.sleep(delay)
    if process.poll() is None:
        send(process, kill, nproc)
    _, err = process.communicate(timeout=600)
    orphans = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    time.sleep(15 if orphans else 0)  # the workers of a dead agent stop on their own within seconds
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    entry = {"kill": kill, "delay": round(delay, 2), "exit": process.returncode, "orphans_after_15s": len(left),
             "preempted_line": "preempted at" in err, "corrupt": not readable(out),
             "mid_task": (out / "checkpoint" / "rolling_state.pth").is_file()}
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    for _ in range(3):  # a launch can fail for reasons of its own (a port taken); a resume that fails is retried
        resumed = launch(args, out, nproc, resume=True)
        _, err = resumed.communicate(timeout=600)
        if resumed.returncode == 0:
            break
        entry.setdefault("resume_errors", []).append(
            [line for line in err.splitlines() if "error" in line.lower()][-3:] or [str(resumed.returncode)])
    entry["difference"] = compare(expected, out)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kill_resume_battery.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2, help="processes under torchrun (1: a plain process)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments and kinds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kill_resume_battery"))
    parser.add_argument("run", nargs="*", help="main.py arguments (after --)")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    run = args.run or DEFAULT_RUN
    shutil.rmtree(args.work, ignore_errors=True)
    expected = args.work / "uninterrupted"
    start = time.monotonic()
    reference = launch(run, expected, args.nproc, resume=False)
    if reference.wait() != 0:
        print(f"the uninterrupted run failed: {reference.stderr.read()[-500:]}", file=sys.stderr)
        return 1
    duration = time.monotonic() - start
    print(f"uninterrupted run: {duration:.1f} s, {args.nproc} process(es): {' '.join(run)}", flush=True)
    results = []
    for i in range(args.trials):
        entry = trial(run, args.work / f"trial{i}", args.nproc, duration, expected)
        results.append(entry)
        print(json.dumps(entry), flush=True)
    counts = Counter(e["kill"] for e in results)
    bad = [e for e in results if e["corrupt"] or e["difference"] or e["orphans_after_15s"]]
    print(f"{len(results)} kills ({dict(counts)}; {sum(e['mid_task'] for e in results)} left a task half done, "
          f"resumed from its rolling state): {sum(e['corrupt'] for e in results)} with a corrupt file, "
          f"{sum(bool(e['difference']) for e in results)} ending different from the uninterrupted run, "
          f"{sum(len(e.get('resume_errors', [])) for e in results)} failed resume launches, "
          f"{sum(e['orphans_after_15s'] > 0 for e in results)} with processes left after 15 s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
