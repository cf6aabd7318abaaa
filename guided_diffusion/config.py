"""Loading and checking the three YAML files of a run (task, purification, model) and `key=value` overrides.

The files are read exactly as the official DCDP repository writes them (`upstream-dcdp.md` §3.1):
a purification file nests the hyper-parameters under `purification:`, beside `dataset:` and
`others:`; a task file has `measurement:` (`operator:`, `noise:` and, in the official inpainting
files, a `mask_opt:` the official drivers ignore), `conditioning:` (unused) and, in the DCDP-LDM task
files, `data:` (the dataset). `!!python/tuple` is read as a list. Every key is checked for its type and
range here, before anything is built or written; an error is one line naming the file (or override),
the key, the value and what is allowed.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from util.errors import ConfigError  # noqa: F401  (re-exported: callers import it from here)
from util.files import load_yaml
from util.schema import Key, Origins, check_block
from util.schema import bool_key as _bool
from util.schema import choice_key as _choice
from util.schema import float_key as _float
from util.schema import int_key as _int

from .gaussian_diffusion import NUM_DIFFUSION_STEPS, SCHEDULE_KINDS
from .solver import LOSSES, OPTIMIZERS, TRANSFORMS, DCDPSettings

log = logging.getLogger("dcdp")

T_MAX = NUM_DIFFUSION_STEPS

# The `purification:` block. Official keys first, then ours. A default of REQUIRED means the key must be given.
CORE_PURIFICATION_SCHEMA: dict[str, Key] = {
    "total_num_iterations": _int(lo=1),                       # K
    "csgm_num_iterations": _int(lo=1),                        # τ
    "lr": _float(lo=0, lo_open=True),
    "ddim_init_timestep": _int(lo=1, hi=T_MAX),               # T_0
    "ddim_end_timestep": _int(0, lo=0, hi=T_MAX),             # T_{K-1} (0 is replaced by 1)
    "purification_schedule": _choice(SCHEDULE_KINDS, "linear"),
    "optimizer": _choice(OPTIMIZERS, "SGD"),
    "momentum": _float(0.9, lo=0, hi=1, hi_open=True),
    "ddim_num_iterations": _int(20, lo=2),
    "full_ddim": _bool(True),
    "ddim_eta": _float(0.0, lo=0, hi=0),                      # DCDP-LDM flag; DDIM is deterministic (eta 0)
    "use_weight_decay": _bool(False),
    "weight_decay_lambda": _float(0.0, lo=0),
    "save_every_main": _int(None, lo=1, nullable=True),       # official; no effect (every output is written)
    "save_every_sub": _int(None, lo=1, nullable=True),
    # ours
    "loss": _choice(LOSSES, "L2"),
    "purify": _bool(True),
    "final_csgm_num_iterations": _int(None, lo=1, nullable=True),
    "final_dc_iterations": _int(0, lo=0),
    "average_last_rounds": _int(1, lo=1),
    "purification_transforms": _choice(tuple(TRANSFORMS), "none"),
    "exact_transpose": _bool(False),
}


@functools.cache
def purification_schema() -> dict[str, Key]:
    """The `purification:` keys: DCDP's, then those the priors read (each prior declares its `OPTIONS`)."""
    from .priors import prior_options_schema

    return {**CORE_PURIFICATION_SCHEMA, **prior_options_schema()}


# Keys that do not change any number (excluded from a run's identity).
NO_EFFECT_KEYS = ("save_every_main", "save_every_sub")

DATASET_SCHEMA = {"name": Key("str", "ffhq"), "root": Key("str", "./data/ffhq"), "img_size": Key("size", None, nullable=True)}
OTHERS_SCHEMA = {"img_size": Key("size", None, nullable=True)}

# The official DCDP-LDM driver's defaults when no purification file is given (upstream-dcdp.md §8).
LDM_DRIVER_DEFAULTS = {
    "total_num_iterations": 10, "csgm_num_iterations": 100, "lr": 1000.0, "ddim_init_timestep": 400,
    "ddim_end_timestep": 0, "purification_schedule": "linear", "optimizer": "SGD", "momentum": 0.9,
    "ddim_num_iterations": 20, "full_ddim": False, "ddim_eta": 0.0, "save_every_main": 1,
    "save_every_sub": 10000, "data_consistency_type": "pixel",
}


# ---------------------------------------------------------------------------------------------
# Overrides: key=value after the options (dotted paths into the three files)
# ---------------------------------------------------------------------------------------------

