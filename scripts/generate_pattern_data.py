#!/usr/bin/env python3
"""Generate the synthetic datasets bundled with the three pattern example DAGs.

Why this exists
---------------
``crm_lead_enrichment``, ``document_summaries`` and ``cancellation_reason_cleanup`` each need a
backlog that looks like a data engineer's own: a CRM export where most leads carry little evidence,
a corpus where some documents are far longer than one request should carry, and a free-text column
full of typos, languages, sarcasm and near-duplicates. Real data cannot ship in a public repository,
so this script fabricates it, with ground truth where QA needs it:

* ``crm_leads.csv`` (2,400 leads) + ``crm_leads_labels.csv`` (a labelled subset of 200 leads; the
  labels are the generator's ground truth, standing in for a hand-labelled sample). A field is
  labelled ``unknown`` when the record carries no evidence for it, which is what the DAG's prompt
  asks the model to answer.
* ``documents.jsonl`` (240 policies, incident reports, contracts and meeting notes) with headings and
  paragraphs; about one in ten runs to tens of thousands of characters.
* ``cancellation_reasons.csv`` (6,000 rows) with the canonical reason each row was written from.

The committed files are the output of this script with its default arguments;
``tests/test_pattern_datasets.py`` regenerates them and fails on any drift, so edit the script,
never the data.

Determinism
-----------
The same ``--seed`` gives byte-identical files on any machine, Python >= 3.10 and any
``PYTHONHASHSEED``: all randomness goes through :class:`Dice`, which only calls
``random.Random.random()`` (the one method CPython keeps stable); there is no set iteration, no
clock and no float formatting in the output.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / "airflow_provider_fable" / "example_data"
DEFAULT_SEED = 11


class Dice:
    """A seeded RNG facade built only on ``Random.random()`` (stable across CPython releases)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._rng.random() * n), n - 1)

    def randint(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def chance(self, p: float) -> bool:
        return self._rng.random() < p

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def weighted(self, options: Sequence[tuple[T, float]]) -> T:
        point = self._rng.random() * sum(w for _, w in options)
        for value, weight in options:
            point -= weight
            if point < 0:
                return value
        return options[-1][0]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        pool = list(seq)
        return [pool.pop(self.below(len(pool))) for _ in range(min(k, len(pool)))]


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def spread(d: Dice, count: int, start: datetime, days: int) -> list[datetime]:
    """``count`` sorted timestamps over ``days`` days, denser on weekdays and office hours."""
    out = []
    for _ in range(count):
        while True:
            day = d.below(days)
            when = start + timedelta(days=day)
            if when.weekday() < 5 or d.chance(0.3):
                break
        out.append(when + timedelta(hours=d.randint(7, 19), minutes=d.below(60), seconds=d.below(60)))
    out.sort()
    return out


# ---------------------------------------------------------------------------------------------------
# CRM leads
# ---------------------------------------------------------------------------------------------------

CRM_COLUMNS = (
    "lead_id",
    "created_at",
    "company_name",
    "website_domain",
    "job_title",
    "notes",
    "pipeline_value_usd",
)
LABEL_COLUMNS = ("lead_id", "industry", "company_size", "persona")
CRM_START = datetime(2026, 3, 2, tzinfo=timezone.utc)  # a Monday
CRM_DAYS = 42

INDUSTRIES = {
    "software": (
        ("Cloud", "Byte", "Stack", "Data", "Logic", "Pixel", "Code"),
        ("Labs", "Software", "Systems", "Analytics", "Apps"),
        (
            "SaaS company building a {thing} platform",
            "their dev team ships a mobile app and a web dashboard",
            "B2B software vendor, sells {thing} tooling to IT teams",
        ),
        ("scheduling", "observability", "analytics", "billing", "security"),
    ),
    "financial_services": (
        ("Capital", "Ledger", "Harbor", "Summit", "Crown"),
        ("Bank", "Finance", "Credit Union", "Insurance", "Wealth"),
        (
            "regional bank, {thing} team wants better reporting",
            "insurance broker handling {thing} policies",
            "asset manager, compliance asked about audit trails for {thing}",
        ),
        ("mortgage", "loan", "claims", "payments", "trading"),
    ),
    "healthcare": (
        ("Mercy", "Clearview", "Riverside", "Evergreen", "Sunrise"),
        ("Health", "Clinics", "Medical Group", "Hospital", "Care"),
        (
            "hospital group, {thing} department is the buyer",
            "chain of dental clinics, patients book online",
            "healthcare provider, HIPAA is a must for {thing}",
        ),
        ("radiology", "patient intake", "billing", "pharmacy", "nursing"),
    ),
    "manufacturing": (
        ("Iron", "Precision", "Allied", "Forge", "Titan"),
        ("Manufacturing", "Industries", "Fabrication", "Components", "Works"),
        (
            "manufacturer of {thing}, three plants",
            "factory floor still runs on spreadsheets for {thing}",
            "makes {thing} for the automotive industry",
        ),
        ("steel parts", "plastic housings", "valves", "packaging machines", "bearings"),
    ),
    "retail": (
        ("Corner", "Urban", "Golden", "Maple", "Bright"),
        ("Store", "Outfitters", "Market", "Boutique", "Retail"),
        (
            "retail chain selling {thing}, stores in several cities",
            "online shop for {thing}, peak season is Q4",
            "ecommerce brand, sells {thing} direct to consumers",
        ),
        ("furniture", "sportswear", "groceries", "cosmetics", "toys"),
    ),
    "education": (
        ("Oakridge", "Lakeside", "Hillcrest", "Northfield", "Westbrook"),
        ("Academy", "University", "School District", "College", "Learning"),
        (
            "university, the {thing} faculty runs the pilot",
            "school district, teachers need {thing}",
            "online learning provider with courses on {thing}",
        ),
        ("engineering", "language", "business", "nursing", "coding"),
    ),
    "logistics": (
        ("Swift", "Atlas", "Express", "Route", "Cargo"),
        ("Logistics", "Freight", "Transport", "Shipping", "Couriers"),
        (
            "freight forwarder, {thing} is their pain point",
            "logistics company with a fleet of trucks, dispatch wants {thing}",
            "3PL warehouse operator, handles {thing} for retailers",
        ),
        ("route planning", "customs paperwork", "last-mile delivery", "warehouse slotting", "tracking"),
    ),
    "professional_services": (
        ("Baker", "Sterling", "Morgan", "Hayes", "Whitfield"),
        ("& Partners", "Consulting", "Advisory", "Law", "Accountants"),
        (
            "consulting firm, billable hours tracked in {thing}",
            "law firm, partners want {thing}",
            "accounting practice, tax season drives {thing}",
        ),
        ("timesheets", "document review", "client portals", "invoicing", "case management"),
    ),
}
NEUTRAL_NAMES = (
    ("Blue", "Apex", "Nova", "Granite", "Silver", "Red Oak", "Polar", "Vertex", "Lumen", "Keystone"),
    ("Group", "Holdings", "Ventures", "Co", "Partners", "Inc", "Ltd", "GmbH"),
)
SIZES = {
    "micro": ("a two-person shop", "founder plus {n} contractors", "{n} employees"),
    "small": ("{n} employees", "team of about {n}", "~{n} staff"),
    "medium": ("{n} employees", "around {n} people across two offices", "headcount {n}"),
    "large": ("{n} employees", "{n} staff in four countries", "a workforce of {n}"),
    "enterprise": ("{n} employees worldwide", "Fortune 500, {n} staff", "global, {n}+ employees"),
}
SIZE_RANGES = {
    "micro": (2, 10),
    "small": (11, 50),
    "medium": (51, 250),
    "large": (251, 1000),
    "enterprise": (1001, 60000),
}
PERSONAS = {
    "executive": ("CEO", "Founder", "Managing Director", "COO", "President", "General Manager"),
    "engineering": ("VP Engineering", "CTO", "Software Engineer", "Head of IT", "DevOps Lead"),
    "finance": ("CFO", "Finance Manager", "Controller", "Head of Finance", "Accountant"),
    "marketing": ("CMO", "Marketing Manager", "Growth Lead", "Head of Brand", "Demand Gen Manager"),
    "sales": ("VP Sales", "Account Executive", "Sales Director", "Head of Revenue", "BDR"),
    "operations": ("Operations Manager", "Head of Ops", "Supply Chain Lead", "Office Manager"),
    "hr": ("HR Director", "People Partner", "Talent Acquisition Lead", "Chief People Officer"),
}
VAGUE_TITLES = ("Owner", "Consultant", "Team member", "Manager", "-", "n/a", "", "Lead", "Partner")
FREE_MAIL = ("gmail.com", "outlook.com", "yahoo.com", "hotmail.com", "proton.me")
TLDS = ((".com", 6), (".io", 2), (".de", 1), (".co.uk", 1), (".nl", 1), (".fr", 1))
WEAK_NOTES = (
    "called, no answer",
    "left voicemail",
    "follow up in Q3",
    "downloaded the whitepaper",
    "met at a conference, asked for pricing",
    "inbound via website form",
    "wants a demo next week",
    "not interested right now",
    "asked us to send info by email",
    "webinar attendee",
    "referral from an existing customer",
    "budget unclear",
    "??",
    "tbd",
    "",
)


def _slug(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _company(d: Dice) -> tuple[str, str]:
    """(company name, true industry); some names give the industry away, neutral ones do not."""
    industry = d.choice(list(INDUSTRIES))
    first, second, _, _ = INDUSTRIES[industry]
    if d.chance(0.45):
        return f"{d.choice(first)} {d.choice(second)}", industry
    return f"{d.choice(NEUTRAL_NAMES[0])} {d.choice(NEUTRAL_NAMES[1])}", industry


def _lead(d: Dice) -> tuple[dict[str, str], dict[str, str]]:
    name, industry = _company(d)
    name_reveals = any(word in name for word in INDUSTRIES[industry][1])
    size = d.weighted((("micro", 2), ("small", 4), ("medium", 3), ("large", 2), ("enterprise", 1)))
    persona = d.choice(list(PERSONAS))
    # Title: most leads have one; some vague ones carry no persona evidence at all.
    title_known = d.chance(0.75)
    title = d.choice(PERSONAS[persona]) if title_known else d.choice(VAGUE_TITLES)
    if title_known and d.chance(0.1):
        title = title.lower()
    domain = _slug(name.replace("&", "and"))[:24] + d.weighted(TLDS)
    if d.chance(0.12):
        domain = d.choice(FREE_MAIL)
    # Notes quality: rich, partial, weak, empty.
    quality = d.weighted((("rich", 25), ("industry", 20), ("size", 15), ("weak", 30), ("empty", 10)))
    parts: list[str] = []
    industry_known = name_reveals
    size_known = False
    _, _, phrases, things = INDUSTRIES[industry]
    if quality in ("rich", "industry"):
        parts.append(d.choice(phrases).format(thing=d.choice(things)))
        industry_known = True
    if quality in ("rich", "size"):
        lo, hi = SIZE_RANGES[size]
        n = d.randint(lo, hi)
        parts.append(d.choice(SIZES[size]).format(n=f"{n:,}" if n >= 10000 else str(n)))
        size_known = True
    if quality == "weak" or (quality != "empty" and d.chance(0.4)):
        parts.append(d.choice(WEAK_NOTES))
    parts = [p for p in parts if p]
    if len(parts) > 1 and d.chance(0.3):
        parts = parts[::-1]
    sep = d.choice(("; ", ". ", " - ", " / "))
    notes = sep.join(parts)
    if notes and d.chance(0.15):
        notes = notes.upper() if d.chance(0.3) else notes[0].upper() + notes[1:]
    value_band = d.weighted(((0, 10), (1, 55), (2, 25), (3, 10)))
    value = (0, d.randint(1, 9) * 1000, d.randint(10, 49) * 1000, d.randint(50, 400) * 1000)[value_band]
    record = {
        "company_name": name,
        "website_domain": domain,
        "job_title": title,
        "notes": notes,
        "pipeline_value_usd": str(value),
    }
    label = {
        "industry": industry if industry_known else "unknown",
        "company_size": size if size_known else "unknown",
        "persona": persona if title_known else "unknown",
    }
    return record, label


def generate_crm(seed: int = DEFAULT_SEED, count: int = 2400) -> tuple[list[dict], list[dict]]:
    """``count`` leads in creation order, and the labelled subset (every 12th lead)."""
    d = Dice(seed * 1000 + 1)
    stamps = spread(d, count, CRM_START, CRM_DAYS)
    leads, labels = [], []
    for n, when in enumerate(stamps, 1):
        record, label = _lead(d)
        lead_id = f"L{100000 + n}"
        leads.append({"lead_id": lead_id, "created_at": stamp(when), **record})
        if n % 12 == 0:
            labels.append({"lead_id": lead_id, **label})
    return leads, labels


# ---------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------

DOC_START = datetime(2026, 1, 5, tzinfo=timezone.utc)
DOC_DAYS = 84
TEAMS = ("Payments", "Search", "Identity", "Data Platform", "Mobile", "Warehouse", "Checkout", "Support")
SYSTEMS = ("the billing API", "the order database", "the login service", "the event pipeline",
           "the CDN", "the inventory sync", "the reporting cluster", "the message queue")  # fmt: skip
PARTIES = ("Northwind Traders", "Contoso Ltd", "Fabrikam Inc", "Tailspin Toys", "Litware GmbH",
           "Adatum Corp", "Proseware BV", "Wingtip Logistics")  # fmt: skip

POLICY_SECTIONS = (
    (
        "Purpose",
        (
            "This policy sets out how {team} handles {topic} across all environments.",
            "It exists because the last audit found that {topic} was handled differently by each team.",
            "The policy applies to employees, contractors and vendors with access to {system}.",
        ),
    ),
    (
        "Scope",
        (
            "All production systems, including {system}, are in scope.",
            "Test environments holding copies of customer data are treated as production.",
            "Personal devices are out of scope unless they access {system} directly.",
        ),
    ),
    (
        "Responsibilities",
        (
            "The {team} lead owns this policy and reviews it every {n} months.",
            "Engineers must raise an exception request before deviating from it.",
            "Security reviews exceptions within {n} business days.",
        ),
    ),
    (
        "Requirements",
        (
            "Access to {system} requires single sign-on and a hardware key.",
            "Credentials are rotated every {n} days; shared accounts are forbidden.",
            "Logs of access to {topic} are retained for {n} months.",
            "Backups are encrypted and restored in a drill at least once a quarter.",
        ),
    ),
    (
        "Risks",
        (
            "The main risk is that legacy scripts still use long-lived tokens for {system}.",
            "Vendors with standing access increase the exposure if their accounts are compromised.",
            "Non-compliance may lead to regulatory fines of up to {n} percent of annual revenue.",
        ),
    ),
    (
        "Open points",
        (
            "It is not yet decided whether contractors need the same hardware keys.",
            "The retention period for {topic} logs is to be confirmed with Legal.",
            "Who approves emergency access outside business hours remains open.",
        ),
    ),
)
INCIDENT_SECTIONS = (
    (
        "Summary",
        (
            "On {date}, {system} was degraded for {n} minutes.",
            "Customers saw errors when they tried to pay, and about {n} orders failed.",
            "The {team} on-call engineer was paged {n} minutes after the first alert.",
        ),
    ),
    (
        "Timeline",
        (
            "At {time} a configuration change was deployed to {system}.",
            "At {time} error rates crossed the alert threshold and the on-call engineer was paged.",
            "At {time} the change was rolled back and error rates returned to normal.",
            "At {time} the incident was declared resolved and customers were informed.",
        ),
    ),
    (
        "Root cause",
        (
            "A connection pool limit was lowered from {n} to a value below normal peak traffic.",
            "The change passed review because the staging environment receives far less traffic.",
            "Retries from clients amplified the load and kept {system} saturated.",
        ),
    ),
    (
        "Impact",
        (
            "About {n} customers were affected; {n} support tickets were opened.",
            "No data was lost, but some payments were captured twice and must be refunded.",
            "The status page was updated {n} minutes late.",
        ),
    ),
    (
        "Action items",
        (
            "Add a load test for {system} to the release pipeline (owner: {team}).",
            "Alert on connection pool saturation, not only on error rates.",
            "Refund duplicate captures within {n} days.",
        ),
    ),
    (
        "Open questions",
        (
            "Why did the canary not catch the change before full rollout?",
            "Should configuration changes require a second approver?",
            "Is the refund process fast enough for enterprise customers?",
        ),
    ),
)
CONTRACT_SECTIONS = (
    (
        "1. Parties",
        (
            "This agreement is made between {party} (the Customer) and Brightloom Ltd (the Provider).",
            "It takes effect on {date} and runs for {n} months.",
        ),
    ),
    (
        "2. Services",
        (
            "The Provider supplies access to its platform and support during business hours.",
            "Service levels are described in Schedule {n}.",
            "Implementation services are billed separately at the agreed day rate.",
        ),
    ),
    (
        "3. Fees and payment",
        (
            "The Customer pays an annual fee of {money}, invoiced in advance.",
            "Invoices are payable within {n} days; late payments accrue interest at {n} percent.",
            "Fees may increase by at most {n} percent at renewal.",
        ),
    ),
    (
        "4. Service levels",
        (
            "The Provider targets {n}.9 percent monthly availability.",
            "If availability falls below target, the Customer receives service credits of up to {n} percent.",
            "Service credits are the Customer's sole remedy for availability failures.",
        ),
    ),
    (
        "5. Data protection",
        (
            "The Provider processes personal data only on the Customer's documented instructions.",
            "Sub-processors are listed in Schedule {n} and may change with {n} days' notice.",
            "Data is stored in the European Union unless agreed otherwise in writing.",
        ),
    ),
    (
        "6. Liability",
        (
            "Each party's total liability is capped at the fees paid in the previous {n} months.",
            "The cap does not apply to breaches of confidentiality or data protection.",
            "Neither party is liable for indirect or consequential loss.",
        ),
    ),
    (
        "7. Termination",
        (
            "Either party may terminate for material breach not remedied within {n} days.",
            "On termination, the Provider returns or deletes Customer data within {n} days.",
            "The renewal notice period is {n} days and is not yet agreed for the second term.",
        ),
    ),
)
MINUTES_SECTIONS = (
    ("Attendees", ("{team} leads, a product manager and two engineers attended.",)),
    (
        "Discussion",
        (
            "The group reviewed progress on migrating {system}.",
            "Latency improved by {n} percent after the last release.",
            "The migration is {n} percent complete; the remaining work is mostly testing.",
            "Support asked for an earlier heads-up before customer-facing changes.",
        ),
    ),
    (
        "Decisions",
        (
            "The cut-over is planned for {date}.",
            "The old endpoint will stay available for {n} weeks after the cut-over.",
        ),
    ),
    (
        "Risks and follow-ups",
        (
            "Staffing is tight: two engineers are on leave during the cut-over week.",
            "It is unclear whether the mobile app needs a release before the cut-over.",
        ),
    ),
)
DOC_KINDS = {
    "policy": (POLICY_SECTIONS, ("Access Control Policy", "Data Retention Policy", "Vendor Access Policy",
                                 "Backup and Recovery Policy", "Incident Response Policy")),
    "incident_report": (INCIDENT_SECTIONS, ("Checkout outage", "Login degradation", "Duplicate payments",
                                            "Search latency spike", "Delayed order sync")),
    "contract": (CONTRACT_SECTIONS, ("Master Services Agreement", "Data Processing Agreement",
                                     "Support Services Agreement")),
    "meeting_notes": (MINUTES_SECTIONS, ("Migration sync", "Quarterly planning", "Release review")),
}  # fmt: skip
FILLER = (
    "For the avoidance of doubt, the terms above apply to {system} as well.",
    "This was discussed again with the {team} team, who agreed with the approach.",
    "Details are recorded in the appendix and in the team's runbook.",
    "The previous version of this section was ambiguous and has been rewritten.",
    "Where this section conflicts with a local procedure, this section prevails.",
    "Figures are approximate and based on the monitoring data available at the time of writing.",
    "Stakeholders from {team} and Finance reviewed this text.",
)


def _fill(d: Dice, text: str, date: datetime) -> str:
    return text.format(
        team=d.choice(TEAMS),
        system=d.choice(SYSTEMS),
        topic=d.choice(("customer data", "access logs", "API keys", "backups", "payment records")),
        n=d.randint(2, 90),
        date=(date - timedelta(days=d.randint(1, 20))).strftime("%Y-%m-%d"),
        time=f"{d.randint(0, 23):02d}:{d.below(60):02d} UTC",
        party=d.choice(PARTIES),
        money=f"EUR {d.randint(12, 480)},000",
    )


def _document(d: Dice, kind: str, created: datetime) -> tuple[str, str]:
    sections, titles = DOC_KINDS[kind]
    length = d.weighted((("short", 62), ("medium", 28), ("long", 10)))
    paragraphs_per_section = {"short": (1, 1), "medium": (2, 4), "long": (10, 22)}[length]
    title = f"{d.choice(titles)} - {d.choice(TEAMS)}"
    lines: list[str] = [title, ""]
    numbered = kind == "contract"
    chosen = sections if length != "short" else [s for s in sections if d.chance(0.6)] or sections[:2]
    for heading, sentences in chosen:
        lines.append(heading if numbered else f"## {heading}")
        lines.append("")
        for _ in range(d.randint(*paragraphs_per_section)):
            picked = d.sample(sentences, d.randint(1, len(sentences)))
            if length != "short":
                picked += [d.choice(FILLER) for _ in range(d.randint(1, 4))]
            lines.append(" ".join(_fill(d, s, created) for s in picked))
            lines.append("")
    return title, "\n".join(lines).rstrip() + "\n"


def generate_documents(seed: int = DEFAULT_SEED, count: int = 240) -> list[dict[str, str]]:
    d = Dice(seed * 1000 + 2)
    stamps = spread(d, count, DOC_START, DOC_DAYS)
    docs = []
    for n, when in enumerate(stamps, 1):
        kind = d.weighted((("policy", 3), ("incident_report", 3), ("contract", 2), ("meeting_notes", 2)))
        title, body = _document(d, kind, when)
        docs.append(
            {
                "doc_id": f"DOC-{n:04d}",
                "created_at": stamp(when),
                "doc_type": kind,
                "title": title,
                "body": body,
            }
        )
    return docs


# ---------------------------------------------------------------------------------------------------
# Cancellation reasons
# ---------------------------------------------------------------------------------------------------

CANCEL_COLUMNS = (
    "cancellation_id",
    "created_at",
    "plan",
    "tenure_months",
    "reason_for_cancellation",
    "expected_reason",
)
CANCEL_START = datetime(2026, 2, 2, tzinfo=timezone.utc)
CANCEL_DAYS = 35
REASONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # label: (plain phrasings, other languages and sarcasm)
    "too_expensive": (
        (
            "too expensive",
            "Too expensive for what we use",
            "price went up again",
            "can't afford it anymore",
            "cheaper options out there",
            "the price increase was too much",
            "costs too much for a small team",
        ),
        (
            "zu teuer",
            "trop cher",
            "demasiado caro",
            "za drogo",
            "te duur",
            "oh great, another price hike. love paying more for the same thing",
            "sure, charge me double, why not",
        ),
    ),
    "missing_features": (
        (
            "missing features we need",
            "no offline mode",
            "doesn't integrate with our CRM",
            "needed an API and you don't have one",
            "lacks reporting",
            "no multi-currency support",
        ),
        (
            "fehlende Funktionen",
            "il manque des fonctionnalités",
            "faltan funciones",
            "still waiting for dark mode since 2019, no rush",
        ),
    ),
    "switched_to_competitor": (
        (
            "switched to a competitor",
            "moving to another tool",
            "found a better alternative",
            "we went with a different vendor",
            "our parent company uses another product",
        ),
        (
            "zu einem anderen Anbieter gewechselt",
            "passé chez un concurrent",
            "nos cambiamos a la competencia",
            "found something that actually works lol",
        ),
    ),
    "poor_support": (
        (
            "support never answered",
            "terrible customer service",
            "waited two weeks for a reply",
            "support was rude",
            "no one helped with my ticket",
        ),
        (
            "schlechter Kundenservice",
            "service client inexistant",
            "el soporte nunca respondió",
            "fantastic support, only took a month to get a canned reply",
        ),
    ),
    "technical_issues": (
        (
            "app keeps crashing",
            "too many bugs",
            "sync never worked",
            "constant outages",
            "data didn't import correctly",
            "too slow to be usable",
        ),
        (
            "stürzt ständig ab",
            "trop de bugs",
            "la aplicación se cae todo el tiempo",
            "ciągle się zawiesza",
            "loved the daily crashes, really kept me on my toes",
        ),
    ),
    "no_longer_needed": (
        (
            "no longer needed",
            "project ended",
            "don't need it anymore",
            "only needed it for one event",
            "we stopped doing that work",
        ),
        ("brauchen es nicht mehr", "plus besoin", "ya no lo necesito", "niet meer nodig"),
    ),
    "business_closed": (
        ("closing the business", "company shut down", "we went out of business", "retiring, closing shop"),
        ("Firma geschlossen", "entreprise fermée", "cerramos el negocio"),
    ),
    "temporary_pause": (
        (
            "pausing for the summer",
            "will be back next season",
            "taking a break for a few months",
            "seasonal business, back in spring",
        ),
        ("nur eine Pause", "pause temporaire", "solo una pausa por unos meses"),
    ),
    "billing_problems": (
        (
            "charged twice",
            "couldn't update my card",
            "invoice was wrong",
            "unexpected charge on renewal",
            "refund never arrived",
        ),
        (
            "doppelt abgebucht",
            "facturé deux fois",
            "me cobraron dos veces",
            "thanks for the surprise renewal charge, very cool",
        ),
    ),
    "not_stated": (
        ("n/a", "N/A", "-", "none", "", ".", "no reason", "x", "na", "?", "...", "no comment"),
        ("keine Angabe", "sans raison", "ninguna"),
    ),
    "other": (
        (
            "moving abroad",
            "my accountant told me to",
            "the owner passed away",
            "merger with another company",
            "boss said so",
            "testing the cancellation flow",
        ),
        ("umzug ins Ausland", "je déménage", "me mudo al extranjero"),
    ),
}
REASON_SHARE = (
    ("too_expensive", 22), ("missing_features", 12), ("switched_to_competitor", 12), ("poor_support", 8),
    ("technical_issues", 13), ("no_longer_needed", 11), ("business_closed", 3), ("temporary_pause", 5),
    ("billing_problems", 5), ("not_stated", 6), ("other", 3),
)  # fmt: skip
PLANS = (("free", 3), ("starter", 4), ("pro", 3), ("business", 1))


def _typo(d: Dice, text: str) -> str:
    """One keyboard slip: a dropped, doubled or swapped letter."""
    letters = [i for i, ch in enumerate(text) if ch.isalpha()]
    if len(letters) < 4:
        return text
    i = d.choice(letters[1:-1])
    kind = d.below(3)
    if kind == 0:
        return text[:i] + text[i + 1 :]
    if kind == 1:
        return text[:i] + text[i] + text[i:]
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def _messy(d: Dice, label: str) -> str:
    plain, foreign = REASONS[label]
    text = d.choice(foreign) if d.chance(0.22) else d.choice(plain)
    if text and d.chance(0.18):
        text = _typo(d, text)
    if text and d.chance(0.25):  # near-duplicates: same words, different case/punctuation/spacing
        text = d.choice((text.upper(), text.lower(), text + "!!", text + ".", "  " + text, text + " :("))
    if text and d.chance(0.08):
        text = f"{text}, also {d.choice(REASONS[d.choice(list(REASONS)[:9])][0])}"
    return text


def generate_cancellations(seed: int = DEFAULT_SEED, count: int = 6000) -> list[dict[str, str]]:
    d = Dice(seed * 1000 + 3)
    stamps = spread(d, count, CANCEL_START, CANCEL_DAYS)
    rows = []
    for n, when in enumerate(stamps, 1):
        label = d.weighted(REASON_SHARE)
        rows.append(
            {
                "cancellation_id": f"C{200000 + n}",
                "created_at": stamp(when),
                "plan": d.weighted(PLANS),
                "tenure_months": str(d.randint(1, 48)),
                "reason_for_cancellation": _messy(d, label),
                "expected_reason": label,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[dict[str, str]], columns: Sequence[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(rows: Sequence[dict[str, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def write_all(out_dir: Path, seed: int = DEFAULT_SEED) -> list[Path]:
    leads, labels = generate_crm(seed)
    paths = [
        out_dir / "crm_leads.csv",
        out_dir / "crm_leads_labels.csv",
        out_dir / "documents.jsonl",
        out_dir / "cancellation_reasons.csv",
    ]
    write_csv(leads, CRM_COLUMNS, paths[0])
    write_csv(labels, LABEL_COLUMNS, paths[1])
    write_jsonl(generate_documents(seed), paths[2])
    write_csv(generate_cancellations(seed), CANCEL_COLUMNS, paths[3])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; defaults reproduce the committed files in airflow_provider_fable/example_data/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="RNG seed (default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR, help="output directory")
    args = parser.parse_args(argv)
    for path in write_all(args.out_dir, args.seed):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
