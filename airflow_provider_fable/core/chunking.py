"""Chunk-then-combine: long text in sections, one answer per section, one combine per record.

A long document does not belong in one request: the answer gets vaguer as the input grows, one
failure loses the whole document and the output limit caps what can be said. This module splits
the long text field of a record into **sections** on the text's own boundaries, gives each a
deterministic id, and later turns the validated section answers of a record into **one combine
input**, only when every section of the record has an accepted answer.

Pure functions over plain dicts: no Airflow, no database, no network. The backlog unit (and any
hand-written DAG) stores the section records wherever it likes and calls back with the answers.

Splitting (:func:`split_text`)
    Boundaries, coarsest first: markdown headings (``#`` .. ``######``, never inside a fenced
    code block), blank lines, and single-line "heading-like" paragraphs (``3. Fees and payment``,
    ``PAYMENT TERMS``: short, no closing punctuation). A heading opens a new section once the
    current one is at least half full, and is never left dangling at the end of a section. A
    paragraph longer than the bound is cut between sentences (``. ! ?`` and their CJK forms), a
    sentence longer than the bound between lines, then between words, and a run without any of
    those is cut hard, never inside a grapheme (combining marks, ZWJ emoji sequences, variation
    selectors stay with their base character). Every section's estimate is at most the bound.

Token estimate (:func:`estimate_tokens`)
    Deterministic and offline, because splitting happens while the run is planned and must give
    the same sections on every retry: ASCII characters count ``1 / chars_per_token`` each
    (default 4; English prose and markdown usually measure 3.5-4 characters per token on
    Claude's tokenizers, so a section can run ~15 % over the bound in real tokens: lower
    ``chars_per_token`` for a strict bound), every non-ASCII character counts one token (CJK is
    about one token per character, where ``bytes / 4`` would say 0.75; accented Latin,
    Cyrillic or Greek use less, so their estimate is high and their sections smaller). It
    sizes sections; the bill is estimated by the submit operator with the API's token counting
    before anything is paid.

Section ids (:func:`section_id`)
    ``<record id>__s<k>of<n>-<digest>``, e.g. ``DOC-0021__s03of07-5f0c2a9e``: the parent, the
    1-based index (zero-padded to the width of ``n``, so ids sort in order) and the count are
    readable in every result and reject row; ``digest`` is 8 hex digits of the section's text.
    The digest is what makes the ids safe to reuse: the job ledger keys answers by
    ``(job, record id)``, so an id that meant other text last run (the document was edited, the
    bound changed, the split moved) would re-attach to the old answer; with the digest an
    unchanged section keeps its id (and its paid answer) and a changed one gets a new id. The id
    is the section record's *real* id; when it does not fit the API's custom_id rule (a long or
    non-ASCII parent id) the submit operator encodes it with :mod:`core.ids` as for any record,
    and the load maps it back (:func:`section_custom_id` shows what is sent).

Combining (:func:`build_combine_inputs`)
    Per record, every expected section id (from the section records, not from whatever answers
    happen to exist) is looked up in the answers: all present -> one combine input with the
    rendered section answers in order; otherwise the record is reported incomplete with the
    sections that are missing (no result yet) and those rejected (with the reason), and nothing
    is combined for it. Records that fitted in one section (``direct``) skip the section stage:
    their combine input carries the whole text.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_fable.core import ids
from airflow_provider_fable.core.errors import RecordError

#: ASCII characters per token of the estimate (non-ASCII characters count one token each).
CHARS_PER_TOKEN = 4.0
#: Separator between a section id's parent and its place: ``<parent>__s<k>of<n>-<digest>``.
SECTION_MARK = "__s"
_DIGEST_LEN = 8
_SECTION_ID_RE = re.compile(r"^(?P<parent>.+)__s(?P<k>\d+)of(?P<n>\d+)(?:-(?P<digest>[0-9a-f]{8}))?$")

#: Fields a section record adds to (a copy of) its parent record.
SECTION_ID = "section_id"
PARENT_ID = "parent_id"
SECTION_INDEX = "section_index"
SECTION_COUNT = "section_count"
SECTION_HEADING = "section_heading"
SECTION_FIELDS = (SECTION_ID, PARENT_ID, SECTION_INDEX, SECTION_COUNT, SECTION_HEADING)

_MD_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+\S")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
# Single-line paragraphs that read as headings: "3. Fees and payment", "4.2 Liability", "TERMS".
_LOOSE_HEADING = re.compile(r"^(\d+(\.\d+)*\.?[ \t]+[A-Z][^\n]{0,80}|[A-Z][A-Z0-9 ,&/()-]{3,80})$")
# A boundary is the whitespace after a sentence end (a closing quote or bracket may follow the
# mark), or the point right after a CJK full stop (CJK text puts no space between sentences).
_SENTENCE_END = re.compile("(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\\]]))\\s+|(?<=[\u3002\uff01\uff1f])\\s*")
_LINE_BREAK = re.compile(r"\n+")
_SPACE = re.compile(r"\s+")
_BLOCK_SEP = "\n\n"
_GLUE = "\u200d\ufe0e\ufe0f"  # zero-width joiner, variation selectors


# --------------------------------------------------------------------------- token estimate


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Estimated tokens of ``text``: ASCII at ``chars_per_token`` per token, other characters 1 each.

    Deterministic and offline (see the module docstring for why and how it errs).
    """
    if chars_per_token <= 0:
        raise ValueError(f"chars_per_token must be positive, got {chars_per_token!r}")
    ascii_chars = len(text.encode("ascii", "ignore"))
    return math.ceil(ascii_chars / chars_per_token + (len(text) - ascii_chars))


