"""The backbone table: each name pins one set of pre-trained weights, where they come from and how their files are
laid out, and every weight file goes through one loader that maps its keys to timm's and checks the result.

Names are timm names with a weight tag. Where timm has the weights (`.orig_in21k`, `.augreg_in21k_ft_in1k`, `.dino`)
the name is timm's own and timm fetches them from its hub; the self-supervised weights timm lacks get a name in the
same style and are read from a file in `checkpoints/`. The reference's names are aliases. Any other timm name also
works, pinned to the tag timm resolves it to.

A file is read whatever its layout (detected from its content, so no conversion step is needed): Google `.npz` (read
by timm's own loader), flat state dicts (`.pth`, `.safetensors`), `{'model': ...}`, `{'state_dict': ...}`, iBOT and
MoCo v3 training checkpoints. Keys a layout is known to carry besides the encoder (projection heads, classifiers,
momentum encoders, masked-image-modelling tokens) are dropped and reported; anything else that does not fit the
model is an error naming the keys.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import math
import pickle
import re
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from utils import UserError, warn

if TYPE_CHECKING:  # timm is imported where a model is built, so that --list_backbones does not pay for it
    from timm.models.vision_transformer import VisionTransformer

CHECKPOINTS_DIR = Path("checkpoints")  # relative to the working directory, as in the reference

# Keys no feature extractor uses, whatever the file (our backbones have num_classes=0), and why they are dropped.
_UNUSED_KEYS = ((re.compile(r"^head\."), "classifier or projection head"),
                (re.compile(r"^pre_logits\."), "representation layer"),
                (re.compile(r"^masked_embed$|^mask_token$"), "masked-image-modelling token"))
# Keys a published file names otherwise than timm: Meta's DINOv2 files call timm's `reg_token` `register_tokens`.
_TIMM_NAMES = {"register_tokens": "reg_token"}
# The reference's MoCo v3 model: the final norm is an Identity and a fresh LayerNorm is applied after pooling.
_FRESH_FC_NORM_KEYS = ("fc_norm.weight", "fc_norm.bias")


# ----------------------------------------------------------------------------------------------------------------
# File layouts
# ----------------------------------------------------------------------------------------------------------------
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """How one kind of file stores a ViT. For pickled files, `matches` recognises the loaded object and `extract`
    returns the encoder's tensors under their file names and the number of keys dropped per reason (heads, other
    networks); `.npz` and `.safetensors` files are recognised by their suffix."""

    description: str
    matches: Callable[[dict], bool] | None = None
    extract: Callable[[dict], tuple[Tensors, dict[str, int]]] | None = None


def _split(entries: dict, keep: Callable[[str], str | None], drop_reason: str) -> tuple[Tensors, dict[str, int]]:
    """`keep(key)` gives the key's encoder name, or None to drop it for `drop_reason`."""
    kept, dropped = {}, 0
    for key, value in entries.items():
        name = keep(key)
        if name is None:
            dropped += 1
        else:
            kept[name] = value
    return kept, ({drop_reason: dropped} if dropped else {})


def _prefixed(prefix: str) -> Callable[[str], str | None]:
    return lambda key: key[len(prefix):] if key.startswith(prefix) else None


def _whole(entry: str | None) -> Callable[[dict], tuple[Tensors, dict[str, int]]]:
    return lambda obj: (dict(obj[entry] if entry else obj), {})


IBOT_TRAINING = Layout(
    "iBOT training checkpoint ('teacher' entry, 'backbone.' prefix)",
    matches=lambda obj: isinstance(obj.get("teacher"), dict),
    extract=lambda obj: _split(obj["teacher"], _prefixed("backbone."), "projection head"))
MOCO_V3_TRAINING = Layout(
    "MoCo v3 training checkpoint ('state_dict' entry, 'module.base_encoder.' prefix)",
    matches=lambda obj: isinstance(obj.get("state_dict"), dict)
    and any(k.startswith("module.base_encoder.") for k in obj["state_dict"]),
    extract=lambda obj: _split(obj["state_dict"], _prefixed("module.base_encoder."),
                               "momentum encoder and predictor"))
