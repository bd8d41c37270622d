"""A first hour without network: a hub name fails in seconds with one line (or loads from the local hub cache), a
failed download leaves nothing under --data-path, and every check that needs no data speaks before the data does."""
import io
import os
import socket
import tarfile
import threading
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets as tvd
import torchvision.datasets.utils as tv_utils

import utils
from conftest import TINY, fails_with_one_line, write_fake_cifar100
from datasets.cifar import load_cifar100
from datasets.five_datasets import load_five_datasets
from datasets.imagenet_r import load_imagenet_r
from models import backbones
from models.backbones import build_backbone, hub_offline_reason, resolve_backbone, weights_file
from utils import PREPARATION_LOCK, UserError

DINO_LINE = ("error: could not fetch timm/vit_base_patch16_224.dino from the Hugging Face hub ({cause}); offline, put "
             "dino_vitbase16_pretrain.pth (from https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
             "dino_vitbase16_pretrain.pth) in {checkpoints}, or pass --pretrained_checkpoint PATH")


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch, tmp_path, no_hub_network):
    """Each test in its own folder (an empty ./checkpoints), with no network."""
    monkeypatch.chdir(tmp_path)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- point 4: hub names offline ------------------------------------------------------------------------------------
def test_a_hub_name_with_no_network_fails_at_once_with_one_line(capsys, tmp_path, no_hub_network):
    start = time.monotonic()
    err = fails_with_one_line(capsys, "digits_ncm", "--model", "vit_base_patch16_224_dino", "--pretrained", "True",
                              "--output_dir", str(tmp_path / "out"))
    assert time.monotonic() - start < 10
    assert err == DINO_LINE.format(cause="no connection to huggingface.co:443: Connection refused",
                                   checkpoints=tmp_path / "checkpoints")
    assert no_hub_network == [("huggingface.co", 443)]  # one connection tried, then nothing more
    assert not (tmp_path / "out").exists()


def test_a_connection_that_hangs_counts_as_offline_after_the_check_time(capsys, tmp_path, monkeypatch):
    """Name lookup and connection both stall on some networks; the check gives up after HUB_CHECK_SECONDS (3 s)."""
    release = threading.Event()

    def stall(*args, **kwargs):
        release.wait(60)
        raise TimeoutError("timed out")
    monkeypatch.setattr(socket, "create_connection", stall)
    try:
        start = time.monotonic()
        err = fails_with_one_line(capsys, "digits_ncm", "--model", "vit_base_patch16_224_dino", "--pretrained",
                                  "True", "--output_dir", str(tmp_path / "out"))
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert backbones.HUB_CHECK_SECONDS <= elapsed < 10
    assert err == DINO_LINE.format(cause="no connection to huggingface.co:443 within 3 s",
                                   checkpoints=tmp_path / "checkpoints")


def test_hub_offline_mode_is_taken_at_its_word(no_hub_network, monkeypatch):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"\(the hub client's offline mode is on \(HF_HUB_OFFLINE\)\); offline, put "):
        weights_file(resolve_backbone("vit_base_patch16_224_dino"), None)
    assert no_hub_network == []  # no connection tried


def test_the_check_is_made_once_and_goes_where_the_hub_client_would(no_hub_network, monkeypatch):
    import huggingface_hub.constants as hub

    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: no_hub_network.append(address)
                        or Connection())
    assert hub_offline_reason() is None and hub_offline_reason() is None
    assert no_hub_network == [("huggingface.co", 443)]
    assert weights_file(resolve_backbone("vit_base_patch16_224_dino"), None) is None  # online: timm's hub
    monkeypatch.setattr(hub, "ENDPOINT", "http://mirror.example:8080")
    assert backbones._hub_address() == ("mirror.example", 8080)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert backbones._hub_address() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "mirror.example")
    assert backbones._hub_address() == ("mirror.example", 8080)


def _fake_hub_cache(cache: Path, name: str, cls_value: float) -> None:
    """The layout the hub client leaves: refs/main naming a snapshot that holds timm's model.safetensors."""
    import timm
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = timm.create_model(name.split(".")[0], pretrained=False).state_dict()
    state["cls_token"] = torch.full_like(state["cls_token"], cls_value)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))