# --------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class _Block:
    text: str
    heading: bool
    weight: float


class _Splitter:
    """One split: the bound in estimate units and the estimate's ratio."""

    def __init__(self, max_tokens: int, chars_per_token: float) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be positive, got {chars_per_token!r}")
        self.bound = float(max_tokens)
        self.cpt = chars_per_token
        self.sep = len(_BLOCK_SEP) / chars_per_token

    def weight(self, text: str) -> float:
        ascii_chars = len(text.encode("ascii", "ignore"))
        return ascii_chars / self.cpt + (len(text) - ascii_chars)

    # -- blocks ---------------------------------------------------------------------------

    def blocks(self, text: str) -> list[_Block]:
        """Headings and paragraphs, in order; paragraphs over the bound already cut to fit."""
        out: list[_Block] = []
        para: list[str] = []
        in_fence = False

        def flush() -> None:
            body = "\n".join(para).strip()
            para.clear()
            if not body:
                return
            heading = (
                "\n" not in body
                and len(body) <= 90
                and body[-1] not in ".!?:;,"
                and _LOOSE_HEADING.match(body) is not None
            )
            self._add(out, body, heading)

        for line in text.split("\n"):
            if _FENCE.match(line):
                in_fence = not in_fence
                para.append(line)
                continue
            if in_fence:
                para.append(line)
                continue
            if not line.strip():
                flush()
                continue
            if _MD_HEADING.match(line):
                flush()
                self._add(out, line.strip(), True)
                continue
            para.append(line.rstrip())
        flush()
        return out

    def _add(self, out: list[_Block], text: str, heading: bool) -> None:
        w = self.weight(text)
        if w <= self.bound:
            out.append(_Block(text, heading, w))
            return
        # Over the bound (a heading that long is not a heading): cut, coarsest boundary first.
        for piece in self._cut(text, (_SENTENCE_END, _LINE_BREAK, _SPACE)):
            out.append(_Block(piece, False, self.weight(piece)))

    def _cut(self, text: str, levels: tuple[re.Pattern[str], ...]) -> list[str]:
        """Pieces of ``text`` each within the bound, packed greedily at the first level that
        separates it, finer levels only for the units that level leaves too long.

        Units keep the separator that follows them, so a piece is a verbatim slice of the text
        (stripped at its ends): no space is invented between CJK sentences, no newline lost.
        """
        if self.weight(text) <= self.bound:
            return [text]
        if not levels:
            return self._hard_cut(text)
        pattern, rest = levels[0], levels[1:]
        units: list[str] = []
        prev = 0
        for m in pattern.finditer(text):
            if m.end() > prev and m.start() > prev:
                units.append(text[prev : m.end()])
                prev = m.end()
        if prev < len(text):
            units.append(text[prev:])
        if len(units) <= 1:
            return self._cut(text, rest)
        pieces: list[str] = []
        current: list[str] = []
        current_w = 0.0

        def emit() -> None:
            piece = "".join(current).strip()
            if piece:
                pieces.append(piece)

        for unit in units:
            uw = self.weight(unit)
            if self.weight(unit.strip()) > self.bound:
                emit()
                current, current_w = [], 0.0
                pieces.extend(self._cut(unit.strip(), rest))
                continue
            if current and current_w + self.weight(unit.rstrip()) > self.bound:
                emit()
                current, current_w = [], 0.0
            current.append(unit)
            current_w += uw
        emit()
        return pieces

    def _hard_cut(self, text: str) -> list[str]:
        """Cut a run with no boundary at all, never between a character and what clings to it."""
        pieces: list[str] = []
        start, acc = 0, 0.0
        i = 0
        while i < len(text):
            w = 1.0 if ord(text[i]) > 127 else 1.0 / self.cpt
            if acc + w > self.bound and i > start:
                cut = i
                while cut > start + 1 and _clings(text, cut):
                    cut -= 1
                if cut == start + 1 and _clings(text, cut):
                    cut = i  # one grapheme longer than the bound: cut it rather than loop
                pieces.append(text[start:cut])
                start, acc, i = cut, 0.0, cut
                continue
            acc += w
            i += 1
        if start < len(text):
            pieces.append(text[start:])
        return pieces

    # -- packing --------------------------------------------------------------------------

    def pack(self, blocks: list[_Block], overlap_paragraphs: int) -> list[tuple[str, str]]:
        """Blocks into ``(heading, text)`` sections, each within the bound."""
        sections: list[tuple[str, str]] = []
        current: list[_Block] = []
        heading_now = ""  # the heading in effect at this point of the text
        section_heading = ""  # the heading in effect where the current section's body starts

        def size(parts: list[_Block]) -> float:
            return sum(b.weight for b in parts) + self.sep * max(0, len(parts) - 1)

        def has_body(parts: list[_Block]) -> bool:
            return any(not b.heading for b in parts)

        def close() -> list[_Block]:
            """Emit the current section; return the overlap paragraphs that open the next."""
            if current:
                sections.append((section_heading, _BLOCK_SEP.join(b.text for b in current)))
            if not overlap_paragraphs:
                return []
            carry = [b for b in current if not b.heading][-overlap_paragraphs:]
            return carry if size(carry) <= self.bound / 2 else []

        for block in blocks:
            if block.heading:
                if has_body(current) and size(current) >= self.bound / 2:
                    close()
                    current = []
                elif current and size(current) + self.sep + block.weight > self.bound:
                    trailing = _pop_headings(current)
                    if current:
                        close()
                    current = trailing
                    if current and size(current) + self.sep + block.weight > self.bound:
                        close()
                        current = []
                if not has_body(current):
                    section_heading = _heading_text(block.text)
                heading_now = _heading_text(block.text)
                current.append(block)
                continue
            if current and size(current) + self.sep + block.weight > self.bound:
                trailing = _pop_headings(current)  # a heading goes with the text it introduces
                carry = close() if current else []
                current = carry + trailing
                if current and size(current) + self.sep + block.weight > self.bound:
                    current = trailing
                if current and size(current) + self.sep + block.weight > self.bound:
                    close()  # headings too long to share a section with the block: on their own
                    current = []
                section_heading = heading_now
            elif not has_body(current):
                section_heading = heading_now
            current.append(block)
        if current:
            close()
        return sections


