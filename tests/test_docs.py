"""The docs stay true: CI runs the README's commands, every config key and module is documented."""

import dataclasses
from pathlib import Path

from dpo_dist import config as config_lib

ROOT = Path(__file__).resolve().parent.parent


def readme_setup_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Set up and run", 1)[1]
    return section.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()


def test_ci_runs_the_readme_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2 and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci


def test_readme_lists_every_config_key():
    readme = (ROOT / "README.md").read_text()
    for section, cls in config_lib.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in readme or f"`{f.name}`" in readme or f", {f.name}" in readme or f"{f.name}`" in readme, f"{section}.{f.name}"


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for module in (ROOT / "dpo_dist").glob("*.py"):
        if module.stem != "__init__":
            assert f"{module.stem}.py" in text, module.name
