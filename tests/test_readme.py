"""The README a newcomer reads first: a short quick start naming the two commands, and commands
that the CLI actually accepts (a renamed flag breaks this test, not the reader)."""

from __future__ import annotations

import re
import shlex

import pytest

from launchers import cli
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
PODSCALE = re.compile(r"^(?:!|\.venv(?:-xla)?/bin/)?podscale(?:\s|$)")


def _sections() -> list[tuple[str, list[str]]]:
    """(heading, lines) for each '## ' section."""
    out: list[tuple[str, list[str]]] = []
    for line in README.splitlines():
        if line.startswith("## "):
            out.append((line[3:].strip(), []))
        elif out:
            out[-1][1].append(line)
    return out


def test_quick_start_comes_first_and_is_short():
    heading, lines = _sections()[0]
    assert heading == "Quick start"
    assert len(lines) <= 60, len(lines)
    body = "\n".join(lines)
    assert "make run" in body and "make test" in body
    assert not any(line.startswith("#") for line in lines)  # both commands before any other heading
    for must in (".venv/bin/activate", ".venv/bin/podscale", "out/scale", "runs/scale", "podscale run"):
        assert must in body, must
    # the times are measured figures, not placeholders
    assert re.search(r"`make run`\*\* took \d+ min", body) and re.search(r"`make test`\*\* took \d+ min", body), body
    assert "## Contents" in README


def _commands() -> list[str]:
    """Every podscale command in the README's code blocks (fenced or indented), continuations joined."""
    cmds, block, fenced = [], False, False
    lines = README.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
            block = fenced and line.strip() in ("```bash", "```sh", "```")
            i += 1
            continue
        code = line.strip() if (fenced and block) or (line.startswith("    ") and not fenced) else None
        if code and PODSCALE.match(code):
            while code.endswith("\\") and i + 1 < len(lines):
                i += 1
                code = code[:-1] + " " + lines[i].strip()
            cmds.append(code)
        i += 1
    return cmds


COMMANDS = _commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    argv = shlex.split(command, comments=True)[1:]
    parts = [argv]
    if argv[:1] == ["launch"] and "--" in argv:  # the command the job runs on the cluster, too
        parts.append(argv[argv.index("--") + 1 :])
    for part in parts:
        try:
            args = cli.parse(part)
        except SystemExit as e:
            pytest.fail(f"README command does not parse (exit {e.code}): {command}")
        assert callable(args.func)