def _pop_headings(current: list[_Block]) -> list[_Block]:
    trailing: list[_Block] = []
    while current and current[-1].heading:
        trailing.insert(0, current.pop())
    return trailing


def _heading_text(text: str) -> str:
    return text.lstrip().lstrip("#").strip()


def _clings(text: str, i: int) -> bool:
    """Whether a cut before ``text[i]`` would split a grapheme."""
    ch, prev = text[i], text[i - 1]
    return bool(unicodedata.combining(ch)) or ch in _GLUE or prev == "\u200d" or 0xDC00 <= ord(ch) <= 0xDFFF


def split_text(
    text: str,
    max_tokens: int,
    *,
    chars_per_token: float = CHARS_PER_TOKEN,
    overlap_paragraphs: int = 0,
) -> list[tuple[str, str]]:
    """Split ``text`` into ``(heading, text)`` sections of at most ``max_tokens`` (estimated).

    ``heading`` is the heading in effect where the section's text starts ("" before the first).
    ``overlap_paragraphs`` repeats the last paragraphs of a section at the start of the next (at
    most half the bound), so a point spanning a boundary is seen whole once; they count against
    the bound. Whitespace-only text gives no sections. Same input, same sections, always.
    """
    if overlap_paragraphs < 0:
        raise ValueError(f"overlap_paragraphs must be >= 0, got {overlap_paragraphs!r}")
    splitter = _Splitter(max_tokens, chars_per_token)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return []
    return splitter.pack(splitter.blocks(text), overlap_paragraphs)


