"""What changes with 8 GPUs and several nodes: how a process finds its rank and device (torchrun, srun, a plain
process inside an allocation), per-rank random streams, data prepared once per node outside the collectives'
timeout, race-free extraction, a folder every node must share, and DDP without buffer broadcasts."""
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY, free_port, read_json, run_cli, write_fake_cifar100
from datasets.archives import extract_folder_from_tar
from utils import UserError, launcher_ranks, rank_device

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "SLURM_STEP_NUM_TASKS")


def _launch_env(monkeypatch, **values: str) -> None:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_torchrun_and_legacy_launch_ranks(monkeypatch):
    _launch_env(monkeypatch, RANK="5", WORLD_SIZE="16", LOCAL_RANK="5")
    assert launcher_ranks() == (5, 16, 5)
    _launch_env(monkeypatch, RANK="3", WORLD_SIZE="8")  # torch.distributed.launch without --use_env
    assert launcher_ranks(local_rank_arg=3) == (3, 8, 3)


def test_srun_step_gives_the_ranks_and_a_plain_process_in_an_allocation_runs_alone(monkeypatch):
    _launch_env(monkeypatch, SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="16")
    assert launcher_ranks() == (9, 16, 1)
    # `python main.py` in an sbatch script or salloc shell of 8 tasks: no srun step, so no peers to wait for
    _launch_env(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0")
    assert launcher_ranks() is None
    _launch_env(monkeypatch, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="1")
    assert launcher_ranks() is None


@pytest.mark.parametrize(("local_rank", "visible", "index"), [(3, 8, 3), (3, 1, 0), (7, 1, 0), (9, 8, 1)])
def test_gpu_is_the_local_rank_modulo_the_visible_gpus(monkeypatch, local_rank, visible, index):
    """With --gpus-per-task=1 every task sees one GPU, as cuda:0, while its local rank reaches 7."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert rank_device(torch.device("cuda"), local_rank) == torch.device("cuda", index)
    assert rank_device(torch.device("cuda", 2), local_rank) == torch.device("cuda", 2)  # asked for explicitly
    assert rank_device(torch.device("cpu"), local_rank) == torch.device("cpu")


@pytest.mark.slow
def test_plain_python_inside_a_slurm_allocation_runs_as_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0", SLURM_JOB_NODELIST="127.0.0.1",
               OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "main.py", "digits_ncm", "--num_tasks", "1", "--device", "cpu",
                             "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_json(out / "results.json")["config"]["context"]["world_size"] == 1


def _tar_with_folder(path, folder: str, files: dict[str, bytes]) -> None:
    source = path.parent / "src"
    for name, data in files.items():
        (source / folder / name).parent.mkdir(parents=True, exist_ok=True)
        (source / folder / name).write_bytes(data)
    with tarfile.open(path, "w") as tar:
        tar.add(source / folder, arcname=folder)


def test_extraction_that_loses_the_race_keeps_the_winners_copy(tmp_path):
    """Two nodes extract into one shared folder: the second rename finds the first's folder (not empty)."""
    archive = tmp_path / "data.tar"
    _tar_with_folder(archive, "imagenet-r", {"a/1.jpg": b"new"})
    root = tmp_path / "root"
    (root / "imagenet-r" / "a").mkdir(parents=True)
    (root / "imagenet-r" / "a" / "1.jpg").write_bytes(b"winner")
    extract_folder_from_tar(archive, "imagenet-r", root, "the source")
    assert (root / "imagenet-r" / "a" / "1.jpg").read_bytes() == b"winner"
    assert sorted(p.name for p in root.iterdir()) == ["imagenet-r"]  # no temporary folder left


def test_extraction_onto_a_file_is_one_clear_error(tmp_path):
    archive = tmp_path / "data.tar"
    _tar_with_folder(archive, "CUB_200_2011", {"images.txt": b"1 a.jpg\n"})
    root = tmp_path / "root"
    root.mkdir()
    (root / "CUB_200_2011").write_text("not a folder")
    with pytest.raises(UserError, match="cannot move the extracted CUB_200_2011/ to .*remove what is there"):
        extract_folder_from_tar(archive, "CUB_200_2011", root, "the source")
    assert sorted(p.name for p in root.iterdir()) == ["CUB_200_2011"]


def test_ddp_broadcasts_no_buffers(tmp_path):
    """Class statistics and masks are identical on every rank by construction; broadcasting them each step cost
    23 MiB (902 MiB with full covariances) per step."""
    import engine
    from config.cli import parse_args
    from datasets import build_scenario
    from models import create_method
    from utils import DistContext

    cfg = parse_args(["digits_hideprompt", *TINY, "--output_dir", str(tmp_path / "out")])
    method = create_method(cfg, build_scenario(10, 5, False, 0, "digits"))
    method.set_phase(method.phases[0])
    method.begin_task(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = engine.wrap_for_training(method, DistContext())
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        assert model.forward_sync_buffers is False
    finally:
        dist.destroy_process_group()
    assert engine.wrap_for_training(method, DistContext()) is method  # no process group: no DDP


# Under torchrun: each rank trains one step of L2P on CIFAR-style data whose every image is the same picture, so
# that two ranks' batches differ only by their augmentation; writes what each rank saw.
RANK_STREAMS_PROBE = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
import engine
from config.cli import parse_args
from datasets import build_scenario, load_benchmark
from datasets.scenario import LoaderSettings
from models import create_method
from utils import all_gather_objects, cleanup_distributed, init_distributed, seed_everything, seed_rank_streams

workers, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = parse_args(["cifar100_l2p", *{tiny!r}, "--data-path", data, "--num_tasks", "10", "--batch-size", "4"])
ctx = init_distributed("cpu")
benchmark = load_benchmark("Split-CIFAR100", data, 32)
first = benchmark.train.load(0)
benchmark.train.load = lambda index: first
scenario = build_scenario(100, 10, False, 0, "cifar100", benchmark=benchmark,
                          loader=LoaderSettings(batch_size=4, num_workers=workers, seed=0))
seed_everything(cfg.run.seed)
method = create_method(cfg, scenario)
seed_everything(cfg.run.seed)
params = [p for p in method.parameters() if p.requires_grad]
optimizer = engine.create_optimizer([g for g in method.begin_task(0) if g["params"]], cfg)
model = engine.wrap_for_training(method, ctx)
seed_rank_streams(cfg.run.seed, 0, 0)
loader = scenario.train_loader(0)
loader.sampler.set_epoch(0)
images, targets = next(iter(loader))
dropout_draw = torch.rand(3).tolist()
loss, _ = model(images, targets, 0)
engine.optimizer_step(loss, optimizer, torch.amp.GradScaler("cpu", enabled=False), params, 1.0)
trained = torch.cat([p.detach().flatten() for p in params])
initial = method.e_prompt.prompt.detach().flatten()[:64]
seen = all_gather_objects({{"images": images.flatten()[:512].tolist(), "dropout": dropout_draw,
                            "trained": trained.tolist(), "initial": initial.tolist()}})
if ctx.rank == 0:
    json.dump(seen, open(out, "w"))
del model  # DDP's reducer must go before its process group (main.py's goes with each task)
cleanup_distributed()
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("workers", [0, 2])
def test_each_rank_draws_its_own_augmentation_and_all_train_the_same_parameters(tmp_path, workers):
    data = write_fake_cifar100(tmp_path / "data")
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_STREAMS_PROBE.format(repo=str(REPO), tiny=TINY))
    result = run_cli([str(workers), str(data), str(tmp_path / "seen.json")], nproc=2, script=str(probe))
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = read_json(tmp_path / "seen.json")
    assert rank0["initial"] == rank1["initial"]  # initialisation agrees
    assert rank0["images"] != rank1["images"]  # the same picture, augmented differently on each rank
    assert rank0["dropout"] != rank1["dropout"]  # dropout and drop-path draw from per-rank streams too
    assert rank0["trained"] == rank1["trained"]  # and after the step every rank holds the same parameters


# main.py with rank 0's data preparation slowed down (a first run's download) well past --dist_timeout
SLOW_PREPARATION = """
import os, sys, time
sys.path.insert(0, {repo!r})
import datasets.cifar as cifar
prepare = cifar._ensure_present

def slow(root, download):
    if os.environ["RANK"] == "0":
        time.sleep({sleep})
    if os.environ["RANK"] == {failing!r}:
        from utils import UserError
        raise UserError("CIFAR-100 is broken here")
    return prepare(root, download)

cifar._ensure_present = slow
import main
sys.exit(main.main(sys.argv[1:]))
"""


def _cifar_ncm(tmp_path, sleep: float, failing: str = "none") -> subprocess.CompletedProcess:
    data = write_fake_cifar100(tmp_path / "data")
    script = tmp_path / "slow_main.py"
    script.write_text(SLOW_PREPARATION.format(repo=str(REPO), sleep=sleep, failing=failing))
    args = ["cifar100_ncm", *TINY, "--data-path", str(data), "--num_tasks", "1", "--dist_timeout", "0.15",
            "--tensorboard", "False", "--output_dir", str(tmp_path / "out")]
    return run_cli(args, nproc=2, script=str(script))


@pytest.mark.slow
@pytest.mark.distributed
def test_slow_data_preparation_does_not_trip_the_collective_timeout(tmp_path):
    start = time.monotonic()
    result = _cifar_ncm(tmp_path, sleep=20)  # --dist_timeout 0.15 = 9 s
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start > 20
    assert read_json(tmp_path / "out" / "results.json")["final"]["test_images"] == 300


@pytest.mark.slow
@pytest.mark.distributed
def test_a_preparation_failing_on_another_rank_stops_every_rank_with_one_line(tmp_path):
    result = _cifar_ncm(tmp_path, sleep=0, failing="1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: CIFAR-100 is broken here (on rank 1)"], result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# main.py whose CIFAR-100 preparation takes a second and records when it ran
TIMED_PREPARATION = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
import datasets.cifar as cifar
prepare = cifar._ensure_present

def timed(root, download):
    start = time.time()
    time.sleep(1)
    result = prepare(root, download)
    with open({log!r}, "a") as log:
        log.write(json.dumps([os.environ["RANK"], start, time.time()]) + "\\n")
    return result

cifar._ensure_present = timed
import main
sys.exit(main.main(sys.argv[1:]))
"""


def _two_nodes(tmp_path, args: list[str], script: str, cwds: tuple = ()) -> list[tuple[int, str]]:
    """Two ranks started by hand as two nodes would start them: each the first (local rank 0) of its node."""
    port, procs = str(free_port()), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=cwds[rank] if cwds else REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=180) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]


@pytest.mark.slow
@pytest.mark.distributed
def test_nodes_sharing_a_data_folder_prepare_it_in_turn(tmp_path):
    """The first process of each node prepares the data; on a shared data folder the lock makes them take turns."""
    data, log = write_fake_cifar100(tmp_path / "data"), tmp_path / "prepared.jsonl"
    script = tmp_path / "timed_main.py"
    script.write_text(TIMED_PREPARATION.format(repo=str(REPO), log=str(log)))
    args = ["cifar100_ncm", *TINY, "--data-path", str(data), "--num_tasks", "1", "--tensorboard", "False",
            "--output_dir", str(tmp_path / "out")]
    results = _two_nodes(tmp_path, args, str(script))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    first, second = sorted(json.loads(line)[1:] for line in log.read_text().splitlines())
    assert second[0] >= first[1]  # one node's preparation ended before the other's began


@pytest.mark.slow
@pytest.mark.distributed
def test_an_output_folder_not_shared_by_every_rank_stops_the_run(tmp_path):
    """Two ranks in different working directories with a relative --output_dir: each sees a folder of its own, as
    two nodes would with a node-local disk."""
    cwds = (tmp_path / "node0", tmp_path / "node1")
    for cwd in cwds:
        cwd.mkdir()
    results = _two_nodes(tmp_path, ["digits_ncm", "--num_tasks", "1", "--device", "cpu", "--output_dir", "out"],
                         str(REPO / "main.py"), cwds)
    assert [code for code, _ in results] == [2, 2], results[0][1][-2000:]
    errors = [line for line in results[0][1].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "must be on a file system shared by all nodes: rank(s) 1" in errors[0], errors
    assert results[1][1].count("error: ") == 0  # rank 0 alone says it
    assert [p.name for p in (tmp_path / "node0" / "out").iterdir()] == [".lock"]  # nothing of the run written
    assert not (tmp_path / "node1" / "out").exists()



def _sbatch_launches(tmp_path, script: str) -> list[dict]:
    """Run an sbatch example with fake `srun` and `scontrol`; each launch's argv and MASTER_ADDR, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "launched.jsonl"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, os, sys\nwith open({str(log)!r}, 'a') as f:\n"
                                  f"    f.write(json.dumps({{'argv': sys.argv[1:], 'master': "
                                  f"os.environ.get('MASTER_ADDR')}}) + '\\n')\n")
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[017-018]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO),
           "OUTPUT_ROOT": "/shared/out", "DATA_PATH": "/shared/data", "SEED": "40"}
    subprocess.run(["bash", f"training_script/{script}", "--print_freq", "50"], cwd=REPO, env=env, check=True,
                   timeout=60)
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("script", ["slurm_srun.sbatch", "slurm_torchrun.sbatch"])
def test_sbatch_examples_launch_both_hide_stages_on_two_nodes(tmp_path, script):
    from config.cli import parse_args
    from config.settings import HiDeSettings

    stage1, stage2 = _sbatch_launches(tmp_path, script)
    configs = [parse_args(launch["argv"][launch["argv"].index("main.py") + 1:]) for launch in (stage1, stage2)]
    assert configs[0].run.output_dir == "/shared/out/cifar100_sup21k_multi_centroid_mlp_2_seed40"
    assert configs[1].group(HiDeSettings).trained_original_model == configs[0].run.output_dir
    for cfg in configs:
        assert cfg.run.resume and cfg.run.seed == 40 and cfg.data.data_path == "/shared/data"
        assert cfg.run.print_freq == 50  # the script's arguments reach every launch
    if script == "slurm_srun.sbatch":
        assert stage1["argv"][:3] == ["--kill-on-bad-exit=1", "python", "main.py"]
        assert stage1["master"] == "gpu017"
    else:
        assert stage1["argv"][:2] == ["--kill-on-bad-exit=1", "torchrun"]
        assert {"--nnodes=2", "--nproc_per_node=8", "--rdzv_endpoint=gpu017:29500"} <= set(stage1["argv"])
        assert "--rdzv_id=4242-stage1" in stage1["argv"] and "--rdzv_id=4242-stage2" in stage2["argv"]
