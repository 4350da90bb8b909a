"""``modelkit``: the click group."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import click

from .. import __version__
from .._exit import EXIT_ERROR
from ..errors import ModelkitError, UsageError
from .output import Output, close_bars


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
        out = Output(self.json_mode)
        out.error(_joined(self.error.problem, self.error.remedy))
        if self.json_mode:
            out.json({"schema": self.schema, "error": self.error.to_dict()})


def _joined(problem: str, remedy: str | None) -> str:
    """``problem`` and ``remedy`` as one line: a period between them, none after a question, so
    click's ``Did you mean '--jobs'?`` is not followed by a stray ``.``."""
    if not remedy:
        return problem
    return f"{problem} {remedy}" if problem.rstrip(")").endswith("?") else f"{problem}. {remedy}"


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
    "clean": ("clean_cmd:clean_cmd", "Remove the temp files an interrupted modelkit left behind."),
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
        except KeyboardInterrupt as exc:
            # click would print "Aborted!" and exit 1, which is also "mismatch" for hash, verify and diff.
            signum = signal_number(exc)
            interrupted_line(ctx.invoked_subcommand in WRITERS)
            _interrupted.append(EXIT_SIGNAL_BASE + signum)
            ctx.exit(EXIT_SIGNAL_BASE + signum)


@click.group(cls=ModelkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelkit")
def cli() -> None:
    """Scan, inspect, convert, prune, merge, load and train Stable Diffusion model files safely."""
    from ..tempfiles import report_sweeps_to

    report_sweeps_to(Output().warn)  # the abandoned temp files a write removes: one warning line on stderr


#: the exit status of a command a signal stopped (set once it has cleaned up and said so)
_interrupted: list[int] = []

#: A command stopped by a signal exits 128 + its number, as a shell reports it: 130 for Ctrl-C
#: (SIGINT), 143 for SIGTERM, 129 for SIGHUP.
EXIT_SIGNAL_BASE = 128

#: Commands that write files: after an interrupt they say that no partial output is left.
WRITERS = frozenset({"convert", "prune", "merge", "lora", "train"})


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised wherever the program is, as Ctrl-C is: ``finally`` blocks and
    context managers (``atomic_output`` removes its temp file) run on the way out."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def signal_number(exc: KeyboardInterrupt) -> int:
    """The signal behind ``exc``: its ``signum``, the N of ``KeyboardInterrupt("signal N")`` (what
    ``modelkit.paths.signals_raise`` raises while a file is written), else SIGINT (Ctrl-C)."""
    signum = getattr(exc, "signum", None)
    if isinstance(signum, int):
        return signum
    text = str(exc.args[0]) if exc.args else ""
    word, _, number = text.partition(" ")
    return int(number) if word == "signal" and number.isdigit() else int(signal.SIGINT)


def interrupted_line(writes: bool) -> None:
    """Close any progress bar and say, in one line on stderr, that the command was interrupted."""
    close_bars()
    # On a terminal, Ctrl-C left "^C" where the cursor is: write over it.
    start = "\r\x1b[K" if sys.stderr.isatty() else ""
    rest = "; no partial output was left behind" if writes else ""
    click.echo(f"{start}modelkit: interrupted{rest}", err=True)


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _install_signal_handlers() -> None:
    """SIGTERM and SIGHUP stop a command the way Ctrl-C does (cleanup, one line), exit 143 / 129."""
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _raise_stopped)


#: The exit status of a command whose reader went away (``modelkit scan . | head``): what a shell
#: reports for a process ended by SIGPIPE, never 1, which means findings.
EXIT_BROKEN_PIPE = 128 + 13


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main() -> None:
    _install_signal_handlers()
    try:
        cli.main(prog_name="modelkit", standalone_mode=True)
    except ModelkitError as exc:  # a command that did not handle its own error
        Output().error(exc)
        sys.exit(EXIT_ERROR)
    except SystemExit:
        if type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper":  # click met EPIPE, exits 1: no finding
            sys.exit(EXIT_BROKEN_PIPE)
        if _interrupted:
            # Stopped by a signal, cleaned up and said so: leave now with 128 + N. Interpreter
            # shutdown (joining a reader thread still in a system call) would otherwise take a
            # while, and now and then ended by SIGINT instead (exit -2 seen in 2 of 40 runs).
            _exit_now(_interrupted[-1])
        raise
    except OSError as exc:
        # Windows reports a write to a closed pipe as EINVAL, which click does not take for EPIPE.
        if sys.platform == "win32" and exc.errno == errno.EINVAL:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter flushes it at exit
            sys.exit(EXIT_BROKEN_PIPE)
        raise
