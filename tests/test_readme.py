"""The README's configuration table names every setting the server reads."""

from __future__ import annotations

from pathlib import Path

from raptorflow.data.server.config import SETTINGS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        s.env
        for s in SETTINGS
        if f"`{s.env}`" not in text or f"`--{s.name.replace('_', '-')}`" not in text
    ]
    assert missing == []


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text(encoding="utf-8")[:600]
    assert "make run" in head
    assert "make test" in head
