"""The emulator's deterministic stand-in for Claude: answers, validation and token usage.

Everything here is a pure function of the request (no clock, no randomness, no shared state),
so the same request text always gets the same answer. That is what makes offline DAG tests
reproducible; the server-global parts (prompt cache, faults) live in ``state``.

The "model" is deliberately simple but useful: structured output and forced tools get JSON
that is valid against the requested schema, enum labels are picked by evidence found in the
last user message (so a ticket about an invoice is labelled billing), and free text gets an
extract of the question. Usage is estimated at ~4 characters per token.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import threading
import uuid
from collections import Counter, OrderedDict, _count_elements  # type: ignore[attr-defined]
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from airflow_provider_fable.emulator.cues import (
    LabelCues,
    PromptCues,
    SharedCues,
    fold,
    fuzzy_matches,
    glosses,
    is_placeholder,
    label_cues,
    matching_example,
    one_slip,
    prompt_cues,
    quoted_text,
    record_key,
)

__all__ = [
    "Answer",
    "AnswerJob",
    "Evidence",
    "PromptAccounting",
    "account_prompt",
    "answer_for_schema",
    "answer_lines",
    "answer_packed",
    "worker_ready",
    "pack_jobs",
    "unpack_jobs",
    "build_answer",
    "SchemaAnswer",
    "SharedPrompt",
    "break_answer",
    "build_message",
    "content_sentences",
    "content_text",
    "estimate_tokens",
    "forced_tool",
    "free_text_answer",
    "last_user_text",
    "name_tokens",
    "output_schema",
    "result_line",
    "shared_prompt",
    "stable_fraction",
    "stable_hash",
    "stable_token",
    "stem",
    "usage_dict",
    "validate_params",
]

# --------------------------------------------------------------------------------------------
# Stable hashing: every "random" choice in the emulator goes through these, never `random`.
# --------------------------------------------------------------------------------------------


class _lazy:  # noqa: N801 (used as a decorator, like the functools one it replaces)
    """``functools.cached_property`` without its per-access lock (Python 3.11 takes an RLock on
    every first read): an ``_Answerer`` lives in one thread, and its lazy reads are hot."""

    __slots__ = ("func", "name")

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func
        self.name = func.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.func(obj)
        return value


_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _digest(parts: Sequence[object]) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass")).digest()


def stable_hash(*parts: object) -> int:
    """A 64-bit integer that depends only on ``parts`` (unlike ``hash()``, stable across runs)."""
    return int.from_bytes(_digest(parts)[:8], "big")


def _continued(hasher: Any, rest: Sequence[object]) -> int:
    """``stable_hash`` of the parts ``hasher`` has taken (each followed by the separator) and ``rest``."""
    hasher = hasher.copy()
    hasher.update("\x1f".join(map(str, rest)).encode("utf-8", "surrogatepass"))
    return int.from_bytes(hasher.digest()[:8], "big")


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) derived from ``parts``; fault rates compare against it."""
    return stable_hash(*parts) / 2.0**64


