"""The CLI's exit code is the command's: an `Exit` raised inside a command (a failed headless demo) is not lost
(click returns it instead of raising it when it is not in standalone mode)."""

from __future__ import annotations

import click

from console.cli import cli, main


def test_an_exit_raised_in_a_command_is_the_exit_code():
    def fail() -> None:
        raise click.exceptions.Exit(3)

    cmd = click.Command("qd-test-exit", callback=fail)
    cli.add_command(cmd)
    try:
        assert main(["qd-test-exit"]) == 3
    finally:
        cli.commands.pop("qd-test-exit", None)
    assert main(["--version"]) == 0
