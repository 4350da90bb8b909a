"""``modelkit``: the click group."""

from __future__ import annotations

import sys

import click

from .. import __version__
from .._exit import EXIT_ERROR
from ..errors import ModelkitError
from .output import Output


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelkit")
def cli() -> None:
    """Scan, inspect, convert and load Stable Diffusion model files safely."""


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


def main() -> None:
    try:
        cli.main(prog_name="modelkit", standalone_mode=True)
    except ModelkitError as exc:  # a command that did not handle its own error
        Output().error(exc)
        sys.exit(EXIT_ERROR)