_BLOCK = 62**10  # ten base-62 digits: a machine-size integer
#: Two base-62 digits per entry, lower digit first: ``_PAIRS[r] == _ALNUM[r % 62] + _ALNUM[r // 62]``.
_PAIRS = tuple(_ALNUM[r % 62] + _ALNUM[r // 62] for r in range(62 * 62))


def stable_token(length: int, *parts: object) -> str:
    """An alphanumeric id derived from ``parts`` (message and tool-use ids stay reproducible).

    The base-62 digits of the SHA-256, lowest first; taken ten at a time off the 256-bit number
    (one big division per ten digits), then two at a time from a table: the same digits as
    one division per digit, for a fifth of the divisions (a message id per answer)."""
    n = int.from_bytes(_digest(parts), "big")
    out = []
    need = length
    while need > 0:
        n, block = divmod(n, _BLOCK)
        for _ in range((min(10, need) + 1) // 2):
            block, r = divmod(block, 3844)
            out.append(_PAIRS[r])
        need -= 10
    token = "".join(out)
    return token if len(token) == length else token[:length]


# --------------------------------------------------------------------------------------------
# Request text
# --------------------------------------------------------------------------------------------


def content_text(content: Any) -> str:
    """The readable text of a message's ``content`` (a string or a list of content blocks)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if not isinstance(block, Mapping):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind == "tool_result":
            parts.append(content_text(block.get("content")))
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, Mapping) and source.get("type") == "text":
                parts.append(str(source.get("data", "")))
    return "\n".join(p for p in parts if p)


def last_user_text(params: Mapping[str, Any]) -> str:
    """Text of the last user message only.

    System prompts and few-shot turns typically list every label ("billing, bug, shipping...")
    and would otherwise count as evidence for all of them; the record being classified is the
    last user turn.
    """
    messages = params.get("messages")
    if type(messages) is list and messages:
        last = messages[-1]
        if type(last) is dict and last.get("role") == "user" and type(last.get("content")) is str:
            return last["content"]  # the commonest record: a user turn of plain text
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9_-]{0,40}>")
_LABEL_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9 #_-]{0,24}:\s+")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
#: Where a ``_SENTENCE_SPLIT_RE`` separator can begin: a newline, or the punctuation before
#: one (searched for as one character class; the look-behind alternation made the engine try
#: every character of the text both ways, several times slower).
_SENTENCE_MARK_RE = re.compile(r"[.!?\n]")
_SPACE_RUN_RE = re.compile(r"\s+")
_NEWLINE_RUN_RE = re.compile(r"\n+")
_HAS_ALNUM_RE = re.compile(r"[^\W_]")  # what ``str.isalnum`` accepts, one character of it


def _split_sentences(text: str) -> list[str]:
    """``_SENTENCE_SPLIT_RE.split(text)``: the same pieces, empty ones included."""
    pieces: list[str] = []
    start = pos = 0
    search = _SENTENCE_MARK_RE.search
    while (mark := search(text, pos)) is not None:
        j = mark.start()
        if text[j] == "\n":
            # Not after punctuation (that one was met first and took the newline with it).
            run = _NEWLINE_RUN_RE.match(text, j)
        else:
            run = _SPACE_RUN_RE.match(text, j + 1)
            if run is None:
                pos = j + 1
                continue
        assert run is not None
        pieces.append(text[start : run.start()])
        start = pos = run.end()
    pieces.append(text[start:])
    return pieces


_INSTRUCTION_WORDS = frozenset(
    "classify categorize categorise summarize summarise extract analyze analyse label determine "
    "identify decide output return respond enrich tag score rate assess evaluate qualify review "
    "read normalize normalise clean map assign fill triage".split()
)


def _content_sentence(raw: str) -> str | None:
    """One piece of ``_split_sentences`` as ``content_sentences`` keeps it, or None (skipped)."""
    sentence = " ".join(raw.split())
    if not sentence or sentence.endswith(":") or _HAS_ALNUM_RE.search(sentence) is None:
        return None
    words = sentence.split(None, 2)  # the first two words are all that is read
    first = words[0].lower().strip(",.:;!?")
    if first == "please" and len(words) > 1:
        first = words[1].lower().strip(",.:;!?")
    if first in _INSTRUCTION_WORDS:
        return None
    return _LABEL_PREFIX_RE.sub("", sentence, count=1) or sentence


#: ``_content_sentence`` of the pieces seen so far: a prompt template's own lines ("Classify
#: this ticket:", "Subject: ...") and a backlog's boilerplate (signatures, disclaimers) recur
#: in every record (bounded: cleared when full).
_SENTENCE_MEMO: dict[str, str | None] = {}
_SENTENCE_MEMO_MAX = 20_000
_UNSEEN = object()


def content_sentences(text: str) -> list[str]:
    """Sentences of ``text`` that carry content, in order.

    Prompt templates wrap the record in instructions ("Classify this ticket:") and labels
    ("Subject: ..."); those are skipped or stripped so extracts quote the record itself.
    """
    text = text.replace("\u2019", "'")
    if "<" in text:
        text = _TAG_RE.sub(" ", text)
    out: list[str] = []
    memo = _SENTENCE_MEMO
    for raw in _split_sentences(text):
        sentence = memo.get(raw, _UNSEEN)
        if sentence is _UNSEEN:
            if len(memo) >= _SENTENCE_MEMO_MAX:
                memo.clear()
            sentence = memo[raw] = _content_sentence(raw)
        if sentence is not None:
            out.append(sentence)
    if not out:
        whole = " ".join(text.split())
        if any(ch.isalnum() for ch in whole):
            out.append(whole)
    return out


def trim_to(text: str, max_len: int | None) -> str:
    """Cut ``text`` to ``max_len`` characters, at a word boundary when one is close."""
    if max_len is None or len(text) <= max_len:
        return text
    if max_len <= 0:
        return ""
    cut = text[:max_len]
    space = cut.rfind(" ")
    if space >= max_len // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") or text[:max_len]


def fit_length(text: str, min_len: int | None, max_len: int | None, filler: Sequence[str]) -> str:
    """Honour minLength/maxLength: trim long text, pad short text with more words of the input."""
    text = trim_to(text, max_len)
    if min_len and len(text) < min_len:
        words = [w for w in filler if w] or ["details"]
        i = 0
        while len(text) < min_len:
            text = f"{text} {words[i % len(words)]}".strip()
            i += 1
        if max_len is not None:
            text = text[:max_len]
    return text


def free_text_answer(text: str) -> str:
    """Answer to a plain prompt: its first one or two content sentences, trimmed."""
    sentences = content_sentences(text)
    if not sentences:
        return "I don't have enough information to answer."
    answer = sentences[0]
    if len(sentences) > 1 and len(answer) < 160:
        answer = f"{answer} {sentences[1]}"
    return trim_to(answer, 400)


# --------------------------------------------------------------------------------------------
# Evidence: which labels does the text talk about?
# --------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SUFFIXES = (
    "ations",
    "ation",
    "ating",
    "ated",
    "ates",
    "ate",
    "ments",
    "ment",
    "ings",
    "ing",
    "ies",
    "ied",
    "ed",
    "es",
    "ly",
    "s",
    "e",
    "y",
)


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A crude suffix stripper so "invoices", "invoiced" and "invoice" count as one word."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if (
                suffix in ("ing", "ed", "ings")
                and len(word) > 3
                and word[-1] == word[-2]
                and word[-1] not in "lsz"
            ):
                word = word[:-1]  # shipping -> shipp -> ship
            break
    return word


#: ``stem`` of the words seen so far: a record's words are mostly words other records had too,
#: and a dict look-up is several times cheaper than the suffix walk (bounded: cleared when full).
_STEM_MEMO: dict[str, str] = {}
_STEM_MEMO_MAX = 200_000


def _stems(tokens: Sequence[str]) -> list[str]:
    """``[stem(t) for t in tokens]``, memoised per word."""
    memo = _STEM_MEMO
    out = list(map(memo.get, tokens))
    if None in out:
        if len(memo) > _STEM_MEMO_MAX:
            memo.clear()
        for i, s in enumerate(out):
            if s is None:
                out[i] = memo[tokens[i]] = stem(tokens[i])
    return out  # type: ignore[return-value]


#: Every ASCII character that cannot be part of a word, as a space (for ``_words``).
_NON_WORD_ASCII = str.maketrans(
    {chr(i): " " for i in range(128) if not (chr(i).isalnum() or chr(i) == "'") or chr(i).isupper()}
)
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")


def _words(text: str) -> list[str]:
    # Accents are folded first: "fonctionnalités" is one word, not "fonctionnalit" + "s".
    text = fold(text.lower().replace("\u2019", "'").replace("\u2018", "'"))
    # ``_WORD_RE.findall``, faster: characters no word can hold become spaces and the text is
    # split there (no match of the pattern spans one, so the matches are the same); only the
    # pieces with an apostrophe, whose place in a word the pattern decides, go through it.
    if not text.isascii():
        text = _NON_ASCII_RE.sub(" ", text)
    parts = text.translate(_NON_WORD_ASCII).split()
    if "'" not in text:
        return parts
    out: list[str] = []
    for part in parts:
        if "'" in part:
            out += _WORD_RE.findall(part)
        else:
            out.append(part)
    return out


def name_tokens(name: str) -> list[str]:
    """Tokens of a label or field name: split on ``_``, ``-``, spaces and camelCase, lowercased."""
    return list(_name_tokens(name))


@lru_cache(maxsize=16384)
def _name_tokens(name: str) -> tuple[str, ...]:
    # Field and label names repeat in every request of a batch; tokenise each once.
    return tuple(_words(re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ")))


# Contractions are expanded before matching, so "doesn't work", "does not work" and the
# typed-in-a-hurry "doesnt work" are one phrase, and negation is always the word "not".
_NOT_CONTRACTIONS = {"can't": "can", "cannot": "can", "cant": "can", "won't": "will", "shan't": "shall"}
_BARE_NOT = frozenset(
    "dont doesnt didnt isnt arent wasnt werent hasnt havent hadnt couldnt wouldnt shouldnt".split()
)
_NOT_WORDS = _BARE_NOT | frozenset(_NOT_CONTRACTIONS)
# A word counts as negated when one of these is among the two words before it ("not urgent").
_NEGATORS = frozenset("not no never without nothing hardly".split())


def _evidence_tokens(text: str) -> list[str]:
    """Words of ``text`` for evidence matching, with ``n't`` contractions expanded."""
    words = _words(text)
    if _NOT_WORDS.isdisjoint(words) and "n't" not in " ".join(words):
        return words  # nothing to expand (most records): skip the per-word loop
    out: list[str] = []
    for word in words:
        if word in _NOT_CONTRACTIONS:
            out += [_NOT_CONTRACTIONS[word], "not"]
        elif word.endswith("n't") and len(word) > 3:
            out += [word[:-3], "not"]
        elif word in _BARE_NOT:
            out += [word[:-2], "not"]
        else:
            out.append(word)
    return out


# A deadline the text names ("by Friday", "before our audit on 2026-01-20", "by 14 March")
# counts as the word "deadline": it is what makes a ticket high priority.
_MONTHS = (
    r"jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?"
)
_WHEN = (
    r"(?:\d{1,4}[./-]\d{1,2}[./-]\d{2,4}"
    rf"|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?\b"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MONTHS})\b"
    r"|(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|tomorrow|tonight|eod|noon)\b"
    r"|end\s+of\s+(?:the\s+)?(?:day|week|month|quarter)\b)"
)
_DEADLINE_RE = re.compile(
    rf"\bby\s+(?:the\s+|this\s+|next\s+|our\s+)?{_WHEN}"
    rf"|\b(?:before|no\s+later\s+than|due|deadline\s+is)\b[^.!?\n]{{0,40}}?{_WHEN}",
    re.IGNORECASE,
)


def _may_name_deadline(text: str) -> bool:
    """False only when ``_DEADLINE_RE`` cannot match: each of its alternatives starts with one of
    these letter runs (``deadl`` and not ``deadline``: under IGNORECASE a dotless ``ı`` matches
    ``i``). A few substring scans instead of the regex's walk over most records."""
    low = text.lower()
    return "by" in low or "before" in low or "due" in low or "later" in low or "deadl" in low


@dataclass(frozen=True)
class _Group:
    """Names a label or field may have, and weighted, comma-separated evidence phrases for it.

    Weights: ``strong`` (3) phrases all but settle the label, ``normal`` (2) ones point at it,
    ``weak`` (1) ones only tip a close call (they are common in other topics too). In a
    ``negatable`` group a single word right after "not"/"no"/"never" does not count, so "not
    urgent" is no evidence for urgent (it is a phrase of ``low``). Topic words ignore negation:
    "no error, nothing happens" is still about a defect.
    """

    names: tuple[str, ...]
    strong: str = ""
    normal: str = ""
    weak: str = ""
    negatable: bool = False


# Names are matched by stem, so "escalate", "escalation" and "needs_escalation" share one entry.
_LEXICON_GROUPS: tuple[_Group, ...] = (
    _Group(
        ("billing", "payment", "invoice", "invoicing", "finance", "charges", "bill"),
        strong="invoice, invoiced, billed, billing, overcharged, overcharge, refund, receipt, "
        "subscription, vat, double charged, charged twice, charged me twice, duplicate charge, "
        "credit card, debit card, bank statement, card statement, payment failed, money back, "
        "prorated, proration, direct debit, billing cycle",
        normal="charge, charged, payment, paid, pay, card, bill, fee, fees, price, pricing, tax, "
        "trial, renewal, renew, upgrade, downgrade, discount, coupon, promo code, visa, mastercard, "
        "amex, paypal, bank, currency, accountant, statement, cost, seats, per seat, plan price, "
        "annual plan, monthly plan, credit note, purchase order, card ending",
        weak="plan, money, amount, dollars, euros, pounds, checkout, cancel, cancelled, expensive",
    ),
    _Group(
        ("account access", "account", "access", "login", "authentication", "auth", "sign in"),
        strong="login, password, unable to log in, sign in, signin, locked out, 2fa, mfa, sso, "
        "otp, two factor, two step, authenticator, verification code, reset link, password reset, "
        "can not access, can not log, can not sign, can not get in, get into my account, "
        "account access, locked, unlock, lockout, backup codes, magic link, login email",
        normal="log in, logged in, access, permission, permissions, invite link, username, "
        "credentials, security code, suspended, deactivated, get in, get past, reset my, lost my phone, "
        "new phone, recovery code, saml, okta, single sign",
        weak="account, role, admin, reset, expired, verify, invite, logout, log out",
    ),
    _Group(
        ("bug", "technical", "defect", "error", "technical issue", "malfunction"),
        strong="bug, crash, crashes, crashed, crashing, exception, traceback, stack trace, glitch, "
        "not working, does not work, stopped working, is broken, broken, does nothing, "
        "blank page, blank screen, white screen, freezes, frozen, error message, "
        "since the update, after the update, after updating, since updating, does not load, "
        "will not load, fails to load, not loading, wrong total, wrong totals, keeps crashing, "
        "regression, data is wrong, outage, outages, downtime, keeps going down",
        normal="error, errors, fail, fails, failed, failing, failure, freeze, hangs, spinner, "
        "loading forever, timeout, timed out, times out, slow, sluggish, lag, laggy, sync, syncing, "
        "disappeared, vanished, no results, reinstall, reinstalled, clearing the cache, "
        "cleared the cache, console, every time, "
        "reproduce, not showing, does not show, not appear, does not appear, not updating, "
        "button, counted twice, wrong number, wrong numbers, shows the wrong, is empty, "
        "not saving, not save, does not save, stopped, duplicated, misaligned, overlapping",
        weak="update, updated, app, page, screen, dashboard, wrong, missing, stuck, duplicate, "
        "browser, chrome, firefox, safari, android, ios, iphone, windows, version, report, "
        "export, display, calculated, webhook, endpoint, api, 500, 502, 503, 504, 404, http, "
        "still, again, incorrect",
    ),
    _Group(
        ("feature request", "feature", "enhancement", "suggestion", "idea", "improvement"),
        strong="feature request, please add, could you add, can you add, would love, we'd love, "
        "i'd love, would be great, would be nice, would be useful, would be helpful, it would help, "
        "suggestion, suggest, roadmap, enhancement, any plans, do you plan, plans to, "
        "is there a way, would like to be able, ability to, option to, wish, request a feature, "
        "feature",
        normal="idea, support for, use case, would want, would save, integrate, integration, "
        "does not support, not possible, possible to, we want, let us, allow, add a, add an, "
        "feedback, previous system, other tools, bulk, in bulk, automatically, customizable, "
        "customisable, not supported, no way to, is it possible, would it be possible, any chance, "
        "we would like, we'd like, one by one, one at a time, manually, does not have, there is no",
        weak="could, would, able, add, new, improve, currently",
    ),
    _Group(
        ("shipping", "delivery", "logistics", "shipment", "order status"),
        strong="delivery, delivered, package, parcel, tracking, courier, carrier, shipment, "
        "shipping, shipped, in transit, never arrived, not arrived, not yet arrived, lost package, "
        "return label, packing slip, customs, import duties, dispatch, dispatched, warehouse, "
        "out for delivery, delivery address, shipping address, tracking number",
        normal="arrive, arrived, ship, box, damaged, wrong item, received the wrong, "
        "received a, ups, fedex, dhl, usps, dpd, royal mail, duties, swap, neighbour, "
        "neighbor, doorstep, postal, postcode, zip code, send back, has not moved, stuck in, "
        "replacement, exchange, broken on arrival, missing from, return it, return the, returned the",
        weak="order, received, item, device, hardware",
    ),
    _Group(
        ("urgent", "critical", "emergency"),
        strong="urgent, urgently, asap, emergency, outage, critical, production down, is down, "
        "are down, site down, data loss, lost data, lawyer, legal, attorney, lawsuit, chargeback, "
        "security breach, hacked, breach, can not work, can not do any work, completely stopped, "
        "turning customers away, losing money, losing sales, business stopped, full outage",
        normal="immediately, right now, as soon as possible, everyone, every user, all users, "
        "entire team, whole team, dead, unauthorized, unauthorised, someone else, privacy, "
        "security, can not take, can not sell, nobody can, no one can",
        weak="all of, worried",
        negatable=True,
    ),
    _Group(
        ("high",),
        strong="high priority, blocking, blocker, deadline, before then, at the latest, time sensitive",
        normal="important, soon, prioritise, prioritize, priority, blocked, tomorrow, "
        "severe, significant, end of month, month end, need this fixed, need it",
        weak="payroll, audit, meeting",
        negatable=True,
    ),
    _Group(
        ("medium", "normal", "moderate"),
        normal="workaround, work around, working around, this week, when you can, annoying, "
        "in the meantime, for now, not the end of the world",
        negatable=True,
    ),
    _Group(
        ("low",),
        strong="no rush, no hurry, low priority, not urgent, when you get a chance, whenever, "
        "just curious, nice to have, not a big deal, no big deal, "
        "at your convenience, cosmetic, trivial, minor",
        normal="just wondering, curious, just flagging, when you have time, typo",
        weak="small, tiny, suggestion, idea, would be nice",
        negatable=True,
    ),
    _Group(
        ("positive",),
        strong="love, awesome, excellent, amazing, fantastic, delighted, wonderful",
        normal="great, happy, appreciate, perfect, good, glad, helpful",
        # Politeness, not sentiment: nearly every message ends with it.
        weak="thank you, thanks",
        negatable=True,
    ),
    _Group(
        ("negative",),
        strong="angry, terrible, awful, furious, unacceptable, worst, hate, horrible, ridiculous, "
        "useless, not happy, very disappointed",
        normal="disappointed, frustrated, frustrating, annoyed, upset, bad, poor, complaint",
        negatable=True,
    ),
    _Group(
        ("yes",),
        strong="yes, of course, definitely, affirmative",
        normal="confirm, confirmed, correct, true, agree",
    ),
    _Group(("no",), strong="no, never, not at all, disagree, deny", normal="not, false"),
    _Group(
        ("escalate", "escalation"),
        strong="lawyer, legal, attorney, lawsuit, sue, chargeback, regulator, gdpr, data loss, "
        "lost data, speak to a manager, talk to a manager, cancel my account, cancel our account, "
        "cancel our contract, considering leaving, thinking of leaving, outage, escalate, "
        "unacceptable, furious, ombudsman, consumer protection, small claims, security breach",
        normal="competitor, leaving, dispute, disputing, breach, every user, all users, "
        "whole company, entire company, privacy, data leak",
        weak="urgent, switch to, complaint, disappeared, vanished",
        negatable=True,
    ),
    _Group(
        ("refund", "reimbursement"),
        strong="refund, refunded, reimburse, reimbursement, chargeback, money back",
    ),
    _Group(
        ("spam",),
        strong="unsubscribe, winner, lottery, viagra, prize, click here, free money, limited offer",
    ),
    _Group(
        ("churn", "cancel", "cancellation", "churn risk"),
        strong="cancel, cancellation, close my account, cancel my account, considering leaving",
        normal="competitor, leaving, switch to",
    ),
    _Group(
        ("security", "fraud", "breach"),
        strong="hacked, breach, phishing, fraud, unauthorized, unauthorised, suspicious, stolen, "
        "compromised, data leak",
    ),
    # -- firmographics (CRM leads): industries, company size words, buyer personas ----------
    _Group(
        ("healthcare", "health", "medical", "health care", "life sciences"),
        strong="hospital, hospitals, clinic, clinics, patient, patients, medical, healthcare, "
        "health system, physician, physicians, nurses, pharma, pharmaceutical, biotech, dental, "
        "ehr, hipaa, care homes, telehealth",
        normal="health, care, doctors, pharmacy, lab, labs, diagnostics",
    ),
    _Group(
        ("education", "edtech", "higher education", "school"),
        strong="school, schools, university, universities, college, students, teachers, "
        "campus, edtech, curriculum, school district, classroom, faculty",
        normal="learning, courses, course, tutoring, academy, training",
    ),
    _Group(
        ("retail", "ecommerce", "e commerce", "consumer goods"),
        strong="retail, retailer, stores, storefront, ecommerce, e-commerce, online shop, "
        "webshop, shoppers, boutique, boutiques, merchandise, point of sale, shopify",
        normal="shop, shops, store, brand, brands, products, catalog, consumer, apparel, fashion, "
        "market, outfitters, retail chain, direct to consumers, peak season",
    ),
    _Group(
        ("manufacturing", "industrial"),
        strong="factory, factories, manufacturing, manufacturer, plant, plants, production line, "
        "assembly line, machining, cnc, industrial, fabrication, shop floor",
        normal="parts, components, machinery, equipment, production, oem, tooling, industries, "
        "automotive, makes, three plants, factory floor",
    ),
    _Group(
        ("financial services", "fintech", "banking", "insurance", "finance"),
        strong="bank, banks, banking, credit union, lender, lending, mortgage, mortgages, "
        "insurer, insurance, fintech, wealth management, asset management, brokerage, loans",
        normal="investment, investments, payments, underwriting, claims, portfolio, advisors, "
        "wealth, finance, capital, broker, trading, asset manager",
    ),
    _Group(
        ("software", "saas", "technology", "tech", "information technology", "it"),
        strong="saas, software, b2b software, cloud platform, developer tools, api platform, "
        "devops, cybersecurity, data platform",
        normal="platform, app, apps, developers, cloud, engineering team, startup, tech, labs, "
        "systems, analytics, dev team, web dashboard, mobile app, it teams",
    ),
    _Group(
        ("real estate", "property", "proptech"),
        strong="real estate, property management, properties, landlord, landlords, tenants, "
        "brokerage, realtor, realtors, apartments, leasing",
        normal="property, buildings, rentals, listings",
    ),
    _Group(
        ("hospitality", "travel", "restaurants", "food"),
        strong="hotel, hotels, restaurant, restaurants, resort, resorts, hospitality, catering, "
        "guests, bookings, travel agency",
        normal="travel, food, kitchen, menu, venue, venues",
    ),
    _Group(
        ("government", "public sector"),
        strong="municipal, municipality, city council, county, state agency, government, "
        "public sector, federal, ministry",
        normal="agency, public, citizens, city of",
    ),
    _Group(
        ("nonprofit", "non profit", "charity", "ngo"),
        strong="nonprofit, non-profit, charity, charities, foundation, donors, donations, ngo, volunteers",
    ),
    _Group(
        ("enterprise", "large"),
        strong="enterprise, fortune 500, multinational, global company, thousands of employees, publicly traded",
        normal="global, worldwide, offices in, subsidiaries, large",
    ),
    _Group(
        ("small", "smb", "startup", "micro"),
        strong="startup, small business, family business, founded last year, seed round, "
        "one person, solo, freelancer, small team",
        normal="small, founder, founders, bootstrapped, local",
    ),
    _Group(
        ("mid market", "midmarket", "medium business"),
        strong="mid-market, mid market, midsize, mid-sized, growing company, series b, series c",
    ),
    _Group(
        ("executive", "economic buyer", "decision maker", "c level", "leadership"),
        strong="ceo, chief executive, coo, founder, co-founder, president, managing director, "
        "general manager, budget holder, signs off, executive director",
        normal="head of, director, board, executive, vice president, vp, chief",
        # A CFO or CTO is first of all finance or engineering; "Owner"/"Partner" alone are vague.
        weak="cfo, cto, cmo, cio, owner, partner",
    ),
    _Group(
        ("technical", "technical buyer", "engineer", "developer", "it"),
        strong="cto, cio, engineer, engineering, developer, developers, architect, devops, it manager, "
        "it director, head of it, it lead, sysadmin, data engineer, security engineer, technical lead, "
        "tech lead, software engineer, vp engineering",
        normal="technical, integration, api, infrastructure, it",
    ),
    _Group(
        ("end user", "user", "practitioner", "individual contributor"),
        strong="end user, day to day, hands-on, uses the tool, individual contributor, analyst, "
        "coordinator, specialist, associate, assistant",
        normal="team member, staff, representative, agent",
    ),
    _Group(
        ("champion", "influencer", "evaluator"),
        strong="champion, evaluating, evaluation, trial, pilot, shortlist, comparing vendors, "
        "proof of concept, poc",
        normal="interested, exploring, researching, recommended",
    ),
    # -- business functions (personas from a job title) -------------------------------------
    _Group(
        ("sales", "revenue", "business development"),
        strong="sales, account executive, sales director, head of revenue, revenue, bdr, sdr, "
        "business development, account manager, sales manager, cro, chief revenue officer",
        normal="account, deals, pipeline, quota, commercial",
    ),
    _Group(
        ("marketing", "growth", "brand"),
        strong="marketing, cmo, growth, demand gen, demand generation, brand, head of brand, "
        "content marketing, seo, campaigns",
        normal="communications, pr, social media, product marketing",
    ),
    _Group(
        ("finance", "accounting"),
        strong="cfo, finance manager, head of finance, controller, accountant, accounting, "
        "financial controller, treasurer, fp&a, bookkeeper",
        normal="finance, financial, payroll, budget",
    ),
    _Group(
        ("hr", "human resources", "people", "talent", "recruiting"),
        strong="hr, human resources, people partner, chief people officer, people officer, "
        "talent acquisition, talent, recruiter, recruiting, hiring manager, people operations",
        normal="people, hiring, onboarding, payroll",
    ),
    _Group(
        ("operations", "ops", "supply chain"),
        strong="operations, operations manager, head of ops, ops, supply chain, office manager, "
        "logistics manager, procurement, facilities",
        normal="office, purchasing, inventory, process",
    ),
    # -- more industries -------------------------------------------------------------------
    _Group(
        ("logistics", "transport", "freight", "transportation"),
        strong="logistics, freight, freight forwarder, forwarder, trucking, trucks, fleet, 3pl, "
        "couriers, haulage, last-mile, transport, transportation, dispatch",
        normal="route planning, routes, cargo, shipping, warehouse operator, customs paperwork",
    ),
    _Group(
        ("professional services", "consulting", "legal services", "accounting firm"),
        strong="consulting, consultancy, consultants, law firm, lawyers, attorneys, accounting practice, "
        "accountants, accounting firm, advisory, billable hours, agency, auditors",
        normal="law, legal, clients, case management, tax season, timesheets, client portals",
    ),
    # -- reasons customers give (cancellation and feedback forms) -----------------------------
    _Group(
        ("expensive", "price", "pricing", "cost", "too expensive"),
        strong="too expensive, expensive, overpriced, pricey, price increase, price hike, "
        "price went up, can not afford, cannot afford, costs too much, cheaper",
        normal="price, prices, cost, costs, afford, budget, cheaper options, charge me double",
        weak="money, paying more",
    ),
    _Group(
        ("missing features", "missing feature", "missing capability", "functionality"),
        strong="missing features, missing feature, lacks, lacking, does not integrate, not integrate, "
        "no integration, no api, do not have, does not have, does not support, not supported, "
        "feature, features, functionality, features missing",
        normal="missing, integrate, integration, offline mode, dark mode, reporting, support for, "
        "no option, no way to, would need",
    ),
    _Group(
        ("competitor", "switched", "switch", "alternative"),
        strong="competitor, competitors, competition, switched, switching, switch to, alternative, "
        "another tool, another vendor, different vendor, another provider, another product, "
        "moved to, moving to, went with",
        normal="vendor, provider, better tool, other tool, another",
    ),
    _Group(
        ("support", "customer service", "service"),
        strong="customer service, customer support, support team, support never, never answered, "
        "no reply, no response, never replied, rude, unhelpful, waited, canned reply",
        normal="support, service, reply, answer, ticket, help, helped, agent",
    ),
    _Group(
        ("no longer needed", "not needed", "no need"),
        strong="no longer need, no longer needed, not needed anymore, do not need, no need, "
        "not need it, need it anymore, anymore, any more, project ended, only needed, one event, "
        "stopped doing",
        normal="no longer, ended, finished, one-off, one time, completed",
    ),
    _Group(
        ("closed", "business closed", "shut down", "closure"),
        strong="closing the business, closed the business, shut down, shutting down, out of business, "
        "closing shop, closed, closing, retiring, retired, bankrupt, went under",
        normal="business closed, company closed, close the company",
    ),
    _Group(
        ("pause", "temporary", "break", "paused"),
        strong="pause, pausing, paused, taking a break, temporary, temporarily, be back, come back, "
        "back next, back in, seasonal, for the summer, for the winter, few months",
        normal="break, season, later, next year, for now, return",
    ),
    # -- document sections: what a summary lists as risks or open questions --------------------
    _Group(
        ("risk", "risks", "liability", "liabilities", "exposure", "threat"),
        strong="risk, risks, main risk, exposure, liability, liable, may lead to, could lead to, "
        "compromised, fines, penalty, penalties, non-compliance, vulnerable, breach",
        normal="failure, fail, loss, damages, indemnify, threat, increase the exposure, cap",
    ),
    _Group(
        ("open question", "open questions", "undecided", "open point", "open points", "open issue"),
        strong="not yet decided, to be confirmed, remains open, is open, open question, undecided, "
        "not decided, unclear whether, tbd, to be determined, still open, not yet agreed, unknown whether",
        normal="whether, unclear, pending, not yet, to be agreed, question",
    ),
    _Group(
        ("pii", "personal data", "personal information"),
        strong="ssn, passport, social security, date of birth, credit card",
        normal="email, phone, address",
    ),
)

_LABEL_STOPWORDS = frozenset(
    # Function words too: "too" in too_expensive or "no" in no_longer_needed is no evidence alone
    # (the label's whole phrase still counts).
    "too no not very so just more less much many never all some "
    "issue issues request requests other general misc problem problems type category question "
    "questions inquiry the a an and or of to for in on with is are has have needs need requires "
    "require should contains contain mentions mention flag was be it any related customer user "
    "label value".split()
)
_FALLBACK_LABELS = frozenset(
    "medium normal neutral unknown other general misc none n/a na unclear unsure undetermined".split()
)
_OWN_WORD_WEIGHT = 3  # a label's own word ("damaged" for damaged_item) not weighed by the lexicon
_OWN_PHRASE_WEIGHT = 3  # its whole multi-word name ("account access")
_SATURATION = 2  # a phrase stops adding evidence after this many occurrences
_BOOLEAN_THRESHOLD = 2  # weak words alone do not make a boolean field true

# (stems of a phrase, weight, negatable)
_Phrase = tuple[tuple[str, ...], int, bool]


def _phrase_key(tokens: Iterable[str]) -> str:
    return " ".join(stem(t) for t in tokens)


def _phrase_stems(phrase: str) -> tuple[str, ...]:
    return tuple(stem(t) for t in _evidence_tokens(phrase))


def _build_lexicon() -> dict[str, dict[tuple[str, ...], _Phrase]]:
    lexicon: dict[str, dict[tuple[str, ...], _Phrase]] = {}
    for group in _LEXICON_GROUPS:
        phrases: dict[tuple[str, ...], _Phrase] = {}
        for weight, listing in ((1, group.weak), (2, group.normal), (3, group.strong)):
            for raw in listing.split(","):
                stems = _phrase_stems(raw)
                if stems:
                    phrases[stems] = (stems, weight, group.negatable)
        for name in group.names:
            entry = lexicon.setdefault(_phrase_key(_words(name)), {})
            for stems, phrase in phrases.items():
                if stems not in entry or entry[stems][1] < phrase[1]:
                    entry[stems] = phrase
    return lexicon


_LEXICON = _build_lexicon()


@lru_cache(maxsize=4096)
def _evidence_phrases(name: str, stopwords: frozenset[str]) -> tuple[_Phrase, ...]:
    """Weighted phrases that count as evidence for a label or boolean field called ``name``.

    The lexicon entries of the name (and of its content words) come first; the name's own
    words count too, at a default weight, unless the lexicon already weighs them.
    """
    tokens = name_tokens(name)
    content = [t for t in tokens if t not in stopwords]
    found: dict[tuple[str, ...], _Phrase] = {}
    whole = {_phrase_key(tokens), _phrase_key(content)}
    parts = {_phrase_key([t]) for t in content} - whole
    for key in sorted(whole | parts):
        # A lexicon reached through one word of a longer name ("delivery" in "late_delivery")
        # is about the wider topic, so it counts a notch less than the name's own words.
        cut = 1 if key in parts else 0
        for stems, (_, weight, neg) in _LEXICON.get(key, {}).items():
            weight = max(1, weight - cut)
            if stems not in found or found[stems][1] < weight:
                found[stems] = (stems, weight, neg)
    negatable = any(p[2] for p in found.values())
    own: list[tuple[tuple[str, ...], int]] = [((stem(t),), _OWN_WORD_WEIGHT) for t in content]
    if len(tokens) > 1:
        own.append((tuple(stem(t) for t in tokens), _OWN_PHRASE_WEIGHT))
    for stems, weight in own:
        if stems and stems not in found:
            found[stems] = (stems, weight, negatable)
    return tuple(found.values())


@lru_cache(maxsize=65536)
def _corrected_cached(token: str, vocabulary: frozenset[str]) -> str:
    # Slips rarely hit the first letter; requiring it keeps real words apart ("reach" is no "breach").
    matches = [w for w in fuzzy_matches(token, vocabulary) if w[0] == token[0] and one_slip(token, w)]
    return matches[0] if len(matches) == 1 else token  # two candidates: no guess


def _corrected(token: str, vocabulary: frozenset[str]) -> str:
    """``token``, or the vocabulary word it is a typo of (only when exactly one fits)."""
    if len(token) < 5 or token in vocabulary:
        return token
    return _corrected_cached(token, vocabulary)


#: Per typo vocabulary (a prompt's is one cached frozenset, so keyed by it), each word seen so
#: far: ``_corrected(word, vocabulary)``. One dict look-up per word instead of a length test, a
#: set test and an ``lru_cache`` call for every long word (bounded: cleared when full).
_CORRECTED_MEMO: dict[frozenset[str], dict[str, str]] = {}
_CORRECTED_MEMO_MAX = 200_000


def _corrected_stems(tokens: list[str], vocabulary: frozenset[str]) -> tuple[list[str], list[str]]:
    """``[_corrected(t, vocabulary) for t in tokens]`` and ``_stems`` of that, memoised per word."""
    memo = _CORRECTED_MEMO.get(vocabulary)
    if memo is None:
        if len(_CORRECTED_MEMO) >= 64:
            _CORRECTED_MEMO.clear()
        memo = _CORRECTED_MEMO[vocabulary] = {}
    words = list(map(memo.get, tokens))
    if None in words:
        if len(memo) > _CORRECTED_MEMO_MAX:
            memo.clear()
        for i, word in enumerate(words):
            if word is None:
                words[i] = memo[tokens[i]] = _corrected(tokens[i], vocabulary)
    return words, _stems(words)  # type: ignore[arg-type]


class Evidence:
    """Word statistics of one request text, built once and queried per label.

    Besides the words themselves, foreign words add their English gloss ("zu teuer" counts as
    "too expensive") and a word one keyboard slip away from a word of ``vocabulary`` (the
    lexicon, the labels and their definitions) counts as that word ("expnsive").
    """

    def __init__(
        self, text: str, sentences: Sequence[str] | None = None, *, vocabulary: frozenset[str] | None = None
    ) -> None:
        tokens = _evidence_tokens(text)
        if vocabulary:
            tokens, stems = _corrected_stems(tokens, vocabulary)
        else:
            stems = _stems(tokens)
        extra = [_stems(_evidence_tokens(g)) for g in glosses(tokens)]
        self.text = text
        self._joined = " " + " | ".join([" ".join(stems), *(" ".join(e) for e in extra)]) + " "
        self._stems = Counter()
        _count_elements(self._stems, stems)  # Counter(stems) without its Mapping check
        for gloss in extra:
            self._stems.update(gloss)
        deadlines = len(_DEADLINE_RE.findall(text)) if _may_name_deadline(text) else 0
        if deadlines:
            self._stems[stem("deadline")] += deadlines
        if _NEGATORS.isdisjoint(tokens):
            # Nothing negated: the affirmed counts are the counts (read-only from here on).
            self._affirmed = self._stems
        else:
            # A word is negated when a negator is one of the two words before it: walked from the
            # few negators forward rather than from every word back.
            size = len(tokens)
            after = {i for j, t in enumerate(tokens) if t in _NEGATORS for i in (j + 1, j + 2) if i < size}
            negated = Counter([stems[i] for i in after])
            self._affirmed = self._stems - negated
        # Keywords come from the content sentences so prompt instructions ("Classify...") are skipped.
        self._sentences = sentences  # joined when first needed
        self._words_cache: list[str] | None = None

    @property
    def _words(self) -> list[str]:
        """Words for keywords, tokenised on first use (most schemas have no keyword field)."""
        if self._words_cache is None:
            source = " ".join(self._sentences) if self._sentences is not None else self.text
            self._words_cache = _words(source)
        return self._words_cache

    def count(self, phrase: Sequence[str], *, negatable: bool = False) -> int:
        """Occurrences of a phrase (words match by stem; ``negatable`` skips negated single words)."""
        stems = tuple(stem(t) for t in _evidence_tokens(" ".join(phrase)))
        return self._count_stems(stems, negatable)

    def _count_stems(self, stems: tuple[str, ...], negatable: bool) -> int:
        if len(stems) == 1:
            return (self._affirmed if negatable else self._stems).get(stems[0], 0)
        return self._joined.count(" " + " ".join(stems) + " ") if stems else 0

    def score(self, name: str, *, stopwords: frozenset[str] = _LABEL_STOPWORDS) -> int:
        """How strongly the text talks about ``name``: weighted hits of its own words and lexicon."""
        return _name_scorer(name, stopwords).scores(self)[0]

    def keywords(self, limit: int) -> list[str]:
        """Most frequent content words, for tag/keyword fields."""
        first: dict[str, tuple[int, str]] = {}
        counts: Counter[str] = Counter()
        for word in self._words:
            if len(word) < 4 or word in _STOPWORDS or word.isdigit() or "'" in word:
                continue
            key = stem(word)
            first.setdefault(key, (len(first), word))
            counts[key] += 1
        order = sorted(counts, key=lambda k: (-counts[k], first[k][0]))
        return [first[k][1] for k in order[:limit]]


class _Scorer:
    """The weighted phrases of several labels, indexed by stem.

    A label's score is ``weight * min(count, 2)`` summed over its phrases: hundreds of look-ups
    per label and record when walked phrase by phrase. The same sum walked from the other side:
    the record's few distinct stems find the single-word phrases they are, and a multi-word
    phrase is counted only when its first stem occurs (otherwise it cannot be in the text).
    Identical scores for a fraction of the work; built once per label set and cached.
    """

    __slots__ = ("multi", "multi_by_first", "single", "size")

    def __init__(self, phrase_lists: Sequence[Iterable[_Phrase]]) -> None:
        single: dict[str, list[tuple[int, int, bool]]] = {}
        multi: list[tuple[int, str, str, int]] = []
        for i, phrases in enumerate(phrase_lists):
            for stems, weight, negatable in phrases:
                if len(stems) == 1:
                    single.setdefault(stems[0], []).append((i, weight, negatable))
                elif stems:
                    multi.append((i, stems[0], " " + " ".join(stems) + " ", weight))
        self.size = len(phrase_lists)
        self.single: dict[str, tuple[tuple[int, int, bool], ...]] = {k: tuple(v) for k, v in single.items()}
        self.multi: tuple[tuple[int, str, str, int], ...] = tuple(multi)
        #: the multi-word phrases by their first stem: a record's few stems find theirs directly
        by_first: dict[str, list[tuple[int, str, int]]] = {}
        for i, first, phrase, weight in multi:
            by_first.setdefault(first, []).append((i, phrase, weight))
        self.multi_by_first: dict[str, tuple[tuple[int, str, int], ...]] = {
            k: tuple(v) for k, v in by_first.items()
        }

    def scores(self, evidence: Evidence) -> list[int]:
        """Each label's score against ``evidence`` (what ``Evidence.score`` sums, label by label)."""
        out = [0] * self.size
        counts = evidence._stems
        affirmed = evidence._affirmed
        single = self.single
        # Sums of integers: the order stems and phrases are added in does not change a score,
        # so the stems both sides have are found as one set intersection (walks the smaller).
        for s in counts.keys() & single.keys():
            n = counts[s]
            for i, weight, negatable in single[s]:
                c = affirmed.get(s, 0) if negatable else n
                if c > 0:
                    out[i] += weight * (c if c < _SATURATION else _SATURATION)
        by_first = self.multi_by_first
        if by_first:
            joined = evidence._joined
            for first in counts.keys() & by_first.keys():
                for i, phrase, weight in by_first[first]:
                    c = joined.count(phrase)
                    if c:
                        out[i] += weight * (c if c < _SATURATION else _SATURATION)
        return out


@lru_cache(maxsize=4096)
def _name_scorer(name: str, stopwords: frozenset[str]) -> _Scorer:
    return _Scorer([_evidence_phrases(name, stopwords)])


@lru_cache(maxsize=1024)
def _choice_scorer(labels: tuple[str, ...], definitions: tuple[str | None, ...]) -> _Scorer:
    """One scorer for an enum's labels: each label's phrases plus, when they count, its definition's."""
    return _Scorer(
        [
            (*_evidence_phrases(label, _LABEL_STOPWORDS), *(_definition_phrases(d) if d else ()))
            for label, d in zip(labels, definitions, strict=True)
        ]
    )


_STOPWORDS = frozenset(
    "about above after again against all also although always among another any anyone anything "
    "around because been before being below between both came cannot could does doing done down "
    "during each either else even ever every from further have having here hers herself himself "
    "into itself just like made make many maybe might more most much must myself never none once "
    "only other ought ours ourselves over please same shall should since some still such than that "
    "their theirs them themselves then there these they thing this those though through thus till "
    "too under until upon very want wants were what when where whether which while whom whose "
    "will with within without would your yours yourself yourselves hello dear thanks thank regards "
    "ticket subject message customer wrote sent".split()
)

# --------------------------------------------------------------------------------------------
# Schema-driven answers
# --------------------------------------------------------------------------------------------

_MAX_DEPTH = 8
_HINT_RE = re.compile(
    r"\b(minLength|maxLength|minimum|maximum|exclusiveMinimum|exclusiveMaximum|minItems|maxItems|multipleOf)"
    r"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"
)
_SUMMARY_TOKENS = frozenset(
    "summary summarize reason reasoning rationale explanation explain description describe notes note "
    "justification comment comments details analysis answer response reply body content".split()
)
_TAG_TOKENS = frozenset("tag tags keyword keywords topic topics phrase phrases entities entity".split())
_CONFIDENCE_TOKENS = frozenset("confidence probability likelihood certainty score".split())
_EVIDENCE_TOKENS = frozenset(
    "evidence quote quotes excerpt citation cite snippet supporting verbatim".split()
)
_ROLE_KEYS = frozenset("persona role title position job contact".split())
_SYNONYMS: dict[str, frozenset[str]] = {
    "persona": _ROLE_KEYS,
    "role": _ROLE_KEYS,
    "company": frozenset("company organization organisation account employer business name".split()),
    "organization": frozenset("company organization organisation account employer".split()),
    "reason": frozenset("reason why cause because comment comments feedback".split()),
    "location": frozenset("location city country region address hq headquarters".split()),
}
_ROLE_RE = re.compile(
    r"\b((?:senior |junior |lead |principal |chief |head of |vp of |vp |vice president of |"
    r"director of |manager of )?(?:[A-Z][A-Za-z&/-]+ ){0,3}?"
    r"(?:CEO|CFO|COO|CTO|CMO|CIO|CISO|VP|Founder|Co-founder|Owner|President|Director|Manager|"
    r"Engineer|Developer|Architect|Analyst|Administrator|Coordinator|Specialist|Officer|Lead|"
    r"Head of [A-Z][A-Za-z]+|Partner|Consultant|Buyer|Teacher|Principal|Nurse|Physician|Superintendent)"
    r"(?: (?:Manager|Director|Lead|Officer|Coordinator|Engineer|Specialist|Partner))?"
    r"(?:(?: of)? [A-Z][A-Za-z&]+(?: [A-Z][A-Za-z&]+)?)?)\b"
)
# "I'm the head of IT at ...", "as a teacher at ...": a role stated in prose, lower case.
_SELF_ROLE_RE = re.compile(
    r"\b(?:i am|i'm|im|as)\s+(?:the|a|an|our)\s+((?:[a-z]+\s+){0,2}?(?:head of \w+|director of \w+|"
    r"vp of \w+|chief \w+ officer|\w+ manager|\w+ director|\w+ engineer|\w+ lead|founder|co-founder|"
    r"owner|ceo|cto|cfo|coo|teacher|principal|nurse|physician|analyst|developer|engineer|consultant))\b",
    re.IGNORECASE,
)
_COUNT_AFTER_RE = re.compile(
    r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s*(k\b)?\+?\s*(?:-\s*|\s+)(?:full[- ]time\s+)?"
    r"(employees|employee|staff|people|person|workers|engineers|headcount|ftes?|team members|seats|users)\b",
    re.IGNORECASE,
)
_COUNT_BEFORE_RE = re.compile(
    r"\b(employees|headcount|staff|team size|company size|employee count|size)\s*(?:[:=]|of|is)?\s*"
    r"(?:about|around|approx\.?|approximately|roughly|~|over|nearly|almost|some)?\s*(\d[\d,]*(?:\.\d+)?)\s*(k\b)?",
    re.IGNORECASE,
)
_BAND_RE = re.compile(r"^\s*(\d[\d,.]*)\s*(k)?\s*(?:-|–|to)\s*(\d[\d,.]*)\s*(k)?\b", re.IGNORECASE)
_PLUS_RE = re.compile(
    r"^\s*(?:over\s+|more than\s+)?(\d[\d,.]*)\s*(k)?\s*(?:\+|or more|and above|\b(?=\s*$))", re.IGNORECASE
)
_UNDER_RE = re.compile(r"^\s*(?:<|under\s+|less than\s+|fewer than\s+)(\d[\d,.]*)\s*(k)?", re.IGNORECASE)
_SIZE_FIELD_TOKENS = frozenset("size employees employee headcount band segment tier bucket".split())
_SIZE_WORDS: tuple[tuple[frozenset[str], int, int], ...] = (
    (frozenset("micro solo".split()), 0, 9),
    (frozenset("small smb startup".split()), 0, 49),
    (frozenset("medium mid midsize midmarket mid_market mid-market".split()), 50, 999),
    (frozenset("large enterprise".split()), 1000, 10**9),
)
# The value is taken greedily to the end of its line and right-stripped in Python: the lazy
# ``(\S.*?)\s*$`` it replaces retried the line end after every character (3x slower).
_FIELD_LINE_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9 _/-]{0,30}?)\s*[:=]\s*(\S.*)$", re.MULTILINE)


