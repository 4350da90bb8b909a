"""The one error tree of modelkit.

Every error carries the file it is about, what is wrong and what to do, so the CLI can turn
it into a single line and an exit code. Each class also derives from the stdlib exception a
caller would expect (``ValueError`` for bad content, ``FileExistsError`` for a refused
overwrite, ...), so code that does not know modelkit still catches them sensibly.
"""

from __future__ import annotations

import os


class ModelkitError(Exception):
    """Base class: ``path``, ``problem`` and ``remedy`` make the one-line message."""

    default_remedy = ""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str, remedy: str | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.problem = problem
        self.remedy = self.default_remedy if remedy is None else remedy
        super().__init__(self.message)

    @property
    def message(self) -> str:
        head = f"{self.path}: {self.problem}" if self.path else self.problem
        return f"{head}. {self.remedy}" if self.remedy else head

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str | None]:
        return {
            "error": type(self).__name__,
            "path": self.path,
            "problem": self.problem,
            "remedy": self.remedy,
        }


class FormatError(ModelkitError, ValueError):
    """The file is not a valid model container (corrupt, truncated, lying header, ...)."""

    default_remedy = "The file is damaged or not a model file; download it again or check its source"


class TruncatedFileError(FormatError):
    """The file ends before its own structure says it should."""

    default_remedy = "The file is incomplete; download it again"


class UnsupportedFormatError(FormatError):
    """Content that modelkit recognises as not being a supported model container."""

    default_remedy = (
        "modelkit reads .safetensors, PyTorch .ckpt/.pt/.pth/.bin (zip or legacy), plain pickles of "
        "tensors, .npy and .npz"
    )


class UnsafeFileError(ModelkitError, ValueError):
    """The file asks to run code (or use a global) that the allow-list refuses."""

    default_remedy = "Do not load this file; run `modelkit scan` on it for details"

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        problem: str,
        remedy: str | None = None,
        *,
        global_name: str | None = None,
    ):
        self.global_name = global_name
        super().__init__(path, problem, remedy)


class ResourceLimitError(FormatError):
    """A pickle or header exceeds a safety bound (opcodes, memo, nesting, size)."""

    default_remedy = "The file is built to exhaust resources or is far larger than any real model file"


class NotAFileError(ModelkitError, IsADirectoryError):
    """A folder (or something else) was given where a file was expected."""

    default_remedy = "Pass a file, or a folder to a command that walks folders"


class InputNotFoundError(ModelkitError, FileNotFoundError):
    """The input path does not exist."""

    default_remedy = "Check the path"


class RemoteError(ModelkitError, OSError):
    """A remote file could not be read as the same bytes from start to end: an HTTP error, a
    server that lies about the length, truncates a body or changes the file between requests."""

    default_remedy = "Try again later, or download the file and scan the local copy"


class OutputExistsError(ModelkitError, FileExistsError):
    """The output exists and ``--force`` was not given."""

    default_remedy = "Pass --force to overwrite it, or choose another output name"


class MissingExtraError(ModelkitError, ImportError):
    """An optional dependency is not installed."""


class OutputWriteError(ModelkitError, OSError):
    """The output could not be written (full disk, no permission, ...); nothing was left behind."""

    default_remedy = "Free some space or choose another output folder; the input was not changed"


class UsageError(ModelkitError, ValueError):
    """The command was called with options that do not go together."""


class ConfigError(ModelkitError, ValueError):
    """A training config (TOML file or ``--set`` override) names an unknown key or a bad value."""

    default_remedy = "Fix that key in the config file or the --set override"


class TrainingError(ModelkitError, RuntimeError):
    """Training cannot go on (a NaN/inf loss, a state that does not fit the run, ...)."""


class CastOverflowError(ModelkitError, ValueError):
    """Finite values would become inf in the output dtype; the output was not written.

    ``counts`` maps each tensor that overflowed to how many of its values did.
    """

    default_remedy = "Pass --allow-overflow to write it anyway, or keep a wider dtype (--dtype fp32/bf16)"

    def __init__(self, path: str | os.PathLike[str] | None, counts: dict[str, int], dtype: str | None = None):
        self.counts = dict(counts)
        total = sum(self.counts.values())
        names = ", ".join(f"{k} ({v:,})" for k, v in list(self.counts.items())[:3])
        more = f" and {len(self.counts) - 3} more" if len(self.counts) > 3 else ""
        where = f" in {dtype}" if dtype else ""
        fp8 = (dtype or "").lower().removeprefix("float8_").removeprefix("fp8_")
        how = {"e4m3fn": "overflow fp8's range (torch saturates them to +-448)", "e5m2": "overflow to inf"}.get(
            fp8, "overflow to inf")
        problem = (f"{total:,} finite value{'' if total == 1 else 's'} would {how}{where} in "
                   f"{len(self.counts)} tensor{'' if len(self.counts) == 1 else 's'}: {names}{more}; not written")
        remedy = ("Pass --fp8 clamp (saturate) or --fp8 scaled (a scale per weight), or --allow-overflow"
                  if fp8 in ("e4m3fn", "e5m2") else None)
        super().__init__(path, problem, remedy)