STATE_DICT_ENTRY = Layout("{'state_dict': ...}", matches=lambda obj: isinstance(obj.get("state_dict"), dict),
                          extract=_whole("state_dict"))
MODEL_ENTRY = Layout("{'model': ...} (DeiT style)", matches=lambda obj: isinstance(obj.get("model"), dict),
                     extract=_whole("model"))
FLAT = Layout("flat state dict", matches=lambda obj: all(isinstance(v, torch.Tensor) for v in obj.values()),
              extract=_whole(None))
GOOGLE_NPZ = Layout("Google ViT .npz (read by timm)")
PICKLED_LAYOUTS = (IBOT_TRAINING, MOCO_V3_TRAINING, STATE_DICT_ENTRY, MODEL_ENTRY, FLAT)  # detection order


def _corrupt(path: Path, err: BaseException) -> UserError:
    detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return UserError(f"cannot read {path}: the file is truncated or corrupt ({type(err).__name__}: {detail}); "
                     f"download it again")


def _read_pickle(path: Path) -> Any:
    # training checkpoints (iBOT, DINO) carry their argparse.Namespace; nothing else but tensors and plain data
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            found = re.search(r"GLOBAL (\S+)", str(err))
            raise UserError(f"{path} holds pickled Python objects besides tensors "
                            f"({found.group(1) if found else 'unknown global'}), which are not loaded for safety; "
                            f"save its state dict alone with torch.save") from err
        raise _corrupt(path, err) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise _corrupt(path, err) from err


def _read_npz(path: Path) -> tuple[Tensors, dict[str, int]]:
    """A Google ViT `.npz` through timm's own reader, into a ViT shaped like the file (read from the arrays), so
    that the result is a timm state dict checked like any other file; the arrays outside the encoder (classifier,
    representation layer) are counted as dropped."""
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer

    try:
        with np.load(path) as npz:
            files = set(npz.files)
            prefix = next((p for p in ("", "opt/target/") if f"{p}embedding/kernel" in files), None)
            if prefix is None:
                raise UserError(f"{path} is not a Google ViT .npz (no 'embedding/kernel' array)")
            block = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
            depth = len({m.group(1) for m in map(block.match, files) if m})
            first = f"{prefix}Transformer/encoderblock_0/"
            query = next((k for k in files if k.startswith(first) and k.endswith("/query/kernel")), None)
            mlp = next((k for k in files if k.startswith(first) and k.endswith("/Dense_0/kernel")), None)
            if not depth or query is None or mlp is None:
                raise UserError(f"{path} is a Google .npz without the classic ViT encoder blocks "
                                f"(Transformer/encoderblock_<i>/...); it cannot be read")
            patch_h, _, in_chans, dim = npz[f"{prefix}embedding/kernel"].shape
            heads = npz[query].shape[1]
            hidden = npz[mlp].shape[1]
            tokens = npz[f"{prefix}Transformer/posembed_input/pos_embedding"].shape[1]
            class_token = f"{prefix}cls" in files
        dropped: dict[str, int] = {}
        encoder = re.compile(re.escape(prefix) + r"(Transformer/|embedding/|cls$)")
        for key in sorted(k for k in files if not encoder.match(k)):
            reason = {"head": "classifier or projection head", "pre_logits": "representation layer"}.get(
                key[len(prefix):].split("/")[0])
            if reason is None:
                raise UserError(f"{path} holds the array {key}, which a plain ViT does not have; "
                                f"it cannot be read as one")
            dropped[reason] = dropped.get(reason, 0) + 1
        grid = math.isqrt(tokens - int(class_token))
        shaped_like_file = VisionTransformer(
            img_size=grid * patch_h, patch_size=patch_h, in_chans=in_chans, embed_dim=dim, depth=depth,
            num_heads=heads, mlp_ratio=hidden / dim, class_token=class_token,
            global_pool="token" if class_token else "avg", num_classes=0)
        shaped_like_file.load_pretrained(str(path))
    except KeyError as err:
        raise UserError(f"{path} lacks the array {err}; the file is incomplete or not a ViT checkpoint") from err
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, RuntimeError) as err:
        raise _corrupt(path, err) from err
    return shaped_like_file.state_dict(), dropped


