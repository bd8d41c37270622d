"""Method registry: method name -> class. Adding a method is one file (its class, and its settings dataclass if it
has flags of its own) plus one line in REGISTRY; its subcommands, flags, help and config.json follow from them."""
from __future__ import annotations

from importlib import import_module

from config.resolved import Config
from datasets.scenario import Scenario

from .base import ContinualMethod

# name -> "module:Class" of this package
REGISTRY: dict[str, str] = {
    "finetune": "finetune:Finetune",
    "fix": "fix:Fix",
    "linear": "linear:Linear",
    "ncm": "ncm:NCM",
    "joint": "joint:Joint",
    "l2p": "prompt_pool_method:PromptPoolMethod",  # the three prompt-pool methods differ only in their presets
    "dualprompt": "prompt_pool_method:PromptPoolMethod",
    "sprompt": "prompt_pool_method:PromptPoolMethod",
    "hideprompt": "hideprompt:HiDePrompt",
    "continual_lora": "continual_lora:ContinualLoRA",
    "hidelora": "hidelora:HiDeLoRA",
    "few_shot_lora": "few_shot_lora:SharedLoRA",  # the upstream shared model; the flow around it is few_shot.py
}


def _load(entry: str) -> type[ContinualMethod]:
    module, name = entry.split(":")
    return getattr(import_module(f".{module}", __name__), name)


METHODS: dict[str, type[ContinualMethod]] = {name: _load(entry) for name, entry in REGISTRY.items()}


def create_method(cfg: Config, scenario: Scenario) -> ContinualMethod:
    return METHODS[cfg.method](cfg, scenario)


__all__ = ["METHODS", "REGISTRY", "ContinualMethod", "create_method"]