# --------------------------------------------------------------------------- section ids


def section_id(parent_id: Any, index: int, count: int, text: str | None = None) -> str:
    """The section's real id: ``<parent>__s<k>of<n>`` plus ``-<digest of text>`` when given."""
    parent = ids.record_id_text(parent_id)
    if not 1 <= index <= count:
        raise ValueError(f"section index {index} is outside 1..{count}")
    width = len(str(count))
    sid = f"{parent}{SECTION_MARK}{index:0{width}d}of{count}"
    if text is not None:
        sid += "-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_LEN]
    return sid


def section_custom_id(section_id_text: str) -> str:
    """What the API receives for a section: its id when it fits the rule, else its encoding."""
    return ids.encode(section_id_text)


def parse_section_id(text: str) -> tuple[str, int, int] | None:
    """``(parent id, index, count)`` of a section id, or None when ``text`` is not one."""
    m = _SECTION_ID_RE.match(text)
    if not m:
        return None
    k, n = int(m["k"]), int(m["n"])
    return (m["parent"], k, n) if 1 <= k <= n else None


# --------------------------------------------------------------------------- records


@dataclass
class ChunkPlan:
    """What chunking made of a batch of records.

    ``sections``: the section records (a copy of the parent record, the text field holding the
    section's text, plus ``SECTION_FIELDS``), parents in input order, sections in text order.
    ``direct``: ids of the records that fitted in one section (no section stage; their combine
    input carries the whole text). ``skipped``: record id -> reason, for empty text under
    ``on_empty="skip"``.
    """

    sections: list[dict[str, Any]] = field(default_factory=list)
    direct: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def chunked(self) -> list[str]:
        """Ids of the records that were split, in input order."""
        seen: dict[str, None] = {}
        for s in self.sections:
            seen.setdefault(s[PARENT_ID], None)
        return list(seen)

    def summary(self) -> dict[str, Any]:
        return {
            "records": len(self.direct) + len(self.chunked) + len(self.skipped),
            "direct": len(self.direct),
            "chunked": len(self.chunked),
            "sections": len(self.sections),
            "skipped": len(self.skipped),
        }


