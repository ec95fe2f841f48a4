"""core.chunking: sections on the text's own boundaries under a token bound, deterministic ids,
and combine inputs only for records whose every section is answered."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

import pytest

from airflow_provider_fable.core import chunking as ch
from airflow_provider_fable.core.errors import RecordError
from airflow_provider_fable.core.ids import CUSTOM_ID_RE, encode

WORDS = "the policy applies to vendors with access to customer data and backups across all teams".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _document(seed: int, sections: int = 8) -> str:
    rng = random.Random(seed)
    parts = [f"Title {seed}"]
    for s in range(sections):
        parts.append(f"## Heading {s}")
        for _ in range(rng.randint(1, 5)):
            parts.append(" ".join(_sentence(rng, rng.randint(4, 25)) for _ in range(rng.randint(1, 8))))
    return "\n\n".join(parts)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _bundled_documents() -> list[dict]:
    path = resources.files("airflow_provider_fable.example_data") / "documents.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- estimate


def test_estimate_counts_ascii_at_the_ratio_and_other_characters_as_one_token_each():
    assert ch.estimate_tokens("") == 0
    assert ch.estimate_tokens("abcd") == 1
    assert ch.estimate_tokens("abcde") == 2  # rounded up: an estimate for a bound errs high
    assert ch.estimate_tokens("abcdefgh", chars_per_token=2) == 4
    assert ch.estimate_tokens("契約書") == 3  # CJK: a token a character, not bytes/4 (= 2)
    assert ch.estimate_tokens("café") == 2  # 3 ASCII / 4 + 1
    with pytest.raises(ValueError, match="chars_per_token"):
        ch.estimate_tokens("x", chars_per_token=0)


# --------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("bound", [20, 60, 200, 700])
@pytest.mark.parametrize("seed", range(6))
def test_every_section_is_within_the_bound_and_nothing_is_lost_or_reordered(seed, bound):
    text = _document(seed)
    sections = ch.split_text(text, bound)
    assert sections
    assert all(ch.estimate_tokens(t) <= bound for _, t in sections)
    # No overlap: the sections are the text, in order, word for word.
    assert _words(" ".join(t for _, t in sections)) == _words(text)


def test_sections_break_at_headings_and_blank_lines_not_mid_paragraph():
    paras = [f"Paragraph {i} says one thing. It says it twice." for i in range(12)]
    text = "# Intro\n\n" + "\n\n".join(paras[:6]) + "\n\n## Details\n\n" + "\n\n".join(paras[6:])
    sections = ch.split_text(text, 40)
    for _, body in sections:
        for block in body.split("\n\n"):  # every block of a section is a whole paragraph or heading
            assert block in paras or block in ("# Intro", "## Details")
    # A heading is never the last block of a section (it goes with the text it introduces) ...
    assert all(not body.split("\n\n")[-1].startswith("#") for _, body in sections)
    # ... and opens a section of its own once the current one is half full.
    assert any(body.startswith("## Details") for _, body in sections)
    assert [h for h, _ in sections][0] == "Intro"
    assert sections[-1][0] == "Details"


def test_a_heading_inside_a_fenced_code_block_is_not_a_boundary():
    code = "```python\n# not a heading\nx = 1\n\n# still code\ny = 2\n```"
    text = "## Real heading\n\nSome text here.\n\n" + code
    sections = ch.split_text(text, 1000)
    assert sections == [("Real heading", text)]
    blocks = ch._Splitter(1000, 4.0).blocks(text)
    assert [b.heading for b in blocks] == [True, False, False]
    assert blocks[2].text == code  # the blank line inside the fence does not split it


def test_loose_headings_numbered_and_capitals_but_not_sentences():
    splitter = ch._Splitter(1000, 4.0)
    text = "3. Fees and payment\n\nPAYMENT TERMS\n\n1. Pay the invoice.\n\nPlain paragraph"
    assert [(b.text, b.heading) for b in splitter.blocks(text)] == [
        ("3. Fees and payment", True),
        ("PAYMENT TERMS", True),
        ("1. Pay the invoice.", False),  # ends like a sentence: a list item, not a heading
        ("Plain paragraph", False),
    ]


def test_one_huge_paragraph_is_cut_between_sentences():
    rng = random.Random(7)
    sentences = [_sentence(rng, rng.randint(5, 30)) for _ in range(400)]
    text = " ".join(sentences)
    sections = ch.split_text(text, 100)
    assert len(sections) > 10
    assert all(ch.estimate_tokens(t) <= 100 for _, t in sections)
    for _, body in sections:  # each section starts and ends on a sentence boundary
        assert body[0].isupper() and body.endswith(".")
    assert " ".join(t for _, t in sections) == text


def test_a_sentence_longer_than_the_bound_is_cut_between_words_then_hard():
    words = " ".join(f"word{i}" for i in range(500))  # no sentence end at all
    sections = ch.split_text(words, 30)
    assert all(ch.estimate_tokens(t) <= 30 for _, t in sections)
    assert " ".join(t for _, t in sections) == words  # cut between words: every word whole
    blob = "x" * 1000  # no boundary of any kind
    sections = ch.split_text(blob, 30)
    assert all(ch.estimate_tokens(t) <= 30 for _, t in sections)
    assert "".join(t for _, t in sections) == blob


def test_unicode_cjk_accents_and_emoji_stay_whole_and_within_the_bound():
    cjk = "本契約は当事者間の合意を定める。支払いは三十日以内に行う。違反した場合は契約を解除できる！" * 30
    sections = ch.split_text(cjk, 50)
    assert all(ch.estimate_tokens(t) <= 50 for _, t in sections)
    assert "".join(t for _, t in sections) == cjk  # cut after 。/！, no space invented
    assert all(t.endswith(("。", "！")) for _, t in sections)
    # A run without boundaries of combining accents and ZWJ emoji: never cut inside a grapheme.
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    run = ("e\u0301" + family + "\u2764\ufe0f") * 60
    sections = ch.split_text(run, 7)
    assert "".join(t for _, t in sections) == run
    for _, t in sections:
        first = t[0]
        assert first in ("e", "\U0001f468", "\u2764"), repr(t[:3])  # starts a grapheme
        assert ch.estimate_tokens(t) <= 7


def test_same_text_same_sections_and_whitespace_only_text_has_none():
    text = _document(3)
    assert ch.split_text(text, 120) == ch.split_text(text, 120)
    assert ch.split_text(text.replace("\n", "\r\n"), 120) == ch.split_text(text, 120)
    assert ch.split_text("", 100) == []
    assert ch.split_text(" \n\n\t\n", 100) == []


def test_overlap_repeats_the_last_paragraph_and_stays_within_the_bound():
    paras = [f"Point {i} is stated here in full. It has two sentences." for i in range(10)]
    text = "\n\n".join(paras)
    plain = ch.split_text(text, 45)
    over = ch.split_text(text, 45, overlap_paragraphs=1)
    assert all(ch.estimate_tokens(t) <= 45 for _, t in over)
    assert len(over) >= len(plain)
    for (_, a), (_, b) in zip(over, over[1:], strict=False):
        assert b.split("\n\n")[0] == a.split("\n\n")[-1]


@pytest.mark.parametrize("bound", [0, -3, 1.5, True])
def test_a_bad_bound_is_an_error_naming_it(bound):
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        ch.split_text("text", bound)


def test_the_bundled_corpus_splits_within_the_bound():
    docs = _bundled_documents()
    plan = ch.chunk_records(docs, id_field="doc_id", text_field="body", max_tokens=500)
    assert plan.chunked and plan.direct
    assert all(ch.estimate_tokens(s["body"]) <= 500 for s in plan.sections)
    assert {len(plan.direct) + len(plan.chunked)} == {len(docs)}
    by_id = {d["doc_id"]: d for d in docs}
    for rid in plan.chunked:  # every word of the document, in order, in its sections
        parts = [s["body"] for s in plan.sections if s["parent_id"] == rid]
        assert _words(" ".join(parts)) == _words(by_id[rid]["body"])


# --------------------------------------------------------------------------- ids and records


def test_section_ids_carry_parent_index_count_and_a_digest_of_the_text():
    sid = ch.section_id("DOC-7", 3, 12, "some text")
    assert re.fullmatch(r"DOC-7__s03of12-[0-9a-f]{8}", sid)
    assert ch.parse_section_id(sid) == ("DOC-7", 3, 12)
    assert ch.section_id("DOC-7", 3, 12, "other text") != sid
    assert ch.section_id(42, 1, 1) == "42__s1of1"
    assert ch.parse_section_id("DOC-7") is None
    assert ch.parse_section_id("a__s5of3") is None
    with pytest.raises(ValueError):
        ch.section_id("DOC-7", 0, 3)


def test_section_ids_fit_the_custom_id_rule_through_the_codec():
    short = ch.section_id("DOC-0021", 2, 7, "x")
    assert ch.section_custom_id(short) == short  # sent as it is
    for parent in ("ticket ZD#123", "ä" * 10, "L" * 60):
        sid = ch.section_id(parent, 2, 7, "x")
        cid = ch.section_custom_id(sid)
        assert CUSTOM_ID_RE.fullmatch(cid) and cid == encode(sid)
    # Distinct sections of one long-id record stay distinct once encoded.
    cids = {ch.section_custom_id(ch.section_id("L" * 60, k, 9, str(k))) for k in range(1, 10)}
    assert len(cids) == 9


def _records():
    long = "\n\n".join(f"Paragraph {i}. " + "Words here. " * 12 for i in range(6))
    return [
        {"doc_id": "A", "title": "Long A", "body": long},
        {"doc_id": "B", "title": "Short B", "body": "Short enough."},
        {"doc_id": 7, "title": "Long 7", "body": long + "\n\nOne more paragraph."},
    ]


def test_chunk_records_makes_section_records_and_direct_records():
    plan = ch.chunk_records(_records(), id_field="doc_id", text_field="body", max_tokens=60)
    assert plan.direct == ["B"]
    assert plan.chunked == ["A", "7"]
    a = [s for s in plan.sections if s["parent_id"] == "A"]
    assert [s["section_index"] for s in a] == list(range(1, len(a) + 1))
    assert {s["section_count"] for s in a} == {len(a)}
    assert all(s["title"] == "Long A" and s["doc_id"] == "A" for s in a)  # parent fields kept
    assert all(ch.parse_section_id(s["section_id"])[0] == "A" for s in a)
    assert plan.summary() == {
        "records": 3, "direct": 1, "chunked": 2, "sections": len(plan.sections), "skipped": 0,
    }  # fmt: skip
    again = ch.chunk_records(_records(), id_field="doc_id", text_field="body", max_tokens=60)
    assert again.sections == plan.sections  # deterministic
    forced = ch.chunk_records(
        _records(), id_field="doc_id", text_field="body", max_tokens=60, always_split=True
    )
    assert forced.direct == [] and "B__s1of1" in forced.sections[len(a)]["section_id"]


def test_empty_text_is_an_error_naming_the_record_or_reported_when_skipped():
    records = [{"id": "r1", "text": "fine text"}, {"id": "r2", "text": "  \n "}, {"id": "r3", "text": None}]
    with pytest.raises(RecordError, match=r"'r2' \(#1 in the source\): \[chunking.empty_text\]"):
        ch.chunk_records(records, id_field="id", text_field="text", max_tokens=10)
    plan = ch.chunk_records(records, id_field="id", text_field="text", max_tokens=10, on_empty="skip")
    assert plan.direct == ["r1"]
    assert plan.skipped == {"r2": "chunking.empty_text", "r3": "chunking.missing_text"}


@pytest.mark.parametrize(
    ("records", "rule"),
    [
        ([{"id": "a", "text": 5}], "chunking.text_type"),
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "custom_id.duplicate"),
        ([{"id": None, "text": "x"}], "custom_id.missing"),
        ([{"id": "a", "text": "x", "section_id": "s"}], "chunking.field_clash"),
    ],
)
def test_bad_records_are_errors_naming_the_rule(records, rule):
    with pytest.raises(RecordError, match=re.escape(f"[{rule}]")):
        ch.chunk_records(records, id_field="id", text_field="text", max_tokens=10)


# --------------------------------------------------------------------------- combining


def _answer(section: dict) -> dict:
    return {"summary": f"summary of {section['section_id']}", "points": ["p1", "p2"]}


def test_combine_only_when_every_section_is_answered_and_report_the_others():
    plan = ch.chunk_records(_records(), id_field="doc_id", text_field="body", max_tokens=60)
    a = [s for s in plan.sections if s["parent_id"] == "A"]
    seven = [s for s in plan.sections if s["parent_id"] == "7"]
    answers = {s["section_id"]: _answer(s) for s in a}
    # Record 7: section 2 rejected, the last one never came back.
    answers.update({s["section_id"]: _answer(s) for s in seven[:1] + seven[2:-1]})
    rejects = {seven[1]["section_id"]: "schema"}
    direct = [r for r in _records() if r["doc_id"] in plan.direct]

    combined = ch.build_combine_inputs(
        reversed(plan.sections), answers, rejects, id_field="doc_id", text_field="body", direct=direct
    )
    assert [i["doc_id"] for i in combined.inputs] == ["B", "A"]
    b, a_in = combined.inputs
    assert b["material"] == "Short enough." and b["section_count"] == 0
    assert a_in["section_count"] == len(a) and "body" not in a_in and a_in["title"] == "Long A"
    assert a_in["section_answers"] == [answers[s["section_id"]] for s in a]  # in section order
    blocks = a_in["material"].split("\n\n")
    assert [b_.splitlines()[0] for b_ in blocks] == [f"Section {k} of {len(a)}" for k in range(1, len(a) + 1)]
    assert "summary: summary of " + a[0]["section_id"] in blocks[0] and "- p2" in blocks[0]
    [inc] = combined.incomplete
    assert inc.record_id == "7" and inc.count == len(seven)
    assert inc.missing == (len(seven),) and inc.rejected == {2: "schema"}
    assert inc.as_dict()["rejected_sections"] == {"2": "schema"}
    assert "section 2 (schema)" in inc.describe()
    assert combined.summary()["incomplete"] == 1


def test_an_answer_wins_over_an_older_reject_and_answers_of_another_split_do_not_count():
    records = _records()[:1]
    plan = ch.chunk_records(records, id_field="doc_id", text_field="body", max_tokens=60)
    answers = {s["section_id"]: _answer(s) for s in plan.sections}
    rejects = {plan.sections[0]["section_id"]: "invalid_json"}  # rejected once, accepted since
    done = ch.build_combine_inputs(plan.sections, answers, rejects, id_field="doc_id", text_field="body")
    assert len(done.inputs) == 1 and not done.incomplete
    # Same record split under another bound: the old answers are for other ids, none counts,
    # even though there are at least as many of them as the new split has sections.
    other = ch.chunk_records(records, id_field="doc_id", text_field="body", max_tokens=200)
    assert len(other.sections) <= len(plan.sections)
    again = ch.build_combine_inputs(other.sections, answers, id_field="doc_id", text_field="body")
    assert not again.inputs and again.incomplete[0].missing == tuple(range(1, len(other.sections) + 1))


def test_a_plan_missing_section_records_or_mixing_splits_is_incomplete():
    plan = ch.chunk_records(_records()[:1], id_field="doc_id", text_field="body", max_tokens=60)
    answers = {s["section_id"]: _answer(s) for s in plan.sections}
    partial = plan.sections[:1] + plan.sections[2:]  # a work table that lost section 2
    res = ch.build_combine_inputs(partial, answers, id_field="doc_id", text_field="body")
    assert not res.inputs and res.incomplete[0].missing == (2,)
    other = ch.chunk_records(_records()[:1], id_field="doc_id", text_field="body", max_tokens=200)
    mixed = plan.sections + other.sections
    answers.update({s["section_id"]: _answer(s) for s in other.sections})
    res = ch.build_combine_inputs(mixed, answers, id_field="doc_id", text_field="body")
    assert not res.inputs and "different splits" in res.incomplete[0].describe()


def test_combine_inputs_are_deterministic_and_render_is_pluggable():
    plan = ch.chunk_records(_records(), id_field="doc_id", text_field="body", max_tokens=60)
    answers = {s["section_id"]: _answer(s) for s in plan.sections}
    one = ch.build_combine_inputs(plan.sections, answers, id_field="doc_id", text_field="body")
    two = ch.build_combine_inputs(
        list(reversed(plan.sections)), answers, id_field="doc_id", text_field="body"
    )
    assert sorted(map(json.dumps, one.inputs)) == sorted(map(json.dumps, two.inputs))
    custom = ch.build_combine_inputs(
        plan.sections, answers, id_field="doc_id", text_field="body",
        render=lambda s, a: f"[{s['section_index']}] {a['summary']}", material_field="notes",
    )  # fmt: skip
    assert custom.inputs[0]["notes"].startswith("[1] summary of ")