def test_weights_in_the_local_hub_cache_load_offline(tmp_path, no_hub_network):
    import huggingface_hub.constants as hub
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    _fake_hub_cache(Path(hub.HF_HUB_CACHE), name, 0.125)
    model = build_backbone(resolve_backbone("vit_tiny_patch16_224"), pretrained=True, input_size=224)
    assert torch.equal(model.cls_token, torch.full((1, 1, 192), 0.125))
    assert f"weights: timm hub timm/{name} (local hub cache) [" in model.weights_summary
    assert no_hub_network == [("huggingface.co", 443)]
    assert hub.HF_HUB_OFFLINE is False  # offline mode only for that load


# --- point 8: nothing under --data-path unless a download succeeds ---------------------------------------------------
def _failing_download(written: list[Path]):
    """A download that gets part of its file, then loses the network."""
    def download_url(url, root, filename=None, md5=None, *args, **kwargs):
        path = Path(root) / (filename or Path(url).name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        written.append(path)
        raise URLError("[Errno -3] Temporary failure in name resolution")
    return download_url


def test_a_failed_cifar_download_leaves_no_data_tree(capsys, tmp_path, monkeypatch):
    written: list[Path] = []
    monkeypatch.setattr(tv_utils, "download_url", _failing_download(written))
    data = tmp_path / "home" / "user" / "data"
    err = fails_with_one_line(capsys, "cifar100_ncm", *TINY, "--data-path", str(data),
                              "--output_dir", str(tmp_path / "out"))
    assert err == (f"error: CIFAR-100 not found in {data / 'cifar-100-python'} and the download from "
                   f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz failed (URLError); extract that archive "
                   f"into {data}")
    assert written and written[0].name == "cifar-100-python.tar.gz"  # the download did write, elsewhere
    assert _tree(tmp_path) == []  # no home/user/data, no output folder, no temporary folder left


def test_a_failed_download_adds_nothing_to_an_existing_data_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_utils, "download_url", _failing_download([]))
    data = tmp_path / "data"
    (data / "other").mkdir(parents=True)
    for load in (load_cifar100, load_imagenet_r):
        with pytest.raises(UserError, match=r"failed \(URLError\)"):
            load(str(data), 32, download=True)
    assert _tree(tmp_path) == ["data", "data/other"]


def test_a_downloaded_archive_is_moved_into_place_whole(tmp_path, monkeypatch):
    """A download that succeeds: the extracted folder (and the archive, as torchvision keeps it) land in --data-path,
    made for it; nothing else does."""
    source = write_fake_cifar100(tmp_path / "source")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source / "cifar-100-python", arcname="cifar-100-python")

    def download_url(url, root, filename=None, md5=None, *args, **kwargs):
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(buffer.getvalue())
    monkeypatch.setattr(tv_utils, "download_url", download_url)
    data = tmp_path / "new" / "data"
    bench = load_cifar100(str(data), 32, download=True)
    assert len(bench.train_targets) == 200 and len(bench.test_targets) == 300
    assert _tree(tmp_path / "new") == ["data", "data/cifar-100-python", "data/cifar-100-python.tar.gz",
                                       "data/cifar-100-python/meta", "data/cifar-100-python/test",
                                       "data/cifar-100-python/train"]


def test_five_datasets_keeps_the_members_downloaded_before_a_failure(tmp_path, monkeypatch):
    def svhn(root, split, download):
        (Path(root) / f"{split}_32x32.mat").write_bytes(b"svhn " + split.encode())

    def mnist(root, train, download):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
        raise URLError("[Errno 101] Network is unreachable")
    monkeypatch.setattr(tvd, "SVHN", svhn)
    monkeypatch.setattr(tvd, "MNIST", mnist)
    data = tmp_path / "data"
    with pytest.raises(UserError, match=r"^5-datasets member MNIST not found and its download from "
                                        r"https://ossci-datasets.s3.amazonaws.com/mnist/ failed \(URLError\)"):
        load_five_datasets(str(data), 32, download=True)
    assert _tree(tmp_path) == ["data", "data/test_32x32.mat", "data/train_32x32.mat"]
    assert (data / "test_32x32.mat").read_bytes() == b"svhn test"


