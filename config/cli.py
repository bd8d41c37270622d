"""Command line: `main.py <dataset>_<method> [flags]` -> a frozen `Config`.

The flags are generated from the settings dataclasses: the common groups, and the groups each registered method
declares. Resolution: field defaults < preset rows (config/presets.py) < the command line; then the method's own
checks and derived values, then the run context. Flags of groups the method does not read are accepted (the reference
passes them) with one warning each.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import shutil
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields, replace
from typing import Any

import torch
from timm.optim import list_optimizers

from models import METHODS, ContinualMethod
from models.backbones import format_backbone_table, resolve_backbone
from run_files import run_folder_for
from utils import UserError, launcher_ranks, resolve_amp

from .presets import (
    ANY,
    SUBCOMMAND_SUFFIX_ALIASES,
    dataset_keys,
    own_dataset_keys,
    preset_values,
    reference_mode_values,
)
from .resolved import Config, RunContext
from .settings import COMMON_GROUPS, CompatSettings, QueryModelSettings, StreamSettings

_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def str2bool(value: str | bool) -> bool:
    """`--flag`, `--flag True` and `--flag False` all mean what they say (the reference's type=bool does not)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Fields and flags
# ----------------------------------------------------------------------------------------------------------------
def all_groups() -> list[type]:
    """Every settings group any method reads, common ones first, each once."""
    seen: list[type] = [*COMMON_GROUPS]
    for cls in METHODS.values():
        seen += [g for g in cls.settings_groups if g not in seen]
    return [*seen, CompatSettings]


def method_groups(method: str) -> tuple[type, ...]:
    return tuple(METHODS[method].settings_groups)


def primary_flag(f: Field) -> str:
    flags = f.metadata.get("flags", ())
    return flags[0] if flags else f"--{f.name}"


def flag_names(f: Field) -> list[str]:
    names = [f"--{f.name}", f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ())]
    return list(dict.fromkeys(names))


def _field_type(group: type, f: Field) -> tuple[Any, bool]:
    """(element type, is a list) of a field from its annotation (`int`, `float | None`, `tuple[int, ...]`, ...)."""
    hint = typing.get_type_hints(group)[f.name]
    inner = hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:  # X | None
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(inner) is tuple:
        return typing.get_args(inner)[0], True
    return inner, False


