"""benchmarks/pipeline.py: real short runs timed phase by phase, with the ViT passes each phase makes per image."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from conftest import REPO, load_script, read_json


def _pipeline() -> ModuleType:
    return load_script("pipeline_benchmark", REPO / "benchmarks" / "pipeline.py")


def test_a_nested_phase_stops_the_clock_of_the_enclosing_one():
    clock = _pipeline().PhaseClock()
    with clock.phase("outer"):
        time.sleep(0.01)
        with clock.phase("inner"):
            time.sleep(0.2)
            clock.credit(4, 2)  # a batch of 4 images that took 2 ViT passes
        clock.credit(3, 0)
    outer, inner = clock.tallies["outer"], clock.tallies["inner"]
    assert 0.01 <= outer.seconds < 0.2 <= inner.seconds  # counted in both, the outer would exceed 0.21
    assert (inner.images, inner.image_passes, outer.images, outer.image_passes) == (4, 8, 3, 0)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """As the subprocess tests run (OMP_NUM_THREADS=1): OpenMP threads that share busy cores with other processes are
    slowed many times over (a 2-thread run here took 7x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_phases_add_up_to_the_run_and_hide_evaluations_reuse_cached_features(tmp_path, capsys):
    path = tmp_path / "pipeline.json"
    with one_thread():
        code = _pipeline().main(["--methods", "hideprompt", "l2p", "--loader_workers", "0", "--json", str(path),
                                 "--input-size", "32", "--device", "cpu", "--num_workers", "0"])
    assert code == 0
    saved = read_json(path)
    assert saved["tasks"] == 2 and saved["epochs"] == 1 and saved["machine"]["threads"] >= 1
    hide, l2p = saved["methods"]
    stages = ("tii", "wtp")
    kinds = ("data loading", "training", "rolling state", "class statistics", "task-adaptive prediction",
             "evaluation", "evaluation after alignment")
    assert {r["phase"] for r in hide["phases"]} == {f"{k} [{s}]" for k in kinds for s in stages} | {
        "checkpointing", "rest of engine.run"}
    assert hide["phases"][-1]["phase"] == "rest of engine.run"
    for result in (hide, l2p):
        seconds = [r["seconds"] for r in result["phases"]]
        assert min(seconds) > 0
        # The phases are timed exclusively and the last one spans the whole of engine.run, so they miss only the
        # probe's own bookkeeping outside its clock (patching a few functions in and out): far below 50 ms.
        assert sum(seconds) == pytest.approx(result["run_seconds"], abs=0.05)
        assert sum(r["share"] for r in result["phases"]) == pytest.approx(1.0)

    phases = {r["phase"]: r for r in hide["phases"]}
    for stage in stages:  # one ViT pass per training image and per statistics image; none to load data
        training = phases[f"training [{stage}]"]
        assert training["images"] == phases[f"data loading [{stage}]"]["images"] > 0
        assert training["vit_passes_per_image"] == phases[f"class statistics [{stage}]"]["vit_passes_per_image"] == 1
        assert phases[f"data loading [{stage}]"]["vit_passes_per_image"] == 0

    # HiDe caches the original model's test features for the whole run and the instructed ones until the next
    # training phase: task 1 computes them (tii: 1 pass; wtp: the instructed pass alone), task 2's stage 1 only for
    # task 2's new images, and the evaluations after alignment rerun only the heads.
    evaluations = [(e["task"], e["stage"], e["after_alignment"]) for e in hide["evaluations"]]
    assert evaluations == [(1, "tii", False), (1, "wtp", False), (2, "tii", False), (2, "tii", True),
                           (2, "wtp", False), (2, "wtp", True)]
    passes = [e["vit_passes_per_image"] for e in hide["evaluations"]]
    first, seen = hide["evaluations"][0]["images"], hide["evaluations"][2]["images"]
    assert passes == [1, 1, pytest.approx((seen - first) / seen), 0, 1, 0]

    # L2P: the query and the prompted pass for each training image; at test time the query once per run
    l2p_phases = {r["phase"]: r for r in l2p["phases"]}
    assert l2p_phases["training"]["vit_passes_per_image"] == 2
    assert [e["vit_passes_per_image"] for e in l2p["evaluations"]] == [2, pytest.approx(2 - first / seen)]

    assert [(v["stage"], v["workers"]) for v in hide["loader"]] == [("training [tii]", 0), ("training [wtp]", 0)]
    assert all(v["loader_images_per_second"] > 0 and v["step_images_per_second"] > 0 for v in hide["loader"])
    out = capsys.readouterr().out
    assert "ViT passes/img" in out and "evaluation after alignment [wtp]" in out and "per process: " in out
    assert "load avg" in out
