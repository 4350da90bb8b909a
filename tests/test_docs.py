from __future__ import annotations

from pathlib import Path

from modelkit.scan.rules import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_rule_table_is_generated_from_the_registry() -> None:
    assert markdown_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in block and "make test" in block
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