def chunk_records(
    records: Iterable[Mapping[str, Any]],
    *,
    id_field: str,
    text_field: str,
    max_tokens: int,
    chars_per_token: float = CHARS_PER_TOKEN,
    overlap_paragraphs: int = 0,
    always_split: bool = False,
    on_empty: str = "error",
) -> ChunkPlan:
    """Split each record's ``text_field`` into section records (see :class:`ChunkPlan`).

    A record whose whole text is within ``max_tokens`` is ``direct`` unless ``always_split``.
    Errors name the record and the rule, before anything is sent: a missing id or duplicate id,
    a text field that is missing or not a string, a record already carrying one of the section
    fields, and (``on_empty="error"``, the default) an empty text, which would otherwise be a
    paid request about nothing; ``on_empty="skip"`` reports it in ``skipped`` instead.
    """
    if id_field in SECTION_FIELDS:
        raise ValueError(f"id_field {id_field!r} is a name section records use; rename the field")
    if on_empty not in ("error", "skip"):
        raise ValueError(f"on_empty must be 'error' or 'skip', got {on_empty!r}")
    splitter = _Splitter(max_tokens, chars_per_token)  # validates the bound once, up front
    plan = ChunkPlan()
    seen: set[str] = set()
    for position, record in enumerate(records):
        try:
            rid = ids.record_id_text(record.get(id_field))
        except RecordError as exc:
            raise exc.at(position) from None
        if rid in seen:
            raise RecordError(rid, "custom_id.duplicate", f"the id appears twice in {id_field!r}", position)
        seen.add(rid)
        clash = [f for f in SECTION_FIELDS if f in record]
        if clash:
            raise RecordError(
                rid, "chunking.field_clash",
                f"the record already has field(s) {clash}, which section records add; rename them",
                position,
            )  # fmt: skip
        text = record.get(text_field)
        if text is None or (isinstance(text, float) and text != text):
            if on_empty == "skip":
                plan.skipped[rid] = "chunking.missing_text"
                continue
            raise RecordError(
                rid, "chunking.missing_text", f"the text field {text_field!r} is missing or null", position
            )
        if not isinstance(text, str):
            raise RecordError(
                rid, "chunking.text_type",
                f"the text field {text_field!r} is a {type(text).__name__}, not a string", position,
            )  # fmt: skip
        normalised = text.replace("\r\n", "\n").replace("\r", "\n")
        if not normalised.strip():
            if on_empty == "skip":
                plan.skipped[rid] = "chunking.empty_text"
                continue
            raise RecordError(
                rid, "chunking.empty_text",
                f"the text field {text_field!r} is empty (on_empty='skip' reports such records instead)",
                position,
            )  # fmt: skip
        if not always_split and splitter.weight(normalised.strip()) <= splitter.bound:
            plan.direct.append(rid)
            continue
        parts = splitter.pack(splitter.blocks(normalised), overlap_paragraphs)
        n = len(parts)
        for k, (heading, body) in enumerate(parts, 1):
            section = dict(record)
            section[text_field] = body
            section[SECTION_ID] = section_id(rid, k, n, body)
            section[PARENT_ID] = rid
            section[SECTION_INDEX] = k
            section[SECTION_COUNT] = n
            section[SECTION_HEADING] = heading
            plan.sections.append(section)
    return plan


# --------------------------------------------------------------------------- combining


@dataclass(frozen=True)
class Incomplete:
    """A record not combined: which of its ``count`` sections have no answer, and why.

    ``missing``: 1-based indices with neither an answer nor a reject (not sent, or not back yet).
    ``rejected``: index -> the reject's reason.
    """

    record_id: str
    count: int
    missing: tuple[int, ...]
    rejected: dict[int, str]
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "sections": self.count,
            "missing_sections": list(self.missing),
            "rejected_sections": {str(k): v for k, v in sorted(self.rejected.items())},
            "note": self.note,
        }

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"no answer for section(s) {', '.join(map(str, self.missing))}")
        if self.rejected:
            parts.append(
                "rejected: " + ", ".join(f"section {k} ({v})" for k, v in sorted(self.rejected.items()))
            )
        if self.note:
            parts.append(self.note)
        return f"record {self.record_id!r}, {self.count} sections: " + "; ".join(parts)


