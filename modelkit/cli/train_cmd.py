"""``modelkit train lora|locon|ti|hypernetwork|dreambooth --config train.toml [--set KEY=VALUE ...]``

Without the ``[train]`` extra every subcommand says which pip command installs it and exits 2; that
check uses ``importlib.util.find_spec`` only, so it works when diffusers and friends are absent.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from .._exit import EXIT_ERROR, EXIT_FINDINGS, EXIT_OK
from ..errors import ModelkitError, UnsafeFileError
from .output import Output, human_bytes

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
    (--config) and --set SECTION.KEY=VALUE overrides; --print-config shows the result.
    """


def _make(method: str) -> click.Command:
    @click.command(method, help=METHOD_HELP[method])
    @click.option("--config", "config_path", type=click.Path(dir_okay=False), help="The TOML config file.")
    @click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                  help="Override one config key (repeatable), e.g. --set optimizer.lr=1e-4.")
    @click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
    @click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON.")
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
    def command(config_path: str | None, overrides: tuple[str, ...], print_config: bool, json_mode: bool,
                quiet: bool) -> None:
        run_train(method, config_path, overrides, print_config, json_mode, quiet)

    return command


for _method in METHOD_HELP:
    train_cmd.add_command(_make(_method))


def run_train(method: str, config_path: str | None, overrides: tuple[str, ...], print_config: bool,
              json_mode: bool, quiet: bool) -> None:
    """The body of every ``modelkit train METHOD`` command."""
    from ..train.extra import require_extras

    out = Output(json_mode, quiet)
    try:
        require_extras()
        from ..train.config import load_config, render_toml, resolved

        config = resolved(load_config(config_path, method, overrides))
        if print_config:
            if json_mode:
                out.json(config.to_dict())
            else:
                out.line(render_toml(config).rstrip("\n"))
            sys.exit(EXIT_OK)
        from ..train import train

        bar = _Bar(out)
        try:
            result = train(config, progress=bar, on_skip=lambda s: out.warn(f"{s.path}: skipped, {s.reason}"))
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
    """The step bar on stderr (tqdm: steps, it/s, loss, lr); nothing outside a TTY or in JSON/quiet mode."""

    def __init__(self, out: Output):
        self.out = out
        self.bar: Any = None

    def __call__(self, step: int, total: int, loss: float, lr: float) -> None:
        if self.bar is None:
            self.bar = self.out.steps_bar(total, step - 1, "train")
            if self.bar is None:
                self.bar = False
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _render(out: Output, r: Any) -> None:
    import os

    size = os.path.getsize(r.output) if os.path.exists(r.output) else 0
    out.line(f"{r.method}: {r.steps} steps ({r.epochs} epochs) on {r.images} images, base {r.base} "
             f"({r.prediction}), final loss {r.loss:.4f}, {r.seconds:.1f} s")
    out.line(f"  wrote {r.output} ({human_bytes(size)})")
    for p in r.saved[:-1]:
        out.line(f"  saved {p}")
    if r.class_images:
        out.line(f"  generated {len(r.class_images)} class images in {os.path.dirname(r.class_images[0])}")
    if r.samples:
        out.line(f"  {len(r.samples)} sample images in {os.path.dirname(r.samples[0])}")
    for p in r.states:
        out.line(f"  state {p}  (resume with --set output.resume={p})")
