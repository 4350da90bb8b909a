"""The one place that fills Stability AI's ModelSpec (``modelspec.*``) and kohya's base tags (``ss_v2``,
``ss_base_model_version``) of every output, and drops hash keys that described the input's bytes.

ModelSpec 1.0 requires ``sai_model_spec``, ``architecture``, ``implementation`` and ``title``; image
models should also carry ``resolution`` (``WxH``) and may carry ``prediction_type`` (``v`` or
``epsilon``) and ``date`` (ISO 8601). Every output gets all four required keys; the others when known.

* architecture: the base's ID (``stable-diffusion-v1``, ``stable-diffusion-v2-512``,
  ``stable-diffusion-v2-768-v``, ``stable-diffusion-xl-v1-base`` ...), and for an adapter or a part
  ``/`` its kind (``/lora``, ``/textual-inversion``, ``/hypernetwork``, ``/vae`` ...), as kohya writes it.
  An SD2 model whose prediction is unknown is ``-512`` (kohya's default, too).
* implementation: the codebase whose names the tensor keys follow: Stability AI's (LDM/SGM names,
  ``input_blocks``, ``first_stage_model`` ..., and textual inversions), ``diffusers`` (``down_blocks``,
  ``text_model`` ...), or AUTOMATIC1111's (hypernetworks).
* Hashes (``sshs_model_hash``, ``sshs_legacy_hash``, ``modelspec.hash_*``) describe bytes; an output
  has other bytes, so they are never carried over.

Example:
    >>> modelspec_block(kind="lora", base="sd2", prediction="v", title="my lora")["modelspec.architecture"]
    'stable-diffusion-v2-768-v/lora'
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping

SPEC_VERSION = "1.0.0"

IMPL_SGM = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_A1111 = "https://github.com/AUTOMATIC1111/stable-diffusion-webui"

#: Metadata that hashes the file's bytes: stale in any output.
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
HASH_PREFIX = "modelspec.hash_"

#: The architecture suffix of each kind of file (a whole model has none).
SUFFIX = {
    "checkpoint": "", "lora": "lora", "embedding": "textual-inversion", "textual-inversion": "textual-inversion",
    "hypernetwork": "hypernetwork", "vae": "vae", "controlnet": "controlnet", "text-encoder": "text-encoder",
    "unet": "unet", "ip-adapter": "ip-adapter", "t2i-adapter": "t2i-adapter",
}
#: kohya's ``ss_base_model_version`` per base (SD2 gains ``_v`` for v-prediction).
SS_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_PREDICTION = {"v": "v", "v_prediction": "v", "v-prediction": "v", "eps": "eps", "epsilon": "eps"}
_RESOLUTION = {"sd1": 512, "sdxl": 1024, "sdxl-refiner": 1024, "sd3": 1024, "flux": 1024}
_LDM = re.compile(r"(?:^|[._])(?:input_blocks|middle_block|output_blocks|diffusion_model|first_stage_model|"
                  r"cond_stage_model|conditioner)(?:[._]|$)|^(?:encoder|decoder)\.(?:down|up|mid)\.")
_DIFFUSERS = re.compile(r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|text_model|transformer_blocks|"
                        r"single_transformer_blocks)(?:[._]|$)")
_ARCH = re.compile(r"^[a-z0-9][a-z0-9.\-]*(?:/[a-z0-9][a-z0-9.\-]*)?$")
_RES = re.compile(r"^[1-9]\d*x[1-9]\d*$")


def prediction(value: str | None) -> str | None:
    """``v`` or ``eps`` for any common spelling (``v_prediction``, ``epsilon`` ...); None if unknown."""
    return _PREDICTION.get((value or "").strip().lower())


def head(base: str | None, pred: str | None = None) -> str:
    """The architecture ID of a base model (``unknown`` when the base is)."""
    p = prediction(pred)
    if base == "sd2":
        return "stable-diffusion-v2-768-v" if p == "v" else "stable-diffusion-v2-512"
    return {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
            "sdxl-refiner": "stable-diffusion-xl-v1-refiner", "sd3": "stable-diffusion-3",
            "flux": "flux-1"}.get(base or "", "unknown")


def architecture(base: str | None, kind: str, pred: str | None = None) -> str:
    """``modelspec.architecture`` of a file of ``kind`` (``checkpoint``, ``lora``, ``embedding`` ...) for ``base``."""
    suffix = SUFFIX.get(kind, kind if kind not in ("other", "unknown") else "")
    return head(base, pred) + (f"/{suffix}" if suffix else "")


def implementation(kind: str, names: Iterable[str] = ()) -> str:
    """``modelspec.implementation``: whose names the keys ``names`` follow (see the module's notes)."""
    if kind == "hypernetwork":
        return IMPL_A1111
    if kind in ("embedding", "textual-inversion"):
        return IMPL_SGM
    diffusers = False
    for n in names:
        if _LDM.search(n):
            return IMPL_SGM
        diffusers = diffusers or bool(_DIFFUSERS.search(n))
    if diffusers:
        return IMPL_DIFFUSERS
    return IMPL_SGM if kind == "checkpoint" else IMPL_DIFFUSERS


def resolution(base: str | None, pred: str | None = None, size: int | tuple[int, int] | None = None) -> str | None:
    """``WxH``: ``size`` if given, else the base's native one (None when unknown)."""
    if size is None:
        if base == "sd2":
            size = 768 if prediction(pred) == "v" else 512
        elif base in _RESOLUTION:
            size = _RESOLUTION[base]
        else:
            return None
    w, h = (size, size) if isinstance(size, int) else size
    return f"{w}x{h}"


def prediction_type(base: str | None, pred: str | None = None) -> str | None:
    """``v`` or ``epsilon`` as the architecture implies it (None for bases without one, or unknown)."""
    p = prediction(pred)
    if p is None and base in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
        p = "eps"  # what the architecture ID says (SD2: -512)
    if base in ("flux", None) and p is None:
        return None
    return {"v": "v", "eps": "epsilon"}.get(p or "")


def now() -> str:
    """The current time in UTC, ISO 8601 to the second (``2026-01-31T12:00:00Z``)."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def modelspec_block(*, kind: str, base: str | None, title: str, prediction: str | None = None,
                    resolution: int | tuple[int, int] | None = None, implementation: str | None = None,
                    names: Iterable[str] = (), date: str | bool = False,
                    merged_from: Iterable[str] = ()) -> dict[str, str]:
    """The ``modelspec.*`` keys of an output: the four required ones, and what else is known.

    Args:
        kind: ``checkpoint``, ``lora``, ``embedding`` (or ``textual-inversion``), ``hypernetwork``, ``vae``,
            ``controlnet``, ``text-encoder``, ``unet`` ..., or ``other``.
        base: ``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``, ``sd3``, ``flux`` or None (unknown).
        title: the title (a file stem when nothing better is known).
        prediction: ``v``/``eps`` in any common spelling, or None.
        resolution: the training or native size; default: the base's.
        implementation: the key naming's codebase; default: decided from ``kind`` and ``names``.
        names: the output's tensor names (to tell LDM from diffusers naming).
        date: an ISO 8601 date, ``True`` for now, or ``False`` for none.
        merged_from: titles or file names of the models merged into this one.

    Returns:
        ``{"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ..., ...}``.
    """
    impl = implementation or _implementation(kind, names)
    out = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": architecture(base, kind, prediction),
        "modelspec.implementation": impl,
        "modelspec.title": title,
    }
    res = _resolution(base, prediction, resolution)
    if res:
        out["modelspec.resolution"] = res
    pred = prediction_type(base, prediction)
    if pred:
        out["modelspec.prediction_type"] = pred
    if date:
        out["modelspec.date"] = now() if date is True else date
    sources = [s.replace(",", " ") for s in merged_from]
    if sources:
        out["modelspec.merged_from"] = ", ".join(sources)
    return out


_implementation = implementation
_resolution = resolution


def kohya_tags(base: str | None, pred: str | None = None) -> dict[str, str]:
    """kohya's ``ss_base_model_version`` and ``ss_v2`` (and ``ss_v_parameterization``) for a LoRA of ``base``."""
    if base not in SS_VERSION:
        return {}
    v = prediction(pred) == "v"
    return {"ss_base_model_version": SS_VERSION[base] + ("_v" if base == "sd2" and v else ""),
            "ss_v2": str(base == "sd2"), "ss_v_parameterization": str(v)}


def settled(metadata: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """``metadata`` with ``modelspec.implementation`` decided from the tensor names really written (the kind
    of file from the architecture's suffix), for writers that get their metadata before their tensors."""
    out = dict(metadata)
    arch = out.get("modelspec.architecture")
    if arch is not None:
        out["modelspec.implementation"] = _implementation(arch.partition("/")[2] or "checkpoint", names)
    return out


def valid(key: str, value: str) -> bool:
    """Whether an existing ``modelspec.*`` value has the form ModelSpec asks for (so it may be kept)."""
    if not value.strip():
        return False
    if key == "modelspec.architecture":
        return bool(_ARCH.match(value)) and value.split("/")[0] != "stable-diffusion-v2"
    if key == "modelspec.resolution":
        return bool(_RES.match(value))
    if key == "modelspec.prediction_type":
        return value in ("v", "epsilon")
    if key == "modelspec.sai_model_spec":
        return bool(re.match(r"^1\.\d+\.\d+$", value))
    if key == "modelspec.date":
        try:
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
    return True


def carried(metadata: Mapping[str, str], changes: list[str] | None = None) -> dict[str, str]:
    """The input's metadata without the hashes of its bytes (noted in ``changes``)."""
    out = {k: v for k, v in metadata.items() if k not in HASH_KEYS and not k.startswith(HASH_PREFIX)}
    gone = sorted(set(metadata) - set(out))
    if gone and changes is not None:
        changes.append(f"dropped {', '.join(gone)} (hashes of the input's bytes)")
    return out


def fill(metadata: Mapping[str, str], block: Mapping[str, str], *, override: Iterable[str] = (),
         changes: list[str] | None = None) -> dict[str, str]:
    """``metadata`` with ``block`` filled in: an existing valid ``modelspec.*`` value wins, except for the
    keys in ``override``; invalid ones are replaced (noted in ``changes``). Stale hashes are dropped."""
    out = carried(metadata, changes)
    forced = set(override)
    for key, value in block.items():
        old = out.get(key)
        if old is None or key in forced:
            out[key] = value
        elif not valid(key, old):
            out[key] = value
            if changes is not None:
                changes.append(f"{key} {old!r} -> {value!r} (not a valid ModelSpec value)")
    return out