def read_weights(path: Path) -> tuple[Tensors, Layout, dict[str, int]]:
    """The encoder tensors of a weight file under their file names, its layout, and what it dropped (reason ->
    count). Handles `.npz`, `.safetensors` and torch pickles (`.pth`, `.pt`, `.pth.tar`, any other name)."""
    if path.suffix == ".npz":
        tensors, dropped = _read_npz(path)
        return tensors, GOOGLE_NPZ, dropped
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), FLAT, {}
        except (SafetensorError, OSError) as err:
            raise _corrupt(path, err) from err
    obj = _read_pickle(path)
    layout = next((lay for lay in PICKLED_LAYOUTS if isinstance(obj, dict) and lay.matches(obj)), None)
    if layout is None:
        shown = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path} is not a ViT checkpoint this loader knows (top level: {shown}); expected a state "
                        f"dict, {{'model': ...}}, {{'state_dict': ...}}, or an iBOT / MoCo v3 training checkpoint")
    tensors, dropped = layout.extract(obj)
    return tensors, layout, dropped


def _strip_wrappers(tensors: Tensors) -> Tensors:
    """DistributedDataParallel's `module.` and SSL codes' `backbone.` prefixes, when every key has one."""
    for prefix in ("module.", "backbone."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """One name: a timm architecture, the weights it stands for, and where they come from.

    `hub`: timm's hub has these weights under `name` (a file in checkpoints/ still takes precedence, for offline
    use). `files`: the names accepted in checkpoints/ (the reference's first, then the published one).
    `fresh_fc_norm`: the reference's MoCo v3 head: the checkpoint's final norm is dropped and a fresh, trainable
    LayerNorm (`fc_norm`) is applied to the pooled [CLS] token instead.
    """

    name: str
    arch: str
    weights: str
    url: str = ""
    files: tuple[str, ...] = ()
    hub: bool = False
    aliases: tuple[str, ...] = ()
    layouts: tuple[Layout, ...] = ()
    fresh_fc_norm: bool = False
    alias_used: str | None = field(default=None, compare=False)

    @property
    def fresh_keys(self) -> tuple[str, ...]:
        return _FRESH_FC_NORM_KEYS if self.fresh_fc_norm else ()

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return {"fc_norm": True} if self.fresh_fc_norm else {}

    @property
    def architecture(self) -> str:
        return self.arch + (" with a fresh trainable fc_norm in place of the final norm" if self.fresh_fc_norm else "")

    @property
    def hub_id(self) -> str:
        return f"timm/{self.name}"

    def display_name(self) -> str:
        return f"{self.alias_used} = {self.name}" if self.alias_used else self.name


def _dinov2(size: str, registers: bool) -> Backbone:
    """DINOv2 ViT-S/14 or ViT-B/14, with or without its 4 register tokens: from timm's hub, or Meta's published
    file (its `register_tokens` read as `reg_token`, its `mask_token` dropped, its [CLS] position folded)."""
    letter, name = size[0], f"vit_{size}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"
    meta = f"dinov2_vit{letter}14{'_reg4' if registers else ''}_pretrain.pth"
    return Backbone(name, name.split(".")[0],
                    f"DINOv2 ViT-{letter.upper()}/14{' with 4 register tokens' if registers else ''}, "
                    f"self-supervised on LVD-142M",
                    url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{letter}14/{meta}",
                    files=(meta, f"{name}.safetensors"), hub=True, layouts=(FLAT,))


_IBOT = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
BACKBONES: tuple[Backbone, ...] = (
    Backbone("vit_base_patch16_224.orig_in21k", "vit_base_patch16_224",
             "Sup-21K: the original Google ViT-B/16, supervised on ImageNet-21k (the prompt methods' backbone)",
             url="https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
             files=("ViT-B_16.npz", "vit_base_patch16_224.orig_in21k.safetensors"), hub=True,
             aliases=("vit_base_patch16_224",), layouts=(GOOGLE_NPZ, FLAT)),
    Backbone("vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224",
             "AugReg ViT-B/16, ImageNet-21k then fine-tuned on ImageNet-1k (what the reference's LoRA code loads "
             "as vit_base_patch16_224)",
             url="https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0"
                 "-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
             files=("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
                    "res_224.npz", "vit_base_patch16_224.augreg_in21k_ft_in1k.safetensors"), hub=True,
             layouts=(GOOGLE_NPZ, FLAT)),
    Backbone("vit_base_patch16_224.ibot_in22k", "vit_base_patch16_224",
             "iBOT-21K: iBOT ViT-B/16 teacher, self-supervised on ImageNet-22k",
             url=f"{_IBOT}/vitb_16_pt22k/checkpoint.pth", files=("checkpoint.pth",),
             aliases=("vit_base_patch16_224_21k_ibot",), layouts=(IBOT_TRAINING,)),
    Backbone("vit_base_patch16_224.ibot_in1k", "vit_base_patch16_224",
             "iBOT-1K: iBOT ViT-B/16 teacher, self-supervised on ImageNet-1k",
             url=f"{_IBOT}/vitb_16/checkpoint_teacher.pth",
             files=("ibot_vitbase16_pretrain.pth", "checkpoint_teacher.pth"),
             aliases=("vit_base_patch16_224_ibot",), layouts=(STATE_DICT_ENTRY,)),
    Backbone("vit_base_patch16_224.dino", "vit_base_patch16_224",
             "DINO-1K: DINO ViT-B/16 teacher, self-supervised on ImageNet-1k",
             url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
             files=("dino_vitbase16_pretrain.pth",), hub=True,
             aliases=("vit_base_patch16_224_dino",), layouts=(FLAT,)),
    Backbone("vit_base_patch16_224.mocov3_in1k", "vit_base_patch16_224",
             "MoCo v3-1K: MoCo v3 ViT-B/16 (300 epochs), self-supervised on ImageNet-1k",
             url="https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
             files=("mocov3-vit-base-300ep.pth", "vit-b-300ep.pth.tar"),
             aliases=("vit_base_patch16_224_mocov3",), layouts=(MODEL_ENTRY, MOCO_V3_TRAINING), fresh_fc_norm=True),
    *(_dinov2(size, registers) for size in ("small", "base") for registers in (False, True)),
)
_BY_NAME: dict[str, Backbone] = {b.name: b for b in BACKBONES}
ALIASES: dict[str, str] = {alias: b.name for b in BACKBONES for alias in b.aliases}


def resolve_backbone(name: str, flag: str = "--model") -> Backbone:
    """The table entry for a name or alias; any other timm name becomes an entry pinned to the weight tag timm
    resolves it to (e.g. `vit_tiny_patch16_224` -> `vit_tiny_patch16_224.augreg_in21k_ft_in1k`)."""
    if name in ALIASES:
        return replace(_BY_NAME[ALIASES[name]], alias_used=name)
    if name in _BY_NAME:
        return _BY_NAME[name]
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not timm.is_model(name):
        known = [*_BY_NAME, *ALIASES, *timm.list_models("vit_*")]
        close = difflib.get_close_matches(name, known, n=3) or difflib.get_close_matches(name.split(".")[0], known,
                                                                                          n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown {flag} {name!r}{hint}; `python main.py --list_backbones` shows this suite's names, "
                        f"and any timm ViT name works")
    arch, tag = split_model_name_tag(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as err:
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"{flag} {name}: timm has no weights tagged {tag!r} for {arch} (it has: "
                        f"{', '.join(tags) or 'none'}); `python main.py --list_backbones` shows this suite's "
                        f"names") from err
    pinned = f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else name
    return Backbone(pinned, arch, f"timm's {pinned} weights", url=f"https://huggingface.co/timm/{pinned}",
                    files=(f"{pinned}.safetensors",), hub=True)


# ----------------------------------------------------------------------------------------------------------------
# Where the weights come from
# ----------------------------------------------------------------------------------------------------------------
def find_local_file(backbone: Backbone, folder: Path = CHECKPOINTS_DIR) -> Path | None:
    return next((folder / f for f in backbone.files if (folder / f).is_file()), None)


def weights_file(backbone: Backbone, checkpoint: str | None) -> Path | None:
    """The file to load (`--pretrained_checkpoint`, else one in checkpoints/), or None for timm's hub. A name whose
    weights exist only as a file, with no file, is an error saying where to put which file; so is a hub name while
    the hub is unreachable and its weights are not in the local hub cache (at once, not after the hub's retries)."""
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise UserError(f"weights file {checkpoint} does not exist")
        return path
    local = find_local_file(backbone)
    if local is not None:
        return local
    if backbone.hub:
        reason = hub_offline_reason()
        if reason is not None and not in_hub_cache(backbone):
            raise _hub_unreachable(backbone, reason)
        return None
    raise UserError(f"{backbone.display_name()} needs its weights file: put {' or '.join(backbone.files)} "
                    f"(published at {backbone.url}) in {CHECKPOINTS_DIR.resolve()}, or pass its path with "
                    f"--pretrained_checkpoint")


def _hub_unreachable(backbone: Backbone, cause: BaseException | str) -> UserError:
    if isinstance(cause, BaseException):
        detail = str(cause).strip().splitlines()[0][:100] if str(cause).strip() else ""
        cause = f"{type(cause).__name__}: {detail}"
    return UserError(f"could not fetch {backbone.hub_id} from the Hugging Face hub ({cause}); "
                     f"offline, put {' or '.join(backbone.files)} (from {backbone.url}) in "
                     f"{CHECKPOINTS_DIR.resolve()}, or pass --pretrained_checkpoint PATH")


# How long the one connection check to the hub may take. Without it, a machine with no network spent a minute in the
# hub client's retries ("Retrying in 8s", 12 times) before failing.
HUB_CHECK_SECONDS = 3.0


def _hub_address() -> tuple[str, int]:
    """Where a hub request first connects: the proxy the environment names for the hub's endpoint (HF_ENDPOINT, or
    huggingface.co), unless no_proxy exempts it, else the endpoint itself."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    proxies = getproxies()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not proxy_bypass(host):
        endpoint = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = endpoint.hostname or host
    return host, endpoint.port or (443 if endpoint.scheme == "https" else 80)


@functools.cache
def hub_offline_reason() -> str | None:
    """Why timm's hub cannot be reached, in a few words, or None when it can. Decided once per process: HF_HUB_OFFLINE,
    else one TCP connection to the hub (or its proxy) within HUB_CHECK_SECONDS, name lookup included (made in a
    thread, since a lookup ignores socket timeouts)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "the hub client's offline mode is on (HF_HUB_OFFLINE)"
    host, port = _hub_address()
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_CHECK_SECONDS).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=connect, name="hub-check", daemon=True)
    thread.start()
    thread.join(HUB_CHECK_SECONDS)
    if not outcome:
        return f"no connection to {host}:{port} within {HUB_CHECK_SECONDS:g} s"
    if outcome[0] is not None:
        return f"no connection to {host}:{port}: {outcome[0].strerror or outcome[0] or type(outcome[0]).__name__}"
    return None


