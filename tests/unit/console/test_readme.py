"""The README's CLI reference stays in step with the code: every subcommand is documented, none is invented."""

from __future__ import annotations

import re
from pathlib import Path

from console.cli import cli

README = Path(__file__).resolve().parents[3] / "README.md"


def _reference_rows() -> set[str]:
    text = README.read_text()
    section = text.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`quantdeck ([a-z0-9-]+)", section))


def test_every_subcommand_is_in_the_readme_reference():
    assert set(cli.commands) - _reference_rows() == set()


def test_the_readme_reference_names_only_real_subcommands():
    assert _reference_rows() - set(cli.commands) == set()


def test_quick_start_is_the_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)", quick, flags=re.M)
    assert commands == ["make demo", "make test"]
