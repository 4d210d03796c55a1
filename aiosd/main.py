"""``aiosd``: the kernel daemon, in the foreground (as systemd expects)."""

from __future__ import annotations

import sys

import click

from libaios import paths

from . import config as config_mod
from . import logs, shipped
from .roles import EX_CONFIG
from .rundir import AlreadyRunning
from .supervisor import Supervisor


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="AIOS_CONFIG",
              help="TOML configuration file (default: built-in defaults).")
@click.option("--print-default-config", is_flag=True, help="Print the default configuration and exit.")
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
@click.option("--print-systemd-unit", is_flag=True,
              help="Print the systemd unit file (aiosd.service) and exit.")
@click.version_option(package_name="aios", prog_name="aiosd")
def main(config_path: str | None, print_default_config: bool, check_config: bool,
         print_systemd_unit: bool) -> None:
    """Run the AIOS kernel: the scheduler, one worker per LLM core, and the
    storage, memory and tool managers.

    Sockets go to AIOS_RUNTIME_DIR (else systemd's RuntimeDirectory, else
    $XDG_RUNTIME_DIR/aios); data to AIOS_DATA_DIR likewise.
    """
    if print_default_config:
        click.echo(config_mod.default_toml(), nl=False)
        return
    if print_systemd_unit:
        try:
            click.echo(shipped.systemd_unit().read_text(), nl=False)
        except OSError as exc:
            click.echo(f"aiosd: {exc}", err=True)
            sys.exit(1)
        return
    try:
        cfg = config_mod.load(config_path)
        if any(m.backend == "llamacpp" for m in cfg.llm.models):
            from .llm.llamacpp import resolve_model

            for i, model in enumerate(cfg.llm.models):
                if model.backend == "llamacpp":
                    resolve_model(model.path, f"llm.models[{i}].path")
    except config_mod.ConfigError as exc:
        click.echo(f"aiosd: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)
    if check_config:
        click.echo("configuration OK")
        return
    logs.setup(cfg.kernel, "aiosd")
    sup = Supervisor(cfg, paths.runtime_dir(), paths.data_dir())
    try:
        sys.exit(sup.run())
    except AlreadyRunning as exc:
        click.echo(f"aiosd: {exc}", err=True)
        sys.exit(1)
    except PermissionError as exc:
        click.echo(f"aiosd: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
