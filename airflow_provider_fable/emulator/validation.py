"""What the real Messages API refuses: headers, models, params and structured-output schemas.

Every rule here was checked against the official SDK's request types (``anthropic`` 2.12:
``types/message_create_params.py``, ``types/model_param.py``, ``types/anthropic_beta_param.py``,
``lib/_parse/_transform.py``) or the API documentation; ``docs/emulator.md`` has the table. The
point is that a request the emulator accepts must be one production accepts too: a lenient
emulator turns every difference into a test that passes while the real run fails.

Errors are returned, not raised, as ``Problem(status, error_type, message)`` so the same rule
serves the synchronous endpoints (an HTTP error) and batches (an ``errored`` result).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_fable.core.cost import served_models as _served_models

__all__ = [
    "API_VERSIONS",
    "KNOWN_BETAS",
    "KNOWN_MODELS",
    "Problem",
    "check_betas",
    "check_version",
    "max_output_tokens",
    "prefix_params",
    "validate_request",
    "validate_schema",
    "validate_shared",
]

#: ``anthropic-version`` values the API accepts. SDK 2.x sends ``2026-10-21`` (``_constants.py``);
#: ``2023-06-01`` is the previous version, still accepted, where sampling params exist.
API_VERSIONS: tuple[str, ...] = ("2023-06-01", "2026-10-21")
_SAMPLING_VERSIONS = frozenset({"2023-06-01"})

#: Current model ids and aliases, as listed by the SDK's ``ModelParam`` (2.12).
KNOWN_MODELS: tuple[str, ...] = (
    "claude-fable-5",
    "claude-fable-5-1",
    "claude-fable-5-2",
    "claude-mythos-5",
    "claude-mythos-5-1",
    "claude-mythos-5-2",
    "claude-mythos-preview",
    "claude-opus-5",
    "claude-opus-5-5",
    "claude-sonnet-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
    "claude-opus-4-8",
    "claude-opus-4-7",
    "claude-opus-4-6",
    "claude-sonnet-4-6",
    "claude-opus-4-5",
    "claude-opus-4-5-20251101",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "claude-haiku-4-5-20251001",
)
# ... and every model of the provider's catalog the API still serves (core/cost.py), so a model
# the price table knows is never refused here.
KNOWN_MODELS += tuple(m for m in _served_models() if m not in KNOWN_MODELS)

#: ``anthropic-beta`` values the SDK knows (``AnthropicBetaParam``); anything else is a 400.
KNOWN_BETAS: frozenset[str] = frozenset(
    """computer-use-2024-10-22 computer-use-2025-01-24 output-128k-2025-02-19 mcp-client-2025-04-04
    mcp-client-2025-11-20 dev-full-thinking-2025-05-14 interleaved-thinking-2025-05-14
    code-execution-2025-05-22 context-1m-2025-08-07 context-management-2025-06-27
    model-context-window-exceeded-2025-08-26 fast-mode-2026-02-01 output-300k-2026-03-24
    user-profiles-2026-03-24 user-profiles-2026-08-18 user-profiles-2026-09-04
    advisor-tool-2026-03-01 managed-agents-2026-04-01 dreaming-2026-04-21
    thinking-token-count-2026-05-13 server-side-fallback-2026-06-01 server-side-fallback-2026-07-01
    fallback-credit-2026-06-01 fallback-credit-2026-07-01 agent-memory-2026-07-22
    mid-conversation-tool-changes-2026-07-01 compact-2026-01-12 computer-use-2025-11-24
    mcp-tunnels-2026-06-22 structured-outputs-2025-11-13 task-budgets-2026-03-13
    thinking-display-updates-2026-08-18 mid-conversation-output-config-2026-07-01
    thinking-binding-controls-2026-08-01 mid-conversation-system-clear-at-2026-08-21
    compact-2026-09-04 inline-tools-2026-09-15 mcp-client-2026-09-15 ce-plugins-2026-09-01
    spend-limit-reads-2026-09-26 telemetry-destinations-2026-08-11 webhooks-2026-10-07
    admin-user-sign-out-2026-10-08 message-threads-2026-08-12 analytics-usage-cost-2026-08-24
    experimental-claude-tag-2026-10-21 message-batches-2024-09-24 prompt-caching-2024-07-31
    pdfs-2024-09-25 token-counting-2024-11-01 token-efficient-tools-2025-02-19
    files-api-2025-04-14 extended-cache-ttl-2025-04-11 skills-2025-10-02 cache-diagnosis-2026-04-07
    ce-user-management-2026-07-13 ce-claude-code-managed-settings-2026-10-06
    user-profiles-billing-2026-10-01""".split()
)

# Top-level params of MessageCreateParams (SDK 2.12). ``stream`` is handled per endpoint.
_PARAMS = frozenset(
    "model messages max_tokens cache_control container diagnostics inference_geo metadata "
    "output_config service_tier speed stop_sequences system thinking tool_choice tools "
    "user_profile_id stream".split()
)
_SAMPLING = ("temperature", "top_p", "top_k")
_COUNT_TOKENS_PARAMS = frozenset(
    "model messages cache_control output_config system thinking tool_choice tools speed".split()
)

# Content block types a request may carry (``ContentBlockParam``).
_BLOCK_TYPES = frozenset(
    "text image document search_result thinking redacted_thinking tool_use tool_result "
    "server_tool_use web_search_tool_result web_fetch_tool_result code_execution_tool_result "
    "bash_code_execution_tool_result text_editor_code_execution_tool_result "
    "tool_search_tool_result container_upload".split()
)
_TEXT_BLOCK_KEYS = frozenset({"type", "text", "cache_control", "citations"})
_CUSTOM_TOOL_KEYS = frozenset(
    "name description input_schema cache_control type strict input_examples defer_loading "
    "eager_input_streaming allowed_callers".split()
)
_TOOL_CHOICE_KEYS = {
    "auto": frozenset({"type", "disable_parallel_tool_use"}),
    "any": frozenset({"type", "disable_parallel_tool_use"}),
    "tool": frozenset({"type", "name", "disable_parallel_tool_use"}),
    "none": frozenset({"type"}),
}
_THINKING_TYPES = frozenset({"enabled", "disabled", "adaptive"})
_MIN_THINKING_BUDGET = 1024

# Structured outputs: the keywords ``transform_schema`` keeps are the ones the API supports;
# everything else it moves into the description because the API would refuse it.
_SCHEMA_KEYS = frozenset(
    "type enum const anyOf allOf $ref $defs definitions description title properties "
    "additionalProperties required format items minItems default".split()
)
_STRING_FORMATS = frozenset("date-time time date duration email hostname uri ipv4 ipv6 uuid".split())
_SCHEMA_TYPES = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_DESCRIPTION_ONLY = (
    "minLength maxLength pattern minimum maximum exclusiveMinimum exclusiveMaximum multipleOf "
    "maxItems uniqueItems minProperties maxProperties oneOf not if then else prefixItems "
    "patternProperties propertyNames contains".split()
)


@dataclass(frozen=True)
class Problem:
    """Why the API refuses a request: HTTP status, ``error.type`` and message."""

    status: int
    error_type: str
    message: str


def _bad(message: str) -> Problem:
    return Problem(400, "invalid_request_error", message)


def check_version(value: str | None) -> Problem | None:
    """The API answers 400 without a known ``anthropic-version`` header (SDKs always send one)."""
    if not value:
        return _bad("anthropic-version: header is required")
    if value not in API_VERSIONS:
        return _bad(f"anthropic-version: {value!r} is not a valid version; known: {', '.join(API_VERSIONS)}")
    return None


def check_betas(value: str | None) -> Problem | None:
    """Every comma-separated ``anthropic-beta`` value must be one the API knows."""
    if not value:
        return None
    unknown = [v.strip() for v in value.split(",") if v.strip() and v.strip() not in KNOWN_BETAS]
    if unknown:
        shown = ", ".join(f"`{v}`" for v in unknown)
        return _bad(
            f"Unexpected value(s) {shown} for the `anthropic-beta` header. Please consult our "
            "documentation at docs.claude.com or try again without the header."
        )
    return None


def max_output_tokens(model: str) -> int:
    """Largest ``max_tokens`` a model accepts in a standard request (no output beta)."""
    if model.startswith(("claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8")):
        return 128_000
    if model.startswith(("claude-fable-5", "claude-mythos-5", "claude-opus-5", "claude-sonnet-5")):
        return 128_000
    return 64_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _extra(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> Problem | None:
    extra = [k for k in obj if k not in allowed]
    if extra:
        return _bad(f"{where}{extra[0]}: Extra inputs are not permitted")
    return None


def _check_content(content: Any, where: str, *, final_assistant: bool) -> Problem | None:
    if isinstance(content, str):
        if not content and not final_assistant:
            return _bad(
                f"{where}: all messages must have non-empty content except for the optional final "
                "assistant message"
            )
        return None
    if not isinstance(content, list):
        return _bad(f"{where}: Input should be a valid string or a list of content blocks")
    if not content and not final_assistant:
        return _bad(
            f"{where}: all messages must have non-empty content except for the optional final "
            "assistant message"
        )
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if not isinstance(block, Mapping):
            return _bad(f"{at}: Input should be a valid dictionary")
        kind = block.get("type")
        if kind not in _BLOCK_TYPES:
            return _bad(
                f"{at}: Input tag {kind!r} found using 'type' does not match any of the expected tags: "
                + ", ".join(f"'{t}'" for t in sorted(_BLOCK_TYPES))
            )
        if kind == "text":
            if not isinstance(block.get("text"), str):
                return _bad(f"{at}.text: Field required")
            if not block["text"]:
                return _bad(f"{at}.text: text content blocks must be non-empty")
            problem = _extra(block, _TEXT_BLOCK_KEYS, f"{at}.text.")
            if problem:
                return problem
    return None


def _check_tools(tools: Any) -> Problem | None:
    if not isinstance(tools, list):
        return _bad("tools: Input should be a valid list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            return _bad(f"tools.{i}: Input should be a valid dictionary")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            continue  # a server tool (web_search_..., bash_...): its own, versioned shape
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            return _bad(f"tools.{i}.custom.name: Field required")
        if "input_schema" not in tool:
            return _bad(f"tools.{i}.custom.input_schema: Field required")
        schema = tool["input_schema"]
        if not isinstance(schema, Mapping) or schema.get("type") != "object":
            return _bad(f"tools.{i}.custom.input_schema.type: Input should be 'object'")
        problem = _extra(tool, _CUSTOM_TOOL_KEYS, f"tools.{i}.custom.")
        if problem:
            return problem
        if tool.get("strict") is True:
            problem = validate_schema(schema, f"tools.{i}.custom.input_schema")
            if problem:
                return problem
    return None


def _check_tool_choice(choice: Any, tools: Any) -> Problem | None:
    if not isinstance(choice, Mapping) or choice.get("type") not in _TOOL_CHOICE_KEYS:
        return _bad("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    problem = _extra(choice, _TOOL_CHOICE_KEYS[choice["type"]], f"tool_choice.{choice['type']}.")
    if problem:
        return problem
    if choice["type"] == "tool":
        names = [t.get("name") for t in tools or [] if isinstance(t, Mapping)]
        if choice.get("name") not in names:
            return _bad(f"tool_choice: Tool '{choice.get('name')}' not found in tools")
    if choice["type"] in ("any", "tool") and not tools:
        return _bad("tool_choice: tool_choice may only be specified while providing tools")
    return None


def _check_thinking(thinking: Any, params: Mapping[str, Any], require_max_tokens: bool) -> Problem | None:
    if not isinstance(thinking, Mapping) or thinking.get("type") not in _THINKING_TYPES:
        return _bad("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    kind = thinking["type"]
    allowed = {
        "enabled": {"type", "budget_tokens", "display"},
        "disabled": {"type"},
        "adaptive": {"type", "display"},
    }
    problem = _extra(thinking, allowed[kind], f"thinking.{kind}.")
    if problem:
        return problem
    if "display" in thinking and thinking["display"] not in (None, "summarized", "omitted"):
        return _bad(f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'")
    if kind == "disabled":
        return None
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if not _is_int(budget):
            return _bad("thinking.enabled.budget_tokens: Field required")
        if budget < _MIN_THINKING_BUDGET:
            return _bad(
                f"thinking.enabled.budget_tokens: Input should be greater than or equal to {_MIN_THINKING_BUDGET}"
            )
        max_tokens = params.get("max_tokens")
        if require_max_tokens and _is_int(max_tokens) and budget >= max_tokens:
            return _bad("`max_tokens` must be greater than `thinking.budget_tokens`")
    choice = params.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") in ("any", "tool"):
        return _bad("Thinking may not be enabled when tool_choice forces tool use.")
    temperature = params.get("temperature")
    if temperature is not None and temperature != 1:
        return _bad("`temperature` may only be set to 1 when thinking is enabled.")
    if params.get("top_k") is not None:
        return _bad("`top_k` must be unset when thinking is enabled.")
    return None


def validate_schema(schema: Any, where: str = "output_config.format.schema") -> Problem | None:
    """The API's complaint about a structured-output schema, or None when it is supported.

    Mirrors what ``anthropic.transform_schema`` produces: objects need
    ``additionalProperties: false``; only the keywords it keeps are allowed (length, range and
    size constraints belong in the description); ``$ref`` must be local and not recursive.
    """
    if not isinstance(schema, Mapping):
        return _bad(f"{where}: Input should be a valid dictionary")
    defs: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), Mapping):
            defs.update({f"#/{key}/{name}": sub for name, sub in schema[key].items()})

    def walk(node: Any, at: str, stack: tuple[str, ...]) -> Problem | None:
        if not isinstance(node, Mapping):
            return _bad(f"{where}{at}: each schema must be an object")
        for key in node:
            if key not in _SCHEMA_KEYS:
                hint = (
                    " (move it into the description, as anthropic.transform_schema does)"
                    if key in _DESCRIPTION_ONLY
                    else ""
                )
                return _bad(f"{where}{at}: JSON schema keyword '{key}' is not supported{hint}")
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or ref not in defs:
                return _bad(
                    f"{where}{at}: $ref {ref!r} must point into this schema's $defs (external refs are not supported)"
                )
            if ref in stack:
                return _bad(f"{where}{at}: recursive schemas are not supported ($ref {ref} refers to itself)")
            problem = walk(defs[ref], at, (*stack, ref))
            if problem:
                return problem
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        for k in kinds:
            if k not in _SCHEMA_TYPES:
                return _bad(f"{where}{at}.type: unsupported type {k!r}")
        enum = node.get("enum")
        if enum is not None and (
            not isinstance(enum, list)
            or not enum
            or any(not (v is None or isinstance(v, (str, int, float, bool))) for v in enum)
        ):
            return _bad(f"{where}{at}.enum: enum values must be strings, numbers, booleans or null")
        if "object" in kinds or "properties" in node:
            if node.get("additionalProperties") is not False:
                return _bad(
                    f"{where}{at}: 'additionalProperties' must be explicitly set to false for object types"
                )
            props = node.get("properties") or {}
            if not isinstance(props, Mapping):
                return _bad(f"{where}{at}.properties: Input should be a valid dictionary")
            for name, sub in props.items():
                problem = walk(sub, f"{at}.properties.{name}", stack)
                if problem:
                    return problem
        fmt = node.get("format")
        if fmt is not None and fmt not in _STRING_FORMATS:
            return _bad(f"{where}{at}.format: string format {fmt!r} is not supported")
        if "minItems" in node and node["minItems"] not in (0, 1):
            return _bad(f"{where}{at}.minItems: only minItems of 0 or 1 is supported")
        if "items" in node:
            problem = walk(node["items"], f"{at}.items", stack)
            if problem:
                return problem
        for key in ("anyOf", "allOf"):
            if key in node:
                if not isinstance(node[key], list):
                    return _bad(f"{where}{at}.{key}: Input should be a valid list")
                for i, sub in enumerate(node[key]):
                    problem = walk(sub, f"{at}.{key}.{i}", stack)
                    if problem:
                        return problem
        return None

    return walk(schema, "", ())


def validate_request(
    params: Any,
    *,
    api_version: str = API_VERSIONS[-1],
    betas: Iterable[str] = (),
    known_models: Iterable[str] | None = KNOWN_MODELS,
    endpoint: str = "batch",
) -> Problem | None:
    """The API's answer to a Messages request that it refuses, or None when it is accepted.

    ``endpoint`` is ``batch`` (params of a batch request: ``stream`` must not be true),
    ``messages`` or ``count_tokens`` (no ``max_tokens``, a smaller set of params). An unknown
    model is a 404 ``not_found_error``, like the API's; everything else is a 400.
    """
    if not isinstance(params, Mapping):
        return _bad("params: Input should be a valid dictionary")
    allowed = set(_COUNT_TOKENS_PARAMS if endpoint == "count_tokens" else _PARAMS)
    if api_version in _SAMPLING_VERSIONS and endpoint != "count_tokens":
        allowed.update(_SAMPLING)
    if "structured-outputs-2025-11-13" in set(betas):
        allowed.add("output_format")
    for key in params:
        if key not in allowed:
            if key in _SAMPLING:
                return _bad(
                    f"{key}: is not supported in API version {api_version}; remove it (or use 2023-06-01)"
                )
            return _bad(f"{key}: Extra inputs are not permitted")
    if "model" not in params:
        return _bad("model: Field required")
    model = params["model"]
    if not isinstance(model, str) or not model:
        return _bad("model: Input should be a valid string")
    require_max_tokens = endpoint != "count_tokens"
    if require_max_tokens:
        if "max_tokens" not in params:
            return _bad("max_tokens: Field required")
        max_tokens = params["max_tokens"]
        # 0 is valid: it pre-warms the prompt cache without generating (SDK 2.12 docstring).
        if not _is_int(max_tokens) or max_tokens < 0:
            return _bad("max_tokens: Input should be an integer greater than or equal to 0")
        limit = max_output_tokens(model)
        if max_tokens > limit:
            return _bad(
                f"max_tokens: {max_tokens} > {limit}, which is the maximum allowed number of output "
                f"tokens for {model}"
            )
    if params.get("stream") is not None and not isinstance(params["stream"], bool):
        return _bad("stream: Input should be a valid boolean")
    if endpoint == "batch" and params.get("stream"):
        return _bad("stream: streaming is not supported for requests in a message batch")
    if "messages" not in params:
        return _bad("messages: Field required")
    messages = params["messages"]
    if not isinstance(messages, list):
        return _bad("messages: Input should be a valid list")
    if not messages:
        return _bad("messages: at least one message is required")
    for i, message in enumerate(messages):
        problem = _check_message(message, i, len(messages))
        if problem:
            return problem
    system = params.get("system")
    if system is not None:
        if isinstance(system, list):
            for j, block in enumerate(system):
                if not isinstance(block, Mapping) or block.get("type") != "text":
                    return _bad(f"system.{j}.type: Input should be 'text'")
                problem = _check_content([block], "system", final_assistant=False)
                if problem:
                    return problem
        elif not isinstance(system, str):
            return _bad("system: Input should be a valid string or a list of text blocks")
    if api_version in _SAMPLING_VERSIONS:
        temperature = params.get("temperature")
        if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 1):
            return _bad("temperature: Input should be less than or equal to 1 and greater than or equal to 0")
        top_p = params.get("top_p")
        if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
            return _bad("top_p: Input should be less than or equal to 1 and greater than or equal to 0")
        top_k = params.get("top_k")
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            return _bad("top_k: Input should be greater than or equal to 0")
    stops = params.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        return _bad("stop_sequences: Input should be a valid list of strings")
    metadata = params.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            return _bad("metadata: Input should be a valid dictionary")
        problem = _extra(metadata, ("user_id",), "metadata.")
        if problem:
            return problem
    if params.get("service_tier") is not None and params["service_tier"] not in ("auto", "standard_only"):
        return _bad("service_tier: Input should be 'auto' or 'standard_only'")
    tools = params.get("tools")
    if tools is not None:
        problem = _check_tools(tools)
        if problem:
            return problem
    if params.get("tool_choice") is not None:
        problem = _check_tool_choice(params["tool_choice"], tools)
        if problem:
            return problem
    if params.get("thinking") is not None:
        problem = _check_thinking(params["thinking"], params, require_max_tokens)
        if problem:
            return problem
    config = params.get("output_config")
    if config is not None:
        if not isinstance(config, Mapping):
            return _bad("output_config: Input should be a valid dictionary")
        problem = _extra(config, ("format", "effort"), "output_config.")
        if problem:
            return problem
        if config.get("effort") is not None and config["effort"] not in (
            "low",
            "medium",
            "high",
            "xhigh",
            "max",
        ):
            return _bad("output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'")
        fmt = config.get("format")
        if fmt is not None:
            problem = _check_format(fmt, "output_config.format")
            if problem:
                return problem
    if params.get("output_format") is not None:
        if isinstance(config, Mapping) and config.get("format") is not None:
            return _bad("output_format: use only output_config.format (output_format is deprecated)")
        problem = _check_format(params["output_format"], "output_format")
        if problem:
            return problem
    if known_models is not None and model not in set(known_models):
        return Problem(404, "not_found_error", f"model: {model}")
    return None


def _check_message(message: Any, i: int, count: int) -> Problem | None:
    """The complaint about message ``i`` of ``count``, or None."""
    if not isinstance(message, Mapping):
        return _bad(f"messages.{i}: Input should be a valid dictionary")
    problem = _extra(message, ("role", "content"), f"messages.{i}.")
    if problem:
        return problem
    if message.get("role") not in ("user", "assistant"):
        return _bad(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    if "content" not in message:
        return _bad(f"messages.{i}.content: Field required")
    final_assistant = i == count - 1 and message["role"] == "assistant"
    return _check_content(message["content"], f"messages.{i}.content", final_assistant=final_assistant)


#: Stands in for the last message when the rest of a request is validated once for a batch.
_PLACEHOLDER_MESSAGE: dict[str, Any] = {"role": "user", "content": "x"}


def validate_shared(
    params: Mapping[str, Any],
    prefix_problem: Callable[[], Problem | None],
    **rules: Any,
) -> Problem | None:
    """``validate_request(params, **rules)``, with everything but the last message judged once.

    The requests of a batch differ in their last message only (the record). ``prefix_problem``
    returns (cached by the caller) the verdict on the same params with that message replaced
    by a valid placeholder, ``prefix_params(params)``. When that verdict is clean every other
    check passes, so the verdict on the whole request is the last message's own (messages are
    checked before anything that could fail after them); otherwise the full check decides,
    so the message and its order are always the ones ``validate_request`` gives.
    """
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages or prefix_problem() is not None:
        return validate_request(params, **rules)
    return last_message_problem(messages)


def last_message_problem(messages: list[Any]) -> Problem | None:
    """The complaint about the last of ``messages`` (``validate_shared`` once the rest is clean)."""
    last = messages[-1]
    if type(last) is dict and len(last) == 2 and last.get("role") == "user":
        content = last.get("content")
        if type(content) is str and content:
            return None  # the commonest record: exactly role and content, a non-empty string
    return _check_message(last, len(messages) - 1, len(messages))


def prefix_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with its last message replaced by a valid placeholder (see ``validate_shared``)."""
    messages = params["messages"]
    return {**params, "messages": [*messages[:-1], _PLACEHOLDER_MESSAGE]}


def _check_format(fmt: Any, where: str) -> Problem | None:
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        return _bad(f"{where}.type: Input should be 'json_schema'")
    problem = _extra(fmt, ("type", "schema"), f"{where}.")
    if problem:
        return problem
    if not isinstance(fmt.get("schema"), dict):
        return _bad(f"{where}.schema: Input should be a valid dictionary")
    return validate_schema(fmt["schema"], f"{where}.schema")
