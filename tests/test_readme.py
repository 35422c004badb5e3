"""The README stays true: its configuration example loads and every command it names exists."""

from __future__ import annotations

import re
from pathlib import Path

from node.cli import build_parser
from node.settings import load_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_opens_with_the_two_commands() -> None:
    first_block = README.read_text().split("```")[1]
    lines = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert lines == ["make run", "make test"]


def test_readme_configuration_example_is_valid(tmp_path: Path) -> None:
    (block,) = re.findall(r"```toml\n(.*?)```", README.read_text(), flags=re.S)
    config = tmp_path / "fracnode.toml"
    config.write_text(block)
    settings = load_settings(config)
    assert settings.dicom.allowed_calling_aets == ["PACS"]
    assert [d.name for d in settings.export.destinations] == ["pacs"]
    assert settings.hl7.host == "ris.example.org"


def test_every_command_in_the_readme_exists() -> None:
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    named = set(re.findall(r"`fracnode (\w+)", README.read_text()))
    assert named and named <= commands, named - commands


def test_every_module_path_in_the_readme_and_docs_exists() -> None:
    root = README.parent
    texts = [README, *sorted((root / "docs").glob("*.md"))]
    pattern = re.compile(r"`((?:node|inference|storage|tests|bench|deploy)/[\w./-]*)`")
    named = {(text.name, path) for text in texts for path in pattern.findall(text.read_text())}

    def placeholder(path: str) -> bool:  # inference/bundled/NAME
        return any(part.isupper() for part in path.split("/"))

    missing = sorted(
        f"{where}: {path}"
        for where, path in named
        if not placeholder(path) and not (root / path.rstrip("/")).exists()
    )
    assert named and missing == []
