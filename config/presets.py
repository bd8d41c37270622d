"""The one preset table: what a subcommand `<dataset>_<method>` resolves to before the command line.

Each row selects by dataset key, method, resolved backbone and HiDe stage ("*" matches any; a tuple matches any of
its entries) and sets field values. Every matching row applies, the less specific first (fewer selectors), rows of
equal specificity in table order; flags given on the command line win over all of them. The values are the
reference's per-config defaults and the settings of its published training scripts, so a bare subcommand runs the
paper's experiment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANY = "*"
SSL_BACKBONES = ("vit_base_patch16_224.ibot_in22k", "vit_base_patch16_224.ibot_in1k", "vit_base_patch16_224.dino",
                 "vit_base_patch16_224.mocov3_in1k")
# HiDe's stage selector: "tii" is a stage-1 launch; the prompt stage's rows also apply to --stage both
PROMPT_STAGES = ("wtp", "both")


@dataclass(frozen=True)
class Preset:
    dataset: str | tuple[str, ...] = ANY
    method: str | tuple[str, ...] = ANY
    backbone: str | tuple[str, ...] = ANY
    stage: str | tuple[str, ...] = ANY
    values: dict[str, Any] = field(default_factory=dict)

    def selectors(self) -> dict[str, str | tuple[str, ...]]:
        return {"dataset": self.dataset, "method": self.method, "backbone": self.backbone, "stage": self.stage}

    @property
    def specificity(self) -> int:
        return sum(value != ANY for value in self.selectors().values())

    def matches(self, selected: dict[str, str]) -> bool:
        return all(want == ANY or selected.get(key) in ((want,) if isinstance(want, str) else want)
                   for key, want in self.selectors().items())


def _p(dataset: str | tuple[str, ...] = ANY, method: str | tuple[str, ...] = ANY, /, *, on_backbone: Any = ANY,
       on_stage: Any = ANY, **values: Any) -> Preset:
    """A row: positional dataset key(s) and method(s), `on_backbone` / `on_stage` selectors, then field values."""
    return Preset(dataset, method, on_backbone, on_stage, values)


PROMPT_METHODS = ("l2p", "dualprompt", "sprompt")
# what every Split Digits variant runs with: a tiny random ViT on 32 px images, offline, in about a minute
DIGITS_RUN: dict[str, Any] = dict(model="vit_tiny_patch16_224", original_model="vit_tiny_patch16_224",
                                  pretrained=False, input_size=32, batch_size=16, epochs=2, num_workers=0,
                                  pin_mem=False, print_freq=20)
DIGITS = ("digits", "digitsgaussian", "digitsdomain")
HIDE_METHODS = ("hideprompt", "hidelora")

PRESETS: list[Preset] = [
    # --- datasets ---------------------------------------------------------------------------------------------
    _p("cifar100", dataset="Split-CIFAR100", num_classes=100, num_tasks=10),
    _p("imr", dataset="Split-Imagenet-R", num_classes=200, num_tasks=10),
    _p("cub", dataset="Split-CUB200", num_classes=200, num_tasks=10),
    _p("five_datasets", dataset="5-datasets", num_classes=50, num_tasks=5, batch_size=16),
    _p("digits", dataset="Split-Digits", num_classes=10, num_tasks=5, **DIGITS_RUN),
    # task-free and domain-incremental streams (methods that need task boundaries refuse them)
    _p("cifar100gaussian", dataset="Split-CIFAR100", num_classes=100, num_tasks=200, scenario="gaussian",
       protocol="online", steps_per_task=-1, reinit_optimizer=False, batch_size=16),
    _p("core50", dataset="CORe50", num_classes=50, num_tasks=8, scenario="domain", input_size=224),
    _p("digitsgaussian", dataset="Split-Digits", num_classes=10, num_tasks=10, scenario="gaussian", protocol="online",
       steps_per_task=-1, gaussian_width=1.0, reinit_optimizer=False, **DIGITS_RUN),
    _p("digitsdomain", dataset="Digits-Domains", num_classes=10, num_tasks=3, scenario="domain", **DIGITS_RUN),
    # --- methods ----------------------------------------------------------------------------------------------
    _p(ANY, "finetune", lr=0.001),
    _p(ANY, "fix", lr=0.001),
    _p(ANY, "ncm", epochs=0),
    _p(ANY, "joint", lr=0.001, num_tasks=1),
    # L2P: prompt tuning before block 0, top-4 of 10 slots by key matching, pull constraint 0.1
    _p(ANY, "l2p", e_prompt_layer_idx=[0], use_prefix_tune_for_e_prompt=False, length=5, top_k=4,
       use_prompt_mask=False, shared_prompt_pool=False, batchwise_prompt=True, pull_constraint_coeff=0.1),
    _p(ANY, "dualprompt", use_g_prompt=True, g_prompt_layer_idx=[0, 1], e_prompt_layer_idx=[2, 3, 4]),
    # HiDe-Prompt: prefix E-prompts at blocks 0-4, slot t for task t, no keys
    _p(ANY, "hideprompt", original_model_mlp_structure=[2], sched="step", warmup_epochs=0),
    # the LoRA configs clip at 2.0; HiDe-LoRA's stage 1 is HiDe-Prompt's, which clips at 1.0
    _p(ANY, "continual_lora", lora_type="continual", clip_grad=2.0),
    _p(ANY, "hidelora", lora_type="hide", clip_grad=2.0, tii_clip_grad=1.0, original_model_mlp_structure=[2]),
    _p(ANY, "few_shot_lora", clip_grad=2.0),
    # --- (dataset, method) cells --------------------------------------------------------------------------------
    _p(DIGITS, ("finetune", "fix"), lr=0.01),
    _p(DIGITS, "joint", lr=0.01, epochs=4),
    _p(DIGITS, "linear", lr=0.3),
    _p("cifar100", "sprompt", batchwise_prompt=True),
    _p("cifar100", ("dualprompt", "sprompt"), epochs=40),  # the reference README's CIFAR-100 epochs (L2P: 5)
    _p("imr", PROMPT_METHODS, epochs=50, lr=0.005),
    _p("cub", PROMPT_METHODS, sched="step", warmup_epochs=0),
    _p("cifar100gaussian", "l2p", top_k=5),  # the Gaussian stream's L2P: top-5 of 10
    _p("five_datasets", "l2p", size=20, length=10, pull_constraint_coeff=0.5),
    _p("five_datasets", "dualprompt", size=5, length=40, g_prompt_length=10, batchwise_prompt=True,
       pull_constraint_coeff=0.5),
    _p("five_datasets", "sprompt", size=5, length=40, batchwise_prompt=True, pull_constraint_coeff=0.5,
       warmup_epochs=0),
    _p("five_datasets", "hideprompt", size=5, length=40, original_model_mlp_structure=[4, 4], reg=0.0, prompt_key=True,
       sched="constant", warmup_epochs=5, tii_lr=0.001),
    _p("digits", HIDE_METHODS, tii_lr=0.01, tii_epochs=2, crct_epochs=5, n_centroids=3),
    _p("digits", "hideprompt", length=5),
    _p("cub", "hideprompt", tii_lr=0.01),
    # --- HiDe-Prompt with the Sup-21K ViT: the paper's two launches (stage 1 = tii, stage 2 = wtp/both) ----------
    _p("cifar100", "hideprompt", on_stage="tii", epochs=20, lr=0.0005, sched="constant"),
    _p("cifar100", "hideprompt", prompt_momentum=0.01),
    _p("cifar100", "hideprompt", on_stage=PROMPT_STAGES, epochs=50, length=5, reg=0.1, larger_prompt_lr=True),
    _p("imr", "hideprompt", on_stage="tii", epochs=20, lr=0.0005),
    _p("imr", "hideprompt", on_stage=PROMPT_STAGES, epochs=150, sched="cosine", length=20, reg=0.5,
       prompt_momentum=0.01, larger_prompt_lr=True),
    _p("cub", "hideprompt", on_stage="tii", epochs=20, lr=0.01),
    _p("cub", "hideprompt", on_stage=PROMPT_STAGES, epochs=50, length=20, reg=0.01, prompt_momentum=0.01,
       larger_prompt_lr=True),
    _p("five_datasets", "hideprompt", on_stage="tii", batch_size=32, epochs=20, lr=0.001),
    _p("five_datasets", "hideprompt", on_stage=PROMPT_STAGES, batch_size=32, epochs=20, lr=0.03, clip_grad=2.0,
       reg=0.1, prompt_momentum=0.01, larger_prompt_lr=True),
    # --- HiDe-Prompt with the self-supervised backbones (iBOT-21K/1K, DINO, MoCo v3); 5-datasets as above ------
    _p(("cifar100", "imr", "cub"), "hideprompt", on_backbone=SSL_BACKBONES, on_stage="tii", epochs=20, lr=0.0005,
       sched="step"),
    _p("cifar100", "hideprompt", on_backbone=SSL_BACKBONES, on_stage=PROMPT_STAGES, epochs=20, sched="step",
       prompt_momentum=0.1),
    _p("imr", "hideprompt", on_backbone=SSL_BACKBONES, on_stage=PROMPT_STAGES, epochs=50, sched="constant"),
    # --- LoRA: continual LoRA and HiDe-LoRA's stage 2 on the AugReg ViT -------------------------------------------
    _p("cifar100", ("continual_lora", "hidelora"), epochs=20, lr=0.01, lora_rank=8),
    _p("imr", ("continual_lora", "hidelora"), epochs=50, lr=0.03, sched="cosine", lora_rank=5),
    _p("imr", "hidelora", reg=0.001, lora_momentum=0.1),
    # --- few-shot LoRA: the upstream datasets and each one's continual / few-shot / task split ------------------
    _p("imr", "few_shot_lora", datasets=["Split-Imagenet-R"], continual_classes_per_dataset=[160],
       few_shot_classes_per_dataset=[40], tasks_per_dataset=[8], epochs=50, lr=0.01, lora_rank=8, num_fs_epochs=50,
       num_episodes=50, fs_backbone="shared"),
    _p("cub_cars", "few_shot_lora", datasets=["Split-Cars196", "Split-CUB200"],
       continual_classes_per_dataset=[160, 160], few_shot_classes_per_dataset=[36, 40], tasks_per_dataset=[8, 8],
       num_fs_epochs=50, fs_backbone="vanilla+shared"),
    _p("digits", "few_shot_lora", datasets=["Split-Digits"], continual_classes_per_dataset=[6],
       few_shot_classes_per_dataset=[4], tasks_per_dataset=[3], num_ways=4, num_queries=30, num_episodes=10,
       num_fs_epochs=20, fs_lr=0.01, lr=0.3, fs_backbone="shared"),
]

# the reference's config names for two methods
SUBCOMMAND_SUFFIX_ALIASES = {"_sprompt_5e": "_sprompt", "_hideprompt_5e": "_hideprompt"}


def dataset_keys() -> list[str]:
    """The dataset keys of the rows that select a dataset alone (the benchmarks every method runs on)."""
    keys = [row.dataset for row in PRESETS if row.method == ANY and isinstance(row.dataset, str)]
    return [k for k in keys if k != ANY]


def own_dataset_keys(method: str) -> list[str]:
    """The dataset keys of the rows written for `method` alone (a method whose datasets are its own)."""
    keys: list[str] = []
    for row in PRESETS:
        if row.method == method and isinstance(row.dataset, str) and row.dataset != ANY and row.dataset not in keys:
            keys.append(row.dataset)
    return keys


def preset_values(selected: dict[str, str]) -> dict[str, Any]:
    """The field values every row matching `selected` (dataset, method, backbone, stage) sets, resolved in order."""
    values: dict[str, Any] = {}
    for row in sorted((r for r in PRESETS if r.matches(selected)), key=lambda r: r.specificity):
        values.update(row.values)
    return values


# --reference_mode: the reference's behaviour where this suite's default differs (only the settings a method reads
# are switched; a flag given on the command line wins)
REFERENCE_MODE: dict[str, Any] = {"legacy_prefix_reshape": True, "stats_per_class": True, "eval_all_classes": True,
                                  "amp": "none", "lora_init": "reference"}


def reference_mode_values(values: dict[str, Any], dataset_key: str, method: str) -> dict[str, Any]:
    """What --reference_mode sets for this subcommand: REFERENCE_MODE, and the test-time vote over each batch where
    the reference's configs vote (the prompt methods' batchwise_prompt presets, HiDe-Prompt on 5-datasets)."""
    vote = bool(values.get("batchwise_prompt")) or (dataset_key, method) == ("five_datasets", "hideprompt")
    return {**REFERENCE_MODE, "batchwise_prompt_eval": vote}