def test_a_failed_preparation_removes_the_folders_it_made_for_its_lock(tmp_path):
    """Under torchrun the data folder is locked while prepared (made for the lock when absent)."""
    def fail() -> None:
        raise UserError("no network")
    assert utils._prepare(fail, tmp_path / "a" / "b", create=True) == (None, "no network")
    assert _tree(tmp_path) == []
    (tmp_path / "kept").mkdir()
    assert utils._prepare(fail, tmp_path / "kept", create=True) == (None, "no network")
    assert _tree(tmp_path) == ["kept"]
    assert utils._prepare(lambda: (tmp_path / "new" / "x").write_text("x"), tmp_path / "new", create=True) == (1, None)
    assert sorted(os.listdir(tmp_path / "new")) == [PREPARATION_LOCK, "x"]  # a success keeps its lock file


# --- point 8: the checks that need no data come first, together ---------------------------------------------------
def test_weight_file_and_stage1_problems_come_together_before_the_data(capsys, tmp_path, monkeypatch):
    called: list[str] = []
    monkeypatch.setattr(tv_utils, "download_url", lambda url, *a, **k: called.append(url))
    data, stage1 = tmp_path / "data", tmp_path / "stage1"
    err = fails_with_one_line(capsys, "cifar100_hideprompt", "--model", "vit_base_patch16_224_mocov3",
                              "--trained_original_model", str(stage1), "--data-path", str(data),
                              "--output_dir", str(tmp_path / "out"), "--device", "cpu")
    assert err == (
        "error: 2 problems: (1) vit_base_patch16_224_mocov3 = vit_base_patch16_224.mocov3_in1k needs its weights "
        "file: put mocov3-vit-base-300ep.pth or vit-b-300ep.pth.tar (published at "
        f"https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar) in {tmp_path / 'checkpoints'}, or "
        f"pass its path with --pretrained_checkpoint (2) --trained_original_model {stage1}: "
        f"{stage1 / 'checkpoint' / 'task1_checkpoint.pth'} is missing (10 of 10 task checkpoints absent); point "
        "--trained_original_model at a finished stage-1 run (--train_inference_task_only; --resume one)")
    assert called == [] and _tree(tmp_path) == []


def test_a_stage1_run_of_another_kind_is_refused_before_the_data(capsys, tmp_path, monkeypatch):
    called: list[str] = []
    monkeypatch.setattr(tv_utils, "download_url", lambda url, *a, **k: called.append(url))
    stage1 = tmp_path / "lora_run" / "checkpoint"
    stage1.mkdir(parents=True)
    for t in range(1, 11):
        torch.save({"config": {"method": "continual_lora"}, "model": {}}, stage1 / f"task{t}_checkpoint.pth")
    err = fails_with_one_line(capsys, "cifar100_hidelora", *TINY, "--trained_original_model", str(stage1.parent),
                              "--data-path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"))
    assert err.startswith(f"error: {stage1 / 'task1_checkpoint.pth'} is not a stage-1 (task-identity) checkpoint of "
                          f"HiDe-Prompt or HiDe-LoRA, which HiDe-LoRA reads (method 'continual_lora', stage None)")
    assert called == [] and not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_an_output_folder_problem_alone_is_one_plain_line(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    err = fails_with_one_line(capsys, "cifar100_ncm", *TINY, "--data-path", str(tmp_path / "data"),
                              "--output_dir", str(tmp_path / "out"))
    assert err.startswith(f"error: --output_dir {tmp_path / 'out'} ") and "problems" not in err
    assert not (tmp_path / "data").exists()


# main.py whose downloads fail as they do with no network
NO_NETWORK_MAIN = """
import sys
from urllib.error import URLError
sys.path.insert(0, {repo!r})
import torchvision.datasets.utils as tv_utils

def no_network(url, root, *args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")

tv_utils.download_url = no_network
import main
sys.exit(main.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_download_under_torchrun_leaves_no_data_tree(tmp_path):
    """Each node's first process makes the data folder to lock it while it downloads; a failure removes it again."""
    from conftest import REPO, run_cli
    script = tmp_path / "no_network_main.py"
    script.write_text(NO_NETWORK_MAIN.format(repo=str(REPO)))
    data = tmp_path / "home" / "data"
    result = run_cli(["cifar100_ncm", *TINY, "--data-path", str(data), "--output_dir", str(tmp_path / "out")],
                     nproc=2, script=str(script))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: CIFAR-100 not found in {data / 'cifar-100-python'} and the download from "
                      f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz failed (URLError); extract that "
                      f"archive into {data}"], result.stderr[-3000:]
    assert _tree(tmp_path) == ["no_network_main.py"]
