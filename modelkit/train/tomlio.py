"""TOML in and out for the training config: ``tomllib`` (3.11+) or ``tomli`` (3.10), and a small writer."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, MissingExtraError

if TYPE_CHECKING:
    from .config import Config


def toml_module() -> Any:
    """``tomllib``, or ``tomli`` on Python 3.10.

    Raises:
        MissingExtraError: Python 3.10 without tomli.
    """
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise MissingExtraError(None, "reading TOML on Python 3.10 needs tomli",
                                "Run: pip install 'modelkit[train]'") from None
    return tomli


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=1e-4"`` -> ``("optimizer.lr", 1e-4)``; a value that is not TOML stays a string.

    Raises:
        ConfigError: no ``=`` or no dotted key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(None, f"--set {text!r} is not SECTION.KEY=VALUE", "Write for example --set optimizer.lr=1e-4")
    raw = raw.strip()
    try:
        value = toml_module().loads(f"v = {raw}")["v"]
    except ValueError:  # tomllib.TOMLDecodeError is a ValueError
        value = raw
    return key, value


def read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file (``OSError`` and ``ValueError`` pass through)."""
    with open(path, "rb") as f:
        data: dict[str, Any] = toml_module().load(f)
    return data


def render_toml(config: Config) -> str:
    """The resolved config as TOML text (what ``--print-config`` prints); ``None`` values are comments."""
    lines = [f"method = {_toml_value(config.method)}"]
    for section, values in config.to_dict().items():
        if section == "method":
            continue
        lines += ["", f"[{section}]"]
        for key, value in values.items():
            lines.append(f"# {key} is not set" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: [optimizer] args = {d_coef = 2.0}
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
