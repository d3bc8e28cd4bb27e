"""docker-compose.yml as the tests read it: parsed, with `${VAR:-default}` resolved to its default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def interpolate(value: Any) -> Any:
    """Compose's `${VAR:-default}` / `${VAR-default}` with nothing set: the default."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_compose() -> dict[str, Any]:
    return dict(interpolate(yaml.safe_load((ROOT / "docker-compose.yml").read_text())))