def _number(raw: str, k: str | None) -> int:
    value = float(raw.replace(",", "")) if raw.replace(",", "").replace(".", "", 1).isdigit() else 0.0
    return int(value * (1000 if k else 1))


def _counts_in(text: str) -> list[int]:
    """Head counts stated in the record, in order of appearance (for size bands)."""
    found: list[tuple[int, int]] = []
    for m in _COUNT_AFTER_RE.finditer(text):
        found.append((m.start(), _number(m.group(1), m.group(2))))
    for m in _COUNT_BEFORE_RE.finditer(text):
        found.append((m.start(), _number(m.group(2), m.group(3))))
    return [n for _, n in sorted(found) if n > 0]


def _band(value: Any) -> tuple[int, int] | None:
    """The head-count range an enum value names ("11-50", "1000+", "<10"), if it names one."""
    if not isinstance(value, str):
        return None
    m = _BAND_RE.match(value)
    if m:
        return _number(m.group(1), m.group(2) or m.group(4)), _number(m.group(3), m.group(4))
    m = _UNDER_RE.match(value)
    if m:
        return 0, _number(m.group(1), m.group(2)) - 1
    m = _PLUS_RE.match(value)
    if m and ("+" in value or "more" in value.lower() or "over" in value.lower() or "above" in value.lower()):
        return _number(m.group(1), m.group(2)), 10**12
    return None


