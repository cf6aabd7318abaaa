"""Loading and checking the three YAML files of a run (task, purification, model).

Our files load with `yaml.safe_load`; the official files also load, because the one non-standard
tag they use (`!!python/tuple`) is read as a list. Unknown keys fail with the list of valid ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from util.errors import ConfigError  # noqa: F401  (re-exported)

from .solver import DCDPSettings

REPO_ROOT = Path(__file__).resolve().parent.parent




class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists (relative to the cwd), else relative to the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def load_yaml(path: str | os.PathLike) -> dict:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        with open(p) as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_keys(d: dict, valid, where: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------
# Task config: measurement operator and noise
# ---------------------------------------------------------------------------------------------

TASK_KEYS = ("measurement", "conditioning", "data")
IGNORED_TASK_KEYS = ("conditioning", "data")  # official files carry them; dcdp.py never reads them


@dataclass
class TaskConfig:
    operator: dict               # {name, **params}
    noise: dict                  # {name, **params}
    ignored: list = field(default_factory=list)
    path: str = ""

    @property
    def operator_name(self) -> str:
        return self.operator["name"]

    @property
    def sigma(self) -> float:
        return float(self.noise.get("sigma", 0.0))


def load_task_config(path) -> TaskConfig:
    d = load_yaml(path)
    _check_keys(d, TASK_KEYS, f"task config '{path}'")
    m = d.get("measurement")
    if not isinstance(m, dict) or "operator" not in m or "noise" not in m:
        raise ConfigError(f"task config '{path}': needs a 'measurement' block with 'operator' and 'noise'")
    _check_keys(m, ("operator", "noise"), f"task config '{path}' measurement")
    for part in ("operator", "noise"):
        if not isinstance(m[part], dict) or "name" not in m[part]:
            raise ConfigError(f"task config '{path}': measurement.{part} needs a 'name'")
    return TaskConfig(operator=dict(m["operator"]), noise=dict(m["noise"]),
                      ignored=[k for k in IGNORED_TASK_KEYS if k in d], path=str(path))


# ---------------------------------------------------------------------------------------------
# Purification config: the DCDP hyper-parameters
# ---------------------------------------------------------------------------------------------

PURIFICATION_KEYS = (
    # official keys
    "total_num_iterations", "csgm_num_iterations", "lr", "ddim_init_timestep", "ddim_end_timestep",
    "purification_schedule", "optimizer", "momentum", "ddim_num_iterations", "full_ddim",
    "use_weight_decay", "weight_decay_lambda", "save_every_main", "save_every_sub", "dataset", "others",
    # ours
    "loss", "purify", "final_csgm_num_iterations", "data_consistency_type", "exact_transpose",
)
REQUIRED_PURIFICATION_KEYS = ("total_num_iterations", "csgm_num_iterations", "lr", "ddim_init_timestep")
DATASET_KEYS = ("name", "root")
OTHERS_KEYS = ("img_size",)


@dataclass
class PurificationConfig:
    raw: dict
    dataset_name: str
    dataset_root: str
    image_size: Optional[int]
    full_ddim: bool
    ddim_num_iterations: int
    path: str = ""

    def settings(self, purify: Optional[bool] = None) -> DCDPSettings:
        r = self.raw
        return DCDPSettings(
            K=int(r["total_num_iterations"]), tau=int(r["csgm_num_iterations"]), lr=float(r["lr"]),
            T_init=int(r["ddim_init_timestep"]), T_end=int(r.get("ddim_end_timestep", 0)),
            schedule=str(r.get("purification_schedule", "linear")), optimizer=str(r.get("optimizer", "SGD")),
            momentum=float(r.get("momentum", 0.9)), loss=str(r.get("loss", "L2")),
            weight_decay_lambda=float(r.get("weight_decay_lambda", 0.0)) if r.get("use_weight_decay", False) else 0.0,
            purify=bool(r.get("purify", True)) if purify is None else purify,
            final_tau=(int(r["final_csgm_num_iterations"]) if r.get("final_csgm_num_iterations") is not None else None),
            exact_transpose=bool(r.get("exact_transpose", False)),
        )

    def prior_options(self) -> dict:
        """Keys the prior reads itself (latent DC type, consistency-model options)."""
        return {k: v for k, v in self.raw.items() if k.startswith("cm_") or k == "data_consistency_type"}


def load_purification_config(path) -> PurificationConfig:
    d = load_yaml(path)
    valid = [k for k in PURIFICATION_KEYS] + ["cm_*"]
    unknown = [k for k in d if k not in PURIFICATION_KEYS and not str(k).startswith("cm_")]
    if unknown:
        raise ConfigError(f"purification config '{path}': unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    missing = [k for k in REQUIRED_PURIFICATION_KEYS if k not in d]
    if missing:
        raise ConfigError(f"purification config '{path}': missing key(s) {', '.join(missing)}")
    dataset = d.get("dataset") or {}
    _check_keys(dataset, DATASET_KEYS, f"purification config '{path}' dataset")
    others = d.get("others") or {}
    _check_keys(others, OTHERS_KEYS, f"purification config '{path}' others")
    img_size = others.get("img_size")
    cfg = PurificationConfig(
        raw=d, dataset_name=str(dataset.get("name", "ffhq")), dataset_root=str(dataset.get("root", "./data/ffhq")),
        image_size=int(img_size[-1]) if img_size else None, full_ddim=bool(d.get("full_ddim", True)),
        ddim_num_iterations=int(d.get("ddim_num_iterations", 20)), path=str(path),
    )
    try:
        cfg.settings().timesteps()
    except ValueError as exc:
        raise ConfigError(f"purification config '{path}': {exc}") from exc
    return cfg


def load_model_config(path) -> dict:
    """The model config as a dict; its keys are checked by the builder of its `kind`."""
    return load_yaml(path)