@dataclass
class CombinePlan:
    """Combine inputs for the complete records; the incomplete ones, never combined."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[Incomplete] = field(default_factory=list)

    def summary(self, limit: int = 50) -> dict[str, Any]:
        return {
            "to_combine": len(self.inputs),
            "incomplete": len(self.incomplete),
            "incomplete_records": [i.as_dict() for i in self.incomplete[:limit]],
        }


def render_answer(section: Mapping[str, Any], answer: Mapping[str, Any]) -> str:
    """Default rendering of one section's answer for the combine prompt.

    ``Section k of n: heading`` then one line per field (lists as ``- item`` lines, nested values
    as compact JSON), in the answer's field order: plain text a model reads easily, and the same
    bytes for the same answer, so a retried combine builds the same request.
    """
    import json

    head = f"Section {section[SECTION_INDEX]} of {section[SECTION_COUNT]}"
    if section.get(SECTION_HEADING):
        head += f": {section[SECTION_HEADING]}"
    lines = [head]
    for key, value in answer.items():
        if isinstance(value, list):
            if not value:
                lines.append(f"{key}: (none)")
                continue
            lines.append(f"{key}:")
            for item in value:
                text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False, sort_keys=True)
                lines.append(f"- {text}")
        elif isinstance(value, dict):
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False, sort_keys=True)}")
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def build_combine_inputs(
    sections: Iterable[Mapping[str, Any]],
    answers: Mapping[str, Mapping[str, Any]],
    rejects: Mapping[str, str] | None = None,
    *,
    id_field: str,
    text_field: str,
    direct: Iterable[Mapping[str, Any]] = (),
    material_field: str = "material",
    render: Callable[[Mapping[str, Any], Mapping[str, Any]], str] = render_answer,
) -> CombinePlan:
    """One combine input per record whose every section is answered; the others reported.

    ``sections``: the section records of :func:`chunk_records` (any order; what the plan made,
    e.g. read back from a work table). ``answers``: section id -> validated answer (dict);
    ``rejects``: section id -> reason, for sections whose latest verdict is a reject (an answer
    for the same id wins: a later acceptance supersedes an old reject). ``direct``: the parent
    records that fitted in one section; their input carries the whole text.

    Each input is the parent's fields (the section fields and the long text removed) plus
    ``material_field`` (the rendered answers in section order, blank-line separated, or the whole
    text for a direct record), ``section_count`` (0 for direct) and ``section_answers`` (the
    answers as a list, for templates or checks that want them structured). Completeness is
    judged against the ids the split produced, never against how many answers there are: an
    answer for an id of another split (an older or a differently bounded one) does not count.
    """
    rejects = rejects or {}
    by_parent: dict[str, list[Mapping[str, Any]]] = {}
    for s in sections:
        by_parent.setdefault(str(s[PARENT_ID]), []).append(s)
    plan = CombinePlan()
    for record in direct:
        rid = ids.record_id_text(record.get(id_field))
        base = {k: v for k, v in record.items() if k not in SECTION_FIELDS}
        base[id_field] = record.get(id_field)
        base[material_field] = str(record.get(text_field) or "").strip()
        base[SECTION_COUNT] = 0
        base["section_answers"] = []
        plan.inputs.append(base)
        by_parent.pop(rid, None)  # a record is direct or chunked, never both
    for parent, parts in by_parent.items():
        parts = sorted(parts, key=lambda s: int(s[SECTION_INDEX]))
        counts = {int(s[SECTION_COUNT]) for s in parts}
        count = max(counts)
        have = {int(s[SECTION_INDEX]): s for s in parts if int(s[SECTION_COUNT]) == count}
        missing: list[int] = []
        rejected: dict[int, str] = {}
        got: list[tuple[Mapping[str, Any], Mapping[str, Any]]] = []
        for k in range(1, count + 1):
            s = have.get(k)  # type: ignore[assignment]  # None is tested right below
            if s is None:  # the plan itself lacks the section (a partial or mixed work table)
                missing.append(k)
                continue
            sid = str(s[SECTION_ID])
            if sid in answers:
                got.append((s, answers[sid]))
            elif sid in rejects:
                rejected[k] = rejects[sid]
            else:
                missing.append(k)
        if missing or rejected or len(counts) > 1:
            note = f"section records of {len(counts)} different splits" if len(counts) > 1 else ""
            plan.incomplete.append(Incomplete(parent, count, tuple(missing), rejected, note))
            continue
        first = parts[0]
        base = {k: v for k, v in first.items() if k not in SECTION_FIELDS and k != text_field}
        base[id_field] = first.get(id_field)
        base[material_field] = _BLOCK_SEP.join(render(s, a) for s, a in got)
        base[SECTION_COUNT] = count
        base["section_answers"] = [dict(a) for _, a in got]
        plan.inputs.append(base)
    return plan
