"""The same run under each launcher the reference's users have: SLURM (srun sets SLURM_*), and the legacy
`torch.distributed.launch` without --use_env (it passes --local-rank=N before the script's arguments)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, free_port, read_json

ARGS = ["main.py", "digits_ncm", "--num_tasks", "1", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_two_tasks(tmp_path):
    out = tmp_path / "slurm"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, *ARGS, "--output_dir", str(out)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:]
    assert "2 process(es)" in outputs[0][0] and outputs[1][0] == ""  # only rank 0 prints
    results = read_json(out / "results.json")
    assert results["config"]["context"]["world_size"] == 2 and results["final"]["test_images"] == 540


@pytest.mark.slow
@pytest.mark.distributed
def test_legacy_launch_without_use_env(tmp_path):
    out = tmp_path / "launch"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           *ARGS, "--output_dir", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    results = read_json(out / "results.json")
    assert results["config"]["context"]["world_size"] == 2
    assert results["final"]["test_images"] == 540 and results["completed_tasks"] == 1