def _value_bands(values: Sequence[Any], field: str) -> list[tuple[int, int] | None] | None:
    """The head-count range of each enum value ("11-50", or a size word on a size-like field),
    None when no value has one."""
    bands = [_band(v) for v in values]
    if sum(b is not None for b in bands) < 2:
        if not set(name_tokens(field)) & _SIZE_FIELD_TOKENS:
            return None
        bands = []
        for v in values:
            toks = set(name_tokens(str(v))) | {str(v).lower()}
            bands.append(next(((lo, hi) for words, lo, hi in _SIZE_WORDS if toks & words), None))
    return bands if any(b is not None for b in bands) else None


@lru_cache(maxsize=1024)
def _value_bands_cached(values: tuple[Any, ...], field: str) -> list[tuple[int, int] | None] | None:
    return _value_bands(values, field)


def _has_bands(values: Sequence[Any], field: str) -> bool:
    """Whether a head count could pick one of ``values`` (else the record's counts are not read)."""
    try:
        return _value_bands_cached(tuple(values), field) is not None
    except TypeError:  # unhashable enum values (objects, lists)
        return _value_bands(values, field) is not None


def _band_choice(values: Sequence[Any], counts: Sequence[int], field: str) -> int | None:
    """Index of the enum value whose range holds the record's head count (None: no match)."""
    if not counts:
        return None
    bands = _value_bands(values, field)
    if bands is None:
        return None
    for count in counts:
        for i, band in enumerate(bands):
            if band is not None and band[0] <= count <= band[1]:
                return i
    return None


def _field_lines(text: str) -> dict[str, str]:
    """``Key: value`` lines of a record (``Title: VP Sales``), keyed by the key's tokens joined."""
    out: dict[str, str] = {}
    for m in _FIELD_LINE_RE.finditer(text):
        key = " ".join(_name_tokens(m.group(1)))
        if key and key not in out and not m.group(2).startswith("//"):
            out[key] = m.group(2).rstrip()
    return out


_HINT_BLOCK_RE = re.compile(r"\{[^{}]*\}")
_SEPARATOR_RE = re.compile(r"\s*[,;/]\s*|\s+-\s+")
_NUMBER_IN_TEXT_RE = re.compile(r"(?<![\w.,])\d[\d,]*(?![\w])")
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")
_URL_RE = re.compile(r"https?://[^\s<>\"')]+")
_DATE_RE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")


def _constraint(schema: Mapping[str, Any], key: str) -> float | None:
    """A numeric constraint, from the keyword itself or from the description.

    ``anthropic.transform_schema`` moves keywords the API does not support (maxLength,
    minimum, maxItems > 1 ...) into the description as ``{maxLength: 80, minimum: 0}``; the
    caller's pydantic model still enforces them, so the emulator must honour both forms.
    """
    value = schema.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    description = schema.get("description")
    if isinstance(description, str) and key in description:
        return _description_hints(description).get(key)
    return None


@lru_cache(maxsize=4096)
def _description_hints(description: str) -> dict[str, float]:
    """The ``{maxLength: 80}`` hints of a description, the first of each name (read-only:
    a schema's descriptions are the same strings in every request of a batch)."""
    hints: dict[str, float] = {}
    for name, number in _HINT_RE.findall(description):
        hints.setdefault(name, float(number))
    return hints


def _int_constraint(schema: Mapping[str, Any], key: str) -> int | None:
    value = _constraint(schema, key)
    return None if value is None else int(value)


