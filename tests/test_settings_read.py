"""Every setting `fracnode config show` prints is read by some code path: a setting that is
accepted and shown but does nothing misleads the operator who sets it."""

from __future__ import annotations

import re
from pathlib import Path

from node.settings import Settings

NODE = Path(__file__).resolve().parents[1] / "node"


def _fields() -> list[tuple[str, str]]:
    out = []
    for section, info in Settings.model_fields.items():
        for field in getattr(info.annotation, "model_fields", {}):
            out.append((section, field))
    return out


def test_every_setting_is_read_outside_the_settings_module() -> None:
    code = "\n".join(p.read_text() for p in NODE.rglob("*.py") if p.name != "settings.py")
    settings_code = (NODE / "settings.py").read_text()
    unread = []
    for section, field in _fields():
        # Read as `<section object>.<field>` elsewhere, or by a method of its own section
        # (e.g. WorklistSettings.order() reading self.not_analysed).
        if not re.search(rf"\.{field}\b", code) and not re.search(rf"self\.{field}\b", settings_code):
            unread.append(f"{section}.{field}")
    assert unread == []


def test_the_check_sees_every_section() -> None:
    sections = {section for section, _ in _fields()}
    assert {"dicom", "worker", "export", "hl7", "routing", "priority", "worklist"} <= sections
