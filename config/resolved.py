"""The resolved configuration of one run: frozen settings groups, and the run context derived from them.

`Config` holds the groups the method reads (and nothing else), so config.json lists only settings that took effect.
`RunContext` holds what follows from the settings and the launch: world size, global batch, LR scale, the backbone
names the model flags resolved to, the class order. Neither is changed after parsing; a phase or an upstream run that
trains with other settings gets its own object (`dataclasses.replace`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from .settings import (
    BackboneSettings,
    DataSettings,
    DistSettings,
    OptimSettings,
    RunSettings,
    SettingsGroup,
    StreamSettings,
)

G = TypeVar("G")
LAYOUT = 2  # config.json / checkpoint config layout: groups nested by key (layout 1 was one flat dict)


@dataclass(frozen=True)
class RunContext:
    world_size: int = 1
    global_batch_size: int = 0
    lr_scale: float = 1.0  # effective LR = base LR x this (per-process or global batch / 256)
    effective_lr: float = 0.0
    backbone: str = ""  # the backbone table names --model and --original_model resolved to
    original_backbone: str | None = None
    class_order: tuple[int, ...] = ()
    explicit_flags: tuple[str, ...] = ()  # the fields the command line set
    no_effect_flags: tuple[str, ...] = ()  # given, but read by nothing in this method
    reference_switches: tuple[str, ...] = ()  # what --reference_mode set, e.g. "--amp none"


@dataclass(frozen=True)
class Config:
    subcommand: str
    dataset_key: str
    method: str
    run: RunSettings
    dist: DistSettings
    optim: OptimSettings
    data: DataSettings
    backbone: BackboneSettings
    method_groups: tuple[SettingsGroup, ...] = ()
    context: RunContext = field(default_factory=RunContext)
    part: str = ""  # which run of a multi-run flow this is (few-shot LoRA: vanilla, shared)

    @property
    def groups(self) -> tuple[SettingsGroup, ...]:
        return (self.run, self.dist, self.optim, self.data, self.backbone, *self.method_groups)

    def group(self, kind: type[G]) -> G:
        """The method's settings of type `kind` (KeyError if the method does not read that group)."""
        for group in self.method_groups:
            if isinstance(group, kind):
                return group
        raise KeyError(f"{self.method} does not read {kind.__name__}")

    def has(self, kind: type) -> bool:
        return any(isinstance(group, kind) for group in self.method_groups)

    @property
    def stream(self) -> StreamSettings:
        """How the data arrives; a method that reads no stream settings runs the default, class-incremental and
        offline."""
        return self.group(StreamSettings) if self.has(StreamSettings) else StreamSettings()

    def __getattr__(self, name: str) -> Any:
        """Read-only shorthand: a field by its flag name, whichever group holds it (names are unique), or a run
        context value."""
        if name.startswith("__"):
            raise AttributeError(name)
        for group in self.groups:
            if name in group.__dataclass_fields__:
                return getattr(group, name)
        if name in RunContext.__dataclass_fields__:
            return getattr(self.context, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}")

    def with_settings(self, **values: Any) -> Config:
        """A copy with some fields replaced (each by flag name), for a phase or an upstream run of its own."""
        groups = {id(g): g for g in self.groups}
        changed: dict[int, dict[str, Any]] = {}
        for name, value in values.items():
            owner = next((g for g in self.groups if name in g.__dataclass_fields__), None)
            if owner is None:
                raise KeyError(f"{self.method} has no setting {name!r}")
            changed.setdefault(id(owner), {})[name] = value
        new = {key: replace(groups[key], **kw) for key, kw in changed.items()}
        pick = lambda g: new.get(id(g), g)  # noqa: E731
        optim = pick(self.optim)
        context = replace(self.context, effective_lr=optim.lr * self.context.lr_scale)
        return replace(self, run=pick(self.run), dist=pick(self.dist), optim=optim, data=pick(self.data),
                       backbone=pick(self.backbone), method_groups=tuple(pick(g) for g in self.method_groups),
                       context=context)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def group_dict(group: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(group, f.name)) for f in fields(group) if f.metadata.get("saved", True)}


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as saved (config.json, checkpoints, results) and printed: each group the method reads under its
    key, then the run context."""
    out: dict[str, Any] = {"layout": LAYOUT, "subcommand": cfg.subcommand, "dataset_key": cfg.dataset_key,
                           "method": cfg.method}
    if cfg.part:
        out["part"] = cfg.part
    for group in cfg.groups:
        out[group.key] = group_dict(group)
    out["context"] = {k: _plain(v) for k, v in vars(cfg.context).items()}
    return out


def config_json(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)


def flat_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a saved config by flag name, whatever its layout (one flat dict before layout 2)."""
    if saved.get("layout", 1) < LAYOUT:
        return dict(saved)
    flat: dict[str, Any] = {}
    for key, value in saved.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def differing_settings(saved: dict[str, Any], cfg: Config, keys: Sequence[str]) -> str:
    """'' when `saved` (a saved config, any layout) agrees with `cfg` on `keys`; else each difference, `key: saved
    there, cfg here`."""
    theirs, current = flat_settings(saved), flat_settings(config_to_dict(cfg))
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {current.get(k)!r} here" for k in keys
                     if theirs.get(k) != current.get(k))
