"""The frozen pre-trained backbone: any timm VisionTransformer, returning the pooled [CLS] feature.

timm's ViT attention already runs through `torch.nn.functional.scaled_dot_product_attention` (fused attention).
"""
from __future__ import annotations

import difflib

import timm
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from utils import UserError


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.split(".")[0], timm.list_models("vit_*"), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def create_backbone(name: str, pretrained: bool, input_size: int, drop: float = 0.0,
                    drop_path: float = 0.0) -> VisionTransformer:
    """A timm ViT with no classifier (`num_classes=0`), so its output is the pooled, normalised feature."""
    if not timm.is_model(name):
        raise UserError(f"unknown --model {name!r}{_suggest(name)}; any timm ViT name works, "
                        f"see `python -c \"import timm; print(timm.list_models('vit_*'))\"`")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=input_size,
                                  drop_rate=drop, drop_path_rate=drop_path)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise UserError(f"could not load the pretrained weights of {name} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160]}); with no network, put the file in the Hugging Face "
                        f"hub cache (HF_HOME) or run with --pretrained False") from err
    except TypeError as err:
        raise UserError(f"--model {name} is not a VisionTransformer this suite can drive ({err})") from err
    if not isinstance(model, VisionTransformer):
        raise UserError(f"--model {name} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def freeze(module: nn.Module, frozen: bool = True) -> None:
    for param in module.parameters():
        param.requires_grad_(not frozen)