def in_hub_cache(backbone: Backbone) -> bool:
    """Whether the hub file timm loads for `backbone` is in the local hub cache (HF_HUB_CACHE), so it loads offline."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone.name)
    if cfg is None or not cfg.hf_hub_id:
        return False
    repo, _, revision = cfg.hf_hub_id.partition("@")
    # timm asks for its cfg's file, else for model.safetensors before pytorch_model.bin
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """The hub client in offline mode (local cache only, no request, no retry) while `offline`; the client reads the
    flag at each request, so setting it here works after import."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# ----------------------------------------------------------------------------------------------------------------
# Loading a file into a model
# ----------------------------------------------------------------------------------------------------------------
def _listing(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _fit_pos_embed(pos: torch.Tensor, model: VisionTransformer, tensors: Tensors) -> tuple[torch.Tensor, str | None]:
    """The file's position embedding for the model's grid and prefix tokens, with timm's resampling.

    The file's own prefix positions are what is left over after a square grid. Extra ones (a [CLS] position the
    model does not embed) are folded into the matching token, so the model computes the same thing."""
    from timm.layers import resample_abs_pos_embed

    if pos.shape == model.pos_embed.shape:
        return pos, None
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    tokens = pos.shape[1]
    file_prefix = next((p for p in dict.fromkeys((model_prefix, 1, 0))
                        if p <= tokens and math.isqrt(tokens - p) ** 2 == tokens - p), None)
    folds_cls = (file_prefix, model_prefix) == (1, 0) and "cls_token" in tensors
    if file_prefix is None or (file_prefix != model_prefix and not folds_cls):
        return pos, None  # left to be reported as a shape mismatch
    grid = math.isqrt(tokens - file_prefix)
    new_grid = tuple(model.patch_embed.grid_size)
    pos = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=[grid, grid], num_prefix_tokens=file_prefix)
    if folds_cls:
        tensors["cls_token"] = tensors["cls_token"] + pos[:, :1]
        pos = pos[:, 1:]
    return pos, f"pos_embed resampled from {grid}x{grid}+{file_prefix} to {new_grid[0]}x{new_grid[1]}+{model_prefix}"


