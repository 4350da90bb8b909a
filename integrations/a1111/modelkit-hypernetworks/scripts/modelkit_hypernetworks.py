"""AUTOMATIC1111 extension: hypernetworks as ``.safetensors`` (what ``modelkit train`` and
``modelkit convert`` write), read safely through modelkit.

A1111 lists only ``models/hypernetworks/**/*.pt`` and reads each with ``torch.load``. At start-up
this script (1) adds ``**/*.safetensors`` to that list and (2) lets ``Hypernetwork.load`` read such
a file through ``modelkit`` (no pickle): ``read_hypernetwork`` rebuilds exactly the object A1111's
own ``.pt`` holds (``{size: (module_0, module_1), "layer_structure": ..., ...}``) and hands it to
A1111's unchanged ``load``, so A1111's own ``HypernetworkModule`` builds the layers. ``.pt`` files
load as before. Needs ``pip install modelkit[torch]`` in the web UI's Python.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

#: structure fields stored as JSON strings in a modelkit hypernetwork's metadata
JSON_FIELDS = ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "use_dropout",
               "activate_output", "dropout_structure", "last_layer_dropout", "sd_checkpoint", "sd_checkpoint_name",
               "optional_info")
#: NovelAI's first module names, which A1111 renames itself
OLD_NAMES = {"linear1": "linear.0", "linear2": "linear.1"}


def _modelkit() -> Any:
    try:
        import modelkit
    except ImportError as exc:
        raise ImportError("loading hypernetworks through modelkit needs it in this Python: "
                          "python -m pip install 'modelkit[torch]'") from exc
    return modelkit


def read_hypernetwork(path: str) -> dict[Any, Any]:
    """The object A1111's ``Hypernetwork.save`` writes with ``torch.save``, read from a modelkit
    hypernetwork (``{size}.{0|1}.linear.{i}.{weight|bias}`` tensors, fields in the metadata) or from
    any file modelkit reads (an A1111 ``.pt`` too, without unpickling code).

    Returns:
        ``{size (int): (state_dict_0, state_dict_1), field: value, ...}``.

    Raises:
        ValueError: a tensor name that is not ``{size}.{0|1}.{module key}``.
    """
    modelkit = _modelkit()
    tensors = modelkit.load(path)
    with modelkit.open_model(path) as mf:
        fields: dict[Any, Any] = {k: v for k, v in mf.extras.items() if not isinstance(k, int)}
        for key, text in mf.metadata.items():
            if key in JSON_FIELDS:
                fields[key] = json.loads(text)
            elif key == "name":
                fields[key] = text
            elif key == "step":
                fields[key] = int(text) if text.isdigit() else text
    out: dict[Any, Any] = {}
    for name, tensor in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
            raise ValueError(f"{path}: {name!r} is not a hypernetwork tensor ({{size}}.{{0|1}}.linear.{{i}}.weight)")
        head, _, tail = parts[2].partition(".")
        key = f"{OLD_NAMES[head]}.{tail}" if head in OLD_NAMES else parts[2]
        pair = out.setdefault(int(parts[0]), (OrderedDict(), OrderedDict()))
        pair[int(parts[1])][key] = tensor
    return {**out, **fields}


class _TorchWith:
    """The ``torch`` module, except that ``load`` of one file returns a given object."""

    def __init__(self, torch: Any, path: str, obj: Any):
        self._torch, self._path, self._obj = torch, path, obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def load(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, os.PathLike)) and os.fspath(f) == self._path:
            return self._obj
        return self._torch.load(f, *args, **kwargs)


@contextlib.contextmanager
def _reading(module: Any, path: str) -> Iterator[None]:
    """While inside, ``module``'s ``torch.load(path)`` gets ``read_hypernetwork(path)``."""
    real = module.torch
    module.torch = _TorchWith(real, path, read_hypernetwork(path))
    try:
        yield
    finally:
        module.torch = real


def install() -> None:
    """Patch A1111's hypernetwork module (call inside the web UI)."""
    from modules.hypernetworks import hypernetwork as hn

    if getattr(hn, "_modelkit_installed", False):
        return
    list_pt, load_pt = hn.list_hypernetworks, hn.Hypernetwork.load

    def list_hypernetworks(path: str) -> dict[str, str]:
        res: dict[str, str] = list_pt(path)
        for filename in sorted(glob.iglob(os.path.join(path, "**/*.safetensors"), recursive=True), key=str.lower):
            name = os.path.splitext(os.path.basename(filename))[0]
            if name != "None":
                res.setdefault(name, filename)
        return res

    def load(self: Any, filename: str) -> Any:
        if not str(filename).lower().endswith(".safetensors"):
            return load_pt(self, filename)
        with _reading(hn, os.fspath(filename)):
            return load_pt(self, filename)

    hn.list_hypernetworks, hn.Hypernetwork.load = list_hypernetworks, load
    hn._modelkit_installed = True
    with contextlib.suppress(ImportError, AttributeError):
        from modules import shared_items

        shared_items.reload_hypernetworks()  # the list was made before extensions loaded


def _in_webui() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("modules.hypernetworks.hypernetwork") is not None
    except ImportError:
        return False


if _in_webui():
    install()
