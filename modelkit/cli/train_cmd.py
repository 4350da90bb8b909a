"""``modelkit train lora|locon|ti|hypernetwork|dreambooth --config train.toml [--set KEY=VALUE ...]``

Without the ``[train]`` extra every subcommand says which pip command installs it and exits 2; that
check uses ``importlib.util.find_spec`` only, so it works when diffusers and friends are absent.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from .output import Output, human_bytes, shown

METHOD_HELP = {
    "lora": "LoRA on the UNet (and optionally the text encoders), saved in kohya's layout.",
    "locon": "LoRA plus the UNet's convolutions (LoCon), saved in kohya's layout.",
    "ti": "Textual inversion: a new token's embedding vectors (emb_params / clip_l+clip_g).",
    "hypernetwork": "A1111-style hypernetwork (layer structure, activation, layer norm, dropout).",
    "dreambooth": "DreamBooth: the whole UNet (and optionally the text encoder), with prior preservation.",
}


@click.group("train")
def train_cmd() -> None:
    """Train LoRA/LoCon, textual inversion, hypernetworks or DreamBooth; outputs are .safetensors.

    Needs the [train] extra: pip install 'modelkit[train]'. Settings come from a TOML file
    (--config) and --set SECTION.KEY=VALUE overrides; --print-config shows the result, or
    without --config a commented template of the method's defaults.
    """


def _make(method: str) -> click.Command:
    @click.command(method, help=METHOD_HELP[method])
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The TOML config file.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one config key (repeatable), e.g. --set optimizer.lr=1e-4.")
    @click.option("--print-config", is_flag=True,
                  help="Print the resolved config and exit; without --config and --set, a commented template "
                       "of this method's defaults.")
    @click.option("--force", is_flag=True, help="Replace existing outputs (output.force = true).")
    @click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar and no chatter; results and errors stay.")
    def command(config_path: str | None, overrides: tuple[str, ...], print_config: bool, force: bool,
                json_mode: bool, quiet: bool) -> None:
        run_train(method, config_path, overrides, print_config, json_mode, quiet, force)

    return command


for _method in METHOD_HELP:
    train_cmd.add_command(_make(_method))


def run_train(method: str, config_path: str | None, overrides: tuple[str, ...], print_config: bool,
              json_mode: bool, quiet: bool, force: bool = False) -> None:
    """The body of every ``modelkit train METHOD`` command."""
    from ..train.extra import require_extras

    out = Output(json_mode, quiet)
    try:
        require_extras()
        from ..train.config import DEFAULT_INIT_WORD, load_config, render_toml, resolved

        if print_config and config_path is None and not overrides:
            from ..train.template import defaults, render_template

            if json_mode:
                out.json(defaults(method).to_dict())
            else:
                out.result(render_template(method).rstrip("\n"))
            sys.exit(EXIT_OK)
        given = load_config(config_path, method, overrides + (("output.force=true",) if force else ()))
        config = resolved(given)
        if print_config:
            if json_mode:
                out.json(config.to_dict())
            else:
                out.result(render_toml(config).rstrip("\n"))
            sys.exit(EXIT_OK)
        from ..train import train

        if method == "ti" and not given.ti.init_word.strip():
            out.warn(f"ti.init_word is not set: the new vectors start from {DEFAULT_INIT_WORD!r}; "
                     "set it to a word close to the concept (dog, painting)")
        bar = _Bar(out, config.output.log_every)
        try:
            result = train(config, progress=bar, on_skip=lambda s: out.warn(f"{s.path}: skipped, {s.reason}"),
                           on_start=bar.start)
        finally:
            bar.close()
    except ModelkitError as exc:
        out.fail(exc, "modelkit.train/1")
        sys.exit(EXIT_FINDINGS if isinstance(exc, UnsafeFileError) else EXIT_ERROR)
    if not result.main:  # another process of a multi-process launch: the main one reports
        sys.exit(EXIT_OK)
    if json_mode:
        out.json(result.to_dict())
    else:
        _render(out, result)
    sys.exit(EXIT_OK)


class _Bar:
    """Progress on stderr, nothing with ``-q``: a start-up summary, then on a terminal the step bar
    (tqdm: steps, it/s, loss, lr; not in JSON mode), elsewhere a line every ``log_every`` steps
    (0: ``max(1, steps // 20)``) and after the last."""

    def __init__(self, out: Output, log_every: int = 0):
        self.out = out
        self.bar: Any = None
        self.log_every = log_every
        self.lines = not out.quiet and not sys.stderr.isatty()
        self.last: tuple[int, float] | None = None

    def start(self, info: Any) -> None:
        """The start-up summary (``modelkit.train.loop.RunStart``)."""
        if self.out.quiet:
            return
        resumed = f", resuming at step {info.start}" if info.start else ""
        _log(f"modelkit train {info.method}: base {info.base} ({shown(info.model)}), {info.images} images in "
             f"{info.buckets} bucket{'s' if info.buckets != 1 else ''}, {info.steps} steps{resumed}, "
             f"{info.device} ({info.threads} thread{'s' if info.threads != 1 else ''})")
        _log(f"  output {shown(info.output)}; config {shown(info.config_file)}")
        self.last = (info.start, time.monotonic())

    def __call__(self, step: int, total: int, loss: float, lr: float) -> None:
        if self.lines:
            self._line(step, total, loss, lr)
            return
        if self.bar is None:
            self.bar = self.out.steps_bar(total, step - 1, "train")
            if self.bar is None:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def _line(self, step: int, total: int, loss: float, lr: float) -> None:
        every = self.log_every or max(1, total // 20)
        if step % every and step != total:
            return
        now = time.monotonic()
        first, then = self.last or (step - 1, now)
        rate = (step - first) / (now - then) if now > then else 0.0
        eta = _clock((total - step) / rate) if rate else "?"
        _log(f"step {step}/{total} ({100 * step // total}%)  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} it/s  ETA {eta}")
        self.last = (step, now)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _log(text: str) -> None:
    """One progress line on stderr (not a warning: no prefix)."""
    click.echo(text, err=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _render(out: Output, r: Any) -> None:
    import os

    size = os.path.getsize(r.output) if os.path.exists(r.output) else 0
    out.result(f"{r.method}: {r.steps} steps ({r.epochs} epochs) on {r.images} images, base {r.base} "
             f"({r.prediction}), final loss {r.loss:.4f}, {r.seconds:.1f} s")
    out.result(f"  wrote {r.output} ({human_bytes(size)})")
    if r.config_file:
        out.line(f"  config {r.config_file}")
    for p in r.saved[:-1]:
        out.line(f"  saved {p}")
    ema = list(getattr(r, "ema_saved", ()))
    if ema:
        out.result(f"  wrote {ema[-1]} (EMA of the trained weights)")
        for p in ema[:-1]:
            out.line(f"  saved {p}")
    checks = list(getattr(r, "validation", ()))
    if checks:
        out.result(f"  validation loss {checks[-1][1]:.4f} at step {checks[-1][0]}"
                   + (f" (first {checks[0][1]:.4f} at step {checks[0][0]})" if len(checks) > 1 else ""))
    if r.class_images:
        out.line(f"  generated {len(r.class_images)} class images in {os.path.dirname(r.class_images[0])}")
    if r.samples:
        out.line(f"  {len(r.samples)} sample images in {os.path.dirname(r.samples[0])}")
    for p in r.states:
        out.line(f"  state {p}  (resume with --set output.resume={p})")
