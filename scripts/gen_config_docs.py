"""Rewrite the settings table of docs/configuration.md from cio_celery.settings.SETTINGS."""

from __future__ import annotations

import re
from pathlib import Path

from cio_celery.settings import SETTINGS

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def table() -> str:
    rows = ["| setting | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "unset" if s.default is None else f"`{s.default}`"
        secret = " Secret: never logged." if s.secret else ""
        rows.append(f"| `{s.name}` | `{s.env}` | {default} | {s.doc}{secret} |")
    return "\n".join(rows)


def main() -> None:
    text = DOC.read_text()
    new = re.sub(r"\| setting \| environment variable .*?\n(?=\n)", table() + "\n", text, flags=re.S)
    DOC.write_text(new)


if __name__ == "__main__":
    main()
