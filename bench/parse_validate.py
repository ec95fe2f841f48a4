"""Benchmark: result lines -> accepted/rejected, our flat parser vs the SDK's typed objects.

Baseline = what ``client.messages.batches.results()`` does per line (``json.loads`` + the SDK's
``construct_type_unchecked`` into ``MessageBatchIndividualResponse``), then reading the text
block and validating it with the same pydantic model. Ours = ``core.results.parse_result_line``
+ ``core.validation.validate_result``. Both see the same lines (10 % broken answers, 2 % errored)
and must reach the same accepted/rejected split, which is checked before timing counts.

Run: ``.venv/bin/python bench/parse_validate.py [--lines 50000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import json
import random
import time
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from airflow_provider_fable.core.results import parse_result_line
from airflow_provider_fable.core.validation import Accepted, validate_result


class Label(str, Enum):
    billing = "billing"
    bug = "bug"
    shipping = "shipping"


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Label
    urgent: bool
    summary: str = Field(max_length=200)

    @model_validator(mode="after")
    def _check(self) -> Answer:
        if self.urgent and self.label is Label.shipping:
            raise ValueError("shipping is never urgent")
        return self


def make_lines(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.02:
            result = {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "api_error", "message": "x"}},
            }
        else:
            answer = {"label": rng.choice(list(Label)).value, "urgent": rng.random() < 0.2,
                      "summary": "Customer reports a problem with the order placed last week."}  # fmt: skip
            text = (
                json.dumps(answer) if roll > 0.12 else '{"label": "refund", "urgent": false, "summary": "x"}'
            )
            result = {
                "type": "succeeded",
                "message": {
                    "id": f"msg_{i}", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                    "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": 900, "output_tokens": 40, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 800, "service_tier": "batch"},
                },
            }  # fmt: skip
        lines.append(json.dumps({"custom_id": f"rec-{i}", "result": result}).encode())
    return lines


def ours(lines: list[bytes]) -> int:
    return sum(isinstance(validate_result(parse_result_line(line), Answer), Accepted) for line in lines)


def sdk_baseline(lines: list[bytes]) -> int:
    from anthropic._models import construct_type_unchecked
    from anthropic.types.messages import MessageBatchIndividualResponse

    accepted = 0
    for line in lines:
        item = construct_type_unchecked(value=json.loads(line), type_=MessageBatchIndividualResponse)
        if item.result.type != "succeeded":
            continue
        text = "".join(b.text for b in item.result.message.content if b.type == "text")
        try:
            Answer.model_validate_json(text, strict=True)
        except ValidationError:
            continue
        accepted += 1
    return accepted


def best_of(fn, lines: list[bytes], repeat: int) -> tuple[float, int]:
    best, out = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(lines)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lines = make_lines(args.lines)
    sdk_s, sdk_ok = best_of(sdk_baseline, lines, args.repeat)
    our_s, our_ok = best_of(ours, lines, args.repeat)
    if sdk_ok != our_ok:
        raise SystemExit(f"paths disagree: sdk accepted {sdk_ok}, ours {our_ok}")
    print(f"lines={args.lines} accepted={our_ok} sdk={sdk_s:.3f}s ours={our_s:.3f}s")
    print(
        f"bench parse_validate: lines={args.lines} ours_lines_per_s={args.lines / our_s:.0f} "
        f"sdk_lines_per_s={args.lines / sdk_s:.0f} vs_baseline={sdk_s / our_s:.2f}"
    )


if __name__ == "__main__":
    main()
