"""The documentation stays true: every command has help with an example, the README lists every
command, its two commands exist and CI runs the second, and the demo runs on the documented config."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from slurm_gpuarb.cli.commands import cli
from slurm_gpuarb.config import load
from slurm_gpuarb.demo import WORKSTATION_TOML, run_workstation_demo

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, path)
    return out


COMMANDS = _commands(cli)


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, f"`gpuarb {' '.join(path)} --help` shows no example"


@pytest.mark.parametrize("path", [p for p, c in COMMANDS if not isinstance(c, click.Group)],
                         ids=[" ".join(p) for p, c in COMMANDS if not isinstance(c, click.Group)])
def test_readme_lists_every_command(path: tuple[str, ...]) -> None:
    assert f"gpuarb {' '.join(path)}" in README, f"README does not mention `gpuarb {' '.join(path)}`"


def test_readme_two_commands_exist_and_ci_runs_the_test_command() -> None:
    block = re.search(r"## Two commands.*?```sh\n(.*?)```", README, re.S)
    assert block is not None
    first, second = [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]
    for cmd in (first, second):
        script = cmd.split()[-1]
        assert (REPO / script).is_file(), script
    ci = (REPO / ".ci" / "run").read_text()
    assert second.split()[-1] in ci


def test_demo_config_is_the_documented_example(tmp_path: Path) -> None:
    embedded = tmp_path / "embedded.toml"
    embedded.write_text(WORKSTATION_TOML)
    embedded.chmod(0o600)
    a = load(embedded, env={})
    b = load(REPO / "templates" / "examples" / "workstation-3090ti.toml", env={})
    assert (a.policy, a.reservations, a.nodes, a.partitions, a.node) == (b.policy, b.reservations, b.nodes,
                                                                          b.partitions, b.node)


def test_demo_tells_the_story(tmp_path: Path) -> None:
    lines: list[str] = []
    run_workstation_demo(lines.append, ledger_dir=str(tmp_path))
    text = "\n".join(lines)
    assert "loads it on the CPU" in text  # without arbitration
    assert text.count("  grant: ") == 2 and text.count("  wait: ") == 1  # two workers run, the third waits
    assert "reservation ollama" in text and "holds   12GiB" in text  # Ollama keeps its 12 GiB, held once
    assert "counted once" in text  # the explanation of the refused request
