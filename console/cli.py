"""The `quantdeck` command line: one click group; each subcommand lives in console/commands/<name>.py.

Errors are caught here, in one place: a QuantdeckError becomes one stderr line
`quantdeck: error: … (hint: …)` and its exit code; anything else is a bug and keeps its traceback.
QUANTDECK_DEBUG=1 shows tracebacks for ours too. stdout is for data only.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from engine.api import __version__
from engine.core.errors import QuantdeckError, SettingsError, exit_code_for
from engine.core.settings import settings


class _Group(click.Group):
    def list_commands(self, ctx):  # keep --help alphabetical
        return sorted(super().list_commands(ctx))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantdeck")
def cli() -> None:
    """quantdeck: quantize DeepSeek MoE checkpoints to NVFP4 / FP8-block, and babysit the runs."""


def _load_commands() -> None:
    import console.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"console.commands.{mod.name}")
        for cmd in getattr(module, "COMMANDS", ()):
            cli.add_command(cmd)


_load_commands()


def report_error(err: QuantdeckError) -> None:
    click.echo(f"quantdeck: error: {err.one_line()}", err=True)


def _debug() -> bool:
    """QUANTDECK_DEBUG, false where the settings themselves are the error being reported."""
    try:
        return settings().debug
    except SettingsError:
        return False


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="quantdeck", standalone_mode=False)
        # without standalone mode click returns an Exit's code instead of raising it (a failed headless demo)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except QuantdeckError as err:
        if _debug():
            import traceback

            traceback.print_exc()
        report_error(err)
        code = exit_code_for(err)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.exceptions.Abort:
        click.echo("quantdeck: interrupted", err=True)
        code = 130
    except KeyboardInterrupt:
        click.echo("quantdeck: interrupted", err=True)
        code = 130
    if argv is None:
        if "torch" in sys.modules:  # a command that worked here (convert, validate, calibrate, eval...): its files
            from engine.api import end_process  # are closed, so torch's teardown is skipped

            end_process(code)
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