def _add_field(parser: argparse.ArgumentParser, group: type, f: Field) -> None:
    kind, is_list = _field_type(group, f)
    kwargs: dict[str, Any] = dict(dest=f.name, help=argparse.SUPPRESS)
    if kind is bool:
        kwargs.update(type=str2bool, nargs="?", const=True)
    else:
        kwargs.update(type=kind)
        if is_list:
            kwargs["nargs"] = f.metadata.get("nargs") or "+"
    parser.add_argument(*flag_names(f), **kwargs)
    negative = f.metadata.get("negative", ())
    if negative:
        parser.add_argument(*negative, dest=f.name, action="store_false", help=argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not a usage block
        raise UserError(f"{message}; `python {entry_script()} {self.prog} --help` lists the flags")


def build_parser(subcommand: str) -> argparse.ArgumentParser:
    """A parser of every flag any method knows; only the flags given end up in the namespace."""
    parser = _Parser(prog=subcommand, allow_abbrev=False, add_help=False, argument_default=argparse.SUPPRESS)
    for group in all_groups():
        for f in fields(group):
            _add_field(parser, group, f)
    return parser


def field_index() -> dict[str, tuple[type, Field]]:
    return {f.name: (group, f) for group in all_groups() for f in fields(group)}


def default_values(groups: Sequence[type]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for group in groups:
        for f in fields(group):
            values[f.name] = f.default_factory() if f.default is MISSING else f.default
    return values


def _flag_spellings(groups: Sequence[type]) -> dict[str, str]:
    """Every spelling of every flag of `groups` -> the flag as help shows it."""
    return {name: primary_flag(f) for group in groups for f in fields(group) for name in flag_names(f)}


def _suggest(word: str, candidates: Sequence[str], shown: dict[str, str] | None = None) -> str:
    """'; did you mean X?' with the closest candidate (as `shown` names it), or ''. Others are named only when
    about as close (within 0.05 of its similarity), so a near miss (`--epoch`) gets one answer, not a list."""
    close = difflib.get_close_matches(word, candidates, n=6, cutoff=0.6)
    ratio = [difflib.SequenceMatcher(None, word, c).ratio() for c in close]
    close = [c for c, r in zip(close, ratio, strict=True) if r >= ratio[0] - 0.05]
    names = list(dict.fromkeys((shown or {}).get(c, c) for c in close))[:3]
    return f"; did you mean {' or '.join(names)}?" if names else ""


# ----------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------
def subcommands() -> list[str]:
    names = []
    for method, cls in METHODS.items():
        keys = own_dataset_keys(method) if cls.own_datasets else dataset_keys()
        names += [f"{key}_{method}" for key in keys]
    return names


def split_subcommand_name(subcommand: str) -> tuple[str, str]:
    """(dataset key, method): dataset keys and method names may both hold underscores (`five_datasets`,
    `continual_lora`), so the longest method name that ends the subcommand after a known dataset key wins."""
    for method in sorted(METHODS, key=len, reverse=True):
        dataset_key = subcommand[: -len(method) - 1]
        keys = own_dataset_keys(method) if METHODS[method].own_datasets else dataset_keys()
        if subcommand.endswith(f"_{method}") and dataset_key in keys:
            return dataset_key, method
    hint = _suggest(subcommand, subcommands()) or f"; `python {entry_script()} --help` lists the subcommands"
    raise UserError(f"unknown subcommand {subcommand}{hint}")


def _split_subcommand(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The first token that is not an option is the subcommand; `--local-rank=N`, which the legacy launcher puts
    before the script's arguments, may come first."""
    rest = list(argv)
    for i, token in enumerate(rest):
        if token.startswith("-"):
            if re.fullmatch(r"--local[-_]rank(=\d+)?", token):
                continue
            return None, rest
        return token, rest[:i] + rest[i + 1:]
    return None, rest


def _alias(subcommand: str) -> str:
    for suffix, target in SUBCOMMAND_SUFFIX_ALIASES.items():
        if subcommand.endswith(suffix):
            return subcommand[: -len(suffix)] + target
    return subcommand


def entry_script() -> str:
    name = os.path.basename(sys.argv[0])
    return name if name == "fsl.py" else "main.py"  # fsl.py: the reference's few-shot entry point, an alias


# ----------------------------------------------------------------------------------------------------------------
# Help
# ----------------------------------------------------------------------------------------------------------------
def _width() -> int:
    return max(60, shutil.get_terminal_size((100, 24)).columns - 1)


def _wrapped(text: str, indent: int) -> str:
    return textwrap.fill(text, _width(), subsequent_indent=" " * indent, break_long_words=False,
                         break_on_hyphens=False)


def subcommands_by_dataset() -> dict[str, list[str]]:
    """The subcommands under their dataset key, datasets in the order the subcommands list them."""
    grouped: dict[str, list[str]] = {}
    for name in subcommands():
        grouped.setdefault(split_subcommand_name(name)[0], []).append(name)
    return grouped


def top_level_help() -> str:
    script = entry_script()
    grouped = subcommands_by_dataset()
    column = max(map(len, grouped)) + 4
    lines = [f"usage: {script} <subcommand> [flags]     a subcommand is <dataset>_<method>",
             f"       {script} <subcommand> --help      its flags and defaults (--help-all: all)",
             f"       {script} --list_backbones         backbone names, weights and files", "",
             _wrapped(f"methods: {' '.join(METHODS)}", 9), "", "subcommands, by dataset:"]
    for key, names in grouped.items():
        lines.append(_wrapped(f"  {key + ':':<{column - 2}}{' '.join(names)}", column))
    known = {key: preset_values({"dataset": key}).get("dataset") for key in grouped}
    lines += ["", _wrapped("benchmarks: " + ", ".join(f"{k} = {name}" for k, name in known.items() if name), 12)]
    return "\n".join(lines)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "(empty)"
    return "(none)" if value is None or value == "" else str(value)


def _flag_line(group: type, f: Field, value: Any) -> str:
    element, is_list = _field_type(group, f)
    kind = element.__name__.upper() + (" ..." if is_list else "")
    choices = f.metadata.get("choices")
    choice_text = f" {{{','.join(map(str, choices))}}}" if choices else ""
    text = f.metadata.get("help")
    return f"  {primary_flag(f)} {kind}{choice_text}  (default: {_format_value(value)})" + (f"  {text}" if text else "")


def format_help(subcommand: str, groups: Sequence[type], values: dict[str, Any], every: bool) -> str:
    """One line per flag, with the value `subcommand` resolves it to; wrapped to a terminal's width, and left whole
    when piped, so that `--help | grep FLAG` shows a flag with its default and meaning."""
    lines = [f"usage: {entry_script()} {subcommand} [flags]",
             f"(default: ...) is what {subcommand} resolves a flag to, with the flags given before --help"]
    shown = [g for g in groups if g is not CompatSettings]
    for group in shown:
        lines += ["", f"{group.title}:", *(_flag_line(group, f, values.get(f.name)) for f in fields(group))]
    compat = [primary_flag(f) for f in fields(CompatSettings)]
    lines.append("")
    if not every:
        lines.append(f"{len(all_groups()) - len(shown) - 1} more groups belong to other methods: --help-all lists "
                     "them (given here, their flags warn that they have no effect)")
    lines.append(f"accepted for compatibility with the reference, no effect: {' '.join(compat)}")
    if sys.stdout.isatty():
        lines = [_wrapped(line, 6) for line in lines]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------------
class Draft(dict):
    """The settings being resolved, by flag name, readable and writable as attributes; frozen into a `Config` when
    parsing ends. `given` holds the flags the command line set."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _selected(dataset_key: str, method: str, values: dict[str, Any]) -> dict[str, str]:
    cls = METHODS[method]
    return {"dataset": dataset_key, "method": method, "backbone": resolve_backbone(values["model"], "--model").name,
            "stage": cls.preset_stage(values) or ANY}


def layered_values(dataset_key: str, method: str, explicit: dict[str, Any]) -> dict[str, Any]:
    """Field defaults < every matching preset row < the command line. The rows that select a backbone or a stage
    match what the others and the command line resolve to. --original_model follows a --model given on the command
    line unless it is given too (see `_follows_model`)."""
    base = default_values(all_groups())
    first = {**base, **preset_values({"dataset": dataset_key, "method": method}), **explicit}
    preset = {**base, **preset_values(_selected(dataset_key, method, first))}
    values = {**preset, **explicit}
    if _follows_model(preset, explicit):
        values["original_model"] = values["model"]
    return values


def _follows_model(preset: dict[str, Any], explicit: dict[str, Any]) -> bool:
    """Users swap backbones with --model alone: a query / task-identity model the presets left on the presets'
    --model swaps with it. One the presets chose apart from --model, or one given on the command line, stays."""
    if "model" not in explicit or "original_model" in explicit:
        return False
    same = resolve_backbone(preset["original_model"], "--original_model").name
    return same == resolve_backbone(preset["model"], "--model").name


def _check_choices_and_minimums(values: dict[str, Any], names: Sequence[str]) -> None:
    index = field_index()
    for name in names:
        _, f = index[name]
        value, choices, minimum = values[name], f.metadata.get("choices"), f.metadata.get("minimum")
        if choices and value not in choices and not (value in ("", None) and f.default in ("", None)):
            raise UserError(f"unknown {primary_flag(f)} {value!r}; use one of {', '.join(map(str, choices))}")
        _check_number(primary_flag(f), value, minimum, f.metadata.get("positive"))


def _check_number(flag: str, value: Any, minimum: float | None, positive: bool) -> None:
    numbers = [v for v in (value if isinstance(value, tuple | list) else [value])
               if isinstance(v, int | float) and not isinstance(v, bool)]
    for v in numbers:
        if not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
        if minimum is not None and v < minimum:
            raise UserError(f"{flag} must be at least {minimum:g}, got {v}")
        if positive and v <= 0:
            raise UserError(f"{flag} must be greater than 0, got {v}")


def _check_common(draft: Draft, cls: type[ContinualMethod]) -> None:
    """Checks that need several flags at once and hold for every method."""
    if cls.num_tasks_override is not None and draft.num_tasks != cls.num_tasks_override:
        raise UserError(f"{draft.method} trains one task holding every class; drop --num_tasks {draft.num_tasks}")
    if draft.eval and draft.resume:
        raise UserError("--eval and --resume contradict each other: --eval re-evaluates a finished run, "
                        "--resume continues training; pass one of them")
    draft.amp = resolve_amp(draft.amp, draft.device, draft.local_rank)
    on_cuda = draft.device.startswith("cuda") or (draft.device == "auto" and torch.cuda.is_available())
    if draft.amp == "fp16" and not on_cuda:
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16 or --amp none")
    if draft.opt.lower() not in list_optimizers():
        raise UserError(f"unknown --opt {draft.opt!r}; timm knows e.g. adam, adamw, sgd, momentum, lamb "
                        f"(timm.optim.list_optimizers() lists all)")
    if not cls.trains and draft.epochs:
        draft.epochs = 0  # nothing to train; keep the config honest about it


def _check_stream(draft: Draft, cls: type[ContinualMethod]) -> None:
    """The online protocol and the task-free / domain-incremental scenarios, for the methods that can run them."""
    scenario, protocol = draft.scenario, draft.protocol
    if StreamSettings not in cls.settings_groups:
        if scenario != "class" or protocol != "offline":
            what = f"the {scenario} scenario" if scenario != "class" else "the online protocol"
            raise UserError(f"{draft.method} does not run {what}: {cls.stream_refusal}; streams run "
                            f"{', '.join(m for m, c in METHODS.items() if StreamSettings in c.settings_groups)}")
        return
    if scenario == "gaussian":
        reason = cls.task_free_refusal(draft)
        if reason:
            raise UserError(f"{draft.method} refuses the task-free (gaussian) scenario: {reason}")
        if protocol != "online":
            raise UserError("the gaussian scenario is a single-pass stream of episodes: drop --protocol offline")
        if draft.steps_per_task == 0 or draft.steps_per_task < -1:
            raise UserError(f"--steps_per_task {draft.steps_per_task}: give a number of batches per episode, or -1 "
                            "for every training image of its label set")
    if protocol == "online" and (draft.resume or draft.eval):
        raise UserError(f"--{'resume' if draft.resume else 'eval'}: an online run is one pass, its test-then-train "
                        "record made as it goes; start it afresh (its results.json is written after every task)")
    if protocol == "online" and draft.sched != "constant":
        raise UserError(f"--sched {draft.sched} steps once per epoch; the online protocol makes one pass: use --sched "
                        "constant")


def _resolve_backbones(draft: Draft, reads_original: bool) -> tuple[str, str | None]:
    """The table names --model and --original_model stand for, and which weight file each loads."""
    if draft.pretrained_checkpoint:
        if "pretrained" in draft.given and not draft.pretrained:
            raise UserError("--pretrained False contradicts --pretrained_checkpoint; drop one of them")
        draft.pretrained = True  # a weight file is pre-trained weights, whatever the dataset preset says
    backbone = resolve_backbone(draft.model, "--model").name
    if not reads_original:
        return backbone, None
    original = resolve_backbone(draft.original_model, "--original_model").name
    if draft.original_model_checkpoint is None and original == backbone:
        draft.original_model_checkpoint = draft.pretrained_checkpoint
    return backbone, original


def _freeze(group: type, values: dict[str, Any]) -> Any:
    return group(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                    for f in fields(group)})


def _context(draft: Draft, cls: type[ContinualMethod], backbone: str, original: str | None,
             no_effect: list[str]) -> RunContext:
    ranks = launcher_ranks()
    world = ranks[1] if ranks else 1
    global_batch = draft.batch_size * world
    lr_scale = (draft.batch_size if draft.unscale_lr else global_batch) / 256.0
    return RunContext(world_size=world, global_batch_size=global_batch, lr_scale=lr_scale,
                      effective_lr=draft.lr * lr_scale, backbone=backbone, original_backbone=original,
                      class_order=tuple(cls.class_order(draft)), explicit_flags=tuple(sorted(draft.given)),
                      no_effect_flags=tuple(no_effect))


def resolve(subcommand: str, dataset_key: str, method: str, explicit: dict[str, Any]) -> Config:
    """The frozen config of `subcommand` with the flags `explicit` (field name -> value) given."""
    cls = METHODS[method]
    groups = (*COMMON_GROUPS, *cls.settings_groups)
    read = {f.name for g in groups for f in fields(g)}
    values = layered_values(dataset_key, method, explicit)
    switched = _reference_switches(values, dataset_key, method, read, explicit)
    draft = Draft({**values, **switched}, given=set(explicit), subcommand=subcommand, method=method)
    _check_choices_and_minimums(draft, sorted(read))
    if draft.output_dir is None:
        draft.output_dir = run_folder_for(subcommand, draft.seed, resuming=draft.resume or draft.eval)
    _check_common(draft, cls)
    _check_stream(draft, cls)
    cls.resolve_settings(draft)
    _check_choices_and_minimums(draft, sorted(read))
    if draft.stop_after_task is not None and not 1 <= draft.stop_after_task <= draft.num_tasks:
        raise UserError(f"--stop_after_task {draft.stop_after_task}: choose 1..{draft.num_tasks} (the run has "
                        f"{draft.num_tasks} tasks)")
    no_effect = sorted(name for name in explicit if name not in read)
    backbone, original = _resolve_backbones(draft, QueryModelSettings in cls.settings_groups)
    frozen = {g: _freeze(g, draft) for g in groups}
    context = replace(_context(draft, cls, backbone, original, no_effect),
                      reference_switches=tuple(f"--{name} {value}" for name, value in switched.items()))
    return Config(subcommand=subcommand, dataset_key=dataset_key, method=method,
                  **{g.key: frozen[g] for g in COMMON_GROUPS},
                  method_groups=tuple(frozen[g] for g in cls.settings_groups), context=context)


def _reference_switches(values: dict[str, Any], dataset_key: str, method: str, read: set[str],
                        explicit: dict[str, Any]) -> dict[str, Any]:
    """With --reference_mode: the settings it changes for this method (those it reads, not given on the command
    line, not at that value already)."""
    if not values.get("reference_mode"):
        return {}
    wanted = reference_mode_values(values, dataset_key, method)
    return {name: value for name, value in wanted.items()
            if name in read and name not in explicit and values.get(name) != value}



def _explicit_values(parser: argparse.ArgumentParser, subcommand: str, rest: list[str]) -> dict[str, Any]:
    namespace, unknown = parser.parse_known_args(rest)
    if unknown:
        word = unknown[0]
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            raise UserError(f"unrecognized flag {name}{_flag_hint(name, subcommand)}")
        raise UserError(f"unexpected argument {word!r} after the subcommand {subcommand}; flags start with --")
    return vars(namespace)


def _flag_hint(name: str, subcommand: str) -> str:
    """The closest flags (of any method: another method's flag is accepted with a warning), else where the flags
    are listed."""
    spellings = _flag_spellings([g for g in all_groups() if g is not CompatSettings])
    listed = f"; `python {entry_script()} {subcommand} --help` lists the flags"
    return _suggest(name, list(spellings), spellings) or listed


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Resolve the config; a bad input raises UserError (one line, exit code 2 from main)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--list_backbones" in argv:
        print(format_backbone_table())
        raise SystemExit(0)
    subcommand, rest = _split_subcommand(argv)
    if subcommand is None:
        if any(a in ("-h", "--help", "--help-all") for a in argv):
            print(top_level_help())
            raise SystemExit(0)
        raise UserError(f"no subcommand given (e.g. python {entry_script()} digits_l2p); `python {entry_script()} "
                        "--help` lists them")
    subcommand = _alias(subcommand)
    dataset_key, method = split_subcommand_name(subcommand)
    parser = build_parser(subcommand)
    help_flags = {"-h", "--help", "--help-all"} & set(rest)
    explicit = _explicit_values(parser, subcommand, [a for a in rest if a not in help_flags])
    if help_flags:
        every = "--help-all" in help_flags
        groups = all_groups() if every else [*COMMON_GROUPS, *method_groups(method)]
        print(format_help(subcommand, groups, layered_values(dataset_key, method, explicit), every))
        raise SystemExit(0)
    return resolve(subcommand, dataset_key, method, explicit)
