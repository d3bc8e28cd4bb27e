"""Integration fixtures: a real nats-server on a random port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from brigade.nats_server import NatsServer


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a nats-server shared by the session's tests (each test uses its own inboxes and ids)."""
    with NatsServer(jetstream=False) as server:
        yield server.url
