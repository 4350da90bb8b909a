"""``modelkit``: the click group."""

from __future__ import annotations

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


class ModelkitGroup(click.Group):
    """The root group: usage errors of any subcommand become ``OneLineUsageError``."""

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


def _register() -> None:
    from .convert_cmd import convert_cmd
    from .hash_cmd import hash_cmd
    from .inspect_cmd import inspect_cmd
    from .load_cmd import load_cmd
    from .lora_cmd import lora_group
    from .merge_cmd import merge_group
    from .prune_cmd import prune_cmd
    from .scan_cmd import scan_cmd
    from .train_cmd import train_cmd
    from .verify_cmd import diff_cmd, verify_cmd

    cli.add_command(scan_cmd)
    cli.add_command(inspect_cmd)
    cli.add_command(convert_cmd)
    cli.add_command(prune_cmd)
    cli.add_command(load_cmd)
    cli.add_command(hash_cmd)
    cli.add_command(merge_group)
    cli.add_command(lora_group)
    cli.add_command(train_cmd)
    cli.add_command(verify_cmd)
    cli.add_command(diff_cmd)


_register()


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
