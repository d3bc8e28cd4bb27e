"""docker-compose.yml as the tests read it: parsed, with `${VAR:-default}` resolved to its default (or to a value
the test sets); and nats-server's config format, for deploy/nats/nats.conf, which compose mounts into `nats`.
(Shared by tests/unit and tests/integration.)"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """Compose's `${VAR:-default}` / `${VAR-default}` / `${VAR}`, with `env` as the environment (default: nothing
    set, so each default)."""
    env = env or {}
    if isinstance(value, str):
        def one(m: re.Match[str]) -> str:
            name, colon, default = m.group(1), m.group(2), m.group(3) or ""
            if name in env and (env[name] or not colon):  # `:-`: an empty value takes the default too
                return env[name]
            return default
        return VARIABLE.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def load_compose_raw() -> dict[str, Any]:
    """The file as written: `${VAR:-default}` left as it is."""
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    return dict(interpolate(load_compose_raw(), env))


# ---- nats-server's config format (the subset deploy/nats/nats.conf uses) ----------------------------------------


@dataclass(frozen=True)
class Ref:
    """A `$NAME` variable reference: nats-server resolves it from the config's variables or its environment."""

    name: str


_NATS_TOKEN = re.compile(r"""
    \s+ | (?:\#|//)[^\n]*                      # blanks, comments
  | (?P<string>"(?:[^"\\]|\\.)*")             # a JSON string
  | (?P<ref>\$[A-Za-z_][A-Za-z0-9_]*)         # $NAME
  | (?P<punct>[{}\[\],;:=])
  | (?P<word>[A-Za-z0-9_.+-]+)                # a key, a number, true/false
""", re.X)


def _nats_tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _NATS_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"nats conf: cannot read {text[pos:pos + 20]!r}")
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def parse_nats_conf(text: str) -> dict[str, Any]:
    """The config as nested dicts and lists; `$NAME` as Ref; a quoted or bare word as str, a number as int/float.

    Strict where nats-server is forgiving: anything outside the subset raises ValueError (fix the parser or the
    file)."""
    tokens = _nats_tokens(text)
    pos = 0

    def peek() -> tuple[str, str]:
        return tokens[pos] if pos < len(tokens) else ("eof", "")

    def take() -> tuple[str, str]:
        nonlocal pos
        tok = peek()
        pos += 1
        return tok

    def value() -> Any:
        kind, text = take()
        if kind == "string":
            return json.loads(text)
        if kind == "ref":
            return Ref(text[1:])
        if kind == "word":
            if text in ("true", "false"):
                return text == "true"
            try:
                return int(text)
            except ValueError:
                return text
        if text == "{":
            return body("}")
        if text == "[":
            items = []
            while peek()[1] != "]":
                items.append(value())
                if peek()[1] == ",":
                    take()
            take()
            return items
        raise ValueError(f"nats conf: unexpected {text!r}")

    def body(end: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while peek()[1] != end:
            kind, key = take()
            if kind not in ("word", "string"):
                raise ValueError(f"nats conf: expected a key, got {key!r}")
            key = json.loads(key) if kind == "string" else key
            if peek()[1] in (":", "="):
                take()
            if key in out:
                raise ValueError(f"nats conf: {key} given twice")
            out[key] = value()
            if peek()[1] in (",", ";"):
                take()
        if end:
            take()
        return out

    return body("")


def load_nats_conf() -> dict[str, Any]:
    return parse_nats_conf(NATS_CONF.read_text())
