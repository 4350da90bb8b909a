"""A checker of Stability AI's ModelSpec 1.0 (``modelspec.*`` in a ``.safetensors`` header), written from the
spec's README (github.com/Stability-AI/ModelSpec), not from modelkit's code, plus the hash keys kohya and
A1111 read (``sshs_model_hash``, ``modelspec.hash_sha256``): a hash in a file must hash that file.

``problems(path)`` returns what is wrong, in words; an empty list means valid.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import struct
from pathlib import Path

#: MUST keys.
REQUIRED = ("sai_model_spec", "architecture", "implementation", "title")
#: Every key the spec (1.0.0, and 1.0.1 as kohya writes it) defines.
KNOWN = set(REQUIRED) | {
    "description", "author", "date", "hash_sha256", "implementation_version", "license", "usage_hint", "category",
    "thumbnail", "merged_from", "resolution", "trigger_phrase", "prediction_type", "timestep_range", "tags",
    "encoder_layer", "preprocessor", "is_negative_embedding", "unet_dtype", "vae_dtype",
    "data_format", "format_type", "language", "format_template",
}
#: The Stable Diffusion architecture IDs the README lists; an SD ID must be one of them ("SDv2-512 and
#: SDv2-768-v are different enough that the distinction must be marked").
SD_HEADS = ("stable-diffusion-v1", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v",
            "stable-diffusion-xl-v1-base", "stable-diffusion-xl-v1-refiner")
#: Adapters as the README spells them (``-lora``) or kohya/ComfyUI do (``/lora``).
ADAPTERS = ("lora", "textual-inversion", "hypernetwork", "vae", "controlnet", "text-encoder", "unet",
            "ip-adapter", "t2i-adapter")
_ID = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")
_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")


def header(path: str | Path) -> dict[str, object]:
    """The JSON header of a ``.safetensors`` file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))  # type: ignore[no-any-return]


def _data_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _split_arch(arch: str) -> tuple[str, str | None]:
    if "/" in arch:
        head, _, adapter = arch.partition("/")
        return head, adapter
    for a in ADAPTERS:
        if arch.endswith("-" + a) and arch[: -len(a) - 1] in SD_HEADS:
            return arch[: -len(a) - 1], a
    return arch, None


def check_metadata(meta: dict[str, str]) -> list[str]:
    """What is wrong with the ``__metadata__`` of a file as ModelSpec 1.0 asks for it (no file checks)."""
    out: list[str] = []
    spec = {k.removeprefix("modelspec."): v for k, v in meta.items() if k.startswith("modelspec.")}
    for key, value in meta.items():
        if not isinstance(value, str):
            out.append(f"{key}: metadata values must be strings, not {type(value).__name__}")
    for key in REQUIRED:
        if not str(spec.get(key, "")).strip():
            out.append(f"modelspec.{key} is required (MUST) and missing or empty")
    for key in spec:
        if key not in KNOWN and not key.startswith("hash_"):
            out.append(f"modelspec.{key} is not a key of the spec")
    version = spec.get("sai_model_spec")
    if version and not re.match(r"^1\.0\.\d+$", version):
        out.append(f"modelspec.sai_model_spec {version!r} is not a 1.0.x version")
    arch = spec.get("architecture")
    if arch:
        head, adapter = _split_arch(arch)
        if not _ID.match(head) or (adapter is not None and not _ID.match(adapter)):
            out.append(f"modelspec.architecture {arch!r} is not an ID (lower case, digits, '-', an optional /adapter)")
        elif head.startswith("stable-diffusion-") and not head.startswith("stable-diffusion-3") \
                and head not in SD_HEADS:
            out.append(f"modelspec.architecture {arch!r}: {head!r} is not a Stable Diffusion ID the spec lists")
    impl = spec.get("implementation")
    if impl and not (_URL.match(impl) or _ID.match(impl)):
        out.append(f"modelspec.implementation {impl!r} is neither a name like 'sgm'/'diffusers' nor a URL")
    title = spec.get("title")
    if title and title != title.strip():
        out.append(f"modelspec.title {title!r} has leading or trailing white space")
    res = spec.get("resolution")
    if res is not None and not re.match(r"^[1-9]\d*x[1-9]\d*$", res):
        out.append(f"modelspec.resolution {res!r} is not (width)x(height)")
    pred = spec.get("prediction_type")
    if pred is not None and pred not in ("v", "epsilon"):
        out.append(f"modelspec.prediction_type {pred!r} is not v or epsilon")
    if arch and pred:
        head = _split_arch(arch)[0]
        if (head == "stable-diffusion-v2-768-v") != (pred == "v") and head.startswith("stable-diffusion-v"):
            out.append(f"modelspec.prediction_type {pred!r} contradicts modelspec.architecture {arch!r}")
    if arch and res and _split_arch(arch)[0] == "stable-diffusion-v2-768-v" and res != "768x768":
        out.append(f"modelspec.resolution {res!r} contradicts modelspec.architecture {arch!r}")
    date = spec.get("date")
    if date is not None:
        try:
            datetime.datetime.fromisoformat(date[:-1] + "+00:00" if date.endswith("Z") else date)  # 3.10 lacks Z
        except ValueError:
            out.append(f"modelspec.date {date!r} is not ISO 8601")
    for key, value in spec.items():
        if key.startswith("hash_") and not re.match(r"^0x[0-9a-f]+$", value):
            out.append(f"modelspec.{key} {value!r} is not 0x-prefixed lower-case hex")
    if "hash_sha256" in spec and not re.match(r"^0x[0-9a-f]{64}$", spec["hash_sha256"]):
        out.append("modelspec.hash_sha256 is not a sha256 (64 hex digits)")
    if spec.get("merged_from", None) == "":
        out.append("modelspec.merged_from is empty")
    span = spec.get("timestep_range")
    if span is not None and not re.match(r"^\d+,\d+$", span):
        out.append(f"modelspec.timestep_range {span!r} is not <min>,<max>")
    v2 = meta.get("ss_v2")
    version_tag = meta.get("ss_base_model_version", "")
    if v2 is not None and v2 not in ("True", "False"):
        out.append(f"ss_v2 {v2!r} is not True or False")
    if version_tag.startswith("sd_v2") and v2 != "True":
        out.append(f"ss_base_model_version {version_tag!r} without ss_v2=True")
    if arch and version_tag and ("v2" in _split_arch(arch)[0]) != version_tag.startswith("sd_v2"):
        out.append(f"ss_base_model_version {version_tag!r} contradicts modelspec.architecture {arch!r}")
    return out


def problems(path: str | Path) -> list[str]:
    """What is wrong with the ModelSpec block and the hash keys of a ``.safetensors`` file."""
    meta = header(path).get("__metadata__")
    if not isinstance(meta, dict):
        return ["no __metadata__ at all"]
    out = check_metadata(meta)
    wanted = [k for k in ("sshs_model_hash", "modelspec.hash_sha256") if k in meta]
    if wanted:
        actual = _data_sha256(path)
        for key in wanted:
            if meta[key].lower().removeprefix("0x") != actual:
                out.append(f"{key} {meta[key]!r} does not hash this file's data (stale)")
    if "sshs_legacy_hash" in meta:
        out.append("sshs_legacy_hash carried over (it hashed other bytes)")
    return out
