"""Reading Lightning ``.ckpt`` files without Lightning, and never running code from them.

``torch.load(weights_only=True)`` reads plain state_dicts and most Lightning files. A Lightning file
can also pickle training metadata (hyper-parameters as omegaconf objects, callback states); the
weights-only loader refuses those, so we then unpickle with an allow-list: tensors, storages,
OrderedDict and dtypes are rebuilt, every other class or function becomes an inert stand-in that
is never called. Only the ``state_dict`` entry is kept.
"""
from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from collections.abc import Mapping

import torch

from util.checkpoints import CheckpointError, describe_unreadable


class _Inert:
    """Stand-in for any pickled global outside the allow-list: accepts every call and state, does nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a pickle *module*; it uses .Unpickler (and .load for old-format files).
_restricted_pickle = types.ModuleType("dcdp_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load


def _torch_load(path: str, restricted: bool):
    mmap = zipfile.is_zipfile(path)  # map multi-GB files instead of reading them whole
    if restricted:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle, mmap=mmap)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint(path: str | os.PathLike, *, what: str, source: str) -> dict[str, torch.Tensor]:
    """The ``name -> tensor`` state_dict in `path` (a plain state_dict or a dict with a ``state_dict`` entry).

    Raises CheckpointError naming the file and `source` (where to download it) if the file is missing,
    unreadable or holds no state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: checkpoint '{path}' not found; download it from {source} and place it at that path")
    try:
        try:
            obj = _torch_load(path, restricted=False)
        except pickle.UnpicklingError:  # pickled Lightning/omegaconf objects beside the weights
            obj = _torch_load(path, restricted=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(f"{what}: cannot read checkpoint '{path}': {describe_unreadable(path, exc)}; "
                              f"re-download it from {source}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what}: '{path}' does not hold a state_dict of tensors; re-download it from {source}")
    return dict(obj)
