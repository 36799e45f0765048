"""Sweep files: a base experiment plus a search space over dotted config keys (no Ray here).

A sweep file is YAML::

    name: sweep_camvid
    base: camvid_supervised.yaml        # an experiment YAML, relative to this file ...
    overrides: [data.labeled_count=46]  # ... with dotted overrides applied to every trial
    space:
      method.lambda_u: [0.5, 1.0, 2.0]          # grid: every value
      train.lr: loguniform(1e-4, 1e-2)          # also uniform(a, b), randint(a, b)
      method.classmix: choice([true, false])    # sampled, num_samples times
    tune:
      metric: val_miou
      mode: max
      scheduler: none                           # or asha (early stopping by epoch)
      num_samples: 1
      max_concurrent_trials: 0                  # 0 = as many as the cluster fits
      trial: train                              # or loop: each trial is a whole AL loop (al.* keys)

Every key of ``space`` is checked against the experiment schema (and every grid value
and range end point against its type and limits) before any trial starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from segrl.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict

_CALL = re.compile(r"^\s*(uniform|loguniform|randint|choice)\s*\((.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Domain:
    """One dimension of the space: ``kind`` in grid | choice | uniform | loguniform | randint."""

    kind: str
    values: tuple[Any, ...]

    def probe_values(self) -> tuple[Any, ...]:
        """Values that must all be valid config values (every option, or both ends)."""
        return self.values


@dataclass(frozen=True)
class TuneSettings:
    metric: str = "val_miou"
    mode: str = "max"
    scheduler: str = "none"
    num_samples: int = 1
    max_concurrent_trials: int = 0
    grace_period: int = 1
    trial: str = "train"  # train: one training run (st / st_pp: the whole pipeline) | loop: a whole AL loop


@dataclass(frozen=True)
class Sweep:
    name: str
    base: dict[str, Any]  # the raw experiment config every trial starts from
    space: dict[str, Domain]
    tune: TuneSettings = field(default_factory=TuneSettings)


def parse_domain(key: str, spec: Any) -> Domain:
    """A space entry: a list is a grid; ``uniform(a, b)`` etc. are distributions."""
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"sweep space '{key}': a grid needs at least one value")
        return Domain("grid", tuple(spec))
    if isinstance(spec, str) and (match := _CALL.match(spec)):
        kind, args = match.group(1), [_number(a) for a in yaml.safe_load(f"[{match.group(2)}]")]
        if kind == "choice":
            options = args[0] if len(args) == 1 and isinstance(args[0], list) else args
            if not options:
                raise ConfigError(f"sweep space '{key}': choice() needs options")
            return Domain("choice", tuple(options))
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] >= args[1]:
            raise ConfigError(f"sweep space '{key}' = {spec!r}: {kind}(low, high) needs numbers low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"sweep space '{key}' = {spec!r}: loguniform needs low > 0")
        if kind == "randint":
            return Domain(kind, (int(args[0]), int(args[1]) - 1))  # high is exclusive
        return Domain(kind, (float(args[0]), float(args[1])))
    raise ConfigError(
        f"sweep space '{key}' = {spec!r}: use a list (grid) or uniform(a, b), loguniform(a, b), "
        "randint(a, b), choice([...])"
    )


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; in a range it is meant as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def yaml_value(value: Any) -> str:
    """``value`` as the YAML text of a ``key=value`` override (no document markers)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def validate_space(base: dict[str, Any], space: dict[str, Domain]) -> None:
    """Every key exists in the schema and every probe value is accepted; else ConfigError."""
    for key, domain in space.items():
        for value in domain.probe_values():
            try:
                config_from_dict(apply_overrides(base, [f"{key}={yaml_value(value)}"]))
            except ConfigError as exc:
                raise ConfigError(f"sweep space '{key}' value {value!r}: {exc}") from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file (see the module doc); ``overrides`` apply to the base."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - {"name", "base", "overrides", "space", "tune"})
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key '{unknown[0]}' (valid: name, base, overrides, space, tune)")
    base = raw.get("base") or {}
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config {str(base_path)!r} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
    base = apply_overrides(base, [*(raw.get("overrides") or []), *(overrides or [])])
    config_from_dict(base)  # the base itself must be a valid experiment
    space = {key: parse_domain(key, spec) for key, spec in (raw.get("space") or {}).items()}
    if not space:
        raise ConfigError(f"{path}: 'space' lists no config key to sweep")
    validate_space(base, space)
    tune_raw = raw.get("tune") or {}
    bad = sorted(set(tune_raw) - set(TuneSettings.__dataclass_fields__))
    if bad:
        raise ConfigError(f"{path}: unknown tune key '{bad[0]}'")
    settings = TuneSettings(**tune_raw)
    if settings.mode not in ("max", "min"):
        raise ConfigError(f"{path}: tune.mode = {settings.mode!r} must be max or min")
    if settings.scheduler not in ("none", "asha"):
        raise ConfigError(f"{path}: tune.scheduler = {settings.scheduler!r} must be none or asha")
    if settings.trial not in ("train", "loop"):
        raise ConfigError(f"{path}: tune.trial = {settings.trial!r} must be train or loop")
    multi_stage = settings.trial == "loop" or base.get("method", {}).get("name") in ("st", "st_pp") or any(
        "st" in d.values or "st_pp" in d.values for k, d in space.items() if k == "method.name")
    if settings.scheduler == "asha" and multi_stage:
        raise ConfigError(f"{path}: tune.scheduler = asha stops trials by epoch; loops and ST/ST++ "
                          "pipelines report once at the end: use scheduler none")
    name = raw.get("name") or path.stem
    return Sweep(name=name, base=base, space=space, tune=settings)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """Tune's sampled ``{dotted key: value}`` as ``key=value`` overrides."""
    return [f"{key}={yaml_value(value)}" for key, value in sorted(params.items())]


def max_concurrent_trials(cluster_cpus: float, cfg: ExperimentConfig) -> int:
    """Trials that fit at once: one CPU stays free for Tune and the trial drivers, the rest
    is divided by what one trial's Ray Train workers reserve (so trials never deadlock
    waiting for each other's CPUs). On 2 cores: one trial at a time."""
    per_trial = cfg.compute.num_workers * cfg.compute.cpus_per_worker
    if per_trial > cluster_cpus:
        raise ConfigError(
            f"one trial needs {per_trial:g} CPUs (compute.num_workers x compute.cpus_per_worker) "
            f"but the cluster has {cluster_cpus:g}"
        )
    return max(1, math.floor((cluster_cpus - 1) / per_trial))
