"""The backlog unit's configuration: a few small objects, validated when the DAG file is parsed.

Why objects and not keyword arguments: a backlog has ~30 knobs (source, prompt, stages,
destination, guardrails, pilot, budget, QA). Grouped, each object checks its own values at parse
time and names the allowed ones in its error, so a typo fails ``airflow dags list-import-errors``
instead of a paid run. Nothing here imports more than the standard library at module level: a
DAG file importing the unit pays for dataclasses only (``bench/dag_parse.py``). Files (prompts,
few-shot) are resolved and read when the unit is built, i.e. at parse time, the way Airflow finds
templates: relative to the DAG file's folder, then the DAG's ``template_searchpath``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_fable.exceptions import BacklogConfigError as BacklogConfigError

#: The run modes the unit adds as the ``mode`` Param (docs/backlog.md "Run modes").
RUN_MODES = ("auto", "interval", "backlog", "failed", "all")
PROMPT_SUFFIXES = (".md", ".txt")
FEW_SHOT_SUFFIXES = (".jsonl", ".yaml", ".yml", ".json")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise BacklogConfigError(message)


# ---------------------------------------------------------------------------------------- source
@dataclass(frozen=True)
class Source:
    """Where the backlog's records come from, and which fields identify and date them.

    Exactly one of ``sql`` (with ``conn_id``), ``records`` (a list of dicts, a DataFrame, a
    ``.csv``/``.jsonl`` path) or ``callable`` (called in a task, returning one of those).

    :param sql: a query returning every record of the backlog (no selection: the unit adds the
        run mode's filters itself, in the database when the destination is the same connection).
    :param conn_id: Airflow SQL connection of ``sql``.
    :param records: in-memory records or a file path (read in the task, not at parse time).
    :param callable: a function returning records, called in the task.
    :param id_field: the field whose value identifies a record (unique, stable across runs).
    :param date_field: optional field dating a record; with it, scheduled and backfill runs take
        the records of their data interval (``mode=auto``/``interval``).
    """

    sql: str | None = None
    conn_id: str | None = None
    records: Any = None
    callable: Callable[[], Any] | None = None
    id_field: str = "id"
    date_field: str | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("sql", "records", "callable") if getattr(self, n) is not None]
        _need(
            len(given) == 1,
            f"Source: give exactly one of sql=, records=, callable= (got {', '.join(given) or 'none'})",
        )
        _need(
            self.sql is None or bool(self.conn_id), "Source: sql= needs conn_id= (an Airflow SQL connection)"
        )
        _need(self.callable is None or callable(self.callable), "Source: callable= must be callable")
        _need(
            _is_identifier(self.id_field),
            f"Source: id_field must be a plain column name, got {self.id_field!r}",
        )
        _need(
            self.date_field is None or _is_identifier(self.date_field),
            f"Source: date_field must be a plain column name or None, got {self.date_field!r}",
        )

    @property
    def kind(self) -> str:
        return "sql" if self.sql is not None else "records" if self.records is not None else "callable"


# ---------------------------------------------------------------------------------------- prompt
@dataclass(frozen=True)
class Prompt:
    """The request: a ``str.format`` template over the record, a system prompt and few-shot turns.

    Each may be inline or a file name next to the DAG (or on its ``template_searchpath``):
    ``.md``/``.txt`` for ``template`` and ``system``, ``.jsonl``/``.yaml``/``.json`` for
    ``few_shot`` (a list of ``{"record": {...}, "answer": {...}}``). Files are read when the unit
    is built, so a missing file fails the parse naming the folders searched.
    """

    template: str
    system: str | None = None
    few_shot: str | Sequence[Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        _need(
            isinstance(self.template, str) and self.template.strip() != "",
            "Prompt: template must be a non-empty string or file name",
        )
        _need(
            self.system is None or isinstance(self.system, str),
            "Prompt: system must be a string, a file name or None",
        )
        _need(
            self.few_shot is None or isinstance(self.few_shot, (str, list, tuple)),
            "Prompt: few_shot must be a list of {'record', 'answer'} dicts, a .jsonl/.yaml/.json file name, or None",
        )

    def resolve(self, search: Sequence[str | os.PathLike[str]]) -> ResolvedPrompt:
        """Read the files this prompt names (parse time); inline values are kept as they are."""
        template = _text_or_file(self.template, search, "template")
        system = _text_or_file(self.system, search, "system") if self.system is not None else None
        few: list[dict[str, Any]] = []
        if isinstance(self.few_shot, str):
            few = _few_shot_file(self.few_shot, search)
        elif self.few_shot is not None:
            few = [dict(x) for x in self.few_shot]
        for n, example in enumerate(few, 1):
            _need(
                isinstance(example, Mapping) and set(example) >= {"record", "answer"},
                f"Prompt: few-shot example #{n} must have 'record' and 'answer' keys, got {sorted(example) if isinstance(example, Mapping) else type(example).__name__}",
            )
        return ResolvedPrompt(template=template, system=system, few_shot=few)


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt with its files read: what the submit operators get."""

    template: str
    system: str | None
    few_shot: list[dict[str, Any]]


def _looks_like_file(value: str, suffixes: Sequence[str]) -> bool:
    return "\n" not in value and value.strip().lower().endswith(tuple(suffixes)) and len(value) < 300


def _find(name: str, search: Sequence[str | os.PathLike[str]]) -> Path:
    path = Path(name)
    if path.is_absolute():
        _need(path.is_file(), f"Prompt: file {name!r} does not exist")
        return path
    for folder in search:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    raise BacklogConfigError(
        f"Prompt: file {name!r} not found in the DAG folder or template_searchpath "
        f"({', '.join(str(f) for f in search) or 'no folder known'})"
    )


def _text_or_file(value: str, search: Sequence[str | os.PathLike[str]], what: str) -> str:
    if _looks_like_file(value, PROMPT_SUFFIXES):
        return _find(value.strip(), search).read_text(encoding="utf-8").strip("\n")
    return value


def _few_shot_file(name: str, search: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    _need(
        _looks_like_file(name, FEW_SHOT_SUFFIXES),
        f"Prompt: few_shot file must end with one of {', '.join(FEW_SHOT_SUFFIXES)}, got {name!r}",
    )
    path = _find(name.strip(), search)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BacklogConfigError(f"Prompt: {path} line {n} is not JSON: {exc}") from None
        return out
    if suffix == ".json":
        data = json.loads(text)
    else:
        import yaml  # an Airflow dependency; imported only when a YAML file is named

        data = yaml.safe_load(text)
    _need(isinstance(data, list), f"Prompt: {path} must hold a list of examples, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------ escalation
@dataclass(frozen=True)
class Escalate:
    """One escalation rule: which answers of a stage go to the next stage.

    Build with the class methods; a stage's rules are checked in order and the first that fires
    gives the record's escalation reason. The order is also the priority when the budget cannot
    cover every escalation (earlier rules first; within a rule, ``Stage.priority_field`` decides).

    - ``Escalate.rejected()``: the stage gave no valid answer (reject of any reason).
    - ``Escalate.below(field, threshold)``: a numeric answer field below the threshold.
    - ``Escalate.equals(field, value)``: an answer field equal to the value (e.g. ``"unknown"``);
      ``when_record=("pipeline_value_usd", ">=", 50000)`` restricts it to some records.
    - ``Escalate.not_quoted(field, in_fields=(...))``: the answer's quote/evidence field is not a
      (case- and whitespace-insensitive) substring of the record's fields: an invented specific.
    - ``Escalate.when(fn, name=...)``: ``fn(answer: dict, record: dict) -> bool`` for anything else.

    ``keep_answer``: when the next stage fails too, keep this stage's answer in the final table
    (true for ``below``/``equals``: the answer was valid, just not good enough; false for
    ``rejected``/``not_quoted``: there is nothing trustworthy to keep).
    """

    kind: str
    field: str | None = None
    value: Any = None
    in_fields: tuple[str, ...] = ()
    fn: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None
    name: str | None = None
    when_record: tuple[str, str, Any] | None = None
    keep_answer: bool = False

    KINDS = ("rejected", "below", "equals", "not_quoted", "when")
    _OPS = ("<", "<=", ">", ">=", "==", "!=")

    def __post_init__(self) -> None:
        _need(
            self.kind in self.KINDS,
            f"Escalate: kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}",
        )
        if self.kind in ("below", "equals", "not_quoted"):
            _need(
                isinstance(self.field, str) and bool(self.field),
                f"Escalate.{self.kind}: field must be an answer field name",
            )
        if self.kind == "below":
            _need(
                isinstance(self.value, (int, float)) and not isinstance(self.value, bool),
                "Escalate.below: threshold must be a number",
            )
        if self.kind == "not_quoted":
            _need(
                len(self.in_fields) > 0,
                "Escalate.not_quoted: in_fields must name the record fields to search",
            )
        if self.kind == "when":
            _need(callable(self.fn), "Escalate.when: fn must be callable (answer, record) -> bool")
        if self.when_record is not None:
            _need(
                len(self.when_record) == 3 and self.when_record[1] in self._OPS,
                f"Escalate: when_record must be (record_field, op, value) with op one of {', '.join(self._OPS)}",
            )

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def rejected(cls) -> Escalate:
        return cls("rejected", name="rejected")

    @classmethod
    def below(
        cls,
        field: str,
        threshold: float,
        *,
        name: str | None = None,
        when_record: tuple[str, str, Any] | None = None,
    ) -> Escalate:
        return cls(
            "below",
            field=field,
            value=threshold,
            name=name or f"{field}_below_{threshold}",
            when_record=when_record,
            keep_answer=True,
        )

    @classmethod
    def equals(
        cls,
        field: str,
        value: Any,
        *,
        name: str | None = None,
        when_record: tuple[str, str, Any] | None = None,
    ) -> Escalate:
        return cls(
            "equals",
            field=field,
            value=value,
            name=name or f"{field}_is_{value}",
            when_record=when_record,
            keep_answer=True,
        )

    @classmethod
    def not_quoted(cls, field: str, *, in_fields: Sequence[str], name: str | None = None) -> Escalate:
        return cls(
            "not_quoted", field=field, in_fields=tuple(in_fields), name=name or f"{field}_not_in_record"
        )

    @classmethod
    def when(
        cls, fn: Callable[[dict[str, Any], dict[str, Any]], bool], *, name: str, keep_answer: bool = False
    ) -> Escalate:
        return cls("when", fn=fn, name=name, keep_answer=keep_answer)

    # -- evaluation (task time) -------------------------------------------------------------------
    @property
    def reason(self) -> str:
        return self.name or self.kind

    def fires(self, answer: Mapping[str, Any] | None, record: Mapping[str, Any]) -> bool:
        """Whether this rule sends the record on; ``answer`` is None when the stage rejected it."""
        if self.when_record is not None and not _compare(
            record.get(self.when_record[0]), self.when_record[1], self.when_record[2]
        ):
            return False
        if self.kind == "rejected":
            return answer is None
        if answer is None:
            return False
        if self.kind == "below":
            value = answer.get(self.field or "")
            return value is not None and float(value) < float(self.value)
        if self.kind == "equals":
            value = answer.get(self.field or "")
            return value == self.value or (hasattr(self.value, "value") and value == self.value.value)
        if self.kind == "not_quoted":
            return not is_quoted(answer.get(self.field or ""), record, self.in_fields)
        assert self.fn is not None
        return bool(self.fn(dict(answer), dict(record)))


def _norm(text: Any) -> str:
    return " ".join(str(text or "").lower().split())


def is_quoted(quote: Any, record: Mapping[str, Any], fields: Sequence[str]) -> bool:
    """True when ``quote`` is empty or a case/whitespace-insensitive substring of the record's fields."""
    needle = _norm(quote).strip(" .,;:\"'")
    if not needle:
        return True
    return needle in " | ".join(_norm(record.get(f)) for f in fields)


def _compare(left: Any, op: str, right: Any) -> bool:
    if left is None:
        return False
    try:
        return {
            "<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right,
            "==": left == right, "!=": left != right,
        }[op]  # fmt: skip
    except TypeError:
        return False


# ----------------------------------------------------------------------------------------- stage
@dataclass(frozen=True)
class Stage:
    """One model of the cascade. Every stage but the last escalates by its rules.

    :param model: model name (e.g. ``"claude-haiku-4-5"``, ``"claude-fable-5"``).
    :param max_tokens: output limit per request of this stage.
    :param escalate: rules deciding which answers go to the next stage (ignored on the last
        stage; a middle stage without rules escalates nothing). Their order is their priority.
    :param priority_field: a numeric source field; within a rule, records with a higher value are
        escalated first when the budget is short (e.g. ``"pipeline_value_usd"``).
    :param name: task-id-safe name of the stage (default ``s1``, ``s2``...).
    """

    model: str
    max_tokens: int = 1024
    escalate: Sequence[Escalate] = ()
    priority_field: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _need(isinstance(self.model, str) and bool(self.model.strip()), "Stage: model must be a model name")
        _need(
            isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= 128_000,
            f"Stage {self.model}: max_tokens must be an int in 1..128000, got {self.max_tokens!r}",
        )
        rules = tuple(self.escalate) if not isinstance(self.escalate, Escalate) else (self.escalate,)
        for rule in rules:
            _need(
                isinstance(rule, Escalate),
                f"Stage {self.model}: escalate takes Escalate rules (Escalate.rejected(), .below(), .equals(), .not_quoted(), .when()), got {rule!r}",
            )
        object.__setattr__(self, "escalate", rules)
        _need(
            self.name is None or _is_identifier(self.name),
            f"Stage: name must be a plain identifier, got {self.name!r}",
        )

    def first_reason(
        self, answer: Mapping[str, Any] | None, record: Mapping[str, Any]
    ) -> tuple[int, Escalate] | None:
        """(priority index, rule) of the first rule that fires, else None (the answer is final)."""
        for n, rule in enumerate(self.escalate):
            if rule.fires(answer, record):
                return n, rule
        return None


# ----------------------------------------------------------------------------------- destination
@dataclass(frozen=True)
class Destination:
    """Where the final table lives: a SQL connection + table, and/or a Parquet copy.

    The unit writes ``<table>`` (one row per record: the answer, ``_stage``, ``_model``,
    ``_escalation_reason``, ``_batch_id``, ``_run_id``), ``<table>_rejects`` (records no stage
    answered, last reason), ``<table>_review`` (``needs_review``), the stage tables
    ``<table>__<stage>`` the loads write, and ``<table>__work`` (each run's selection).

    :param conn_id: Airflow SQL connection (sqlite or postgres).
    :param table: final table name.
    :param parquet: optional path/URL of a Parquet copy of the final rows written by a run.
    :param id_column: the id column of the tables (default: the source's ``id_field``).
    """

    conn_id: str
    table: str
    parquet: str | None = None
    id_column: str | None = None

    def __post_init__(self) -> None:
        _need(
            isinstance(self.conn_id, str) and bool(self.conn_id),
            "Destination: conn_id must be an Airflow SQL connection id",
        )
        _need(
            _is_identifier(self.table), f"Destination: table must be a plain table name, got {self.table!r}"
        )
        _need(
            self.id_column is None or _is_identifier(self.id_column),
            f"Destination: id_column must be a plain column name, got {self.id_column!r}",
        )


# ------------------------------------------------------------------------------------ guardrails
@dataclass(frozen=True)
class Guardrails:
    """Checks on a run's final outcome (after every row is written; a breach fails the run).

    :param max_reject_rate: share of this run's records no stage answered, for full runs.
    :param failed_max_reject_rate: the same for ``mode=failed`` reruns, which are made only of
        records that failed before (None: no limit; a rerun is expected to fail more often).
    :param max_share: ``{"field": {"value": share}}`` over the run's final rows.
    :param min_share: the same shape, a lower bound.
    :param min_accepted: fewest final rows a non-empty run must produce.
    :param review_after: a record rejected this many times for the same reason by the last stage
        becomes ``needs_review`` and is no longer sent automatically.
    """

    max_reject_rate: float | None = None
    failed_max_reject_rate: float | None = None
    max_share: Mapping[str, Mapping[str, float]] | None = None
    min_share: Mapping[str, Mapping[str, float]] | None = None
    min_accepted: int | None = None
    review_after: int = 3

    def __post_init__(self) -> None:
        for name in ("max_reject_rate", "failed_max_reject_rate"):
            v = getattr(self, name)
            _need(
                v is None or (isinstance(v, (int, float)) and 0 <= v <= 1),
                f"Guardrails: {name} must be a share in 0..1 or None, got {v!r}",
            )
        for name in ("max_share", "min_share"):
            v = getattr(self, name)
            _need(
                v is None or (isinstance(v, Mapping) and all(isinstance(x, Mapping) for x in v.values())),
                f"Guardrails: {name} must be {{'field': {{'value': share}}}} or None",
            )
        _need(
            isinstance(self.review_after, int) and self.review_after >= 1,
            f"Guardrails: review_after must be an int >= 1, got {self.review_after!r}",
        )


# -------------------------------------------------------------------------------------- chunking
# (chunk-then-combine; owned by the chunking work, wired in backlog/chunked.py)
@dataclass(frozen=True)
class Chunking:
    """Chunk-then-combine for a long field (``core.chunking``): sections first, then one answer per record.

    The long ``field`` of each record is split into sections on its own heading/paragraph
    boundaries under ``section_tokens`` (estimated offline, see docs/patterns.md); every section is
    answered by ``model`` with this object's ``prompt`` and ``output_model``; then, only for a
    record whose every section is accepted, the unit's own prompt, output model and stages answer
    **one combine request per record** built from the section answers. The final table therefore
    holds the combined answers (the unit's ``output_model``), one row per record, and the stages'
    escalation rules apply to the combine. Records with a section missing or rejected are not
    combined: they are reported in ``<table>_incomplete`` and picked up by ``mode=failed``, which
    resends only the sections not accepted yet. Records whose whole text fits in one section skip
    the section requests (unless ``always_split``): their combine request carries the text itself.

    The section template sees the record's fields with ``field`` holding the section's text, plus
    ``section_index``, ``section_count``, ``section_heading``, ``section_id``, ``parent_id``. The
    unit's (combine) template sees the record's other fields plus ``material`` (the section
    answers in order, or the whole text), ``material_note`` (a sentence saying which of the two it
    is) and ``section_count`` (0 when the text was sent whole).

    :param field: the long text field of the source record.
    :param prompt: the section request's ``Prompt(...)`` (template, system, few-shot; inline or files).
    :param output_model: pydantic model (or dotted path) every section answer must satisfy.
    :param model: model answering the sections (a cheap model is often enough).
    :param max_tokens: output limit of a section request.
    :param section_tokens: token bound of a section (estimated).
    :param chars_per_token: ASCII characters per token of the estimate (non-ASCII: 1 token each).
    :param overlap_paragraphs: paragraphs repeated at the start of the next section (0-3).
    :param always_split: send even a text that fits in one section through the section stage.
    :param on_empty: ``"error"`` (fail naming the record, before anything is paid for) or
        ``"skip"`` (report it as incomplete) for an empty or missing text.
    """

    field: str
    prompt: Prompt
    output_model: Any
    model: str = "claude-fable-5"
    max_tokens: int = 1024
    section_tokens: int = 2000
    chars_per_token: float = 4.0
    overlap_paragraphs: int = 0
    always_split: bool = False
    on_empty: str = "error"

    ON_EMPTY = ("error", "skip")

    def __post_init__(self) -> None:
        _need(_is_identifier(self.field), f"Chunking: field must be a plain field name, got {self.field!r}")
        _need(isinstance(self.prompt, Prompt), "Chunking: prompt must be a Prompt(...) for the section requests")
        _need(self.output_model is not None, "Chunking: output_model (the section answer's model) is required")
        _need(isinstance(self.model, str) and bool(self.model.strip()), "Chunking: model must be a model name")
        _need(
            isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= 128_000,
            f"Chunking: max_tokens must be an int in 1..128000, got {self.max_tokens!r}",
        )
        _need(
            isinstance(self.section_tokens, int) and not isinstance(self.section_tokens, bool)
            and self.section_tokens >= 50,
            f"Chunking: section_tokens must be an int >= 50, got {self.section_tokens!r}",
        )  # fmt: skip
        _need(
            isinstance(self.chars_per_token, (int, float)) and 1 <= self.chars_per_token <= 10,
            f"Chunking: chars_per_token must be a number in 1..10, got {self.chars_per_token!r}",
        )
        _need(
            isinstance(self.overlap_paragraphs, int) and 0 <= self.overlap_paragraphs <= 3,
            f"Chunking: overlap_paragraphs must be an int in 0..3, got {self.overlap_paragraphs!r}",
        )
        _need(
            self.on_empty in self.ON_EMPTY,
            f"Chunking: on_empty must be one of {', '.join(self.ON_EMPTY)}, got {self.on_empty!r}",
        )


def _is_identifier(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name.replace("_", "a").isalnum()
        and not name[0].isdigit()
        and len(name) <= 63
    )


__all__ = [
    "RUN_MODES",
    "BacklogConfigError",
    "Chunking",
    "Destination",
    "Escalate",
    "Guardrails",
    "Prompt",
    "ResolvedPrompt",
    "Source",
    "Stage",
    "is_quoted",
]
_ = field  # dataclasses.field kept importable for subclasses
