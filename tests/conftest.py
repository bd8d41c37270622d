"""Shared helpers: run main.py in-process or under torchrun, and a tiny CIFAR-100 tree in the real pickle format."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# tiny, fast, offline model settings for any subcommand
TINY = ["--model", "vit_tiny_patch16_224", "--pretrained", "False", "--input-size", "32", "--num_workers", "0",
        "--device", "cpu"]


def run_main(*args: str) -> int:
    import main
    return main.main(list(args))


def fails_with_one_line(capsys, *args: str) -> str:
    """Runs main in-process, which must fail with exit code 2 and one `error: ` line on stderr; returns that line."""
    capsys.readouterr()
    assert run_main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def folder_snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `folder` (but those under a sub-folder named in `skip`) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not set(skip) & set(p.relative_to(folder).parts)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args: list[str], nproc: int = 0, timeout: int = 300, script: str = "main.py"
            ) -> subprocess.CompletedProcess:
    """`python main.py ...` (or another entry script), or under `torchrun --nproc_per_node=nproc` when nproc > 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def load_script(name: str, path: Path) -> ModuleType:
    """A script outside the package layout (benchmarks/*.py) as module `name`, registered in sys.modules: its
    dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_fake_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 3, seed: int = 0) -> Path:
    """`root/cifar-100-python/{train,test,meta}` as the official archive lays them out (latin1 pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        entry = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                 "data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)}
        with open(folder / split, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, handle)
    return root


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Path:
    return write_fake_cifar100(tmp_path / "data")


def script_commands(script: str, *args: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    """Run a training script with a fake `torchrun` on PATH; return the `main.py` argument lists it launched."""
    bin_dir, log = tmp_path / "fake_bin", tmp_path / "launched.jsonl"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "torchrun"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    run_env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", f"training_script/{script}", *args], cwd=REPO, env=run_env, check=True,
                   capture_output=True, text=True, timeout=60)
    launched = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return [argv[argv.index("main.py") + 1:] for argv in launched]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu`-marked tests need CUDA: skipped where torch sees none."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)



@pytest.fixture
def no_hub_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No connection reaches the network: `socket.create_connection` (used by the hub check and by the hub client's
    transport) is refused, the hub check is made afresh for the default endpoint with no proxy, the hub cache is an
    empty folder. Yields the addresses tried; a test may patch `socket.create_connection` again."""
    import huggingface_hub.constants as hub

    from models.backbones import hub_offline_reason

    tried: list[tuple] = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):  # the hub's own address, whatever the host
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(hub, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    hub_offline_reason.cache_clear()
    yield tried
    hub_offline_reason.cache_clear()  # no later test inherits this one's verdict


def raises_one_line(call, *needles: str) -> str:
    """`call()` raises a UserError of one line holding every needle; returns its message."""
    from utils import UserError
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# images per object folder in each session of the fake tree; sessions 2 and 7 hold two per object, the others one
IMAGES_PER_OBJECT = {session: 2 if session in (2, 7) else 1 for session in range(1, 12)}
TRAIN_ORDER = (1, 2, 4, 5, 6, 8, 9, 11)


def write_fake_core50(root: Path) -> Path:
    """`<root>/core50_128x128/sS/oN/C_S_N_K.png`, 8x8 RGB; each image's red value encodes its session and object."""
    folder = root / "core50_128x128"
    for session, count in IMAGES_PER_OBJECT.items():
        for obj in range(1, 51):
            (folder / f"s{session}" / f"o{obj}").mkdir(parents=True)
            for k in range(count):
                pixels = np.full((8, 8, 3), (session * 20, obj * 5, k * 100), dtype=np.uint8)
                # names in reverse order of k, so a listing that is not sorted would show
                name = f"C_{session:02d}_{obj:02d}_{9 - k}.png"
                Image.fromarray(pixels).save(folder / f"s{session}" / f"o{obj}" / name)
    return root
