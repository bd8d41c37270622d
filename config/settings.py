"""The typed settings every run reads, one frozen dataclass per component; a field is a command-line flag.

A field's metadata gives its help text, the reference's spellings (`--batch-size`), choices and minimum. Both the
dashed and the underscored spelling of every flag parse. Method-specific groups live here when several methods share
them; a method with flags of its own declares its dataclass in its own file, the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# the cosine/step/... schedulers timm provides, plus the reference's constant LR
SCHEDULERS = ("constant", "step", "cosine", "tanh", "multistep", "poly", "plateau")
STATISTICS_KINDS = ("covariance", "variance", "multi-centroid")


def setting(default: Any, help: str = "", *, flags: tuple[str, ...] = (), choices: tuple[Any, ...] | None = None,
            minimum: float | None = None, positive: bool = False, nargs: str | None = None,
            negative: tuple[str, ...] = (), saved: bool = True, metavar: str | None = None) -> Any:
    """A dataclass field that is also a flag: `flags` are extra spellings (the first is shown in help), `negative`
    spellings store False, `saved=False` keeps it out of config.json (launcher details). Numbers are checked at parse
    time against `minimum` / `positive` (and floats for being finite)."""
    meta = dict(help=help, flags=flags, choices=choices, minimum=minimum, positive=positive, nargs=nargs,
                negative=negative, saved=saved, metavar=metavar)
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: value, metadata=meta)
    return field(default=default, metadata=meta)


class SettingsGroup:
    """Base of every settings dataclass: `title` heads its section in --help, `key` names it in config.json."""

    title = ""
    key = ""


# ----------------------------------------------------------------------------------------------------------------
# Read by every method
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSettings(SettingsGroup):
    title, key = "run", "run"
    output_dir: str = setting(None, "where the run writes config.json, results.json, TensorBoard events and task "
                              "checkpoints; default: a folder of its own, ./output/<subcommand>_seed<seed> (_2, _3... "
                              "when that one holds a run; with --resume or --eval, the last of them)",
                              flags=("--output_dir", "--output-dir"), metavar="DIR")
    device: str = setting("auto", "auto (CUDA when available), cuda or cpu")
    seed: int = setting(42, "seeds the class order (with --shuffle), initialisation and data order")
    amp: str = setting("auto", "mixed precision; auto = bf16 where it is native (GPUs of compute capability 8.0 or "
                       "later, CPUs with AVX512-BF16/AMX), else fp32 (none); fp16 needs CUDA; none for fp32 parity "
                       "with the reference",
                       choices=("auto", "none", "bf16", "fp16"))
    compile: str = setting("auto", "torch.compile the training forward and the evaluation forward (same results "
                           "within floating-point rounding; the first steps take the compilation time). auto turns "
                           "it on where it has been measured faster: nowhere yet, so auto is off (on CPU it stays "
                           "off); on falls back to uncompiled, with one warning, where compilation fails",
                           choices=("auto", "on", "off"))
    deterministic: bool = setting(False, "deterministic kernels (torch.use_deterministic_algorithms, cuDNN without "
                                  "autotuning, cuBLAS workspace :4096:8): bitwise-repeatable CUDA runs on the same "
                                  "GPU type, driver and libraries, a few % to ~30% slower depending on the ops (the "
                                  "fused attention backward takes a deterministic kernel); an op without one stops "
                                  "the run naming it. CPU runs repeat without it")
    reference_mode: bool = setting(False, "the reference's own behaviour wherever this suite's default differs, to "
                                   "reproduce its published numbers: every switch it turns on is printed, and a flag "
                                   "given on the command line still wins")
    threads: int | None = setting(None, "CPU threads per process (torch.set_num_threads); default: OMP_NUM_THREADS "
                                  "when set, else on CPU the cores this process may use shared among the node's "
                                  "processes, at most 8 (more only contend on small models); on GPU, torch's own",
                                  minimum=1)
    eval: bool = setting(False, "re-evaluate the task checkpoints in --output_dir, train nothing")
    resume: bool = setting(False, "continue a stopped run in --output_dir from its last finished task")
    stop_after_task: int | None = setting(None, "stop after this many tasks (split a run over job time limits; "
                                          "--resume continues)")
    print_freq: int = setting(10, "log every N training steps (non-terminal output)")
    tensorboard: bool = setting(True, "write TensorBoard events to output_dir/tensorboard")
    wandb: bool = setting(False, "also log to Weights & Biases (needs `pip install wandb`): the TensorBoard scalars, "
                          "the config and the provenance")
    wandb_project: str = setting("hide-cl", "W&B project")
    wandb_entity: str | None = setting(None, "W&B entity (user or team; default: wandb's own default)")
    wandb_name: str | None = setting(None, "W&B run name (default: the name of --output_dir)")
    wandb_mode: str = setting("auto", "W&B mode; auto: WANDB_MODE when set, else online when api.wandb.ai answers, "
                              "offline when not (upload later with `wandb sync`)",
                              choices=("auto", "online", "offline"))
    print_config: bool = setting(False, "print the resolved config as JSON and exit", saved=False)


@dataclass(frozen=True)
class DistSettings(SettingsGroup):
    title, key = "distributed (set by the launcher)", "dist"
    dist_url: str = setting("env://", "process-group init method")
    dist_timeout: float = setting(30.0, "minutes a process waits for the others in a collective before the run stops "
                                  "(a dead or hung process ends the run after this long); leave room for rank 0's "
                                  "downloads and checkpoint writes", positive=True)
    local_rank: int | None = setting(None, "set by torch.distributed.launch without --use_env",
                                     flags=("--local_rank", "--local-rank"), saved=False)


@dataclass(frozen=True)
class OptimSettings(SettingsGroup):
    title, key = "optimisation", "optim"
    batch_size: int = setting(24, "per-process batch", flags=("--batch-size",), minimum=1)
    epochs: int = setting(5, "epochs per task", minimum=0)
    lr: float = setting(0.03, "base LR, scaled by batch/256 (see --unscale_lr)", positive=True)
    unscale_lr: bool = setting(True, "scale the LR by the per-process batch (True) or the global batch")
    opt: str = setting("adam", "timm optimizer name")
    opt_eps: float = setting(1e-8, "optimizer epsilon", flags=("--opt-eps",))
    opt_betas: tuple[float, ...] = setting((0.9, 0.999), "Adam betas", flags=("--opt-betas",), nargs="+")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0, "one flag under both spellings (the reference's second one never took "
                                  "effect)", flags=("--weight-decay",), minimum=0)
    clip_grad: float = setting(1.0, "gradient-norm clipping; 0 or less disables it", flags=("--clip-grad",))
    reinit_optimizer: bool = setting(True, "a fresh optimizer and scheduler for every task")
    sched: str = setting("constant", "constant, or a timm scheduler name", choices=SCHEDULERS)
    warmup_epochs: int = setting(5, "scheduler warm-up epochs", flags=("--warmup-epochs",))
    warmup_lr: float = setting(1e-6, "scheduler warm-up start LR", flags=("--warmup-lr",))
    min_lr: float = setting(1e-5, "scheduler floor", flags=("--min-lr",))
    decay_epochs: float = setting(30, "step scheduler period", flags=("--decay-epochs",))
    decay_rate: float = setting(0.1, "step scheduler factor", flags=("--decay-rate", "--dr"))
    cooldown_epochs: int = setting(10, "scheduler cool-down epochs", flags=("--cooldown-epochs",))
    patience_epochs: int = setting(10, "plateau scheduler patience", flags=("--patience-epochs",))
    lr_noise: tuple[float, ...] | None = setting(None, "scheduler LR noise window", flags=("--lr-noise",), nargs="+")
    lr_noise_pct: float = setting(0.67, "scheduler LR noise share", flags=("--lr-noise-pct",))
    lr_noise_std: float = setting(1.0, "scheduler LR noise std", flags=("--lr-noise-std",))
    train_mask: bool = setting(True, "mask the logits of classes outside the current task")


@dataclass(frozen=True)
class DataSettings(SettingsGroup):
    title, key = "data", "data"
    data_path: str = setting("./data", "where the benchmarks are (or are downloaded to)", flags=("--data-path",))
    dataset: str = setting("", "benchmark name (set by the subcommand)")
    num_classes: int = setting(0, "classes of the benchmark (set by the subcommand)")
    num_tasks: int = setting(10, "tasks the classes are split into", minimum=1)
    shuffle: bool = setting(False, "shuffle the class order with --seed")
    num_workers: int = setting(4, "data-loading processes per rank", minimum=0)
    pin_mem: bool = setting(True, "pinned host memory for the loaders (CUDA)", flags=("--pin-mem",),
                            negative=("--no-pin-mem", "--no_pin_mem"))
    task_inc: bool = setting(False, "task-incremental evaluation: mask to the evaluated task's classes")
    eval_all_classes: bool = setting(False, "evaluation takes the argmax over every class of the head, the untrained "
                                     "rows of classes not seen yet included, as the reference (default: among the "
                                     "classes seen so far)")
    stats_per_class: bool = setting(False, "class statistics computed in batches of one class each, as the reference "
                                    "(with --legacy_prefix_reshape a sample's prompt depends on its batch, so only "
                                    "this reproduces its statistics; default: mixed-class batches of the task)")


@dataclass(frozen=True)
class BackboneSettings(SettingsGroup):
    title, key = "model (python main.py --list_backbones shows the names)", "backbone"
    # `.orig_in21k` pins the original Google ImageNet-21k ViT-B/16 of the prompt papers, which the reference's name
    # vit_base_patch16_224 (an alias here) meant in its prompt code
    model: str = setting("vit_base_patch16_224.orig_in21k", "a backbone table name, a reference alias or any timm "
                         "ViT name")
    pretrained: bool = setting(True, "load the name's pre-trained weights (a file in ./checkpoints, else timm's hub)")
    pretrained_checkpoint: str | None = setting(
        None, "weight file for --model (.npz, .pth, .pt, .pth.tar, .safetensors; layout detected), and for "
        "--original_model when it names the same backbone", metavar="PATH")
    input_size: int = setting(224, "image side in pixels", flags=("--input-size",), minimum=16)
    drop: float = setting(0.0, "dropout of the backbone")
    drop_path: float = setting(0.0, "stochastic depth of the backbone", flags=("--drop-path",))


@dataclass(frozen=True)
class CompatSettings(SettingsGroup):
    """Flags of the reference that change nothing here: accepted so its command lines run, with one warning each."""

    title, key = "accepted for compatibility with the reference, no effect", "compat"
    init_lr: tuple[str, ...] | None = setting(None, nargs="*")
    milestones: tuple[str, ...] | None = setting(None, nargs="*")
    ca_epochs: tuple[str, ...] | None = setting(None, nargs="*")
    initializer: tuple[str, ...] | None = setting(None, nargs="*")
    predefined_key: tuple[str, ...] | None = setting(None, nargs="*")
    mask_first_epoch: tuple[str, ...] | None = setting(None, nargs="*")
    separated_head: tuple[str, ...] | None = setting(None, nargs="*")
    global_pool: tuple[str, ...] | None = setting(None, nargs="*")
    lora_pool: tuple[str, ...] | None = setting(None, nargs="*")
    color_jitter: tuple[str, ...] | None = setting(None, nargs="*")
    aa: tuple[str, ...] | None = setting(None, nargs="*")
    smoothing: tuple[str, ...] | None = setting(None, nargs="*")
    train_interpolation: tuple[str, ...] | None = setting(None, nargs="*")
    reprob: tuple[str, ...] | None = setting(None, nargs="*")
    remode: tuple[str, ...] | None = setting(None, nargs="*")
    recount: tuple[str, ...] | None = setting(None, nargs="*")
    freeze: tuple[str, ...] | None = setting(None, nargs="*")
    head_type: str | None = setting(None)
    world_size: int | None = setting(None)
    prompt_pool: bool | None = setting(None)
    prompt_key_init: str | None = setting(None)
    embedding_key: str | None = setting(None)
    same_key_value: bool | None = setting(None)


COMMON_GROUPS: tuple[type, ...] = (RunSettings, DistSettings, OptimSettings, DataSettings, BackboneSettings)


@dataclass(frozen=True)
class StreamSettings(SettingsGroup):
    """How the data arrives: by task and epoch (offline) or as a single-pass stream, and what a task is."""

    title, key = "streams (online protocol, task-free and domain-incremental scenarios)", "stream"
    scenario: str = setting("class", "class: tasks split the classes; domain: every task holds every class in a new "
                            "domain (CORe50's sessions); gaussian: task-free episodes whose classes follow Gaussian "
                            "presence curves (online only). Set by the subcommand's dataset",
                            choices=("class", "domain", "gaussian"))
    protocol: str = setting("offline", "offline: --epochs per task; online: one pass over each task's stream, each "
                            "batch predicted before it is learned from, every test set evaluated "
                            "--continual_evaluations times per task", choices=("offline", "online"))
    online_batch_size: int | None = setting(None, "online: images per step of the stream over all processes "
                                            "(default: --batch-size x processes)", minimum=1)
    continual_evaluations: int = setting(1, "online: evaluations per task at evenly spaced points of its stream, the "
                                         "last at its end (gaussian: over the whole schedule)", minimum=1)
    eval_window: int = setting(1000, "online: test-then-train accuracy over windows of this many training images",
                               minimum=1)
    steps_per_task: int = setting(-1, "gaussian: batches per episode (-1: every training image of its label set)")
    gaussian_width: float = setting(50.0, "gaussian: width of each class's presence curve, in schedule positions",
                                    positive=True)


# ----------------------------------------------------------------------------------------------------------------
# Shared by several methods
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryModelSettings(SettingsGroup):
    title, key = "query / task-identity model", "query"
    original_model: str = setting("vit_base_patch16_224.orig_in21k", "query / task-identity model; follows "
                                  "--model unless given (give both for the reference's two-backbone runs)")
    original_model_checkpoint: str | None = setting(
        None, "weight file for --original_model (default: --pretrained_checkpoint when both name the same backbone, "
        "else the name's own weights)", metavar="PATH")


@dataclass(frozen=True)
class SlotSettings(SettingsGroup):
    title, key = "instruction slots", "slots"
    size: int = setting(10, "prompt pool size (HiDe: slots, one per task)", minimum=1)


@dataclass(frozen=True)
class EPromptSettings(SettingsGroup):
    title, key = "E-prompts", "e_prompt"
    use_e_prompt: bool = setting(True, "task-specific E-prompts from the pool")
    e_prompt_layer_idx: tuple[int, ...] = setting((0, 1, 2, 3, 4), "blocks that take E-prompts", nargs="*")
    use_prefix_tune_for_e_prompt: bool = setting(True, "E-prompts as prefixes (False: prompt tokens)")
    length: int = setting(20, "E-prompt length", minimum=1)
    use_prompt_mask: bool = setting(True, "train task t on slot t (else on the key-matched slots)")
    shared_prompt_pool: bool = setting(True, "initialise slot t from slot t-1")
    batchwise_prompt_eval: bool = setting(False, "test: majority vote per batch as the reference does (leaks task "
                                          "identity; off by default)")
    legacy_prefix_reshape: bool = setting(False, "reproduce the reference's prefix reshape without permute (mixes "
                                          "keys/values across samples)")


@dataclass(frozen=True)
class PromptPoolSettings(SettingsGroup):
    title, key = "prompt pool (l2p, dualprompt, sprompt)", "prompt_pool"
    use_g_prompt: bool = setting(False, "task-shared G-prompt (DualPrompt)")
    g_prompt_length: int = setting(5, "G-prompt length", minimum=1)
    g_prompt_layer_idx: tuple[int, ...] = setting((), "blocks that take the G-prompt", nargs="*")
    use_prefix_tune_for_g_prompt: bool = setting(True, "G-prompt as key/value prefix")
    top_k: int = setting(1, "slots chosen per image", minimum=1)
    prompt_key: bool = setting(True, "learnable keys")
    shared_prompt_key: bool = setting(False, "initialise key t from key t-1 too")
    batchwise_prompt: bool = setting(False, "training: one majority-voted selection per batch")
    pull_constraint: bool = setting(True, "subtract coeff x key-query similarity from the loss")
    pull_constraint_coeff: float = setting(1.0, "weight of the pull constraint")


@dataclass(frozen=True)
class HiDeSettings(SettingsGroup):
    title, key = "HiDe stages (hideprompt, hidelora)", "hide"
    stage: str = setting("auto", "tii: stage 1 only (task-identity inference); wtp: stage 2 only, reading stage 1 "
                         "from --trained_original_model; both: the two stages task by task in one run. auto: tii with "
                         "--train_inference_task_only, wtp with --trained_original_model, else both",
                         choices=("auto", "tii", "wtp", "both"))
    train_inference_task_only: bool = setting(False, "the reference's switch for stage 1 (= --stage tii)")
    trained_original_model: str = setting("", "stage 1's --output_dir, read by stage 2")
    original_model_mlp_structure: tuple[int, ...] = setting(
        (2,), "hidden widths of the residual MLP mapping, as multiples of the feature size ([] = none)", nargs="*")
    reg: float = setting(0.01, "weight of the contrastive regularisation (stage 2)", minimum=0)


@dataclass(frozen=True)
class TaskIdentitySettings(SettingsGroup):
    title, key = "HiDe stage 1 inside --stage both", "tii"
    tii_epochs: int = setting(20, "stage-1 epochs per task in --stage both", minimum=0)
    tii_lr: float = setting(0.0005, "stage-1 base LR in --stage both (constant schedule)", positive=True)
    tii_clip_grad: float | None = setting(None, "stage-1 gradient clipping in --stage both (default: --clip-grad)")


@dataclass(frozen=True)
class TaskAdaptiveSettings(SettingsGroup):
    title, key = "task-adaptive prediction (HiDe)", "tap"
    ca_storage_efficient_method: str = setting("multi-centroid", "class statistics kept for task-adaptive "
                                               "prediction", choices=STATISTICS_KINDS)
    n_centroids: int = setting(10, "k-means centroids per class (multi-centroid)", minimum=1)
    crct_epochs: int = setting(30, "task-adaptive prediction epochs", minimum=0)
    ca_lr: float = setting(0.005, "task-adaptive prediction LR (scaled by batch/256 in stage 1 only, as the "
                           "reference)", positive=True)
    not_train_ca: bool = setting(False, "skip task-adaptive prediction")
    ca_stage2_batches_per_centroid: int = setting(5, "stage 2 draws this many batches of pseudo-features per "
                                                  "centroid per step (stage 1: one batch)", minimum=1)


@dataclass(frozen=True)
class HiDePromptSettings(SettingsGroup):
    title, key = "HiDe-Prompt stage 2", "hideprompt"
    prompt_momentum: float = setting(0.0, "mix slot t with the mean of the earlier slots (stage 2, from task 2 on)")
    larger_prompt_lr: bool = setting(False, "the reference's name: prompts keep the LR, every other trained "
                                     "parameter (the head) gets LR x --head_lr_scale")
    head_lr_scale: float = setting(0.1, "with --larger_prompt_lr, the head's LR as a share of the prompts'")


@dataclass(frozen=True)
class LoRATypeSettings(SettingsGroup):
    title, key = "LoRA module", "lora_type"
    lora_type: str = setting("", "the reference's switch, set by the subcommand: continual (continual_lora), hide "
                             "(hidelora)", choices=("continual", "hide"))


@dataclass(frozen=True)
class LoRASettings(SettingsGroup):
    title, key = "LoRA", "lora"
    lora_rank: int = setting(4, "rank r of the key and value updates", minimum=1)
    lora_depth: int = setting(5, "adapt the first N blocks (the reference's fixed 5)")
    lora_init: str = setting("reference", "A ~ U(+-1/sqrt(r)) as the reference (its kaiming init takes r as the "
                             "fan-in), or the usual U(+-1/sqrt(dim)); B = 0 either way",
                             choices=("reference", "standard"))


@dataclass(frozen=True)
class HiDeLoRASettings(SettingsGroup):
    title, key = "HiDe-LoRA stage 2", "hidelora"
    lora_momentum: float = setting(0.0, "after task t, slot t <- (1-m) slot t + m mean(earlier slots) (the "
                                   "reference reads it without defining it)")


@dataclass(frozen=True)
class FewShotSettings(SettingsGroup):
    title, key = "few-shot LoRA", "few_shot"
    datasets: tuple[str, ...] = setting((), "upstream datasets (--dataset names), set by the subcommand", nargs="+")
    continual_classes_per_dataset: tuple[int, ...] = setting(
        (), "per dataset: its first N labels are learnt continually upstream", nargs="+")
    few_shot_classes_per_dataset: tuple[int, ...] = setting(
        (), "per dataset: the next N labels are held out for the few-shot episodes", nargs="+")
    tasks_per_dataset: tuple[int, ...] = setting((), "per dataset: upstream tasks of its classes", nargs="+")
    train_vanilla: bool = setting(False, "upstream: a linear head on the frozen backbone (it picks the LoRA slot of "
                                  "each image's dataset)")
    train_shared: bool = setting(False, "upstream: a LoRA slot per dataset and a head")
    train_few_shot: bool = setting(False, "the episodes; with none of the three switches, all three run in turn")
    vanilla_model_output_dir: str = setting("", "the vanilla upstream run (default <output_dir>/vanilla_model)")
    shared_model_output_dir: str = setting("", "the shared upstream run (default <output_dir>/shared_model)")
    shared_lora_lr_scale: float = setting(0.1, "the shared run's LoRA LR as a share of the head's")
    num_shots: int = setting(5, "training images per class in an episode", minimum=1)
    num_ways: int = setting(5, "classes per episode", minimum=2)
    num_episodes: int = setting(100, "episodes", minimum=1)
    num_queries: int = setting(100, "test images per class in an episode (at most)", minimum=1)
    num_fs_epochs: int = setting(20, "full-batch epochs of an episode's fresh head", minimum=1)
    fs_lr: float = setting(0.001, "Adam LR of an episode's head (not scaled)", positive=True)
    fs_backbone: str = setting("shared", "vanilla: the pre-trained backbone; shared: with the few-shot dataset's "
                               "LoRA slot; vanilla+shared: with the slot the vanilla model picks from the support "
                               "images", choices=("vanilla", "shared", "vanilla+shared"))
    few_shot_dataset_idx: int = setting(0, "which of --datasets the episodes draw from")
    few_class_idx: tuple[int, ...] | None = setting(
        None, "the episodes' classes (that dataset's labels); more than --num_ways: each episode draws --num_ways of "
        "them. Default: its first --num_ways few-shot classes, as the reference", nargs="+")
