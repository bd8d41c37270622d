"""Method registry: `--method` name -> class. Adding a method is one file plus one entry here."""
from __future__ import annotations

from argparse import Namespace

from datasets.scenario import Scenario

from .base import ContinualMethod
from .continual_lora import ContinualLoRA
from .few_shot_lora import SharedLoRA
from .finetune import Finetune
from .hidelora import HiDeLoRA
from .hideprompt import HiDePrompt
from .fix import Fix
from .joint import Joint
from .linear import Linear
from .ncm import NCM
from .prompt_pool_method import PromptPoolMethod

METHODS: dict[str, type[ContinualMethod]] = {
    "finetune": Finetune,
    "fix": Fix,
    "linear": Linear,
    "ncm": NCM,
    "joint": Joint,
    "l2p": PromptPoolMethod,         # the three prompt-pool methods differ only in their presets (config.py)
    "dualprompt": PromptPoolMethod,
    "sprompt": PromptPoolMethod,
    "hideprompt": HiDePrompt,
    "continual_lora": ContinualLoRA,
    "hidelora": HiDeLoRA,
    "few_shot_lora": SharedLoRA,  # the upstream shared model; the flow around it is few_shot.py
}


def create_method(cfg: Namespace, scenario: Scenario) -> ContinualMethod:
    return METHODS[cfg.method](cfg, scenario)


__all__ = ["METHODS", "ContinualMethod", "create_method"]
