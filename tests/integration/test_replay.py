"""A worker that dies mid-generation: the gateway replays the request elsewhere with the tokens it already has
(DESIGN §3.6), and the client sees one uninterrupted, correct stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import SubjectWatch, free_port

from brigade import protocol as P
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.launcher import Up, UpConfig

PROMPT = "Once upon a time there was a worker that"
MAX_TOKENS = 300


@pytest.fixture()
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), decode=2, router="least_loaded",
                     worker_args=("--num-blocks", "128"))) as u:
        yield u


@pytest.mark.parametrize("seed,stop", [(None, []), (7, []), (None, ["<|a stop string never produced|>"])],
                         ids=["greedy", "seeded", "withheld"])
def test_worker_killed_mid_stream_is_replayed(up: Up, tiny_models: dict[str, Path], seed: int | None,
                                              stop: list[str]) -> None:
    """Greedy and seeded sampling alike: the text equals what one uninterrupted engine produces. With a long
    stop string the dead worker had withheld the text that could begin it: the new worker emits it."""
    ref = Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128))
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop, **(
        {"temperature": 0.0} if seed is None else {"temperature": 0.8, "seed": seed}))
    [want] = ref.generate([ref.tokenizer.encode(PROMPT)], params)
    assert up.nats is not None

    watch = SubjectWatch(up.nats.client_url, P.worker_generate("*"))  # learns which worker the router chose
    body: dict[str, Any] = {"model": "llama", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}, "stop": stop}
    body.update({"temperature": 0} if seed is None else {"temperature": 0.8, "seed": seed})
    url = f"http://{up.cfg.host}:{up.cfg.port}"
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 20:  # mid-stream: kill the worker serving it
                        next(p for n, p in up.procs if n == watch.seen[0]).kill()
    finally:
        watch.close()
    assert not [e for e in events if "error" in e], events[-1]
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == want.text
    assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    assert up.failed() == [watch.seen[0]]  # the worker did die mid-stream
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'brigade:requests_replayed_total{reason="worker_lost"} 1.0' in metrics