def _json_pointer(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node


@dataclass
class SchemaAnswer:
    """A value generated for a schema plus where its enum fields are (for ``bad_enum`` faults)."""

    value: Any
    enum_paths: list[tuple[tuple[Any, ...], tuple[Any, ...]]]
    broken_hints: int = 0
    #: verbatim-quote fields answered with a paraphrase (counted in ``broken_hints`` too)
    invented_quotes: int = 0


class _Answerer:
    """Walks a JSON schema and fills it from the request text."""

    def __init__(
        self,
        root: Mapping[str, Any],
        text: str,
        *,
        break_rate: float = 0.0,
        break_key: str = "",
        cues: PromptCues | None = None,
        quote_break_rate: float = 0.0,
        enums: tuple[str, ...] | None = None,
        shared: SharedPrompt | None = None,
    ) -> None:
        self.root = root
        #: memo of ``resolve`` shared by the requests of one prompt (None: resolve every time)
        self._resolved = shared.resolved if shared is not None and shared.owns(root) else None
        self._stable = shared.stable_ids if shared is not None else set()
        self._plans = shared.object_plans if self._resolved is not None and shared is not None else None
        self._gen_plans = shared.gen_plans if self._resolved is not None and shared is not None else None
        self.text = text
        #: Share of description-only constraints to break, and the key that picks which.
        self.break_rate = break_rate
        self.break_key = break_key
        self.quote_break_rate = quote_break_rate
        self.broken = 0
        self.invented_quotes = 0
        self.sentences = content_sentences(text)
        #: System prompt, template words and few-shot answers around the record.
        self.cues = cues or PromptCues()
        self.vocabulary = _vocabulary(_schema_enums(root) if enums is None else enums, self.cues.system)
        evidence_text = (
            quoted_text(text)
            if self.cues.quoted_record
            else _without_template(text, self.cues.template_words)
        )
        self.evidence = Evidence(evidence_text, self.sentences, vocabulary=self.vocabulary)
        self._scoped: dict[str, Evidence] = {}
        self._text_hasher: Any = None
        self._break_hasher: Any = None
        self._sentence_evidence: dict[str, Evidence] = {}
        #: the stems of each sentence of the record, for the fields answered by overlap
        self._sentence_stems: dict[str, frozenset[str]] = {}
        self.enum_paths: list[tuple[tuple[Any, ...], tuple[Any, ...]]] = []
        #: (best score, runner-up score) of every enum decision: how sure each choice was.
        self.decisions: list[tuple[int, int]] = []
        #: Labels chosen so far, for evidence fields that quote what supports them.
        self.chosen: list[str] = []
        #: Every enum value picked so far, with or without evidence.
        self.picked_all: list[str] = []
        #: Decisions, labels with evidence and all picked labels of the object being filled
        #: (set before its late fields).
        self.scope: tuple[list[tuple[int, int]], list[str], list[str]] = ([], [], [])
        #: Optional fields whose description ties them to enum values ("Required for other").
        self.conditions: dict[tuple[Any, ...], set[str]] = {}

    # -- what the record says, read when a field first needs it ------------------------------
    @_lazy
    def record(self) -> str:
        """The record itself (its quoted value, or its non-template words), normalised."""
        return record_key(self.text, self.cues.template_words)

    @_lazy
    def empty_record(self) -> bool:
        return is_placeholder(self.record)

    @_lazy
    def example(self) -> Any:
        """The answer a few-shot turn gave to this very record, if one did."""
        return matching_example(self.record, self.cues.examples) if self.cues.examples else None

    @_lazy
    def filler(self) -> list[str]:
        """Words of the record, to pad text up to a minLength."""
        return _words(self.text) or ["details"]

    @_lazy
    def counts(self) -> list[int]:
        """Counts the record states ("350 employees", "Employees: 1,200", "a 12-person team")."""
        return _counts_in(self.text)

    @_lazy
    def fields(self) -> dict[str, str]:
        """``Key: value`` lines of the record, by key stems, for fields named like a key."""
        return _field_lines(self.text)

    def sentence_evidence(self, sentence: str) -> Evidence:
        """The evidence of one sentence of the record, read once for every list field and quote."""
        evidence = self._sentence_evidence.get(sentence)
        if evidence is None:
            evidence = self._sentence_evidence[sentence] = Evidence(sentence, [sentence])
        return evidence

    def text_hash(self, *rest: object) -> int:
        """``stable_hash(self.text, *rest)``, the record's part of the hash computed once per record
        (a record is hashed for several draws: tie-breaks, hints, confidence jitter)."""
        hasher = self._text_hasher
        if hasher is None:
            hasher = self._text_hasher = hashlib.sha256((self.text + "\x1f").encode("utf-8", "surrogatepass"))
        return _continued(hasher, rest)

    def break_hash(self, *rest: object) -> int:
        """``stable_hash(self.break_key, self.text, *rest)``, likewise."""
        hasher = self._break_hasher
        if hasher is None:
            head = f"{self.break_key}\x1f{self.text}\x1f"
            hasher = self._break_hasher = hashlib.sha256(head.encode("utf-8", "surrogatepass"))
        return _continued(hasher, rest)

    def fit(self, text: str, min_len: int | None, max_len: int | None) -> str:
        """``fit_length`` with the record's words as filler (only read when padding is needed)."""
        return fit_length(text, min_len, max_len, self.filler if min_len else ())

    # -- schema plumbing ---------------------------------------------------------------------
    def resolve(self, schema: Any) -> Any:
        """``schema`` with ``$ref`` followed and ``allOf`` merged (memoised per shared prompt)."""
        cache = self._resolved
        if cache is None or not isinstance(schema, Mapping):
            return self._resolve(schema)
        hit = cache.get(id(schema))
        if hit is not None and hit[0] is schema:
            return hit[1]
        result = self._resolve(schema)
        if id(schema) in self._stable:
            # Only nodes the shared prompt keeps alive are memoised (their ids cannot be reused),
            # and a memoised result is kept alive too, so it may be memoised in turn.
            cache[id(schema)] = (schema, result)
            self._stable.add(id(result))
        return result

    def _resolve(self, schema: Any) -> Any:
        for _ in range(32):
            if not isinstance(schema, Mapping) or not isinstance(schema.get("$ref"), str):
                break
            target = _json_pointer(self.root, schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k not in ("$ref", "$defs", "definitions")}
            schema = {**target, **siblings} if isinstance(target, Mapping) else siblings
        if isinstance(schema, Mapping) and isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                if not isinstance(part, Mapping):
                    continue
                for key, value in part.items():
                    if key == "properties" and isinstance(value, Mapping):
                        merged["properties"] = {**merged.get("properties", {}), **value}
                    elif key == "required" and isinstance(value, list):
                        merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
                    else:
                        merged.setdefault(key, value)
            schema = merged
        return schema

    def breaks(self, schema: Mapping[str, Any], key: str, path: tuple[Any, ...]) -> bool:
        """Whether to violate ``key`` here: only when it reached the model as a description hint.

        A real model reads ``{maxLength: 80}`` in a description as advice, not a rule, and now
        and then ignores it; keywords the API enforces (enum, required, types) always hold.
        """
        if not self.break_rate or key in schema or _constraint(schema, key) is None:
            return False
        hit = self.break_hash(self._path_str(path), key) / 2.0**64 < self.break_rate
        self.broken += hit
        return hit

    @staticmethod
    def field_name(path: tuple[Any, ...]) -> str:
        for part in reversed(path):
            if isinstance(part, str):
                return part
        return ""

    @staticmethod
    def _path_str(path: tuple[Any, ...]) -> str:
        return _path_string(path)

    # -- generation --------------------------------------------------------------------------
    def gen(self, schema: Any, path: tuple[Any, ...], depth: int) -> Any:
        plans = self._gen_plans
        if plans is not None:
            # A node of the shared prompt's schema is filled the same way in every record: an
            # enum, or a type (per depth class); what was worked out for it is looked up.
            hit = plans.get(id(schema))
            if hit is not None and hit[0] is schema:
                if hit[1] is None:  # an enum: (node, None, resolved, values tuple, values)
                    self.enum_paths.append((path, hit[3]))
                    return copy.deepcopy(self.choose(hit[4], path, 1, hit[2])[0])
                return self._fill(hit[2], hit[3] if depth > _MAX_DEPTH else hit[1], path, depth)
        original = schema
        schema = self.resolve(schema)
        if not isinstance(schema, Mapping):
            return None if schema is False else self.string({}, path)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            values = tuple(enum)
            if plans is not None and id(original) in self._stable:
                plans[id(original)] = (original, None, schema, values, enum)
            self.enum_paths.append((path, values))
            return copy.deepcopy(self.choose(enum, path, 1, schema)[0])
        variants = schema.get("anyOf") or schema.get("oneOf")
        if isinstance(variants, list) and variants:
            condition = self.conditions.get(path)
            if condition is not None and not condition & set(self.scope[2]):
                # "Required for other": left null unless the label it is about was chosen.
                return None
            variant = self.pick_variant(variants, depth)
            outer = schema.get("description")
            if isinstance(variant, Mapping) and isinstance(outer, str) and _HINT_RE.search(outer):
                # Hints transform_schema left on the optional field itself hold for its value too.
                inner = variant.get("description")
                variant = {
                    **variant,
                    "description": f"{inner}\n\n{outer}" if isinstance(inner, str) else outer,
                }
            return self.gen(variant, path, depth)
        shallow, deep = _schema_kinds(schema)
        if plans is not None and id(original) in self._stable:
            plans[id(original)] = (original, shallow, schema, deep)
        return self._fill(schema, deep if depth > _MAX_DEPTH else shallow, path, depth)

    def _fill(self, schema: Mapping[str, Any], kind: Any, path: tuple[Any, ...], depth: int) -> Any:
        """A value of a resolved schema of type ``kind`` (no const, enum or variants)."""
        if kind == "object":
            return self.object(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        if kind == "integer":
            return self.integer(schema, path)
        if kind == "number":
            return self.number(schema, path)
        if kind == "boolean":
            return self.boolean(path)
        if kind == "null":
            return None
        return self.string(schema, path)

    def pick_variant(self, variants: list[Any], depth: int) -> Any:
        resolved = [self.resolve(v) for v in variants]

        def is_null(v: Any) -> bool:
            return isinstance(v, Mapping) and (v.get("type") == "null" or v.get("const", 0) is None)

        if depth > _MAX_DEPTH:
            for v in resolved:
                if is_null(v):
                    return v
        for v in resolved:
            if not is_null(v):
                return v
        return resolved[0]

    def object(self, schema: Mapping[str, Any], path: tuple[Any, ...], depth: int) -> dict[str, Any]:
        props = schema.get("properties")
        if type(props) is not dict and not isinstance(props, Mapping):
            props = {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        out: dict[str, Any] = {}
        # Fields that judge the others (confidence, evidence quotes) are filled last, from the
        # decisions made for this object; the output keeps the schema's key order.
        first_decision = len(self.decisions)
        first_chosen = len(self.chosen)
        first_picked = len(self.picked_all)
        late, conditions = self._object_plan(schema, props)
        for name, condition in conditions:
            self.conditions[(*path, name)] = condition
        for name, sub in props.items():
            if name not in late and (depth <= _MAX_DEPTH or name in required):
                out[name] = self.gen(sub, (*path, name), depth + 1)
        self.scope = (
            self.decisions[first_decision:],
            self.chosen[first_chosen:],
            self.picked_all[first_picked:],
        )
        for name in late:
            if depth <= _MAX_DEPTH or name in required:
                out[name] = self.gen(props[name], (*path, name), depth + 1)
        if late:  # else the fields were filled in the schema's order already
            out = {name: out[name] for name in props if name in out}
        for name in required:
            if name not in out:
                out[name] = self.string({}, (*path, name))
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, Mapping) and depth <= _MAX_DEPTH:
            out["key"] = self.gen(extra, (*path, "key"), depth + 1)
        return out

    def _object_plan(
        self, schema: Mapping[str, Any], props: Mapping[str, Any]
    ) -> tuple[list[str], list[tuple[str, set[str]]]]:
        """Which fields of an object are filled last, and the enum values conditional fields are
        tied to: a function of the schema alone, so worked out once per shared prompt (memoised
        like ``resolve``, on nodes the shared prompt keeps alive) instead of once per record."""
        cache = self._plans
        if cache is not None and id(schema) in self._stable:
            hit = cache.get(id(schema))
            if hit is not None and hit[0] is schema:
                return hit[1]  # type: ignore[no-any-return]
        late = [n for n in props if set(name_tokens(n)) & (_CONFIDENCE_TOKENS | _EVIDENCE_TOKENS)]
        siblings = self.sibling_enum_values(props)
        conditions: list[tuple[str, set[str]]] = []
        for name, sub in props.items():
            condition = self.condition_of(sub, siblings)
            if condition:
                conditions.append((name, condition))
                if name not in late:
                    late.append(name)
        plan = (late, conditions)
        if cache is not None and id(schema) in self._stable:
            cache[id(schema)] = (schema, plan)
        return plan

    def sibling_enum_values(self, props: Mapping[str, Any]) -> set[str]:
        """String enum values of an object's own properties (for conditional fields)."""
        values: set[str] = set()
        for sub in props.values():
            sub = self.resolve(sub)
            if isinstance(sub, Mapping):
                enum = sub.get("enum")
                if not isinstance(enum, list) and isinstance(sub.get("items"), Mapping):
                    enum = self.resolve(sub["items"]).get("enum")
                if isinstance(enum, list):
                    values.update(v for v in enum if isinstance(v, str))
        return values

    def condition_of(self, sub: Any, siblings: set[str]) -> set[str] | None:
        """The enum values a nullable field's description ties it to ("Required for other: why
        no canonical label fits"): a model fills it for those labels and leaves it null otherwise."""
        sub = self.resolve(sub)
        if not isinstance(sub, Mapping) or not siblings:
            return None
        variants = sub.get("anyOf") or sub.get("oneOf")
        nullable = isinstance(variants, list) and any(
            isinstance(v, Mapping) and v.get("type") == "null" for v in map(self.resolve, variants)
        )
        description = sub.get("description")
        if not nullable or not isinstance(description, str):
            return None
        mentioned = {v for v in siblings if re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", description)}
        return mentioned or None

    def array(self, schema: Mapping[str, Any], path: tuple[Any, ...], depth: int) -> list[Any]:
        items = self.resolve(schema.get("items", {}))
        lo = _int_constraint(schema, "minItems") or 0
        hi = _int_constraint(schema, "maxItems")
        name_toks = set(name_tokens(self.field_name(path)))
        wanted = 3 if name_toks & _TAG_TOKENS else 1
        n = lo if depth > _MAX_DEPTH else max(lo, wanted)
        if hi is not None:
            n = min(n, hi)
            if self.breaks(schema, "maxItems", path):
                n = hi + 1
        elif lo and self.breaks(schema, "minItems", path):
            n = lo - 1
        if n <= 0:
            return []
        enum = items.get("enum") if isinstance(items, Mapping) else None
        if isinstance(enum, list) and enum and "const" not in items:
            ranked = self.choose(enum, path, len(enum), schema)
            out = [copy.deepcopy(ranked[i % len(ranked)]) for i in range(n)]
            self.enum_paths.extend(((*path, i), tuple(enum)) for i in range(n))
            return out
        is_string = (
            isinstance(items, Mapping) and items.get("type", "string") == "string" and "format" not in items
        )
        if is_string and name_toks & _TAG_TOKENS:
            words = self.evidence.keywords(n) or ["general"]
            max_len = _int_constraint(items, "maxLength")
            min_len = _int_constraint(items, "minLength")
            out = [self.fit(words[i % len(words)], min_len, max_len) for i in range(n)]
            if len(set(out)) < len(out):
                out = [w if i < len(words) else f"{w}-{i}" for i, w in enumerate(out)]
            return out
        if is_string and not name_toks & _TAG_TOKENS and depth <= _MAX_DEPTH:
            listed = self.listed_sentences(path, schema, lo, hi)
            if listed is not None:
                max_len = _int_constraint(items, "maxLength")
                min_len = _int_constraint(items, "minLength")
                return [self.fit(v, min_len, max_len) for v in listed]
        values = [self.gen(items, (*path, i), depth + 1) for i in range(n)]
        if schema.get("uniqueItems") and all(isinstance(v, str) for v in values):
            values = [v if v not in values[:i] else f"{v} ({i + 1})" for i, v in enumerate(values)]
        return values

    def listed_sentences(
        self, path: tuple[Any, ...], schema: Mapping[str, Any], lo: int, hi: int | None
    ) -> list[str] | None:
        """A list of free-text items about a topic (``risks``, ``open_questions``): the record's
        sentences about it, as many as there are (up to 3 and ``maxItems``), none when the
        record names none and the list may be empty, else "None identified.". None when the
        field names no topic the lexicon or its description can find (the caller extracts)."""
        name = self.field_name(path)
        description = schema.get("description")
        definition = _HINT_BLOCK_RE.sub(" ", description) if isinstance(description, str) else ""
        if not _known_topic(name):
            return None
        scored = []
        for i, sentence in enumerate(self.sentences):
            evidence = self.sentence_evidence(sentence)
            score = evidence.score(name) + (_definition_score(evidence, definition) if definition else 0)
            if score >= _LIST_THRESHOLD:
                scored.append((-score, i, sentence))
        cap = min(3, hi) if hi is not None else 3
        if hi is not None and scored and self.breaks(schema, "maxItems", path):
            cap = hi + 1
        top = {s for _, _, s in sorted(scored)[:cap]}
        chosen = list(dict.fromkeys(s for s in self.sentences if s in top))  # record order, once each
        if len(chosen) < lo:
            chosen += ["None identified."] if not chosen else []
            extra = [s for s in self.sentences if s not in chosen]
            chosen += extra[: lo - len(chosen)]
            while len(chosen) < lo:
                chosen.append(f"None identified ({len(chosen) + 1}).")
        return chosen

    def integer(self, schema: Mapping[str, Any], path: tuple[Any, ...]) -> int:
        lo_f, hi_f = _constraint(schema, "minimum"), _constraint(schema, "maximum")
        ex_lo, ex_hi = _constraint(schema, "exclusiveMinimum"), _constraint(schema, "exclusiveMaximum")
        lo = None if lo_f is None else int(-(-lo_f // 1))
        hi = None if hi_f is None else int(hi_f // 1)
        if ex_lo is not None:
            lo = max(lo if lo is not None else -(2**62), int(ex_lo // 1) + 1)
        if ex_hi is not None:
            hi = min(hi if hi is not None else 2**62, int(-(-ex_hi // 1)) - 1)
        confident = bool(set(name_tokens(self.field_name(path))) & _CONFIDENCE_TOKENS)
        if lo is None and hi is None:
            lo, hi = (0, 100) if confident else (0, 10)
        elif lo is None:
            lo = hi - 10  # type: ignore[operator]
        elif hi is None:
            hi = lo + 10
        assert lo is not None and hi is not None
        if hi < lo:
            return lo
        if self.breaks(schema, "maximum", path):
            return hi + 1 + self.text_hash(self._path_str(path)) % 5
        if self.breaks(schema, "minimum", path):
            return lo - 1 - self.text_hash(self._path_str(path)) % 5
        step = _constraint(schema, "multipleOf")
        if confident and self.scope[0] and not step:
            return lo + round((hi - lo) * self.confidence_share(path))
        h = self.text_hash(self._path_str(path))
        if step and step >= 1 and float(step).is_integer():
            m = int(step)
            first = -(-lo // m) * m
            count = (hi - first) // m + 1
            return first + (h % count) * m if count > 0 else lo
        return lo + h % (hi - lo + 1)

    def number(self, schema: Mapping[str, Any], path: tuple[Any, ...]) -> float:
        lo, hi = _constraint(schema, "minimum"), _constraint(schema, "maximum")
        ex_lo, ex_hi = _constraint(schema, "exclusiveMinimum"), _constraint(schema, "exclusiveMaximum")
        frac = self.text_hash(self._path_str(path)) / 2.0**64
        low = lo if lo is not None else ex_lo
        high = hi if hi is not None else ex_hi
        confident = bool(set(name_tokens(self.field_name(path))) & _CONFIDENCE_TOKENS)
        if low is None and high is None:
            if confident:
                return round(self.confidence_share(path), 2)
            low, high = 0.0, 100.0
        elif low is None:
            low = high - 100.0  # type: ignore[operator]
        elif high is None:
            high = low + 100.0
        assert low is not None and high is not None
        if high <= low:
            return low
        if self.breaks(schema, "maximum", path):
            return round(high + max(0.01, (high - low) * 0.1), 2)
        if self.breaks(schema, "minimum", path):
            return round(low - max(0.01, (high - low) * 0.1), 2)
        # A confident model: confidence-like fields land in the upper half of their range.
        share = self.confidence_share(path) if confident else 0.05 + 0.9 * frac
        # Stay strictly inside so exclusive bounds hold; rounding must not land on a bound.
        value = round(low + (high - low) * share, 2)
        if not low < value < high:
            value = low + (high - low) * share
        return value

    def boolean(self, path: tuple[Any, ...]) -> bool:
        return self.evidence.score(self.field_name(path)) >= _BOOLEAN_THRESHOLD

    def string(self, schema: Mapping[str, Any], path: tuple[Any, ...]) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt](self, path)
        name = self.field_name(path)
        email, url, quote, summary, tag = _string_kinds(name)
        min_len = _int_constraint(schema, "minLength")
        max_len = _int_constraint(schema, "maxLength")
        index = path[-1] if path and isinstance(path[-1], int) else 0
        sentences = self.sentences or ["n/a"]
        if email:
            value = _format_email(self, path)
        elif url:
            value = _format_uri(self, path)
        elif quote:
            value = trim_to(self.best_quote(), 280)
            if self.invents_quote(path):
                # A real model asked for a verbatim quote sometimes paraphrases or adds a
                # specific the record never gave; checks that the quote is in the record must
                # see that happen (``invented_quote_rate``).
                value = self.fit(self.invented_quote(value), None, max_len)
                if max_len is not None:
                    return value
        elif (
            found := self.field_value(name, schema.get("description"), by_overlap=not (summary or tag))
        ) is not None:
            value = found
        elif summary:
            value = trim_to(sentences[index % len(sentences)], 280)
        elif tag:
            words = self.evidence.keywords(index + 1) or ["general"]
            value = words[min(index, len(words) - 1)]
        else:
            value = " ".join(sentences[index % len(sentences)].split()[:8]).rstrip(",.;:!?")
        value = self.fit(value, min_len, max_len)
        if max_len is not None and self.breaks(schema, "maxLength", path):
            # Overlong, as a model that "forgot" the hint writes: the text runs on past the limit.
            extra = " ".join(self.filler)
            value = (value + " " + extra + " " + " ".join(sentences))[: max(max_len + 1, int(max_len * 1.3))]
            while len(value) <= max_len:
                value += " more"
        elif min_len and self.breaks(schema, "minLength", path):
            value = value[: min_len - 1]
        return value

    def invents_quote(self, path: tuple[Any, ...]) -> bool:
        if not self.quote_break_rate:
            return False
        # The model is part of the draw: a retry on another model (a cascade's escalation) is a
        # new sample, as it would be in production.
        draw = stable_fraction(
            self.break_key, self.cues.model, self.text, self._path_str(path), "invented_quote"
        )
        hit = draw < self.quote_break_rate
        self.invented_quotes += hit
        return hit

    def invented_quote(self, quote: str) -> str:
        """A "quote" that is not in the record: a number in it changed (the commonest invented
        specific), else the wording paraphrased, with a made-up head count added."""
        record = " ".join(self.text.lower().split())
        h = self.text_hash("invented_quote")

        def bump(m: re.Match[str]) -> str:
            n = _number(m.group(0), None)
            return f"{max(2, n + 1 + n // 5 + h % 7):,}"

        candidates = [
            _NUMBER_IN_TEXT_RE.sub(bump, quote, count=1) if _NUMBER_IN_TEXT_RE.search(quote) else "",
            f"{_SEPARATOR_RE.sub(' and ', quote).strip()} with about {20 + h % 900} employees",
            f"the record says: {quote}",
        ]
        for candidate in candidates:
            if candidate and " ".join(candidate.lower().split()).strip(" .,;:\"'") not in record:
                return candidate
        return f"the record says: {quote}"

    def confidence_share(self, path: tuple[Any, ...]) -> float:
        """Where a confidence-like field lands in its range: high when the labels of its object
        had strong, clear evidence, low when they were guesses (fallbacks, close calls)."""
        jitter = (self.text_hash(self._path_str(path)) / 2.0**64 - 0.5) * 0.08
        decisions = self.scope[0]
        if not decisions:
            return min(0.99, max(0.01, 0.6 + 0.3 * min(1.0, len(self.sentences) / 4) + jitter))
        # No evidence at all for any label is a clear case too (the record says nothing: unknown),
        # a little evidence that did not reach a label is the unsure one.
        strengths = [
            0.7 if best == 0 else 0.2 if best < _MIN_EVIDENCE
            else 0.6 * min(1.0, best / 6) + 0.4 * min(1.0, (best - runner_up) / 6)
            for best, runner_up in decisions
        ]  # fmt: skip
        # "How sure of all fields together": the least sure field weighs as much as the mean.
        share = 0.5 * sum(strengths) / len(strengths) + 0.5 * min(strengths)
        return min(0.99, max(0.01, 0.2 + 0.75 * share + jitter))

    def best_quote(self) -> str:
        """The record sentence that best supports the labels chosen for this object (verbatim)."""
        sentences = self.sentences or ["n/a"]
        labels = self.scope[1]
        best, best_score = sentences[0], 0
        for sentence in sentences:
            evidence = self.sentence_evidence(sentence)
            score = sum(evidence.score(label) for label in labels) + 2 * len(_counts_in(sentence))
            if score > best_score:
                best, best_score = sentence, score
        return best

    def field_value(self, name: str, description: Any, *, by_overlap: bool = True) -> str | None:
        """A free-text field answered from the part of the record it is about.

        A ``Key: value`` line whose key matches the field name (or a synonym: persona ~ title,
        role) wins; a role-like field takes the job title found in the record; else the
        sentence sharing most words with the field's name and description. None: no clue.
        """
        toks, wanted, roleish = _field_words(name)
        if not toks:
            return None
        # A key line can only match when a wanted word is in the text (the keys are ASCII, so
        # their words are in the lower-cased text as they are): else the lines are not read.
        lowered = self.text.lower()
        lines = self.fields if any(w in lowered for w in wanted) else {}
        for key, value in lines.items():
            if set(key.split()) & wanted:
                if roleish:
                    role = _ROLE_RE.search(value)
                    if role:
                        return role.group(1)
                    if set(key.split()) & {"contact"}:
                        # "Linda Brooks, Superintendent": the title follows the name.
                        name_part, comma, title = value.rpartition(",")
                        if comma and name_part and title.strip():
                            return title.strip().rstrip(".")
                        continue
                return value.strip().rstrip(".")
        if roleish:
            role = _ROLE_RE.search(self.text) or _SELF_ROLE_RE.search(self.text)
            # No title anywhere: say so, as a model would, rather than quote unrelated text.
            return role.group(1) if role else "unknown"
        if not by_overlap:
            return None  # summaries and tags have their own rules
        hints = _overlap_hints(tuple(toks), description if isinstance(description, str) else None)
        best, best_hits = None, 0
        stem_sets = self._sentence_stems
        for sentence in self.sentences:
            stems = stem_sets.get(sentence)
            if stems is None:
                stems = stem_sets[sentence] = frozenset(_stems(_words(sentence)))
            hits = len(hints & stems)
            if hits > best_hits:
                best, best_hits = sentence, hits
        return best

    # -- enums -------------------------------------------------------------------------------
    def scoped_evidence(self, name: str, description: str) -> Evidence:
        """Evidence for a field the prompt says comes from one part of the record.

        "Persona comes from the job title" makes the ``Job title:`` line the only evidence for
        ``persona`` (the company name or the notes would otherwise vote too); without such a
        statement, or when the record has no such line, the whole record is the evidence.
        """
        words = [w for w in name_tokens(name) if w]
        if not words:
            return self.evidence
        phrases = _scope_phrases(" ".join(words), description, self.cues.system)
        if not phrases or not self.fields:  # the record's key lines are only read when needed
            return self.evidence
        for phrase in phrases:
            for key, value in self.fields.items():
                if phrase.startswith(key):
                    if key not in self._scoped:
                        value = "" if is_placeholder(" ".join(_words(value))) else value
                        self._scoped[key] = Evidence(value, [value], vocabulary=self.vocabulary)
                    return self._scoped[key]
        return self.evidence

    def choose(
        self, values: Sequence[Any], path: tuple[Any, ...], k: int, schema: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """Enum values ranked by evidence; ties (and no evidence) broken by a stable hash.

        A value's evidence: its own words and the lexicon (``Evidence.score``), the definition
        the system prompt or the field description gives it ("- too_expensive: price, cannot
        afford"), a head count in the record that falls in the band it is defined by ("micro
        1-10", "11-50"), a placeholder record ("n/a", "-") for a value defined as one, and the
        answer a few-shot turn gave to the same record. ``unknown``/``other``-like values win
        when the best evidence is weak (a single weak word), not only when there is none.
        """
        name = self.field_name(path)
        description = (
            schema.get("description") if type(schema) is dict or isinstance(schema, Mapping) else None
        )
        description = description if isinstance(description, str) else ""
        plan = _choice_plan(values, self.cues.system, description, name)
        labels, cues, scorer = plan.labels, plan.cues, plan.scorer
        # Without scope phrases ``scoped_evidence`` is the whole record's evidence.
        evidence = self.scoped_evidence(name, description) if plan.scoped else self.evidence
        by_label = scorer.scores(evidence)
        if plan.all_strings:
            scores = by_label
        else:
            scores = [0] * len(values)
            for i, score in zip(plan.string_at, by_label, strict=True):
                scores[i] = score
        # The label test first (cached per label): the record key is only read for a label
        # that stands for "no answer given".
        if plan.placeholders and self.empty_record:
            for i in plan.placeholders:
                scores[i] += 8
        band = None
        if len(cues.bands) >= 2 and self.counts:
            for count in self.counts:
                band = next(
                    (labels.index(v) for v, (lo, hi) in cues.bands.items() if lo <= count <= hi), None
                )
                if band is not None:
                    band = list(values).index(labels[band])
                    break
        if band is None and plan.bands:
            band = _band_choice(values, self.counts, name)
        if band is not None:
            scores[band] += 6
        example = self.example
        if example is not None and isinstance(example, Mapping):
            shown = self.example.get(name)
            if shown in values:
                scores[list(values).index(shown)] += 10
        best = max(scores)
        ordered = sorted(scores, reverse=True)
        runner_up = ordered[1] if len(ordered) > 1 else 0
        fallbacks, unknowns = plan.fallbacks, plan.unknowns
        weak = best < _MIN_EVIDENCE and 0 in unknowns
        self.decisions.append((best, runner_up))
        where = self._path_str(path)

        def rank(i: int) -> tuple[int, int, int]:
            if weak:
                return (unknowns[i], -scores[i], fallbacks[i])
            return (0, -scores[i], fallbacks[i] if best == 0 else 0)

        order = self._ranked(values, rank, where, k)
        picked = [values[i] for i in order[:k]]
        self.picked_all.extend(str(v) for v in picked)
        self.chosen.extend(str(v) for v in picked if isinstance(v, str) and scores[values.index(v)] > 0)
        return picked

    def _ranked(
        self, values: Sequence[Any], rank: Callable[[int], tuple[int, int, int]], where: str, k: int
    ) -> list[int]:
        """Indexes of ``values`` sorted by ``rank``, ties broken by a stable hash of the value.

        The same order as sorting by ``(*rank(i), stable_hash(text, where, repr(value)))``, but
        the hash (a SHA-256 of the whole record) is only computed inside the groups of equal rank
        that reach the first ``k`` places: most enum decisions have a clear winner.
        """
        keys = [rank(i) for i in range(len(values))]
        order = sorted(range(len(values)), key=keys.__getitem__)
        start = 0
        while start < len(order) and start < k:
            end = start + 1
            while end < len(order) and keys[order[end]] == keys[order[start]]:
                end += 1
            if end - start > 1:
                group = order[start:end]
                group.sort(key=lambda i: self.text_hash(where, repr(values[i])))
                order[start:end] = group
            start = end
        return order


def _schema_kinds(schema: Mapping[str, Any]) -> tuple[Any, Any]:
    """The type ``gen`` fills a resolved schema as (no const, enum or variants): at depths up to
    ``_MAX_DEPTH`` and beyond it (where a nullable type list gives null)."""
    out = []
    for deep in (False, True):
        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [t for t in kind if t != "null"]
            kind = "null" if not non_null or (deep and "null" in kind) else non_null[0]
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema:
                kind = "array"
            else:
                kind = "string"
        out.append(kind)
    return out[0], out[1]


@lru_cache(maxsize=4096)
def _string_kinds(name: str) -> tuple[bool, bool, bool, bool, bool]:
    """What a string field's name makes it, as ``_Answerer.string`` tests in turn: an email, a
    URL, a verbatim quote, a summary-like text, a tag (the same in every record)."""
    toks = set(name_tokens(name))
    return (
        bool(toks & {"email", "mail"}),
        bool(toks & {"url", "uri", "link", "website"}),
        bool(toks & _EVIDENCE_TOKENS),
        bool(toks & _SUMMARY_TOKENS),
        bool(toks & _TAG_TOKENS),
    )


@lru_cache(maxsize=4096)
def _field_words(name: str) -> tuple[list[str], frozenset[str], bool]:
    """What ``field_value`` reads from a field's name alone: its words (stopwords left out), the
    key-line words it looks for (synonyms included) and whether it is about a person's role.
    The same in every record (the word list is read-only)."""
    toks = [t for t in name_tokens(name) if t not in _LABEL_STOPWORDS]
    wanted = set(toks)
    for t in toks:
        wanted |= _SYNONYMS.get(t, frozenset())
    # A bare "title" is a headline; "job_title", "persona" or "role" are about a person.
    roleish = bool(set(toks) & (_ROLE_KEYS - {"title", "contact"})) or (
        "title" in toks and bool(set(toks) & {"job", "contact", "person", "lead", "buyer"})
    )
    return toks, frozenset(wanted), roleish


@lru_cache(maxsize=1024)
def _overlap_hints(toks: tuple[str, ...], description: str | None) -> frozenset[str]:
    """The stems a free-text field looks for in the record's sentences: its name's and its
    description's (hint blocks, short words and stopwords left out); the same in every record."""
    hints = {stem(t) for t in toks}
    if description is not None:
        hints |= {
            stem(w)
            for w in _words(_HINT_BLOCK_RE.sub(" ", description))
            if len(w) > 3 and w not in _STOPWORDS
        }
    return frozenset(hints)


@dataclass(frozen=True)
class _ChoicePlan:
    """What ``choose`` works out from an enum field alone (its values, the prompt's system text,
    its description and name): the same in every record, so built once per field."""

    labels: tuple[str, ...]
    cues: LabelCues
    scorer: _Scorer
    #: every value is a string (the scores are the scorer's, in order)
    all_strings: bool
    #: indexes of the string values, in order (for the others' zero scores)
    string_at: tuple[int, ...]
    #: indexes of the labels that stand for "no answer given"
    placeholders: tuple[int, ...]
    #: the prompt names the record part the field comes from (``scoped_evidence`` may narrow)
    scoped: bool
    #: a head count could pick a value (``_has_bands``)
    bands: bool
    #: per value, 0 for a fallback label (else 1), 0 for an unknown-like one (else 1)
    fallbacks: tuple[int, ...]
    unknowns: tuple[int, ...]


def _choice_plan(values: Sequence[Any], system: str, description: str, name: str) -> _ChoicePlan:
    try:
        return _choice_plan_cached(tuple(values), system, description, name)
    except TypeError:  # unhashable enum values (objects, lists)
        return _choice_plan_cached.__wrapped__(tuple(values), system, description, name)


@lru_cache(maxsize=1024)
def _choice_plan_cached(values: tuple[Any, ...], system: str, description: str, name: str) -> _ChoicePlan:
    labels = tuple(v for v in values if isinstance(v, str))
    cues, scorer = _choice_model(labels, system, description)
    string_at = tuple(i for i, v in enumerate(values) if isinstance(v, str))
    words = [w for w in name_tokens(name) if w]
    lowered = [v.lower() if isinstance(v, str) else None for v in values]
    return _ChoicePlan(
        labels=labels,
        cues=cues,
        scorer=scorer,
        all_strings=len(string_at) == len(values),
        string_at=string_at,
        placeholders=tuple(
            i for i in string_at if _names_placeholder(values[i], cues.definitions.get(values[i]))
        ),
        scoped=bool(words) and bool(_scope_phrases(" ".join(words), description, system)),
        bands=_has_bands(values, name),
        fallbacks=tuple(0 if v is not None and v in _FALLBACK_LABELS else 1 for v in lowered),
        unknowns=tuple(0 if v is not None and v in _UNKNOWN_LABELS else 1 for v in lowered),
    )


@lru_cache(maxsize=4096)
def _path_string(path: tuple[Any, ...]) -> str:
    """A field's JSON path as the stable hashes spell it (``$.items[0].label``)."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


_LIST_THRESHOLD = 3  # a sentence is "about" a list's topic from this much evidence


@lru_cache(maxsize=1024)
def _known_topic(name: str) -> bool:
    """Whether the lexicon has a topic for a list field's name (risks, open questions...)."""
    tokens = name_tokens(name)
    content = [t for t in tokens if t not in _LABEL_STOPWORDS]
    keys = {_phrase_key(tokens), _phrase_key(content)} | {_phrase_key([t]) for t in content}
    return any(key in _LEXICON for key in keys if key)


_MIN_EVIDENCE = 2  # below this, an unknown/other-like label beats a guess
_UNKNOWN_LABELS = frozenset("unknown other none n/a na unclear unsure undetermined misc general".split())
_PLACEHOLDER_NAMES = frozenset(
    ["not stated", "not given", "no answer", "no reason", "no response", "none given", "not provided"]
)
_DEFINITION_STOPWORDS = frozenset(
    "about also any are be been but by can could does each etc for from has have how into its "
    "like more most not of off only one other our out own same some such than that the their them "
    "then there these they this those too use used very was what when where which while who why "
    "will with within without would you your real".split()
)


_KEPT_TEMPLATE_WORDS = _NEGATORS | _STOPWORDS | _DEFINITION_STOPWORDS


def _without_template(text: str, template_words: frozenset[str]) -> str:
    """``text`` without the prompt template's own words ("Reason given:", "Subject:").

    Every record's turn has them, so they are evidence for nothing; short and negating words
    stay (they are part of phrases like "not working").
    """
    pattern = _template_pattern(template_words)
    return text if pattern is None else pattern.sub(" ", text)


@lru_cache(maxsize=256)
def _template_pattern(template_words: frozenset[str]) -> re.Pattern[str] | None:
    drop = {w for w in template_words if len(w) >= 3 and w.isalpha() and w not in _KEPT_TEMPLATE_WORDS}
    return _template_re(frozenset(drop)) if drop else None


@lru_cache(maxsize=4096)
def _scope_phrases(words: str, description: str, system: str) -> tuple[str, ...]:
    """The record parts the prompt says a field comes from ("persona comes from the job
    title": ``job title``), in the order ``scoped_evidence`` tries them."""
    pattern = _scope_pattern(words)
    return tuple(
        " ".join(name_tokens(m.group(1)))
        for source in (description, system)
        for m in pattern.finditer(source or "")
    )


@lru_cache(maxsize=64)
def _template_re(words: frozenset[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, words))) + r")\b", re.IGNORECASE)


@lru_cache(maxsize=4096)
def _scope_pattern(words: str) -> re.Pattern[str]:
    return re.compile(
        rf"\b{re.escape(words)}\b[^.\n]{{0,60}}?\bfrom (?:the |its |their |a )?([A-Za-z][A-Za-z ]{{2,30}})",
        re.IGNORECASE,
    )


@lru_cache(maxsize=4096)
def _well_known(label: str) -> bool:
    """Whether the lexicon has an entry for the label's whole name. A definition in the prompt
    then adds little but noise (crude word matching misreads prose like "a paying customer is
    blocked"); definitions teach the labels the lexicon does not know."""
    tokens = name_tokens(label)
    content = [t for t in tokens if t not in _LABEL_STOPWORDS]
    return any(key in _LEXICON for key in {_phrase_key(tokens), _phrase_key(content)} if key)


@lru_cache(maxsize=16384)
def _names_placeholder(value: str, definition: str | None) -> bool:
    """Whether a label is the one for "no answer given" (``not_stated``, ``no_answer``, or
    defined as "empty, n/a, '-'")."""
    if value.lower() in _UNKNOWN_LABELS:
        return False
    tokens = name_tokens(value)
    named = " ".join(tokens) in _PLACEHOLDER_NAMES or bool(set(tokens) & {"empty", "blank", "unstated"})
    defined = bool(definition) and (
        "n/a" in definition
        or bool(set(_words(definition)) & {"empty", "placeholder", "placeholders", "blank"})
    )
    return named or defined


@lru_cache(maxsize=4096)
def _definition_phrases(definition: str) -> tuple[_Phrase, ...]:
    """Weighted evidence phrases of a label definition: its short comma-separated items count as
    phrases (3), their content words on their own (2 in a short definition, 1 in a long one).
    Only the first sentence of each definition counts: later ones tend to discuss other labels."""
    firsts = [re.split(r"(?<=[a-z)])\.\s+", part.strip(), maxsplit=1)[0] for part in definition.split(" ; ")]
    found: dict[tuple[str, ...], _Phrase] = {}
    words: list[str] = []
    for first in firsts:
        for segment in re.split(r"[,;:()/]|\bor\b|\band\b", first):
            tokens = _evidence_tokens(segment)
            content = [
                t for t in tokens if len(t) >= 3 and t not in _DEFINITION_STOPWORDS and t not in _STOPWORDS
            ]
            if 2 <= len(tokens) <= 4 and content:
                stems = tuple(stem(t) for t in tokens)
                found.setdefault(stems, (stems, 2, False))
            words += content
    if len(set(words)) > 12:
        # Prose ("a paying customer is blocked on an important task"): its single words are
        # too common to point at one label; only its short items count.
        return tuple(found.values())
    single = 1
    for word in words:
        stems = (stem(word),)
        if stems not in found:
            found[stems] = (stems, single, False)
    return tuple(found.values())


def _definition_score(evidence: Evidence, definition: str) -> int:
    """``sum(weight * min(count(phrase), _SATURATION))`` over the definition's phrases (none
    negatable), walked from the record's stems by a ``_Scorer`` built once per definition."""
    return _definition_scorer(definition).scores(evidence)[0]


@lru_cache(maxsize=4096)
def _definition_scorer(definition: str) -> _Scorer:
    return _Scorer([tuple((stems, weight, False) for stems, weight, _ in _definition_phrases(definition))])


@lru_cache(maxsize=1024)
def _choice_model(labels: tuple[str, ...], system: str, description: str) -> tuple[LabelCues, _Scorer]:
    """The cues and the scorer of one enum field in one prompt (both pure: cached).

    A label's definition counts unless the label is a fallback or one the lexicon knows well.
    """
    cues = label_cues(labels, system, description)
    definitions = tuple(
        d if d and v.lower() not in _FALLBACK_LABELS and not _well_known(v) else None
        for v in labels
        for d in (cues.definitions.get(v),)
    )
    return cues, _choice_scorer(labels, definitions)


def _schema_enums(root: Any) -> tuple[str, ...]:
    """Every string enum value in a schema (for the typo vocabulary)."""
    found: list[str] = []
    stack = [root]
    seen = 0
    while stack and seen < 5000:
        node = stack.pop()
        seen += 1
        if isinstance(node, Mapping):
            enum = node.get("enum")
            if isinstance(enum, list):
                found += [v for v in enum if isinstance(v, str)]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return tuple(dict.fromkeys(found))


def _lexicon_words() -> frozenset[str]:
    words: set[str] = set()
    for group in _LEXICON_GROUPS:
        for listing in (group.strong, group.normal, group.weak, " ".join(group.names)):
            words.update(_words(listing))
    return frozenset(w for w in words if w.isalpha())


_LEXICON_WORDS = _lexicon_words()


@lru_cache(maxsize=256)
def _vocabulary(labels: tuple[str, ...], system: str) -> frozenset[str]:
    """Words a typo in the record is corrected towards: the lexicon, the labels, their definitions."""
    words = set(_LEXICON_WORDS)
    for label in labels:
        words.update(name_tokens(label))
    for definition in label_cues(labels, system, "").definitions.values():
        words.update(_words(definition))
    return frozenset(w for w in words if w.isalpha() and len(w) >= 5)


def _date_from_text(answerer: _Answerer, path: tuple[Any, ...]) -> str:
    match = _DATE_RE.search(answerer.text)
    if match:
        return match.group(0)
    h = stable_hash(answerer.text, answerer._path_str(path))
    return f"2024-{1 + h % 12:02d}-{1 + (h >> 8) % 28:02d}"


def _format_email(answerer: _Answerer, path: tuple[Any, ...]) -> str:
    match = _EMAIL_RE.search(answerer.text)
    return match.group(0).rstrip(".") if match else "customer@example.com"


def _format_uri(answerer: _Answerer, path: tuple[Any, ...]) -> str:
    match = _URL_RE.search(answerer.text)
    if match:
        return match.group(0).rstrip(".,;")
    return f"https://example.com/{stable_token(8, answerer.text, answerer._path_str(path)).lower()}"


def _format_uuid(answerer: _Answerer, path: tuple[Any, ...]) -> str:
    raw = _digest([answerer.text, answerer._path_str(path)])[:16]
    return str(uuid.UUID(bytes=raw, version=4))


_FORMATS: dict[str, Any] = {
    "date": _date_from_text,
    "date-time": lambda a, p: f"{_date_from_text(a, p)}T09:00:00Z",
    "time": lambda a, p: "09:00:00Z",
    "duration": lambda a, p: "PT1H",
    "email": _format_email,
    "uri": _format_uri,
    "uri-reference": _format_uri,
    "url": _format_uri,
    "uuid": _format_uuid,
    "hostname": lambda a, p: "example.com",
    "ipv4": lambda a, p: "192.0.2.10",
    "ipv6": lambda a, p: "2001:db8::10",
}


def answer_for_schema(
    schema: Mapping[str, Any],
    text: str,
    *,
    break_rate: float = 0.0,
    break_key: str = "",
    params: Mapping[str, Any] | None = None,
    quote_break_rate: float = 0.0,
    shared: SharedPrompt | None = None,
) -> SchemaAnswer:
    """A value valid against ``schema``, chosen from the evidence in ``text``.

    ``params`` (the whole request, optional) lets the answer use what surrounds the record:
    label definitions in the system prompt, the template words and answers of few-shot turns.
    With ``break_rate`` > 0 a share of the constraints that only live in descriptions (as
    ``transform_schema`` leaves them) is violated, as a real model sometimes does; with
    ``quote_break_rate`` > 0 that share of verbatim-quote fields paraphrase instead of quoting.
    """
    cues: PromptCues | None = None
    enums = None
    if shared is not None and params is not None:
        # The shared part of the prompt was read once for the batch (same result as reading it here).
        if shared.cues is not None:
            cues = shared.cues.cues(params["messages"][-1].get("content"))
        enums = shared.schema_enums(schema)
    if cues is None and params is not None:
        cues = prompt_cues(params)
    answerer = _Answerer(
        schema,
        text,
        break_rate=break_rate,
        break_key=break_key,
        cues=cues,
        quote_break_rate=quote_break_rate,
        enums=enums,
        shared=shared,
    )
    value = answerer.gen(schema, (), 0)
    return SchemaAnswer(
        value=value,
        enum_paths=answerer.enum_paths,
        broken_hints=answerer.broken,
        invented_quotes=answerer.invented_quotes,
    )


# --------------------------------------------------------------------------------------------
# Broken answers (fault injection)
# --------------------------------------------------------------------------------------------


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, str):
        return 42
    if isinstance(value, (int, float)):
        return "many"
    if isinstance(value, list):
        return "not-a-list"
    if isinstance(value, dict):
        return "not-an-object"
    return 0


def _set_path(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    node = value
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return value


def break_answer(
    value: Any,
    schema: Mapping[str, Any],
    enum_paths: Sequence[tuple[tuple[Any, ...], tuple[Any, ...]]],
    kind: str,
    key: str,
) -> tuple[Any, str]:
    """Make ``value`` invalid in the way ``kind`` names; returns the value and the kind applied.

    A kind that cannot apply to this schema (no enum for ``bad_enum``, nothing required for
    ``missing_field``) falls back to ``wrong_type`` so the answer is still reliably invalid.
    """
    if kind == "bad_enum" and enum_paths:
        path, allowed = enum_paths[stable_hash(key, "bad_enum") % len(enum_paths)]
        bad = "unlisted_label"
        while bad in allowed:
            bad += "_x"
        return _set_path(value, path, bad), "bad_enum"
    if kind == "missing_field" and isinstance(value, dict):
        resolved = _Answerer(schema, "").resolve(schema)
        required = [r for r in (resolved.get("required") or []) if r in value]
        if required:
            del value[required[stable_hash(key, "missing_field") % len(required)]]
            return value, "missing_field"
    if isinstance(value, dict) and value:
        resolved = _Answerer(schema, "").resolve(schema)
        keys = [r for r in (resolved.get("required") or []) if r in value] or list(value)
        target = keys[stable_hash(key, "wrong_type") % len(keys)]
        value[target] = _wrong_type(value[target])
        return value, "wrong_type"
    return _wrong_type(value), "wrong_type"


# --------------------------------------------------------------------------------------------
# Request validation (done "asynchronously" for batches: bad params become errored results)
# --------------------------------------------------------------------------------------------


def output_schema(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The structured-output schema of a request (``output_config.format``, or the older ``output_format``)."""
    config = params.get("output_config")
    candidates = (config.get("format") if isinstance(config, Mapping) else None, params.get("output_format"))
    for fmt in candidates:
        if (
            isinstance(fmt, Mapping)
            and fmt.get("type") == "json_schema"
            and isinstance(fmt.get("schema"), dict)
        ):
            return fmt["schema"]
    return None


def forced_tool(params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tool the request forces (``tool_choice`` type ``tool``, or ``any`` = the first tool)."""
    choice = params.get("tool_choice")
    tools = params.get("tools")
    if not isinstance(choice, Mapping) or not isinstance(tools, list):
        return None
    custom = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if choice.get("type") == "tool":
        return next((t for t in custom if t["name"] == choice.get("name")), None)
    if choice.get("type") == "any" and custom:
        return custom[0]
    return None


def validate_params(params: Any, *, require_max_tokens: bool = True) -> str | None:
    """The API's complaint about a Messages request (any model accepted), or None.

    Kept for callers that want the message only; the emulator itself uses
    ``validation.validate_request``, which also knows models, API versions and betas.
    """
    from airflow_provider_fable.emulator.validation import validate_request

    problem = validate_request(
        params, known_models=None, endpoint="batch" if require_max_tokens else "count_tokens"
    )
    return None if problem is None else problem.message


# --------------------------------------------------------------------------------------------
# Token accounting
# --------------------------------------------------------------------------------------------

_IMAGE_TOKENS = 1600


def estimate_tokens(chars: int) -> int:
    """~1 token per 4 characters, like the rule of thumb for English text."""
    return (chars + 3) // 4


def _canonical(block: Any) -> str:
    if isinstance(block, Mapping):
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return json.dumps(block, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)


def _block_tokens(block: Any) -> int:
    if isinstance(block, str):
        return estimate_tokens(len(block))
    if isinstance(block, Mapping):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            return estimate_tokens(len(block["text"]))
        source = block.get("source")
        if kind in ("image", "document") and isinstance(source, Mapping) and source.get("type") == "base64":
            return _IMAGE_TOKENS
    return estimate_tokens(len(_canonical(block)))


class PromptAccounting(NamedTuple):
    """Input-token view of one request: its total and its cacheable prefix, if any (a named
    tuple: the end of a batch builds one per request, several times faster than a frozen
    dataclass)."""

    total_tokens: int
    cache_prefix_tokens: int = 0
    cache_key: str | None = None
    cache_ttl_seconds: float = 300.0


def _cache_ttl(cache_control: Any) -> float:
    if isinstance(cache_control, Mapping) and cache_control.get("ttl") == "1h":
        return 3600.0
    return 300.0


class _Tally:
    """Running input-token count and prompt-cache prefix hash of a request, block by block."""

    __slots__ = ("hasher", "prefix_key", "prefix_tokens", "total", "ttl")

    def __init__(self, model: str) -> None:
        self.hasher = hashlib.sha256(model.encode())
        self.total = 0
        self.prefix_tokens = 0
        self.prefix_key: str | None = None
        self.ttl = 300.0

    def copy(self) -> _Tally:
        other = _Tally.__new__(_Tally)
        other.hasher = self.hasher.copy()
        other.total, other.prefix_tokens, other.prefix_key, other.ttl = (
            self.total, self.prefix_tokens, self.prefix_key, self.ttl,
        )  # fmt: skip
        return other

    def add(self, block: Any) -> None:
        self.total += _block_tokens(block)
        self.hasher.update(_canonical(block).encode("utf-8", "surrogatepass"))
        self.hasher.update(b"\x1e")
        if isinstance(block, Mapping) and block.get("cache_control"):
            self.prefix_tokens, self.prefix_key, self.ttl = (
                self.total,
                self.hasher.copy().hexdigest(),
                _cache_ttl(block["cache_control"]),
            )

    def add_message(self, message: Any) -> None:
        if not isinstance(message, Mapping):
            return
        self.hasher.update(str(message.get("role")).encode())
        content = message.get("content")
        if isinstance(content, list):
            for block in content:
                self.add(block)
        elif content is not None:
            self.add(content)


def _tally_prompt(params: Mapping[str, Any], messages: Iterable[Any]) -> _Tally:
    """The tally after tools, system and ``messages``, in the order the API caches them."""
    tally = _Tally(str(params.get("model", "")))
    for tool in params.get("tools") or []:
        tally.add(tool)
    system = params.get("system")
    if isinstance(system, str) and system:
        tally.add(system)
    elif isinstance(system, list):
        for block in system:
            tally.add(block)
    for message in messages:
        tally.add_message(message)
    return tally


def _schema_tokens(params: Mapping[str, Any]) -> int:
    schema = output_schema(params)
    return 0 if schema is None else estimate_tokens(len(_canonical(schema)))


def _uncached_tokens(message: Any) -> int | None:
    """The tokens ``_Tally.add_message`` adds for ``message`` when none of its blocks carries
    ``cache_control`` (then the tally's prefix is left as it was), else None."""
    content = message.get("content") if isinstance(message, Mapping) else None
    if type(content) is str:
        return estimate_tokens(len(content))
    if content is None:
        return 0
    if type(content) is not list:
        return None  # another type: counted by its JSON, through the tally
    total = 0
    for block in content:
        if isinstance(block, Mapping) and block.get("cache_control"):
            return None
        total += _block_tokens(block)
    return total


def account_prompt(params: Mapping[str, Any]) -> PromptAccounting:
    """Count input tokens and find the prompt-cache prefix.

    The API caches in the order tools -> system -> messages, up to and including the last
    block that carries ``cache_control``; the prefix is identified by a hash of everything
    before that point (so a different system prompt or model never shares a cache entry).
    Requests of one batch share everything but their last message: that part is tallied once
    (``SharedPrompt``) and each request adds only its own message to a copy.
    """
    shared = shared_prompt(params)
    if shared is not None:
        last = params["messages"][-1]
        tokens = _uncached_tokens(last)
        if tokens is not None:
            # No cache breakpoint in the record's message: the prefix is the shared one and
            # only the total grows (the hash of the message would never be read).
            base = shared.tally
            return PromptAccounting(
                base.total + tokens + shared.schema_tokens, base.prefix_tokens, base.prefix_key, base.ttl
            )
        tally = shared.tally.copy()
        tally.add_message(last)
        total = tally.total + shared.schema_tokens
    else:
        tally = _tally_prompt(params, params.get("messages") or [])
        total = tally.total + _schema_tokens(params)
    return PromptAccounting(total, tally.prefix_tokens, tally.prefix_key, tally.ttl)


class SharedPrompt:
    """What every request of one prompt shape shares: all params but the last message.

    A batch is up to 100,000 requests built from one template: same model, system prompt,
    few-shot turns, schema and tools, a different record in the last user turn. Everything
    derived from the shared part (the schema and its enums, the few-shot cues, the token
    tally of the prefix, the validation verdict) is computed once here, from the first
    request seen, and every later request only does the work of its own record. The result
    is the same as deriving it all again per request: the key is the shared part's JSON.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        messages = params["messages"]
        #: the first request seen; its objects stand for every request of this shape
        self.params = params
        self.tool = forced_tool(params)
        self.schema = output_schema(params)
        tool_schema = self.tool.get("input_schema") if self.tool is not None else None
        self.tool_schema = tool_schema if isinstance(tool_schema, Mapping) else None
        last = messages[-1]
        self.cues = SharedCues(params) if isinstance(last, Mapping) and last.get("role") == "user" else None
        self.tally = _tally_prompt(params, messages[:-1])
        self.schema_tokens = _schema_tokens(params)
        self._enums: dict[int, tuple[Any, tuple[str, ...]]] = {}
        #: ``_Answerer.resolve`` memo: id(node) -> (node, resolved), for nodes kept alive here
        self.resolved: dict[int, tuple[Any, Any]] = {}
        self.stable_ids: set[int] = set()
        #: ``_Answerer._object_plan`` memo: id(object schema) -> (schema, (late fields, conditions))
        self.object_plans: dict[int, tuple[Any, Any]] = {}
        #: ``_Answerer.gen`` memo: id(schema node) -> (node, how it is filled), for nodes kept alive here
        self.gen_plans: dict[int, tuple[Any, ...]] = {}
        self._roots = [r for r in (self.schema, self.tool_schema) if isinstance(r, Mapping)]
        stack: list[Any] = list(self._roots)
        while stack and len(self.stable_ids) < 100_000:
            node = stack.pop()
            if isinstance(node, Mapping):
                self.stable_ids.add(id(node))
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        #: validation verdicts on the shared part, by (endpoint, version, betas, models)
        self.problems: dict[Any, Any] = {}

    def schema_enums(self, root: Any) -> tuple[str, ...]:
        """``_schema_enums`` of one of this prompt's schemas (kept alive here, so ids are stable)."""
        hit = self._enums.get(id(root))
        if hit is not None and hit[0] is root:
            return hit[1]
        enums = _schema_enums(root)
        if self.owns(root):
            self._enums[id(root)] = (root, enums)
        return enums

    def owns(self, root: Any) -> bool:
        """Whether ``root`` is one of this prompt's own schemas (the structured output or the tool's)."""
        for own in self._roots:
            if root is own:
                return True
        return False


_SHARED_MAX = 64
_shared_prompts: OrderedDict[bytes, SharedPrompt] = OrderedDict()
_shared_lock = threading.Lock()
#: The last params looked up and their plan: one request asks three times (validation,
#: accounting, answer); holding the params object makes the identity check safe.
_shared_last: tuple[Any, SharedPrompt | None] = (None, None)


#: The shared part of the last request keyed by JSON, as the objects themselves (keys, values
#: but ``messages``, the messages before the last, the last one's role) and its plan. A batch's
#: create body is parsed with equal values made one object (``state._share_equal_values``), so
#: the next request of the same shape holds the very same objects: recognised by identity, with
#: no JSON key to build (~10 us a request). Holding the objects keeps their identities unique.
_shared_same: tuple[tuple[Any, ...], SharedPrompt | None] = ((), None)


_SCALARS = (str, int)


def _same_shared_part(params: Mapping[str, Any], messages: list[Any], parts: tuple[Any, ...]) -> bool:
    """Whether ``params`` has the shared part ``parts`` (same keys in order, same objects)."""
    if len(parts) != 2 * len(params) + len(messages):
        return False
    i = 0
    for key, value in params.items():
        if key != parts[i]:
            return False
        if key != "messages":
            part = parts[i + 1]
            # Short strings and integers are not made one object by the create ("claude-fable-5",
            # 1024): equal ones of the same exact type have the same JSON (floats may not: -0.0).
            if value is not part and not (type(value) is type(part) in _SCALARS and value == part):
                return False
        i += 2
    for message in messages[:-1]:
        if message is not parts[i]:
            return False
        i += 1
    return messages[-1].get("role") == parts[i]


def shared_prompt(params: Mapping[str, Any]) -> SharedPrompt | None:
    """The ``SharedPrompt`` of a request (cached by the JSON of its shared part), or None when
    the request has no last message to set apart or cannot be keyed (then it is handled whole)."""
    global _shared_last, _shared_same
    last = _shared_last
    if last[0] is params:
        return last[1]
    messages = params.get("messages") if isinstance(params, Mapping) else None
    plan: SharedPrompt | None = None
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping):
        same = _shared_same
        if same[1] is not None and _same_shared_part(params, messages, same[0]):
            _shared_last = (params, same[1])
            return same[1]
        try:
            key = orjson.dumps(
                [[k, v] for k, v in params.items() if k != "messages"]
                + [messages[:-1], messages[-1].get("role")]
            )
        except (TypeError, orjson.JSONEncodeError):
            key = None
        if key is not None:
            with _shared_lock:
                plan = _shared_prompts.get(key)
                if plan is not None:
                    _shared_prompts.move_to_end(key)
            if plan is None:
                plan = SharedPrompt(params)
                with _shared_lock:
                    _shared_prompts[key] = plan
                    while len(_shared_prompts) > _SHARED_MAX:
                        _shared_prompts.popitem(last=False)
            parts: list[Any] = []
            for k, v in params.items():
                parts += (k, v if k != "messages" else None)
            _shared_same = ((*parts, *messages[:-1], messages[-1].get("role")), plan)
    _shared_last = (params, plan)
    return plan


def usage_dict(
    *,
    input_tokens: int,
    output_tokens: int,
    cache_creation: int = 0,
    cache_read: int = 0,
    cache_ttl_seconds: float = 300.0,
    service_tier: str = "batch",
) -> dict[str, Any]:
    """The ``usage`` object of a Message."""
    long_ttl = cache_ttl_seconds >= 3600
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": 0 if long_ttl else cache_creation,
            "ephemeral_1h_input_tokens": cache_creation if long_ttl else 0,
        },
        "server_tool_use": None,
        "service_tier": service_tier,
    }


# --------------------------------------------------------------------------------------------
# Answers and messages
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """Content of an assistant reply, before usage is attached."""

    content: list[dict[str, Any]]
    stop_reason: str
    output_tokens: int
    invalid_kind: str | None = None
    broken_hints: int = 0
    invented_quotes: int = 0


#: ``json.dumps(value, ensure_ascii=False)`` without building an encoder per call (same bytes).
_REPLY_JSON = json.JSONEncoder(ensure_ascii=False)
_JSON_STRING = json.encoder.encode_basestring  # what that encoder writes a str as


def _reply_json(value: Any) -> str:
    """``_REPLY_JSON.encode(value)``: a flat object of strings, booleans, integers and nulls (the
    commonest answer) is written here, the same bytes without the encoder's call layers."""
    if type(value) is dict and value:
        parts = []
        for key, item in value.items():
            kind = type(item)
            if type(key) is not str:
                break
            if kind is str:
                text = _JSON_STRING(item)
            elif kind is bool:
                text = "true" if item else "false"
            elif kind is int:
                text = int.__repr__(item)
            elif item is None:
                text = "null"
            else:
                break
            parts.append(f"{_JSON_STRING(key)}: {text}")
        else:
            return "{" + ", ".join(parts) + "}"
    return _REPLY_JSON.encode(value)


def _broken_text(json_text: str) -> str:
    return "Here is the JSON you asked for:\n" + json_text[: max(1, len(json_text) // 2)]


def _thinking_block(params: Mapping[str, Any], text: str, id_seed: str) -> tuple[dict[str, Any], int] | None:
    """The thinking block a request with ``thinking`` enabled gets first, and its token cost.

    Thinking tokens are billed as output tokens even when the display is ``omitted`` (the
    block then carries only the signature), so usage stays honest about what was paid for.
    """
    thinking = params.get("thinking")
    if (
        thinking is None
        or not isinstance(thinking, Mapping)
        or thinking.get("type") not in ("enabled", "adaptive")
    ):
        return None
    sentences = content_sentences(text) or [text.strip() or "the request"]
    reasoning = (
        f"The request is about: {trim_to(sentences[0], 200)} I check which parts of the record "
        "are evidence for each field before answering, and keep to the requested format."
    )
    tokens = estimate_tokens(len(reasoning)) + 40
    budget = thinking.get("budget_tokens")
    if isinstance(budget, int) and not isinstance(budget, bool):
        tokens = min(tokens, budget)
    omitted = thinking.get("display") == "omitted"
    block = {
        "type": "thinking",
        "thinking": "" if omitted else reasoning,
        "signature": "Eq" + stable_token(86, id_seed, "thinking-signature"),
    }
    return block, tokens


def build_answer(
    params: Mapping[str, Any],
    *,
    invalid_kind: str | None = None,
    id_seed: str = "",
    fault_key: str | None = None,
    description_break_rate: float = 0.0,
    invented_quote_rate: float = 0.0,
) -> Answer:
    """The reply the emulated model gives to ``params`` (already validated).

    ``invalid_kind`` (a fault) breaks a structured or tool answer on purpose; free-text
    requests have no schema to violate and are answered normally. ``id_seed`` derives the
    tool-use id; ``fault_key`` (default: ``id_seed``) picks which field a fault breaks, and
    is kept free of the batch id so a request breaks the same way in every batch.
    ``description_break_rate`` is the share of description-only constraints the answer ignores,
    ``invented_quote_rate`` the share of verbatim-quote fields that paraphrase instead.
    A request with ``thinking`` gets a thinking block first, counted in the output tokens.
    """
    fault_key = id_seed if fault_key is None else fault_key
    text = last_user_text(params)
    max_tokens = params.get("max_tokens")
    thought = _thinking_block(params, text, id_seed)
    prefix: list[dict[str, Any]] = [thought[0]] if thought else []
    thinking_tokens = thought[1] if thought else 0
    break_rate = description_break_rate if invalid_kind is None else 0.0
    quote_rate = invented_quote_rate if invalid_kind is None else 0.0
    shared = shared_prompt(params)
    tool = forced_tool(params) if shared is None else shared.tool
    if tool is not None:
        schema = (
            tool.get("input_schema") if isinstance(tool.get("input_schema"), Mapping) else {"type": "object"}
        )
        generated = answer_for_schema(
            schema, text, break_rate=break_rate, break_key=fault_key, params=params,
            quote_break_rate=quote_rate, shared=shared,
        )  # fmt: skip
        value: Any = generated.value if isinstance(generated.value, dict) else {}
        applied = None
        if invalid_kind is not None and invalid_kind != "non_json":
            value, applied = break_answer(value, schema, generated.enum_paths, invalid_kind, fault_key)
        if invalid_kind == "non_json" or not isinstance(value, dict):
            reply = _broken_text(_reply_json(value))
            return Answer(
                [*prefix, {"type": "text", "text": reply}],
                "end_turn",
                thinking_tokens + estimate_tokens(len(reply)),
                "non_json",
            )
        block = {
            "type": "tool_use",
            "id": "toolu_01" + stable_token(22, id_seed, "tool_use"),
            "name": tool["name"],
            "input": value,
        }
        tokens = thinking_tokens + 8 + estimate_tokens(len(_canonical(value)))
        return Answer(
            [*prefix, block], "tool_use", tokens, applied, generated.broken_hints, generated.invented_quotes
        )

    schema = output_schema(params) if shared is None else shared.schema
    applied = None
    broken_hints = invented = 0
    if schema is not None:
        generated = answer_for_schema(
            schema, text, break_rate=break_rate, break_key=fault_key, params=params,
            quote_break_rate=quote_rate, shared=shared,
        )  # fmt: skip
        value = generated.value
        broken_hints = generated.broken_hints
        invented = generated.invented_quotes
        if invalid_kind == "non_json":
            reply, applied = _broken_text(_reply_json(value)), "non_json"
        else:
            if invalid_kind is not None:
                value, applied = break_answer(value, schema, generated.enum_paths, invalid_kind, fault_key)
            reply = _reply_json(value)
    else:
        reply = free_text_answer(text)
    stop_reason = "end_turn"
    output_tokens = max(1, estimate_tokens(len(reply)))
    room = max_tokens - thinking_tokens if isinstance(max_tokens, int) else None
    if room is not None and output_tokens > room:
        # Like the real API: the reply is cut at max_tokens (structured JSON included).
        room = max(room, 0)
        reply, output_tokens, stop_reason = reply[: room * 4], room, "max_tokens"
    content = [*prefix, {"type": "text", "text": reply}] if reply else prefix
    return Answer(content, stop_reason, thinking_tokens + output_tokens, applied, broken_hints, invented)


def _compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def result_line(obj: dict[str, Any], *, fast: bool = False) -> bytes:
    """One results-file line: compact JSON, UTF-8 (lone surrogates passed through), newline.

    ``fast``: the object holds only strings, integers, None and booleans (no floats, whose
    spelling differs between encoders), so orjson writes the same bytes as ``json``, several
    times faster; it refuses lone surrogates, which then go the ``json`` way.
    """
    if fast:
        try:
            return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            pass
    return _compact(obj).encode("utf-8", "surrogatepass") + b"\n"


@dataclass(slots=True)
class AnswerJob:
    """A succeeded batch request whose result line is still to be written.

    Everything that depends on the emulator's state (the outcome, the broken-answer kind, the
    prompt cache's verdict in ``usage``) is decided when the batch ends; what is left is a pure
    function of this job, so it can run later, in a background thread or a worker process.
    The message id and the tool-use id seed derive from the batch id and the custom_id where
    the line is written: hashing them is work the end of a batch no longer does in order.
    """

    custom_id: str
    params: dict[str, Any]
    batch_id: str
    invalid_kind: str | None
    #: ``<seed>:<fault key>``: picks broken hints and invented quotes
    fault_key: str
    #: ``usage_dict`` arguments but the output tokens: (input_tokens, cache_creation,
    #: cache_read, cache_ttl_seconds, service_tier)
    usage: tuple[int, int, int, float, str]
    #: the request's ``SharedPrompt`` when known: lets ``pack_jobs`` send its shape once
    shared: SharedPrompt | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def id_seed(self) -> str:
        """Seeds the tool-use id and the thinking signature (``<batch id>:<custom_id>``)."""
        return f"{self.batch_id}:{self.custom_id}"

    @property
    def message_id(self) -> str:
        return "msg_01" + stable_token(22, self.batch_id, self.custom_id)


#: What answering a job counted: (broken-answer kind applied, broken hints, invented quotes).
JobCounts = tuple[str | None, int, int]


def answer_lines(
    jobs: Sequence[bytes | AnswerJob], description_break_rate: float, invented_quote_rate: float
) -> tuple[list[bytes], list[JobCounts]]:
    """The result lines of ``jobs`` in order (lines already written pass through) and, per
    answered job, what the stats must count. Runs in the emulator or in a worker process."""
    lines: list[bytes] = []
    counts: list[JobCounts] = []
    for job in jobs:
        if not isinstance(job, AnswerJob):
            lines.append(job)
            continue
        answer = build_answer(
            job.params,
            invalid_kind=job.invalid_kind,
            id_seed=job.id_seed,
            fault_key=job.fault_key,
            description_break_rate=description_break_rate,
            invented_quote_rate=invented_quote_rate,
        )
        input_tokens, creation, read, ttl, tier = job.usage
        usage = usage_dict(
            input_tokens=input_tokens, output_tokens=answer.output_tokens, cache_creation=creation,
            cache_read=read, cache_ttl_seconds=ttl, service_tier=tier,
        )  # fmt: skip
        message_id = job.message_id
        # Text blocks carry the answer as a string: no float outside a tool_use input.
        fast = all(block.get("type") != "tool_use" for block in answer.content)
        line = _fast_line(job, message_id, answer, usage) if fast else None
        if line is None:
            message = build_message(job.params, answer, usage, message_id)
            obj = {"custom_id": job.custom_id, "result": {"type": "succeeded", "message": message}}
            line = result_line(obj, fast=fast)
        lines.append(line)
        counts.append((answer.invalid_kind, answer.broken_hints, answer.invented_quotes))
    return lines, counts


#: A chunk of jobs as sent to a worker process (``pack_jobs``): the prompt shapes, then one
#: row per job: a ready line, or (shape index, custom_id, last message, invalid kind, fault
#: key, usage), with the chunk's batch id once.
PackedJobs = tuple[str, list[tuple[tuple[str, ...], tuple[Any, ...], list[Any]]], list[Any]]


def pack_jobs(jobs: Sequence[bytes | AnswerJob]) -> PackedJobs:
    """``jobs`` in the form a worker process is sent: each prompt shape once, then per job
    only what is its own (the record's message, its ids and usage).

    Pickling the jobs as they are repeats, per request, the params dict, its messages list
    and the job's attribute dict, and reading them back costs a worker ~6 us a request. A job
    whose ``shared`` prompt is known (the end of a batch looked it up) is sent as its shape's
    index: the shared part is the same JSON for every request of a ``SharedPrompt``, so the
    params the worker rebuilds from the shape's first request are equal to the job's own,
    keys in the job's order (``unpack_jobs``).
    """
    shapes: list[tuple[tuple[str, ...], tuple[Any, ...], list[Any]]] = []
    index: dict[tuple[int, tuple[str, ...]], int] = {}
    rows: list[Any] = []
    batch_id = ""
    for job in jobs:
        if not isinstance(job, AnswerJob):
            rows.append(job)
            continue
        shared = job.shared
        if shared is None or (batch_id and job.batch_id != batch_id):
            rows.append(dataclasses.replace(job, shared=None))  # sent whole
            continue
        batch_id = job.batch_id
        keys = tuple(job.params)
        shape = index.get((id(shared), keys))
        if shape is None:
            first = shared.params
            values = tuple(None if k == "messages" else first[k] for k in keys)
            shape = index[(id(shared), keys)] = len(shapes)
            shapes.append((keys, values, first["messages"][:-1]))
        last = job.params["messages"][-1]
        rows.append((shape, job.custom_id, last, job.invalid_kind, job.fault_key, job.usage))
    return batch_id, shapes, rows


def unpack_jobs(packed: PackedJobs) -> list[bytes | AnswerJob]:
    """The jobs ``pack_jobs`` packed (params equal to the originals, keys in the same order)."""
    batch_id, shapes, rows = packed
    jobs: list[bytes | AnswerJob] = []
    for row in rows:
        if type(row) is not tuple:
            jobs.append(row)
            continue
        shape, custom_id, last, invalid_kind, fault_key, usage = row
        keys, values, prefix = shapes[shape]
        params = dict(zip(keys, values, strict=True))
        params["messages"] = [*prefix, last]
        jobs.append(AnswerJob(custom_id, params, batch_id, invalid_kind, fault_key, usage))
    return jobs


def worker_ready() -> None:
    """Submitted to the answer workers to start them early (unpickling it imports this module)."""


def answer_packed(
    packed: PackedJobs, description_break_rate: float, invented_quote_rate: float
) -> tuple[list[bytes], list[JobCounts]]:
    """``answer_lines`` of packed jobs: what a worker process runs."""
    return answer_lines(unpack_jobs(packed), description_break_rate, invented_quote_rate)


_LINE_HEAD = b'{"custom_id":'
_LINE_ID = b',"result":{"type":"succeeded","message":{"id":'
_LINE_MODEL = b',"type":"message","role":"assistant","model":'
_LINE_CONTENT = b',"content":'
_LINE_STOP = b',"stop_reason":'
_LINE_USAGE = b',"stop_sequence":null,"usage":'
_LINE_TAIL = b"}}}\n"


def _fast_line(job: AnswerJob, message_id: str, answer: Answer, usage: dict[str, Any]) -> bytes | None:
    """The result line of a succeeded job whose content has no tool_use block, from its
    pieces: the same bytes as ``result_line`` of the whole object with ``fast`` (orjson, compact,
    the keys in ``build_message``'s order) without building the envelope dicts. None (the
    caller takes the general way) when a piece is not a plain string or orjson refuses one."""
    model = job.params.get("model")
    if type(job.custom_id) is not str or type(model) is not str:
        return None
    dumps = orjson.dumps
    try:
        return b"".join(
            (
                _LINE_HEAD,
                dumps(job.custom_id),
                _LINE_ID,
                dumps(message_id),
                _LINE_MODEL,
                dumps(model),
                _LINE_CONTENT,
                dumps(answer.content),
                _LINE_STOP,
                dumps(answer.stop_reason),
                _LINE_USAGE,
                dumps(usage),
                _LINE_TAIL,
            )
        )
    except orjson.JSONEncodeError:
        return None


def build_message(
    params: Mapping[str, Any], answer: Answer, usage: dict[str, Any], message_id: str
) -> dict[str, Any]:
    """A Messages API ``Message`` object."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": params.get("model"),
        "content": answer.content,
        "stop_reason": answer.stop_reason,
        "stop_sequence": None,
        "usage": usage,
    }
