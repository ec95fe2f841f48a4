"""The emulator's fast paths give what the plain paths give (bench/emulator_throughput.py times them).

Answers are generated after a batch ends, into a results file that downloads stream while it
grows, in a thread or in worker processes; enum labels are scored through a stem index; the
part of a prompt a batch's requests share is read and validated once; create bodies are
decoded by orjson and their envelopes checked in bulk. Each shortcut must be invisible.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Literal

import anthropic
import pytest
from pydantic import BaseModel, Field

from airflow_provider_fable.emulator import EmulatorServer, EmulatorSettings, FaultSettings
from airflow_provider_fable.emulator import model as emulator_model
from airflow_provider_fable.emulator.errors import ApiError
from airflow_provider_fable.emulator.state import (
    BatchStore,
    ResultsDownload,
    ResultsFile,
    _share_equal_values,
    parse_create_body,
)
from airflow_provider_fable.emulator.validation import validate_request

from .helpers import API_KEY, stats, text_params


class Triage(BaseModel):
    category: Literal["billing", "bug", "shipping", "account", "other"]
    urgent: bool
    summary: str = Field(max_length=60)
    confidence: float = Field(ge=0, le=1)
    evidence: str


RECORDS = [
    "I was charged twice for invoice 4411, please refund the duplicate payment by Friday.",
    "The app crashes every time I open the settings screen since the last update.",
    "My parcel is late: the courier says it was delivered but nothing arrived.",
    "I can't log in, the password reset email never arrives. Our lawyer is asking questions.",
    "Wie kann ich meine Rechnung herunterladen? Das ist zu teuer.",
    "n/a",
]


def _requests(n: int) -> list[dict[str, Any]]:
    schema = anthropic.transform_schema(Triage)
    tool = {"name": "triage", "description": "File the ticket", "input_schema": schema}
    out = []
    for i in range(n):
        record = f"Ticket {i}: {RECORDS[i % len(RECORDS)]}"
        if i % 7 == 3:
            params = text_params(record, tools=[tool], tool_choice={"type": "tool", "name": "triage"})
        elif i % 11 == 5:
            params = text_params(record)
        else:
            params = text_params(
                record,
                system="Classify the ticket. billing: invoices, refunds. other: anything else.",
                output_config={"format": {"type": "json_schema", "schema": schema}},
            )
        out.append({"custom_id": f"t{i}", "params": params})
    return out


def _served(
    settings: EmulatorSettings, requests: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    with EmulatorServer(settings) as server:
        client = anthropic.Anthropic(api_key=API_KEY, base_url=server.base_url)
        batch = client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
        results = {}
        for line in client.messages.batches.results(batch.id):
            result = line.result.model_dump()
            if result["type"] == "succeeded":
                result["message"].pop("id")  # derived from the (random) batch id, as are tool-use ids
                for block in result["message"]["content"]:
                    block.pop("id", None)
            elif result["type"] == "errored":
                result["error"].pop("request_id")
            results[line.custom_id] = result
        return results, stats(server)


def test_worker_processes_write_the_results_the_thread_writes() -> None:
    faults = FaultSettings(
        seed=5, errored_rate=0.1, invalid_answer_rate=0.2, description_break_rate=0.2, invented_quote_rate=0.2
    )
    requests = _requests(120)
    in_thread, thread_stats = _served(EmulatorSettings(faults=faults, generation_workers=0), requests)
    in_workers, worker_stats = _served(
        EmulatorSettings(faults=faults, generation_workers=2, generation_min_batch=1), requests
    )
    assert in_workers == in_thread
    assert worker_stats["faults"] == thread_stats["faults"]
    assert worker_stats["results"] == thread_stats["results"]
    # The faults really happened, so the comparison covered them.
    assert thread_stats["faults"]["invalid_answer"] > 0
    assert thread_stats["faults"]["description_constraint_broken"] > 0
    assert thread_stats["results"]["errored"] > 0


def test_a_download_streams_the_lines_written_so_far_and_waits_for_the_rest() -> None:
    results = ResultsFile(total=5)
    results.append([b'{"n":0}\n', b'{"n":1}\n'])
    received: list[bytes] = []
    first_chunk = threading.Event()

    def download() -> None:
        for chunk in ResultsDownload(results).chunks(chunk_lines=2):
            received.append(chunk)
            first_chunk.set()

    reader = threading.Thread(target=download)
    reader.start()
    assert first_chunk.wait(30), "the lines already written were not streamed"
    assert received == [b'{"n":0}\n{"n":1}\n']  # the rest does not exist yet
    results.append([b'{"n":2}\n', b'{"n":3}\n', b'{"n":4}\n'])
    results.finish()
    reader.join(30)
    assert b"".join(received) == b"".join(b'{"n":%d}\n' % i for i in range(5))
    cut = b"".join(ResultsDownload(results, cut_after=3).chunks())
    assert cut.startswith(b'{"n":0}\n{"n":1}\n{"n":2}\n') and not cut.endswith(b"\n")


def test_a_failed_generation_breaks_the_download_instead_of_hanging() -> None:
    results = ResultsFile(total=3)
    results.append([b"{}\n"])
    results.finish(ValueError("boom"))
    with pytest.raises(RuntimeError, match="failed to generate"):
        list(ResultsDownload(results).chunks(chunk_lines=1))


def test_results_read_as_lines_are_served_as_set() -> None:
    """``batch.lines`` (inspection, tests rewriting what is served) reads and replaces the file."""
    store = BatchStore(EmulatorSettings())
    created = store.create([(f"r{i}", text_params(f"Question {i}?")) for i in range(3)], "http://x/")
    store.retrieve(created["id"], "http://x/")
    batch = store._get(created["id"])
    lines = batch.lines
    assert lines is not None and len(lines) == 3
    lines.append(b'{"custom_id":"extra"}\n')
    served = b"".join(store.open_results(created["id"]).chunks())
    assert served.endswith(b'{"custom_id":"extra"}\n') and served.count(b"\n") == 4


@pytest.mark.parametrize(
    ("params", "where"),
    [
        pytest.param(text_params(""), "messages.0.content", id="empty-last-message"),
        pytest.param(
            {
                **text_params("hi"),
                "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            },
            "messages.1.role",
            id="bad-last-role",
        ),
        pytest.param(
            {
                **text_params("hi"),
                "messages": [{"role": "user", "content": ""}, {"role": "user", "content": "b"}],
            },
            "messages.0.content",
            id="bad-shared-message",
        ),
        pytest.param(
            {**text_params(""), "model": "claude-nope"}, "messages.0.content", id="bad-message-and-model"
        ),
        pytest.param({**text_params("hi"), "model": "claude-nope"}, "model: claude-nope", id="unknown-model"),
        pytest.param({**text_params(""), "system": 5}, "messages.0.content", id="message-before-system"),
        pytest.param({**text_params("fine"), "system": 5}, "system", id="bad-system"),
        pytest.param(text_params("fine"), None, id="valid"),
        pytest.param(
            {**text_params("hi"), "messages": [{"role": "user", "text": "hi"}]},
            "messages.0.text",
            id="two-keys-not-content",
        ),
        pytest.param(
            {**text_params("hi"), "messages": [{"role": "user", "content": "hi", "name": "x"}]},
            "messages.0.name",
            id="extra-key-in-record",
        ),
        pytest.param(
            {
                **text_params("hi"),
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            },
            None,
            id="record-as-blocks",
        ),
    ],
)
def test_validating_the_shared_part_once_gives_the_full_verdict(
    params: dict[str, Any], where: str | None
) -> None:
    store = BatchStore(EmulatorSettings())
    for _ in range(2):  # the second time the shared part's verdict comes from the cache
        problem = store._problem(params, "batch", "2026-10-21", ())
        assert problem == validate_request(params, api_version="2026-10-21", betas=())
        assert (problem is None) == (where is None)
        if problem is not None:
            assert problem.message.startswith(where)  # type: ignore[arg-type]


def test_shared_prompts_answer_like_a_fresh_read() -> None:
    """Two requests with the same prompt around different records: the second one is answered
    from the cached shared part, and gets what a cache-free read of its own prompt gives."""
    first, second = _requests(2)[0]["params"], _requests(8)[7]["params"]
    second = {**first, "messages": second["messages"]}
    emulator_model.build_answer(first, id_seed="a")
    assert emulator_model.shared_prompt(second) is emulator_model.shared_prompt({**first})
    cached = emulator_model.build_answer(second, id_seed="b", description_break_rate=0.5)
    emulator_model._shared_prompts.clear()
    fresh = emulator_model.build_answer({**second}, id_seed="b", description_break_rate=0.5)
    assert cached == fresh


def test_the_stem_index_scores_like_the_phrase_by_phrase_sum() -> None:
    labels = ("billing", "bug", "shipping", "account_access", "too_expensive", "other")
    for record in RECORDS + ["not urgent, no refund needed", "doesn't work, not charged twice"]:
        evidence = emulator_model.Evidence(record)
        for label in labels:
            phrases = emulator_model._evidence_phrases(label, emulator_model._LABEL_STOPWORDS)
            expected = sum(
                weight * min(evidence._count_stems(stems, negatable), emulator_model._SATURATION)
                for stems, weight, negatable in phrases
            )
            assert evidence.score(label) == expected, (record, label)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        pytest.param('{"custom_id":"a\\nb","params":{}}', "requests.1.custom_id", id="newline-in-id"),
        pytest.param('{"custom_id":"' + "z" * 65 + '","params":{}}', "requests.1.custom_id", id="65-chars"),
        pytest.param('{"custom_id":"","params":{}}', "requests.1.custom_id", id="empty-id"),
        pytest.param('{"custom_id":"a","params":{},"x":1}', "requests.1.x: Extra inputs", id="extra-key"),
        pytest.param('{"custom_id":"a"}', "requests.1.params: Field required", id="no-params"),
        pytest.param('{"custom_id":7,"params":{}}', "requests.1.custom_id: Input should be a valid string", id="int-id"),
        pytest.param('{"custom_id":"a","params":{}},{"custom_id":"a","params":{}}', "requests.2.custom_id: duplicate", id="dup"),
        pytest.param('{"custom_id":"a","params":[]}', "requests.1.params: Input should be a valid dictionary", id="list"),
    ],
)  # fmt: skip
def test_bulk_envelope_check_reports_what_the_item_loop_reports(items: str, message: str) -> None:
    body = ('{"requests":[{"custom_id":"ok","params":{}},' + items + "]}").encode()
    with pytest.raises(ApiError) as info:
        parse_create_body(body)
    assert message in info.value.message


def test_bodies_orjson_refuses_decode_as_the_standard_library_does() -> None:
    ids = [
        c
        for c, _ in parse_create_body(b'{"requests":[{"custom_id":"' + b"y" * 64 + b'","params":{"x":NaN}}]}')
    ]
    assert ids == ["y" * 64]  # 64 characters is fine; NaN is accepted by json, not by orjson
    with pytest.raises(ApiError) as info:
        parse_create_body(b'{"requests": [}')
    assert info.value.message.startswith(
        "There was an error parsing the body of your request: Expecting value"
    )


def test_requests_of_a_create_share_their_equal_values_and_keep_their_own_record() -> None:
    """What a create of at least ``_LARGE_BODY`` bytes does to its decoded requests."""
    requests = _requests(30)
    body = json.dumps({"requests": requests}).encode()
    parsed = [params for _, params in parse_create_body(body)]
    _share_equal_values(parsed)
    structured = [p for p in parsed if "output_config" in p]
    assert all(p["output_config"] is structured[0]["output_config"] for p in structured)
    assert all(p["system"] is structured[0]["system"] for p in structured)
    # Short strings and integers too (decoded anew per request): the shape is told by identity.
    assert all(
        p["model"] is parsed[0]["model"] and p["max_tokens"] is parsed[0]["max_tokens"] for p in parsed
    )
    records = [p["messages"][-1]["content"] for p in parsed]
    assert records == [r["params"]["messages"][-1]["content"] for r in requests]
    assert parsed == [r["params"] for r in requests]  # equal values, fewer copies
