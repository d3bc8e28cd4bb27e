"""Worker engine metrics under vLLM's names: they parse, and they count what the engine did."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.telemetry import engine_registry


def _scrape(registry: object) -> dict[str, float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.labels == {"model_name": "llama", "worker": "w0"}
            out[sample.name] = sample.value
    return out


def test_engine_metrics_count_what_ran(tiny_models: dict[str, Path]) -> None:
    eng = Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=64))
    registry = engine_registry(eng, "llama", "w0")
    before = _scrape(registry)
    assert before["vllm:generation_tokens_total"] == 0 and before["vllm:num_requests_running"] == 0
    prompts = ["The quick brown fox " * 4, "The quick brown fox " * 4 + "jumps", "hello"]
    outs = eng.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    m = _scrape(registry)
    assert m["vllm:generation_tokens_total"] == 15
    assert m["vllm:prompt_tokens_total"] == sum(len(o.prompt_token_ids) for o in outs)
    assert m["vllm:prefix_cache_queries_total"] == eng.pool.stats.prefix_queries > 0
    assert m["vllm:prefix_cache_hits_total"] == eng.pool.stats.prefix_hits
    assert m["vllm:kv_cache_usage_perc"] == 0.0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:num_preemptions_total"] == 0
