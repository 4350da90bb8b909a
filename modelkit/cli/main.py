"""``modelkit``: the click group."""

from __future__ import annotations

import errno
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from .. import __version__
from .._exit import EXIT_ERROR
from ..errors import ModelkitError, UsageError
from .output import Output


class OneLineUsageError(click.ClickException):
    """A click usage error (bad option value, unknown option, missing argument) shown the modelkit
    way: one line on stderr and, with ``--json``, a JSON error object on stdout; exit 2."""

    exit_code = EXIT_ERROR

    def __init__(self, exc: click.UsageError, json_mode: bool):
        super().__init__(exc.format_message())
        words = ["modelkit", *(exc.ctx.command_path.split()[1:] if exc.ctx is not None else [])]
        self.error = UsageError(None, exc.format_message().rstrip("."), f"Try '{' '.join(words)} -h' for help")
        self.schema = ".".join(words) + "/1"
        self.json_mode = json_mode

    def show(self, file: Any = None) -> None:
        Output(self.json_mode).fail(self.error, self.schema)


_JSON_KEY = "modelkit.json_requested"


def _json_requested(args: Sequence[str]) -> bool:
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


#: Each subcommand: the module and attribute that define it, and the first paragraph of its help.
#: A command's module is imported only when that command runs, so ``modelkit --help`` and
#: ``modelkit scan`` import nothing another command needs (tests/test_startup.py checks that this
#: help matches each command's own).
COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("scan_cmd:scan_cmd", "Scan model files statically; nothing in them is run."),
    "inspect": ("inspect_cmd:inspect_cmd", "Show what model files hold, without running or loading them."),
    "convert": ("convert_cmd:convert_cmd", "Convert model files to .safetensors, type-aware and bit-exact."),
    "prune": ("prune_cmd:prune_cmd", "Prune checkpoints into .safetensors: drop EMA, optimizer state and junk, "
              "cast, fix, extract."),
    "load": ("load_cmd:load_cmd", "Load a model file safely onto a device and report the throughput."),
    "hash": ("hash_cmd:hash_cmd", "Hash model files in one streaming read each (the hashes A1111 and Civitai "
             "show)."),
    "merge": ("merge_cmd:merge_group", "Bake LoRAs into a checkpoint, or merge checkpoints: streaming, exact, "
              "atomic."),
    "lora": ("lora_cmd:lora_group", "Extract a LoRA from two checkpoints, merge LoRAs, or change a LoRA's key "
             "style."),
    "train": ("train_cmd:train_cmd", "Train LoRA/LoCon, textual inversion, hypernetworks or DreamBooth; outputs "
              "are .safetensors."),
    "verify": ("verify_cmd:verify_cmd", "Check that OUTPUT holds exactly SOURCE's tensors (after any dtype cast). "
               "Exit 1 if not."),
    "diff": ("verify_cmd:diff_cmd", "Show key, shape, dtype and value differences between two model files. "
             "Exit 1 if they differ."),
}


class ModelkitGroup(click.Group):
    """The root group: subcommands are imported on first use (``COMMANDS``), and usage errors of
    any subcommand become ``OneLineUsageError``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, _, attr = COMMANDS[cmd_name][0].partition(":")
            command = getattr(importlib.import_module(f".{module}", __package__), attr)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from ``COMMANDS`` without importing them; same layout as click's."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.commands.get(name) or click.Command(name, help=COMMANDS[name][1])
            if not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in rows])

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        json_mode = _json_requested(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise OneLineUsageError(exc, json_mode) from None
        ctx.meta[_JSON_KEY] = json_mode
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise OneLineUsageError(exc, bool(ctx.meta.get(_JSON_KEY))) from None


@click.group(cls=ModelkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelkit")
def cli() -> None:
    """Scan, inspect, convert, prune, merge, load and train Stable Diffusion model files safely."""


#: The exit status of a command whose reader went away (``modelkit scan . | head``): what a shell
#: reports for a process ended by SIGPIPE, never 1, which means findings.
EXIT_BROKEN_PIPE = 128 + 13


def main() -> None:
    try:
        cli.main(prog_name="modelkit", standalone_mode=True)
    except ModelkitError as exc:  # a command that did not handle its own error
        Output().error(exc)
        sys.exit(EXIT_ERROR)
    except SystemExit:
        if type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper":  # click met EPIPE, exits 1: no finding
            sys.exit(EXIT_BROKEN_PIPE)
        raise
    except OSError as exc:
        # Windows reports a write to a closed pipe as EINVAL, which click does not take for EPIPE.
        if sys.platform == "win32" and exc.errno == errno.EINVAL:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
            sys.exit(EXIT_BROKEN_PIPE)
        raise