@dataclass
class LoadReport:
    path: Path
    layout: Layout
    loaded: int
    dropped: dict[str, int]
    fresh: tuple[str, ...]
    resampled: str | None

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors from {self.path} ({self.layout.description})"]
        if self.dropped:
            parts.append("dropped as expected: " + ", ".join(f"{reason} ({n} keys)"
                                                             for reason, n in self.dropped.items()))
        if self.fresh:
            parts.append(f"fresh: {', '.join(self.fresh)}")
        if self.resampled:
            parts.append(self.resampled)
        return "; ".join(parts)


def load_weights_file(model: VisionTransformer, path: Path, backbone: Backbone) -> LoadReport:
    """Load `path` into `model`, or raise a UserError naming every key that does not fit:
    missing from the file, unknown to the model, or of another shape."""
    tensors, layout, dropped = read_weights(path)
    tensors = {_TIMM_NAMES.get(k, k): v for k, v in _strip_wrappers(tensors).items()}
    own = model.state_dict()
    for key in list(tensors):
        reason = next((why for pattern, why in _UNUSED_KEYS if pattern.search(key) and key not in own), None)
        if backbone.fresh_fc_norm and key.startswith("norm."):
            reason = "final norm, replaced by a fresh fc_norm"
        if reason:
            del tensors[key]
            dropped[reason] = dropped.get(reason, 0) + 1
    resampled = None
    if "pos_embed" in tensors and "pos_embed" in own:
        tensors["pos_embed"], resampled = _fit_pos_embed(tensors["pos_embed"], model, tensors)
    fresh = tuple(k for k in backbone.fresh_keys if k in own and k not in tensors)
    missing = sorted(set(own) - set(tensors) - set(fresh))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [f"{k} (file {tuple(tensors[k].shape)}, model {tuple(own[k].shape)})"
                  for k in sorted(set(tensors) & set(own)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_listing(keys)}" for label, keys in (
            ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
        raise UserError(f"{path} ({layout.description}) does not fit {backbone.arch}: {'; '.join(problems)}")
    model.load_state_dict({**tensors, **{k: own[k] for k in fresh}}, strict=True)
    return LoadReport(path, layout, len(tensors), dropped, fresh, resampled)


def _create_vit(backbone: Backbone, name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """timm's model `name` (`backbone`'s architecture, or its hub name) with no classifier, or a UserError when it
    is not a timm VisionTransformer."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **backbone.model_kwargs, **kwargs)
    except TypeError as err:
        raise UserError(f"{backbone.arch} is not a VisionTransformer this suite can drive ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise UserError(f"{backbone.arch} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


@functools.cache
def _patch_size(backbone: Backbone) -> tuple[int, int] | None:
    """(height, width) of `backbone`'s patches, read from the model built on the meta device (no weights, no
    memory), or None when its patch embedding pads the image to whole patches itself."""
    with torch.device("meta"):
        embed = _create_vit(backbone, backbone.arch, False).patch_embed
    return None if getattr(embed, "dynamic_img_pad", False) else tuple(getattr(embed, "patch_size", (1, 1)))


def check_input_size(backbone: Backbone, input_size: int, flag: str = "--model") -> None:
    """`input_size` is a whole number of `backbone`'s patches: timm's patch embedding would silently drop the pixels
    past the last whole patch (a 14-pixel patch on a 32-pixel image ignores 4 rows and columns)."""
    patch = _patch_size(backbone)
    side = math.lcm(*patch) if patch else 1
    if input_size % side == 0:
        return
    raise UserError(f"--input-size {input_size} is not a multiple of the patch size {side} of {flag} "
                    f"{backbone.name}: the last {input_size % side} pixel rows and columns would be ignored; use "
                    f"a multiple of {side} (e.g. {input_size - input_size % side + side})")


def build_backbone(backbone: Backbone, pretrained: bool, input_size: int, drop: float = 0.0, drop_path: float = 0.0,
                   checkpoint: str | None = None) -> VisionTransformer:
    """A timm VisionTransformer with no classifier (`num_classes=0`) carrying `backbone`'s weights: from
    `checkpoint`, else from a file in checkpoints/, else from timm's hub; random with `pretrained` False and no
    `checkpoint`. Sets `model.weights_summary` (the line the run prints) and `model.fresh_keys` (parameters no
    checkpoint supplies, which `vit.freeze_pretrained` leaves trainable)."""
    path = weights_file(backbone, checkpoint) if pretrained or checkpoint else None  # raises if offline, not cached
    from_hub = pretrained and path is None
    offline = from_hub and hub_offline_reason() is not None
    try:
        with _hub_offline(offline):
            model = _create_vit(backbone, backbone.name if from_hub else backbone.arch, from_hub,
                                img_size=input_size, drop_rate=drop, drop_path_rate=drop_path)
    except UserError:
        raise
    except Exception as err:  # the hub client raises its own, network and cache errors alike
        if not from_hub:
            raise
        raise _hub_unreachable(backbone, hub_offline_reason() or err) from err
    if path is not None:
        report = load_weights_file(model, path, backbone)
        if checkpoint is None and backbone.layouts and report.layout not in backbone.layouts:
            warn(f"{path} is a {report.layout.description}, but {backbone.name} is published as "
                 f"{' or '.join(lay.description for lay in backbone.layouts)}; is it the right file?")
        source = f"weights: {report.summary()}" + ("" if checkpoint else f" [{backbone.weights}]")
    elif from_hub:
        source = f"weights: timm hub {backbone.hub_id}{' (local hub cache)' if offline else ''} [{backbone.weights}]"
    else:
        source = "random initialisation (--pretrained False)"
    model.weights_summary = f"{backbone.display_name()}, architecture {backbone.architecture}, {source}"
    model.fresh_keys = backbone.fresh_keys
    return model


# ----------------------------------------------------------------------------------------------------------------
# --list_backbones
# ----------------------------------------------------------------------------------------------------------------
def format_backbone_table(folder: Path = CHECKPOINTS_DIR) -> str:
    lines = [f"Backbones for --model / --original_model. Weight files are looked up in {folder.resolve()}; "
             f"--pretrained_checkpoint PATH gives any name its weights from a file.", ""]
    for b in BACKBONES:
        local = find_local_file(b, folder)
        source = ("timm hub " + b.hub_id + ", or a local file (which takes precedence)" if b.hub
                  else "local file only")
        lines += [b.name + (f"   (reference name: {', '.join(b.aliases)})" if b.aliases else ""),
                  f"    architecture  {b.architecture}",
                  f"    weights       {b.weights}",
                  f"    source        {source}",
                  f"    local files   {', '.join(b.files)}: " + (f"PRESENT ({local.name})" if local else "absent"),
                  f"    published at  {b.url}", ""]
    lines.append("Any other timm ViT name works too, pinned to the weight tag timm gives it "
                 "(e.g. vit_tiny_patch16_224 -> vit_tiny_patch16_224.augreg_in21k_ft_in1k), from timm's hub.")
    return "\n".join(lines)