# first path component -> the file it goes to
OVERRIDE_TARGETS = {"purification": "purification", "dataset": "purification", "others": "purification",
                    "measurement": "task", "conditioning": "task", "data": "task", "model": "model"}


@dataclass
class Override:
    text: str           # as given
    file: str           # task, purification or model
    path: tuple         # path inside that file
    value: Any


def parse_overrides(items: list[str]) -> list[Override]:
    """`purification.lr=1e4 measurement.noise.sigma=0.05 model.model_path=/ckpt.pt` -> Overrides.

    Values are YAML scalars or flow lists, parsed by omegaconf's grammar (so 1e4 is a number).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = []
    for text in items:
        key, sep, raw = text.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{text}': expected key=value with a dotted key, e.g. purification.lr=1e4")
        parts = tuple(key.split("."))
        target = OVERRIDE_TARGETS.get(parts[0])
        if target is None:
            raise ConfigError(f"override '{text}': unknown first key '{parts[0]}'; valid: "
                              f"{', '.join(OVERRIDE_TARGETS)} (purification.*, dataset.*, others.* go to the "
                              f"purification file, measurement.* and conditioning.* to the task file, model.* to the model file)")
        if target == "model":
            if len(parts) < 2:
                raise ConfigError(f"override '{text}': name a key of the model file, e.g. model.model_path=/ckpt.pt")
            parts = parts[1:]
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{text}': cannot read the value '{raw}' ({' '.join(str(exc).split())})") from None
        out.append(Override(text, target, parts, value))
    return out


def apply_overrides(data: dict, overrides: list[Override], file: str, origins: Origins) -> dict:
    """A deep copy of `data` with the overrides of `file` applied; records their origin."""
    data = copy.deepcopy(data)
    for o in overrides:
        if o.file != file:
            continue
        node = data
        for part in o.path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{o.text}': '{part}' is not a mapping in the {file} file")
            node = nxt
        node[o.path[-1]] = o.value
        origins.by_path[o.path] = f"override '{o.text}'"
    return data


# ---------------------------------------------------------------------------------------------
# Task config: measurement operator and noise
# ---------------------------------------------------------------------------------------------

TASK_KEYS = ("measurement", "conditioning", "data")
MEASUREMENT_KEYS = ("operator", "noise", "mask_opt")
NOISE_SCHEMAS = {"gaussian": {"name": Key("str"), "sigma": _float(0.0, lo=0)},
                 "poisson": {"name": Key("str"), "rate": _float(lo=0, lo_open=True)}}
DATA_SCHEMA = {"name": Key("str", None, nullable=True), "root": Key("str", None, nullable=True)}
# The hole both official drivers cut, whatever their YAML says (rows and columns 100..199).
OFFICIAL_BOX = {"mask_type": "box"}


@dataclass
class TaskConfig:
    operator: dict               # {name, **params}
    noise: dict                  # {name, **params}
    ignored: list = field(default_factory=list)
    data: dict = field(default_factory=dict)     # DCDP-LDM task files: dataset name and root
    notes: list = field(default_factory=list)    # one line each, printed by the driver
    path: str = ""

    @property
    def operator_name(self) -> str:
        return self.operator["name"]

    @property
    def sigma(self) -> float:
        return float(self.noise.get("sigma", 0.0))


def load_task_config(path, overrides: Optional[list[Override]] = None) -> TaskConfig:
    origins = Origins(f"task config '{path}'")
    d = apply_overrides(load_yaml(path, "task config"), overrides or [], "task", origins)
    where = origins.default
    if "measurement" not in d and ("purification" in d or "image_size" in d or "model_path" in d):
        raise ConfigError(f"{where} is not a task config (it has no 'measurement' block); give a file from "
                          f"task_configurations/ as --task_config")
    unknown = [k for k in d if k not in TASK_KEYS]
    if unknown:
        raise ConfigError(f"{origins.of(unknown[0])}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"valid keys: {', '.join(TASK_KEYS)}")
    m = d.get("measurement")
    if not isinstance(m, dict) or not isinstance(m.get("operator"), dict) or not isinstance(m.get("noise"), dict):
        raise ConfigError(f"{where}: needs a 'measurement' block with 'operator' and 'noise' mappings")
    unknown = [k for k in m if k not in MEASUREMENT_KEYS]
    if unknown:
        raise ConfigError(f"{origins.of('measurement', unknown[0])}: unknown key(s) {', '.join(map(str, unknown))} "
                          f"in 'measurement'; valid keys: {', '.join(MEASUREMENT_KEYS)}")
    operator, noise = dict(m["operator"]), dict(m["noise"])
    if not isinstance(operator.get("name"), str):
        raise ConfigError(f"{origins.of('measurement', 'operator', 'name')}: measurement.operator needs a 'name'")
    from .measurements import __NOISES__

    noise_name = noise.get("name")
    if noise_name not in NOISE_SCHEMAS or noise_name not in __NOISES__:
        raise ConfigError(f"{origins.of('measurement', 'noise', 'name')}: measurement.noise.name = {noise_name!r} "
                          f"is not allowed; use one of {', '.join(NOISE_SCHEMAS)}")
    noise = check_block(noise, NOISE_SCHEMAS[noise_name], origins, ("measurement", "noise"), "measurement.noise")
    notes = []
    if "mask_opt" in m:  # the official inpainting files: ignored by both official drivers
        if operator["name"] == "inpainting" and "mask_opt" not in operator:
            operator["mask_opt"] = dict(OFFICIAL_BOX)
            notes.append(f"note: {where}: measurement.mask_opt is ignored, as by the official code, which always "
                         f"cuts the 100x100 box at rows/columns 100..199; for a random mask put mask_opt under "
                         f"measurement.operator (see task_configurations/inpainting_random_config.yaml)")
        else:
            notes.append(f"note: {where}: measurement.mask_opt is ignored (as by the official code); the "
                         f"operator's own settings are used")
    data = check_block(d.get("data"), DATA_SCHEMA, origins, ("data",), "data") if "data" in d else {}
    ignored = [k for k in ("conditioning",) if k in d]
    return TaskConfig(operator=operator, noise=noise, ignored=ignored, data=data, notes=notes, path=str(path))


# ---------------------------------------------------------------------------------------------
# Purification config: the DCDP hyper-parameters
# ---------------------------------------------------------------------------------------------

PURIFICATION_FILE_KEYS = ("purification", "dataset", "others")


@dataclass
class PurificationConfig:
    values: dict                 # the checked `purification:` block, defaults filled in
    dataset_name: str
    dataset_root: str
    image_size: Optional[int]
    dataset_given: bool = True   # the file (or an override) named a dataset
    path: str = ""

    @property
    def full_ddim(self) -> bool:
        return self.values["full_ddim"]

    @property
    def ddim_num_iterations(self) -> int:
        return self.values["ddim_num_iterations"]

    def resolved(self) -> dict:
        """The settings as the official layout, for run records (no-effect keys left out)."""
        block = {k: v for k, v in self.values.items() if k not in NO_EFFECT_KEYS}
        return {"purification": block, "dataset": {"name": self.dataset_name, "root": self.dataset_root},
                "others": {"img_size": self.image_size}}

    def settings(self, purify: Optional[bool] = None) -> DCDPSettings:
        v = self.values
        return DCDPSettings(
            K=v["total_num_iterations"], tau=v["csgm_num_iterations"], lr=v["lr"],
            T_init=v["ddim_init_timestep"], T_end=v["ddim_end_timestep"], schedule=v["purification_schedule"],
            optimizer=v["optimizer"], momentum=v["momentum"], loss=v["loss"],
            weight_decay_lambda=v["weight_decay_lambda"] if v["use_weight_decay"] else 0.0,
            purify=v["purify"] if purify is None else purify, final_tau=v["final_csgm_num_iterations"],
            final_dc_iterations=v["final_dc_iterations"], average_last_rounds=v["average_last_rounds"],
            purification_transforms=v["purification_transforms"], exact_transpose=v["exact_transpose"],
        )

    def prior_options(self) -> dict:
        """Keys the prior reads itself (latent DC type, consistency-model options), those that are set."""
        core = CORE_PURIFICATION_SCHEMA
        return {k: v for k, v in self.values.items() if k not in core and v is not None}


def _nested(d: dict) -> dict:
    """`d` in the official layout; a file of dcdp before 2026-12 (the hyper-parameters at the top level) is nested."""
    if "purification" in d or not any(k in purification_schema() for k in d):
        return d
    return {"purification": {k: v for k, v in d.items() if k not in ("dataset", "others")},
            **{k: d[k] for k in ("dataset", "others") if k in d}}


def purification_from_dict(d: dict, origins: Origins, *, dataset_fallback: Optional[dict] = None) -> PurificationConfig:
    where = origins.default
    if "measurement" in d or "model_path" in d or "image_size" in d:
        raise ConfigError(f"{where} is not a purification config (it has no 'purification' block); give a file "
                          f"from purification_configurations/ as --purification_config")
    unknown = [k for k in d if k not in PURIFICATION_FILE_KEYS]
    if unknown:
        raise ConfigError(f"{origins.of(unknown[0])}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: "
                          f"{', '.join(PURIFICATION_FILE_KEYS)} (the hyper-parameters go under 'purification:')")
    if "purification" not in d:
        raise ConfigError(f"{where}: needs a 'purification:' block with the hyper-parameters (the official layout)")
    values = check_block(d["purification"], purification_schema(), origins, ("purification",), "purification")
    if values["average_last_rounds"] > values["total_num_iterations"]:
        raise ConfigError(f"{origins.of('purification', 'average_last_rounds')}: purification.average_last_rounds = "
                          f"{values['average_last_rounds']} is more than the {values['total_num_iterations']} rounds "
                          f"(total_num_iterations); use a value from 1 (the last round's x, official) to "
                          f"{values['total_num_iterations']}")
    dataset_given = d.get("dataset") is not None
    raw_dataset = d.get("dataset")
    if not dataset_given and dataset_fallback:
        raw_dataset = {k: v for k, v in dataset_fallback.items() if v is not None}
        dataset_given = bool(raw_dataset)
    dataset = check_block(raw_dataset, DATASET_SCHEMA, origins, ("dataset",), "dataset")
    others = check_block(d.get("others"), OTHERS_SCHEMA, origins, ("others",), "others")
    from util.image_io import DATASETS

    if dataset["name"] not in DATASETS:
        raise ConfigError(f"{origins.of('dataset', 'name')}: dataset.name = {dataset['name']!r} is not allowed; "
                          f"use one of {', '.join(DATASETS)}")
    cfg = PurificationConfig(values=values, dataset_name=dataset["name"], dataset_root=dataset["root"],
                             image_size=others["img_size"] or dataset["img_size"], dataset_given=dataset_given,
                             path=where)
    try:
        cfg.settings().timesteps()
    except ValueError as exc:
        raise ConfigError(f"{origins.of('purification')}: {exc}") from None
    return cfg


def load_purification_config(path, overrides: Optional[list[Override]] = None,
                             dataset_fallback: Optional[dict] = None) -> PurificationConfig:
    origins = Origins(f"purification config '{path}'")
    raw = _nested(load_yaml(path, "purification config"))
    d = apply_overrides(raw, overrides or [], "purification", origins)
    cfg = purification_from_dict(d, origins, dataset_fallback=dataset_fallback)
    cfg.path = str(path)
    return cfg


def ldm_driver_purification(flags: dict, overrides: Optional[list[Override]] = None,
                            dataset_fallback: Optional[dict] = None) -> PurificationConfig:
    """The purification settings of the official DCDP-LDM driver: its defaults, then its flags."""
    origins = Origins("the official DCDP-LDM defaults")
    block = dict(LDM_DRIVER_DEFAULTS)
    for key, value in flags.items():
        block[key] = value
        origins.by_path[("purification", key)] = f"--{key}"
    d = apply_overrides({"purification": block, "others": {"img_size": 256}}, overrides or [], "purification", origins)
    cfg = purification_from_dict(d, origins, dataset_fallback=dataset_fallback)
    cfg.path = "(DCDP-LDM flags)"
    return cfg


# ---------------------------------------------------------------------------------------------
# Model config
# ---------------------------------------------------------------------------------------------

def load_model_config(path, overrides: Optional[list[Override]] = None, *, random_weights: bool = False) -> dict:
    """The model config as a dict; `model_path` must be given (null = random weights, said explicitly).

    The other keys are checked by the builder of its `kind`.
    """
    origins = Origins(f"model config '{path}'")
    d = apply_overrides(load_yaml(path, "model config"), overrides or [], "model", origins)
    where = origins.default
    if "measurement" in d or "purification" in d or any(k in d for k in purification_schema()):
        raise ConfigError(f"{where} is not a model config (it holds a task or purification block); give a file "
                          f"from model_configurations/ as --model_config")
    kind = d.get("kind", "pixel")
    from .priors import PRIORS

    if kind not in PRIORS:
        raise ConfigError(f"{origins.of('kind')}: kind = {kind!r} is not allowed; use one of {', '.join(PRIORS)}")
    if random_weights:
        d["model_path"] = None
    elif "model_path" not in d:
        raise ConfigError(f"{where} has no model_path; set model_path: /path/to/checkpoint (see "
                          f"`python dcdp.py --check_models`), or for random weights write model_path: null or pass --random_weights")
    elif d["model_path"] is not None and not isinstance(d["model_path"], str):
        raise ConfigError(f"{origins.of('model_path')}: model_path = {d['model_path']!r} must be a file path or null")
    return d
