"""Prompt caching: the first use of a prefix writes the cache, later uses (any batch) read it."""

from __future__ import annotations

from typing import Any

import anthropic

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings

from .helpers import stats

EMULATOR_SETTINGS = EmulatorSettings(min_cache_tokens=200)

SYSTEM_TEXT = "You are a careful support-ticket classifier. " * 40  # ~450 tokens


def _params(
    text: str, *, model: str = "claude-fable-5", system: str = SYSTEM_TEXT, ttl: str | None = None
) -> dict[str, Any]:
    cache_control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        cache_control["ttl"] = ttl
    return {
        "model": model,
        "max_tokens": 300,
        "system": [{"type": "text", "text": system, "cache_control": cache_control}],
        "messages": [{"role": "user", "content": text}],
    }


def _run(client: anthropic.Anthropic, requests: list[dict[str, Any]]) -> dict[str, Any]:
    batch = client.messages.batches.create(requests=requests)
    client.messages.batches.retrieve(batch.id)
    return {r.custom_id: r.result.message.usage for r in client.messages.batches.results(batch.id)}


def test_first_request_writes_then_others_read(client: anthropic.Anthropic, emulator: EmulatorServer) -> None:
    before = stats(emulator)["cache"]
    requests = [
        {"custom_id": f"c{i}", "params": _params(f"ticket {i}: my invoice is wrong")} for i in range(3)
    ]
    usage = _run(client, requests)
    prefix = usage["c0"].cache_creation_input_tokens
    assert prefix > 200
    assert usage["c0"].cache_read_input_tokens == 0
    assert usage["c0"].cache_creation.ephemeral_5m_input_tokens == prefix
    for cid in ("c1", "c2"):
        assert usage[cid].cache_creation_input_tokens == 0
        assert usage[cid].cache_read_input_tokens == prefix
    counted = client.messages.count_tokens(
        model="claude-fable-5",
        system=requests[0]["params"]["system"],
        messages=requests[0]["params"]["messages"],
    )
    assert usage["c0"].input_tokens == counted.input_tokens - prefix
    after = stats(emulator)["cache"]
    assert after["creations"] - before["creations"] == 1
    assert after["reads"] - before["reads"] == 2


def test_cache_is_shared_across_batches_and_the_messages_endpoint(client: anthropic.Anthropic) -> None:
    system = "Shared prefix for two batches. " * 40
    first = _run(client, [{"custom_id": "a", "params": _params("one", system=system)}])
    second = _run(client, [{"custom_id": "b", "params": _params("two", system=system)}])
    assert first["a"].cache_creation_input_tokens > 0
    assert second["b"].cache_read_input_tokens == first["a"].cache_creation_input_tokens
    direct = client.messages.create(**_params("three", system=system))
    assert direct.usage.cache_read_input_tokens == first["a"].cache_creation_input_tokens


def test_cache_is_per_model(client: anthropic.Anthropic) -> None:
    system = "Per-model prefix. " * 60
    usage = _run(
        client,
        [
            {"custom_id": "m1", "params": _params("x", system=system, model="claude-sonnet-4-5")},
            {"custom_id": "m2", "params": _params("x", system=system, model="claude-haiku-4-5")},
        ],
    )
    assert usage["m1"].cache_creation_input_tokens > 0
    assert usage["m2"].cache_creation_input_tokens > 0


def test_short_prefix_is_not_cached(client: anthropic.Anthropic) -> None:
    usage = _run(
        client, [{"custom_id": f"s{i}", "params": _params("x", system="Too short.")} for i in range(2)]
    )
    for item in usage.values():
        assert item.cache_creation_input_tokens == 0 and item.cache_read_input_tokens == 0


def test_one_hour_ttl_and_few_shot_breakpoint(client: anthropic.Anthropic) -> None:
    example = "Example ticket about a refund for a duplicated invoice line. " * 20
    params = {
        "model": "claude-fable-5",
        "max_tokens": 300,
        "messages": [
            {"role": "user", "content": example},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "text",
                        "text": '{"label": "billing"}',
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
            },
            {"role": "user", "content": "The real ticket"},
        ],
    }
    usage = _run(client, [{"custom_id": "f1", "params": params}, {"custom_id": "f2", "params": params}])
    created = usage["f1"].cache_creation_input_tokens
    assert created > 200
    assert usage["f1"].cache_creation.ephemeral_1h_input_tokens == created
    assert usage["f2"].cache_read_input_tokens == created


def test_a_batch_end_touches_each_prefix_once_and_leaves_the_expiry_of_its_last_use() -> None:
    """The end of a batch reads a prefix's later uses without touching the cache each time; the
    counts and the entry it leaves (expiry from the last use's TTL) are those of per-request
    touches."""
    from airflow_provider_fable.emulator.state import PromptCache, Stats, _CacheUses

    now = [1000.0]
    cache = PromptCache(lambda: now[0])
    uses = _CacheUses(cache)
    hits = [
        uses.touch(key, ttl) for key, ttl in [("m:a", 300.0), ("m:a", 3600.0), ("m:b", 300.0), ("m:a", 300.0)]
    ]
    assert hits == [False, True, False, True]
    counted = Stats()
    uses.done(counted)
    assert counted.counters["cache_creations"] == 2 and counted.counters["cache_reads"] == 2
    assert cache._entries["m:a"] == now[0] + 300.0  # the last use's TTL, not the 1 h one before it
    now[0] += 301.0
    assert cache.touch("m:a", 300.0) is False  # expired as the last (5 min) use said
