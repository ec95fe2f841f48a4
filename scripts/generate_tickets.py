#!/usr/bin/env python3
"""Generate the synthetic support-ticket backlog bundled with the ``support_ticket_triage`` example DAG.

Why this exists
---------------
The example DAG needs a backlog big enough (thousands of rows) for the Message Batches API to pay off,
and realistic enough that a triage prompt can be *measured* against it. Real tickets cannot ship in a
public repository, so this script fabricates them together with ground-truth labels
(``expected_category``, ``expected_priority``, ``expected_escalate``) that QA can compare model answers
with. The committed CSV is the output of this script with its default arguments; ``tests/test_dataset.py``
regenerates it and fails on any drift, so edit the script, never the CSV.

Labelling rules
---------------
Labels follow the rules in the DAG's ``SYSTEM_PROMPT``: *what the customer needs done*, not which
keywords appear. About 15% of tickets are deliberate near-misses whose surface vocabulary points at
another team:

* account_access wins whenever the blocker is signing in, even if the goal is billing ("can't log in to
  update my card", "locked out, need my invoice") or the symptom looks like a defect ("2FA code never
  arrives", "login error AUTH-401").
* billing wins when money moved wrongly, even if something else triggered it ("charged twice after
  resetting my password", "checkout errored so I paid again", refund for a *returned* item).
* shipping wins for physical delivery, including a complaint about the shipping fee of a late parcel
  ("charged for express shipping but it arrived late") and "I paid but it never came".
* bug wins when something that exists is broken, even when phrased as a wish ("would be great if the new
  filter button actually filtered") or when the broken thing is an invoice PDF or the tracking page.
* feature_request wins when the behaviour works as designed, even when asked "is this a bug?".

Priority: urgent = business stopped, security at risk, data lost, or an explicit legal/chargeback threat;
high = blocked on an important task or a deadline within days; medium = real problem with a workaround;
low = cosmetic, ideas, "no rush". ``expected_escalate`` is true only for legal threats, chargebacks, data
loss, many-user outages, or an enterprise customer threatening to leave, and therefore only ever with
high/urgent priority. Evidence for every urgent or escalated label is written into the ticket text.

Determinism
-----------
The same ``--seed`` and ``--count`` must give a byte-identical file on any machine, Python >= 3.10 and
any ``PYTHONHASHSEED``. Hence: all randomness flows through :class:`Dice`, which only calls
``random.Random.random()`` (the one method CPython promises to keep stable across versions); there is no
set iteration, no clock, no locale-dependent ``strftime`` and no float formatting in the output.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "airflow_provider_fable" / "example_data" / "support_tickets.csv"
DEFAULT_COUNT = 2400
DEFAULT_SEED = 7

FIELDNAMES = (
    "ticket_id",
    "created_at",
    "channel",
    "customer_tier",
    "subject",
    "body",
    "expected_category",
    "expected_priority",
    "expected_escalate",
)
PRIORITIES = ("low", "medium", "high", "urgent")
# An uneven split, like a real backlog: bugs dominate, feature requests trickle in.
CATEGORY_SHARE = (
    ("bug", 30),
    ("billing", 25),
    ("account_access", 20),
    ("shipping", 15),
    ("feature_request", 10),
)
NEAR_MISS_RATE = 0.15
START = datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday
SPAN_DAYS = 90
SUPPORT_ADDRESS = "support@brightloom.example"


class Dice:
    """A seeded RNG facade that derives everything from ``Random.random()``.

    ``choice``/``choices``/``shuffle``/``randrange`` have changed their algorithms between CPython
    releases; ``random()`` has not (it is the documented reproducibility guarantee). Building every
    helper on top of it keeps the committed CSV reproducible on future Pythons.
    """

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def random(self) -> float:
        """Uniform float in ``[0, 1)``; the only primitive every other helper is built on."""
        return self._rng.random()

    def below(self, n: int) -> int:
        """Uniform int in ``[0, n)``."""
        return min(int(self._rng.random() * n), n - 1)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform int in ``[lo, hi]`` (inclusive, like ``random.randint``)."""
        return lo + self.below(hi - lo + 1)

    def chance(self, p: float) -> bool:
        """True with probability ``p``."""
        return self._rng.random() < p

    def choice(self, seq: Sequence[T]) -> T:
        """One element of a non-empty sequence."""
        return seq[self.below(len(seq))]

    def weighted(self, options: Sequence[tuple[T, float]]) -> T:
        """One value from ``(value, weight)`` pairs; weights need not sum to one."""
        total = sum(w for _, w in options)
        point = self._rng.random() * total
        for value, weight in options:
            point -= weight
            if point < 0:
                return value
        return options[-1][0]

    def shuffle(self, items: list[T]) -> None:
        """In-place Fisher-Yates shuffle."""
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        """``k`` distinct elements in random order."""
        pool = list(seq)
        out: list[T] = []
        for _ in range(min(k, len(pool))):
            out.append(pool.pop(self.below(len(pool))))
        return out


# ---------------------------------------------------------------------------------------------------
# Customers: locales drive names, currency, carriers, date style and the odd native-language line, so
# that a ticket from Kraków mentions złoty, InPost and "Z góry dziękuję" rather than a random mix.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Currency:
    """How a currency is written by its customers (symbol placement and separators)."""

    code: str
    symbol: str
    per_usd_milli: int
    prefix: bool
    group: str
    decimal: str
    minor_digits: int = 2


CURRENCIES = {
    c.code: c
    for c in (
        Currency("USD", "$", 1000, True, ",", "."),
        Currency("CAD", "CA$", 1360, True, ",", "."),
        Currency("AUD", "A$", 1520, True, ",", "."),
        Currency("MXN", "MX$", 17000, True, ",", "."),
        Currency("GBP", "£", 790, True, ",", "."),
        Currency("EUR", " €", 920, False, ".", ","),
        Currency("JPY", "¥", 150000, True, ",", ".", 0),
        Currency("INR", "₹", 83000, True, ",", "."),
        Currency("PLN", " zł", 4000, False, " ", ","),
        Currency("BRL", "R$ ", 5000, True, ".", ","),
        Currency("DKK", " kr", 6900, False, ".", ","),
        Currency("TRY", "₺", 32000, True, ".", ","),
    )
}


@dataclass(frozen=True)
class Locale:
    """A customer population: who writes, from where, and how they write numbers and dates."""

    country: str
    weight: int
    currency: str
    date_style: str
    lang: str | None
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    cities: tuple[str, ...]
    companies: tuple[str, ...]
    carriers: tuple[str, ...]
    free_mail: tuple[str, ...]
    tld: str
    phone_prefix: str
    vat_prefix: str


LOCALES: tuple[Locale, ...] = (
    Locale(
        "the United States",
        30,
        "USD",
        "us",
        None,
        (
            "Emily",
            "Michael",
            "Jessica",
            "David",
            "Ashley",
            "Chris",
            "Megan",
            "Brandon",
            "Tyler",
            "Sarah",
            "Jamal",
            "Keisha",
            "Kevin",
            "Laura",
            "Marcus",
            "Rachel",
            "Danielle",
            "Josh",
        ),
        (
            "Johnson",
            "Smith",
            "Williams",
            "Brown",
            "Davis",
            "Miller",
            "Wilson",
            "Moore",
            "Taylor",
            "Anderson",
            "Rivera",
            "Kim",
            "Nguyen",
            "Washington",
            "O'Neil",
        ),
        ("Austin", "Portland", "Denver", "Chicago", "Brooklyn", "Nashville", "San Diego", "Columbus"),
        (
            "Blue Fern Café",
            "Northside Books",
            "Petal & Stem Florists",
            "Urban Cycle Company",
            "Lone Star Tacos",
            "Maple Street Hardware",
            "Harbor Light Coffee",
            "Golden Hour Vinyl",
        ),
        ("UPS", "FedEx", "USPS"),
        ("gmail.com", "yahoo.com", "outlook.com", "icloud.com"),
        "com",
        "+1 {a}55 0{b}",
        "EIN ",
    ),
    Locale(
        "the United Kingdom",
        10,
        "GBP",
        "dmy_slash",
        None,
        ("Oliver", "Amelia", "Harry", "Siobhán", "Callum", "Niamh", "Rhys", "Priya", "Georgia", "Alfie"),
        ("Patel", "Jones", "Evans", "O'Brien", "Hughes", "Clarke", "Khan", "Murphy"),
        ("London", "Manchester", "Leeds", "Bristol", "Glasgow", "Cardiff"),
        ("The Crooked Spoon", "Thistle & Thread", "Camden Cycles", "Bramble Bakery"),
        ("Royal Mail", "DPD", "Evri"),
        ("gmail.com", "hotmail.co.uk", "outlook.com", "btinternet.com"),
        "co.uk",
        "+44 7{a} {b}",
        "GB",
    ),
    Locale(
        "Germany",
        8,
        "EUR",
        "dmy_dot",
        "de",
        ("Jürgen", "Lena", "Lukas", "Anna", "Björn", "Katharina", "Jörg", "Mia", "Felix", "Sören"),
        ("Müller", "Schäfer", "Weiß", "Becker", "Hoffmann", "Groß", "Krüger", "Schmidt"),
        ("Berlin", "München", "Hamburg", "Köln", "Leipzig"),
        ("Bäckerei Groß", "Fahrradladen Krüger", "Café Süß", "Buchhandlung am Markt"),
        ("DHL", "DPD", "Hermes"),
        ("gmx.de", "web.de", "gmail.com", "t-online.de"),
        "de",
        "+49 15{a} {b}",
        "DE",
    ),
    Locale(
        "Canada",
        7,
        "CAD",
        "iso",
        "fr",
        ("Émilie", "Liam", "Noah", "Charlotte", "Mathieu", "Olivia", "Gabriel"),
        ("Tremblay", "Gagnon", "Roy", "Côté", "MacDonald", "Bouchard"),
        ("Toronto", "Montréal", "Vancouver", "Calgary", "Ottawa"),
        ("Maple Leaf Outfitters", "Café Côté", "Northern Lights Books"),
        ("Canada Post", "Purolator"),
        ("gmail.com", "outlook.com", "videotron.ca"),
        "ca",
        "+1 {a}55 0{b}",
        "BN ",
    ),
    Locale(
        "India",
        6,
        "INR",
        "dmy_slash",
        None,
        ("Priya", "Arjun", "Ananya", "Rohan", "Vikram", "Sneha", "Aditya"),
        ("Sharma", "Iyer", "Reddy", "Gupta", "Nair", "Mehta"),
        ("Bengaluru", "Mumbai", "Pune", "Delhi", "Chennai"),
        ("Masala Junction", "Iyer Electronics", "Lotus Handlooms"),
        ("Blue Dart", "Delhivery"),
        ("gmail.com", "yahoo.co.in", "rediffmail.com"),
        "in",
        "+91 98{a} {b}",
        "GSTIN ",
    ),
    Locale(
        "Australia",
        5,
        "AUD",
        "dmy_slash",
        None,
        ("Jack", "Mia", "Lachlan", "Chloe", "Isla", "Linh"),
        ("Nguyễn", "Thompson", "Kelly", "Walker", "O'Connor"),
        ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide"),
        ("Bondi Bean Roasters", "Wattle & Wool", "Kookaburra Cycles"),
        ("Australia Post", "StarTrack"),
        ("gmail.com", "bigpond.com", "outlook.com"),
        "com.au",
        "+61 4{a} {b}",
        "ABN ",
    ),
    Locale(
        "France",
        5,
        "EUR",
        "dmy_slash",
        "fr",
        ("François", "Chloé", "Hélène", "Théo", "Renée", "Mathis", "Léa", "Gaël"),
        ("Lefèvre", "Dubois", "Moreau", "Girard", "Fontaine"),
        ("Paris", "Lyon", "Marseille", "Bordeaux", "Nantes"),
        ("Boulangerie Lefèvre", "Lumière Boutique", "Le Petit Café", "Fromagerie Girard"),
        ("Colissimo", "Chronopost"),
        ("orange.fr", "gmail.com", "free.fr"),
        "fr",
        "+33 6 {a} {b}",
        "FR",
    ),
    Locale(
        "Spain",
        5,
        "EUR",
        "dmy_slash",
        "es",
        ("José", "Ana María", "Íñigo", "Lucía", "Pablo", "Nuria", "Begoña", "Sergio"),
        ("García", "Fernández", "Núñez", "López", "Martín", "Ibáñez", "Peña"),
        ("Madrid", "Barcelona", "Valencia", "Sevilla", "Bilbao"),
        ("Librería Núñez", "Taberna El Olivo", "Zapatería Peña", "Café Lucía"),
        ("Correos", "SEUR"),
        ("gmail.com", "hotmail.es", "yahoo.es"),
        "es",
        "+34 6{a} {b}",
        "ESB",
    ),
    Locale(
        "the Netherlands",
        4,
        "EUR",
        "dmy_slash",
        "nl",
        ("Zoë", "Sanne", "Daan", "Joost", "Fenna", "Bram", "Eline"),
        ("de Vries", "van Dijk", "Bakker", "Jansen", "Visser", "de Jong"),
        ("Amsterdam", "Utrecht", "Rotterdam", "Den Haag", "Groningen"),
        ("Café Zoë", "Fietsenwinkel Bakker", "De Gouden Tulp"),
        ("PostNL", "DHL"),
        ("gmail.com", "ziggo.nl", "kpnmail.nl"),
        "nl",
        "+31 6 {a}{b}",
        "NL",
    ),
    Locale(
        "Brazil",
        4,
        "BRL",
        "dmy_slash",
        "pt",
        ("João", "Luíza", "Thiago", "Conceição", "Gabriel", "Letícia", "Vinícius"),
        ("Silva", "Araújo", "Gonçalves", "Magalhães", "Souza", "Lima"),
        ("São Paulo", "Rio de Janeiro", "Belo Horizonte", "Curitiba", "Porto Alegre"),
        ("Padaria Pão Quente", "Açaí da Praia", "Livraria Magalhães"),
        ("Correios", "Jadlog"),
        ("gmail.com", "uol.com.br", "hotmail.com"),
        "com.br",
        "+55 11 9{a}-{b}",
        "CNPJ ",
    ),
    Locale(
        "Poland",
        4,
        "PLN",
        "dmy_dot",
        "pl",
        ("Łukasz", "Małgorzata", "Paweł", "Zofia", "Wojciech", "Agnieszka", "Michał", "Joanna"),
        ("Nowak", "Wójcik", "Kowalczyk", "Zając", "Król", "Mazur", "Woźniak"),
        ("Warszawa", "Kraków", "Gdańsk", "Wrocław", "Poznań"),
        ("Kwiaciarnia Łąka", "Piekarnia Złoty Kłos", "Sklep Rowerowy Mazur"),
        ("InPost", "DPD"),
        ("wp.pl", "onet.pl", "gmail.com"),
        "pl",
        "+48 5{a} {b}",
        "PL",
    ),
    Locale(
        "Mexico",
        3,
        "MXN",
        "dmy_slash",
        "es",
        ("José Luis", "Guadalupe", "Alejandro", "Ximena", "Andrés", "Sofía"),
        ("Hernández", "Ramírez", "Cruz", "Pérez", "Gómez"),
        ("Ciudad de México", "Guadalajara", "Monterrey", "Puebla"),
        ("Tacos Don Chuy", "Papelería La Estrella", "Panadería Santa Fe"),
        ("Estafeta", "DHL"),
        ("gmail.com", "hotmail.com", "prodigy.net.mx"),
        "mx",
        "+52 55 {a} {b}",
        "RFC ",
    ),
    Locale(
        "Japan",
        2,
        "JPY",
        "iso",
        "ja",
        ("Kenta", "Yui", "Haruto", "Sakura", "Ren", "Aoi"),
        ("Tanaka", "Suzuki", "Sato", "Watanabe", "Takahashi", "Ito"),
        ("Tokyo", "Osaka", "Kyoto", "Fukuoka"),
        ("Sakura Ramen", "Kissaten Hoshi", "Tanaka Stationery"),
        ("Yamato Transport", "Sagawa"),
        ("gmail.com", "yahoo.co.jp", "docomo.ne.jp"),
        "jp",
        "+81 90 {a} {b}",
        "T",
    ),
    Locale(
        "Denmark",
        2,
        "DKK",
        "dmy_dot",
        "da",
        ("Søren", "Mette", "Freja", "Mads", "Astrid", "Rasmus"),
        ("Jørgensen", "Nielsen", "Sørensen", "Hansen", "Møller"),
        ("København", "Aarhus", "Odense"),
        ("Møllers Bageri", "Cykelværkstedet", "Kaffebaren Ø"),
        ("PostNord", "GLS"),
        ("gmail.com", "hotmail.dk", "mail.dk"),
        "dk",
        "+45 {a} {b}",
        "DK",
    ),
    Locale(
        "Turkey",
        2,
        "TRY",
        "dmy_dot",
        "tr",
        ("Çağla", "Emre", "Şule", "Oğuz", "Elif", "Burak"),
        ("Yılmaz", "Kaya", "Demir", "Çelik", "Şahin"),
        ("İstanbul", "Ankara", "İzmir"),
        ("Kahve Durağı", "Demir Hırdavat", "Lale Çiçekçilik"),
        ("Yurtiçi Kargo", "Aras Kargo"),
        ("gmail.com", "hotmail.com", "yandex.com.tr"),
        "com.tr",
        "+90 5{a} {b}",
        "VKN ",
    ),
)

# A first line in the customer's own language, followed by English. Generic per category on purpose:
# the native sentence must never contradict the ground-truth label of the English text that follows.
NATIVE_GIST: dict[str, dict[str, str]] = {
    "de": {
        "billing": "Ich habe ein Problem mit einer Abbuchung.",
        "account_access": "Ich komme nicht in mein Konto.",
        "bug": "Etwas funktioniert bei Ihnen nicht richtig.",
        "shipping": "Ich habe eine Frage zu meiner Bestellung.",
        "feature_request": "Ich hätte einen Verbesserungsvorschlag.",
    },
    "fr": {
        "billing": "J'ai un problème avec un prélèvement.",
        "account_access": "Je n'arrive pas à accéder à mon compte.",
        "bug": "Quelque chose ne fonctionne pas correctement.",
        "shipping": "J'ai une question concernant ma commande.",
        "feature_request": "J'ai une suggestion pour le produit.",
    },
    "es": {
        "billing": "Tengo un problema con un cobro.",
        "account_access": "No puedo acceder a mi cuenta.",
        "bug": "Algo no funciona bien en el sistema.",
        "shipping": "Tengo una consulta sobre mi pedido.",
        "feature_request": "Tengo una sugerencia para el producto.",
    },
    "pt": {
        "billing": "Tenho um problema com uma cobrança.",
        "account_access": "Não consigo acessar minha conta.",
        "bug": "Algo não está funcionando direito.",
        "shipping": "Tenho uma dúvida sobre o meu pedido.",
        "feature_request": "Tenho uma sugestão para o produto.",
    },
    "pl": {
        "billing": "Mam problem z płatnością.",
        "account_access": "Nie mogę zalogować się na swoje konto.",
        "bug": "Coś nie działa poprawnie.",
        "shipping": "Mam pytanie dotyczące zamówienia.",
        "feature_request": "Mam sugestię dotyczącą produktu.",
    },
    "nl": {
        "billing": "Ik heb een probleem met een afschrijving.",
        "account_access": "Ik kan niet inloggen op mijn account.",
        "bug": "Er werkt iets niet goed.",
        "shipping": "Ik heb een vraag over mijn bestelling.",
        "feature_request": "Ik heb een suggestie voor het product.",
    },
    "da": {
        "billing": "Jeg har et problem med en betaling.",
        "account_access": "Jeg kan ikke logge ind på min konto.",
        "bug": "Noget virker ikke, som det skal.",
        "shipping": "Jeg har et spørgsmål om min ordre.",
        "feature_request": "Jeg har et forslag til produktet.",
    },
    "tr": {
        "billing": "Bir ödemeyle ilgili sorunum var.",
        "account_access": "Hesabıma giriş yapamıyorum.",
        "bug": "Bir şey düzgün çalışmıyor.",
        "shipping": "Siparişimle ilgili bir sorum var.",
        "feature_request": "Ürün için bir önerim var.",
    },
    "ja": {
        "billing": "請求について問題があります。",
        "account_access": "アカウントにログインできません。",
        "bug": "システムが正しく動作しません。",
        "shipping": "注文について質問があります。",
        "feature_request": "製品について提案があります。",
    },
}
NATIVE_SNIPPETS: dict[str, tuple[str, ...]] = {
    "de": (
        "Vielen Dank im Voraus!",
        "Entschuldigung, mein Englisch ist nicht perfekt.",
        "Mit freundlichen Grüßen",
    ),
    "fr": ("Merci d'avance !", "Désolé pour mon anglais.", "Bonne journée"),
    "es": ("¡Gracias de antemano!", "Perdón por mi inglés.", "Un saludo"),
    "pt": ("Obrigado desde já!", "Desculpe o meu inglês.", "Abraços"),
    "pl": ("Z góry dziękuję!", "Przepraszam za mój angielski.", "Pozdrawiam"),
    "nl": ("Alvast bedankt!", "Sorry voor mijn Engels.", "Met vriendelijke groet"),
    "da": ("På forhånd tak!", "Undskyld mit engelsk.", "Venlig hilsen"),
    "tr": ("Şimdiden teşekkürler!", "İngilizcem için kusura bakmayın.", "İyi çalışmalar"),
    "ja": ("よろしくお願いします。", "英語が下手ですみません。", "よろしくお願いいたします"),
}
BRIDGES = (
    "(Sorry, I'll continue in English.)",
    "- sorry, English below:",
    "Sorry, wrong language! In English:",
    "",
)

MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

PLANS = {
    "free": (("Starter", 9), ("Pro trial", 29)),
    "pro": (("Pro", 29), ("Pro", 29), ("Pro annual", 290), ("Business", 79)),
    "enterprise": (("Enterprise", 1250), ("Enterprise Plus", 2400)),
}
HARDWARE = (
    ("Loom Terminal", 299),
    ("Loom Terminal Mini", 199),
    ("Loom Card Reader", 59),
    ("receipt printer", 189),
    ("barcode scanner", 129),
    ("cash drawer", 99),
    ("label printer", 219),
    ("kitchen display", 349),
)
ACCESSORIES = (
    "charging dock",
    "power adapter",
    "USB-C cable",
    "box of receipt paper rolls",
    "mounting bracket",
    "protective case",
    "stylus",
)
PRODUCTS = ("Reports", "Inventory", "Orders", "Customers", "Analytics")
INTEGRATIONS = ("Shopify", "WooCommerce", "QuickBooks", "Xero", "BigCommerce", "Mailchimp")
ERROR_CODES = (
    "E1042",
    "ERR_SYNC_TIMEOUT",
    "BL-5003",
    "HTTP 502",
    "0x80070005",
    "ERR_CONNECTION_RESET",
    "E_PRINTER_OFFLINE",
    "SYNC-409",
    "E2217",
    "BL-4410",
)
AUTH_ERRORS = ("AUTH-401", "E_SESSION_INVALID", "AUTH-419", "LOGIN_STATE_MISMATCH")
BROWSERS = ("Chrome 131", "Chrome 132", "Firefox 134", "Safari 18.2", "Edge 131", "Brave", "Samsung Internet")
OSES = ("Windows 11", "Windows 10", "macOS Sonoma", "macOS Sequoia", "iPadOS 18", "Android 14", "ChromeOS")
DEVICES = (
    "iPhone 15",
    "iPhone 13 mini",
    "Pixel 8",
    "Galaxy S24",
    "Galaxy A54",
    "iPad Air",
    "Moto G",
    "OnePlus 12",
)
SSO = ("Okta", "Microsoft Entra ID", "Google Workspace", "OneLogin", "JumpCloud")
SSO_ERRORS = (
    "SAML response signature invalid",
    "AADSTS50105: user is not assigned to a role",
    "invalid_grant",
    "Assertion has expired",
    "Audience mismatch",
)
DECLINES = (
    "Your card was declined.",
    "Card authentication failed (3D Secure)",
    "do_not_honor",
    "Transaction not permitted for this card",
)
CARD_BRANDS = ("Visa", "Mastercard", "Amex", "Visa debit")
OTHER_COUNTRIES = ("Singapore", "Romania", "Vietnam", "Argentina", "Indonesia", "Kazakhstan")
FEATURES = (
    "dark mode",
    "bulk editing of products",
    "a Slack integration",
    "keyboard shortcuts",
    "stock transfers between locations",
    "scheduled exports to Google Drive",
    "a loyalty program",
    "recurring orders",
    "gift cards",
    "staff time tracking",
    "offline mode for the mobile app",
    "an Excel (.xlsx) export",
    "two-person approval for refunds",
    "custom receipt footers",
)
TITLES = (
    "Owner",
    "Store Manager",
    "Operations Manager",
    "Head of Finance",
    "IT Administrator",
    "Co-founder",
    "Bookkeeper",
    "Office Manager",
    "Head of Retail Operations",
    "CTO",
)
OLD_MAIL_DOMAINS = ("oldjob.com", "previous-employer.com", "formerco.net")
AGENTS = ("Maya", "Tom", "Aisha", "Lukas", "Inés", "Sam", "Noor", "Dev", "Hannah", "Kofi")


def _ascii_slug(text: str, sep: str = ".") -> str:
    """Fold accents for email addresses: ``Łukasz Wójcik`` -> ``lukasz.wojcik`` (NFKD misses ł/ø/ß)."""
    special = str.maketrans(
        {"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "ß": "ss", "ı": "i", "İ": "I", "æ": "ae", "đ": "d", "Đ": "D"}
    )
    folded = unicodedata.normalize("NFKD", text.translate(special)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", sep, folded.lower()).strip(sep)


def _group(n: int, sep: str) -> str:
    """Thousands grouping without locale or format-spec tricks."""
    digits = str(n)
    parts: list[str] = []
    while len(digits) > 3:
        parts.insert(0, digits[-3:])
        digits = digits[:-3]
    parts.insert(0, digits)
    return sep.join(parts)


def money(d: Dice, cur: Currency, usd: int, exact: bool = True) -> str:
    """Format a USD price in the customer's currency the way they would type it.

    ``exact`` prices are rounded to whole units (list prices); otherwise random minor units are added,
    as with prorations and odd charges. Integer arithmetic only, so output never depends on floats.
    """
    major = (usd * cur.per_usd_milli + 500) // 1000
    if major >= 1000:
        major = (major + 5) // 10 * 10
    minor = 0 if exact else d.randint(1, 99)
    if cur.minor_digits == 0:
        text = _group(major, cur.group)
    else:
        text = f"{_group(major, cur.group)}{cur.decimal}{minor:02d}"
    return f"{cur.symbol}{text}" if cur.prefix else f"{text}{cur.symbol}"


def fmt_date(dt: datetime, style: str) -> str:
    """Write a date the way this customer would; English month names avoid ``strftime`` locale drift."""
    day, month = dt.day, dt.month
    if style == "long":
        return f"{MONTHS[month - 1]} {day}"
    if style == "long_dm":
        return f"{day} {MONTHS[month - 1]}"
    if style == "short":
        suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
        return f"{MONTHS[month - 1][:3]} {day}{suffix}"
    if style == "us":
        return f"{month:02d}/{day:02d}/{dt.year}"
    if style == "dmy_dot":
        return f"{day:02d}.{month:02d}.{dt.year}"
    if style == "dmy_slash":
        return f"{day:02d}/{month:02d}/{dt.year}"
    return f"{dt.year}-{month:02d}-{day:02d}"


# ---------------------------------------------------------------------------------------------------
# Scenarios: what the ticket is about. Near-misses carry ``decoy``, the team their wording points to.
# ``floor``/``cap`` keep the priority believable (a cosmetic glitch is never urgent, data loss always is).
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One kind of ticket with several phrasings; slots like ``{order}`` are filled per ticket."""

    category: str
    key: str
    subjects: tuple[str, ...]
    bodies: tuple[str, ...]
    shorts: tuple[str, ...] = ()
    decoy: str | None = None
    floor: str = "low"
    cap: str = "urgent"
    force_escalate: bool = False
    reasons: tuple[str, ...] | None = None  # escalation reasons that fit; None = category default
    high_phrases: tuple[str, ...] | None = None  # replaces the category's when those would not fit


S = Scenario

SCENARIOS: tuple[Scenario, ...] = (
    # ----------------------------------------------------------------------------------- billing
    S(
        "billing",
        "double_charge",
        (
            "Charged twice this month",
            "Double charge on my {card_brand}",
            "duplicate payment??",
            "Two charges for one subscription",
        ),
        (
            "I was charged {plan_price} twice on {date} for my {plan} subscription. Both charges show up on "
            "my {card_brand} ending in {last4}. Please refund the duplicate.",
            "Looking at my bank statement there are two identical charges of {plan_price} from Brightloom "
            "dated {date}. We only have one workspace ({workspace}), so one of them must be a mistake.",
            "Hello, your system billed me twice for the same month. Charge 1: {plan_price} on {date}. Charge "
            "2: {plan_price} on {date}. Card ending {last4}. Can you reverse one of them?",
        ),
        (
            "charged twice for {plan} this month, card ending {last4}",
            "double charge {plan_price} pls refund one",
        ),
    ),
    S(
        "billing",
        "charged_after_cancel",
        (
            "Charged after cancelling",
            "Why was I billed? I cancelled",
            "Refund request - cancelled subscription",
        ),
        (
            "I cancelled my {plan} plan on {date2} and got a confirmation email, but I was still billed "
            "{plan_price} on {date}. I'd like that renewal refunded.",
            "We closed our {city} shop and cancelled Brightloom on {date2}. Today I see another charge of "
            "{plan_price}. Please refund it and make sure nothing else gets charged.",
        ),
        ("cancelled on {date2} but still charged {plan_price}",),
    ),
    S(
        "billing",
        "price_mismatch",
        (
            "Invoice amount doesn't match pricing page",
            "Question about invoice {invoice}",
            "Why is my bill higher this month?",
        ),
        (
            "My invoice {invoice} shows {plan_price_odd} but the pricing page says the {plan} plan is "
            "{plan_price}. Can you explain the difference?",
            "This month's bill went up to {plan_price_odd} from the usual {plan_price}. Nothing changed on "
            "our side as far as I know: same users, same plan ({plan}). What happened?",
        ),
        ("why is invoice {invoice} {plan_price_odd}? pricing page says {plan_price}",),
    ),
    S(
        "billing",
        "vat_missing",
        (
            "VAT number missing on invoice",
            "Need corrected invoice for accounting",
            "Invoice {invoice} - wrong company details",
        ),
        (
            "Our invoice {invoice} is missing our tax number ({vat}). We're a registered business in "
            "{country} and our accountant can't book it without a corrected invoice.",
            "The company name on invoice {invoice} is wrong: it still shows my personal name instead of "
            "{company}. Could you reissue it with the right details and tax ID {vat}?",
        ),
        ("please add tax ID {vat} to invoice {invoice}",),
        cap="high",
    ),
    S(
        "billing",
        "proration",
        ("Proration charge looks wrong", "Upgrade charge question", "Unexpected charge after adding seats"),
        (
            "I upgraded from Pro to Business on {date} and was charged {plan_price_odd} straight away. I "
            "thought it would be prorated for the rest of the month. How is this calculated?",
            "We added {n_seats} seats mid-cycle and the prorated charge was {plan_price_odd}, which looks "
            "like a full month for every seat. Can someone double-check the maths?",
        ),
        ("upgrade proration charge {plan_price_odd} seems too high",),
        cap="high",
    ),
    S(
        "billing",
        "card_declined",
        ("Payment declined", "Card keeps getting declined", "Can't pay my invoice"),
        (
            "My payment keeps getting declined even though the card works everywhere else. It's my "
            "{card_brand} "
            'ending in {last4}, and the error says "{decline}".',
            'Tried to pay invoice {invoice} three times today and each time it fails with "{decline}". My '
            "bank says they see no attempts at all on their side.",
        ),
        ("card ending {last4} declined: {decline}",),
    ),
    S(
        "billing",
        "seat_overbilling",
        ("Billed for too many seats", "Seat count on invoice is wrong"),
        (
            "We were billed for {n_seats} seats on invoice {invoice}, but we only have {n_seats_actual} "
            "active users. Please adjust it and credit the difference.",
            "Our admin removed several users last month, yet the {plan} invoice still charges for {n_seats} "
            "seats. We should be at {n_seats_actual}.",
        ),
        ("invoice {invoice} charges {n_seats} seats, we have {n_seats_actual}",),
    ),
    S(
        "billing",
        "trial_charge",
        ("Charged during free trial", "Trial was supposed to be free", "why was I charged??"),
        (
            "I started the 14-day trial {n_small} days ago and was already charged {plan_price} yesterday, "
            "well before it ends. I haven't even decided whether to keep it.",
            "Why did I get charged {plan_price}? The signup page said no card would be charged until the "
            "trial ends, and I'm still in the trial.",
        ),
        ("charged {plan_price} during free trial??",),
    ),
    S(
        "billing",
        "refund_not_received",
        ("Refund still not received", "Where is my refund?", "Refund status"),
        (
            "Your team confirmed a refund of {plan_price} on {date2}, but it still hasn't appeared on my "
            "card ending in {last4}. It's been weeks.",
            "I was told the refund for invoice {invoice} ({plan_price}) was processed. My bank has nothing. "
            "Can you send me the refund reference so I can chase it?",
        ),
        ("refund of {plan_price} from {date2} still not on my card",),
    ),
    S(
        "billing",
        "unknown_charge",
        ("Unknown charge from BRIGHTLOOM", "What is this charge?", "charge on my statement"),
        (
            'There\'s a charge of {plan_price} from "BRIGHTLOOM*SUBSCR" on my statement from {date}. '
            "I don't remember signing up for anything. Can you tell me what it's for?",
            "Found {plan_price} charged by Brightloom on {date}. Could this be my business partner's "
            "account? The email on the card account is {email}.",
        ),
        ("what is the BRIGHTLOOM charge of {plan_price} on {date}",),
    ),
    S(
        "billing",
        "receipt_request",
        ("Receipt needed for expense report", "Can I get a receipt?", "Invoice copy please"),
        (
            "Could you send me a receipt for the {plan_price} payment on {date}? I need it for my expense "
            "report.",
            "Where can I download past invoices? I need the ones for January and February for our "
            "bookkeeping, and I can only find the latest one.",
        ),
        ("need a receipt for the {date} payment",),
        cap="medium",
    ),
    S(
        "billing",
        "currency_change",
        ("Change billing currency", "Billing in the wrong currency"),
        (
            "We're based in {country} but get billed in US dollars, and our bank adds a conversion fee every "
            "month. Can you switch our {plan} subscription to local currency?",
        ),
        ("can we be billed in local currency instead of USD",),
        cap="medium",
    ),
    S(
        "billing",
        "hardware_overcharge",
        ("Charged more than the listed price", "Overcharged for {hardware}"),
        (
            "I bought a {hardware} (order {order}) and my card was charged {hw_price}, but the checkout page "
            "said {hw_price_low}. Please refund the difference.",
            "The {hardware} was on sale for {hw_price_low} when I ordered ({order}), yet the charge on my "
            "{card_brand} is {hw_price}. Can you fix that?",
        ),
        ("charged {hw_price} for {hardware}, checkout said {hw_price_low}",),
    ),
    S(
        "billing",
        "billing_contact",
        ("Update billing contact", "Send invoices to our accounts team"),
        (
            "Please send future invoices to accounts@{domain} instead of my address. I'm still the owner but "
            "our bookkeeper handles payments now.",
        ),
        ("pls send invoices to accounts@{domain} from now on",),
        cap="medium",
    ),
    S(
        "billing",
        "renewal_surprise",
        ("Annual renewal charged without notice", "Didn't expect the annual renewal"),
        (
            "Our {plan} subscription renewed for a full year on {date}, {annual_price} in one go, without "
            "any reminder email. We meant to switch to monthly billing. Can this be reversed and moved to "
            "monthly?",
        ),
        ("annual renewal {annual_price} charged without reminder, want monthly instead",),
    ),
    # ------------------------------------------------------------------------------ account_access
    S(
        "account_access",
        "reset_email_missing",
        ("Password reset email not arriving", "Never got the reset link", "reset password not working"),
        (
            "I've requested a password reset three times today but the email never arrives. I checked spam "
            "and promotions. My login email is {email}.",
            'Forgot my password, clicked "Forgot password", and nothing comes through. Is there another way '
            "to get back into my account?",
        ),
        ("reset email never arrives for {email}",),
    ),
    S(
        "account_access",
        "locked_after_attempts",
        ("Account locked", "Locked out after too many attempts", "account temporarily locked"),
        (
            "My account got locked after too many login attempts. The message says to try again in 24 hours, "
            "but I need to get in before then. Can you unlock it?",
            'I mistyped my password a few times and now it says "Account temporarily locked". Please unlock '
            "{email}.",
        ),
        ("account locked after failed logins, please unlock {email}",),
        floor="medium",
    ),
    S(
        "account_access",
        "lost_2fa_device",
        ("Lost phone - can't get past 2FA", "2FA reset request", "New phone, authenticator codes gone"),
        (
            "I got a new {device} and didn't move my authenticator app over. Now I can't get past the "
            "two-factor screen and I don't have my backup codes.",
            "My phone was stolen on {date} and it had my authenticator app on it. I need two-factor removed "
            "from {email} so I can set it up again.",
        ),
        ("new phone, lost my 2FA app, can't log in",),
        floor="medium",
    ),
    S(
        "account_access",
        "sso_failure",
        ("SSO login failing", "{sso} SSO error", "Can't sign in with SSO"),
        (
            'Since this morning, signing in through {sso} fails with "{sso_error}" for several people in our '
            "workspace ({workspace}). Password login is disabled for us.",
            'Our {sso} integration stopped working after we rotated our certificate. Users get "{sso_error}" '
            "and are sent back to the login page.",
        ),
        ("{sso} sso login fails: {sso_error}",),
        floor="medium",
        reasons=("outage", "legal"),
    ),
    S(
        "account_access",
        "old_email_no_access",
        ("Change login email", "Lost access to my old email", "Move account to new email address"),
        (
            "I signed up with my old work email {email_old} and lost access to it when I changed jobs. How "
            "can I move my account to {email}?",
            "The email on my account ({email_old}) no longer exists, so I can't receive the verification "
            "code to sign in. Please change it to {email}.",
        ),
        ("need to change login email from {email_old} to {email}",),
    ),
    S(
        "account_access",
        "account_deactivated",
        ("Account says deactivated", "Why is my account deactivated?"),
        (
            'When I try to log in it says "This account has been deactivated". I never deactivated anything '
            "and I'm the owner of {workspace}.",
        ),
        ("login says account deactivated, I'm the owner",),
        floor="medium",
    ),
    S(
        "account_access",
        "invite_expired",
        ("Invite link expired", "Can't join my team's workspace"),
        (
            "My manager invited me to the {workspace} workspace but the invite link says it has expired. "
            "She's on holiday until {deadline}. Can you resend it or add me directly?",
        ),
        ("invite link to {workspace} expired",),
    ),
    S(
        "account_access",
        "account_compromised",
        ("Someone else logged into my account", "Account hacked?", "Suspicious login and password changed"),
        (
            "I got an alert about a sign-in from {country2} that wasn't me, and now my password doesn't "
            "work. I think someone has taken over my account. Please lock it down.",
            "Someone changed the email address on my account to one I don't recognise and I can't log in any "
            "more. I'm worried they can see our customer list.",
        ),
        ("my account was hacked, password changed, can't log in",),
        floor="urgent",
    ),
    S(
        "account_access",
        "admin_left",
        ("Our admin left the company", "Need admin rights transferred"),
        (
            "Our only admin left the company on {date2} and nobody else can manage users or settings in "
            "{workspace}. How can we transfer admin rights to me? I'm the {title}.",
        ),
        ("only admin left, need admin rights moved to me",),
    ),
    S(
        "account_access",
        "role_downgraded",
        ("Lost admin access", "My role changed to Viewer?"),
        (
            'Since {date} my role shows "Viewer" and I can\'t open Settings or Reports any more. '
            "I used to be an admin. Did someone change my permissions?",
        ),
        ("my role got changed to viewer, can't open settings",),
    ),
    S(
        "account_access",
        "which_email",
        ("Which email did I sign up with?", "Can't remember my login"),
        (
            "I can't remember which email I used to sign up. I've tried {email} and my personal address. Can "
            "you look it up by my name, {full}?",
        ),
        ("which email is my account under? name is {full}",),
        cap="medium",
    ),
    S(
        "account_access",
        "suspended_after_review",
        ("Account suspended", "Why was my account suspended?"),
        (
            'I logged in this morning and got "Your account is suspended pending review". Nobody told us '
            "anything. What do we need to do to get access back?",
        ),
        ("account suspended pending review?? how do I get access back",),
        floor="medium",
    ),
    # ------------------------------------------------------------------------------------------ bug
    S(
        "bug",
        "export_crash",
        ("Export crashes", "CSV export fails with large reports", "export broken"),
        (
            "The {product} page crashes when I export more than {n_rows} rows to CSV. Smaller exports work. "
            "I'm on {browser}, {os}.",
            'Clicking Export on the {product} report gives "{error_code}" and the download never starts. It '
            "worked fine last week.",
        ),
        ("csv export of {product} fails with {error_code}",),
        reasons=(),
    ),
    S(
        "bug",
        "dashboard_spinner",
        ("Dashboard not loading", "Blank dashboard", "stuck on loading spinner"),
        (
            "The dashboard shows a loading spinner forever on {browser}. The console shows a 504 for "
            "/api/widgets. I tried logging out and back in.",
            "Since {date} the home dashboard is blank for me: just the header and nothing else. Same on "
            "{browser} and on my {device}.",
        ),
        ("dashboard stuck loading forever",),
    ),
    S(
        "bug",
        "integration_sync",
        ("{integration} sync failing", "Inventory sync error {error_code}", "sync stopped working"),
        (
            "Inventory sync with {integration} has been failing with {error_code} since {date}. Stock levels "
            "are out of date, so we're overselling.",
            'The nightly {integration} sync says "completed" but none of the new products show up in '
            "Brightloom. Last good sync was {date2}.",
        ),
        ("{integration} sync failing with {error_code}",),
        floor="medium",
        reasons=("outage", "data_loss"),
    ),
    S(
        "bug",
        "app_crash",
        ("App crashes on launch", "Mobile app keeps closing", "app crash after update"),
        (
            "The Brightloom app crashes as soon as I open it on my {device} since the latest update. "
            "Reinstalling didn't help.",
            "App closes straight after the splash screen. {device}, app version {version}.",
        ),
        ("app crashes on open, {device}",),
    ),
    S(
        "bug",
        "wrong_report_numbers",
        ("Sales report numbers are wrong", "Daily totals don't match the till"),
        (
            "The daily sales report for {date} shows {hw_price_odd}, but our till totals for that day were "
            "{plan_price_odd}. It looks like orders are counted twice when a refund is involved.",
            "Revenue in {product} doesn't match our payouts for {date}. Refunded orders seem to be counted "
            "as sales.",
        ),
        ("sales report totals wrong for {date}",),
        reasons=("legal",),
    ),
    S(
        "bug",
        "duplicate_notifications",
        ("Getting every notification three times", "Duplicate emails"),
        (
            "I'm getting every email notification three times since the update. Not the end of the world but "
            "it's filling up my inbox.",
        ),
        ("every notification arrives 3 times",),
        cap="medium",
    ),
    S(
        "bug",
        "terminal_freeze",
        ("Loom Terminal freezes", "Terminal stuck on 'Processing'", "receipt printing error {error_code}"),
        (
            "Our Loom Terminal freezes when it tries to print a receipt: the screen shows {error_code} and "
            "we have to restart it. It happens a few times a day at our {city} store.",
            "The card reader keeps disconnecting from the terminal mid-payment. Customers wait at the till "
            "while we reboot it.",
        ),
        ("terminal freezes printing receipts, {error_code}",),
        floor="medium",
        reasons=("outage",),
    ),
    S(
        "bug",
        "api_errors",
        ("API returning 500s", "Intermittent 500 on POST /v2/orders", "Rate limit errors below limit"),
        (
            "POST /v2/orders returns HTTP 500 for about 1 in 10 requests since {date}. Request IDs: "
            "req_{hex1}, req_{hex2}. The same payload succeeds on retry.",
            "The API started returning 429 Too Many Requests even though we're far below the documented rate "
            "limit (about {n_small} requests per minute).",
        ),
        ("api 500s on POST /v2/orders, req_{hex1}",),
        reasons=("outage", "data_loss"),
    ),
    S(
        "bug",
        "scheduled_report_time",
        ("Scheduled reports arriving late", "Report schedule off by an hour"),
        (
            "Scheduled reports now arrive an hour late since the clocks changed. The schedule is set to 7:00 "
            "local time and the timezone in settings is correct.",
        ),
        ("scheduled reports an hour late since DST",),
        cap="high",
    ),
    S(
        "bug",
        "search_accents",
        ("Search doesn't find products with accents", "Search broken for accented names"),
        (
            'Searching for products with accents (for example "Crème brûlée" or "Jalapeño") returns no '
            "results, even though they exist. Searching without the accent works.",
        ),
        ("search ignores products with accents like Crème",),
        cap="high",
    ),
    S(
        "bug",
        "upload_limit",
        ("CSV upload fails", "413 error when importing products"),
        (
            'Uploading a product CSV bigger than about 5 MB fails with "413 Request Entity Too Large". The '
            "docs say up to 50 MB is supported.",
        ),
        ("product import fails with 413 for files over 5MB",),
        reasons=(),
    ),
    S(
        "bug",
        "data_loss",
        ("Saved data disappeared", "Products missing after update", "Where did our records go?"),
        (
            "After yesterday's update all of our saved filters and custom views disappeared. We had "
            "{n_small} of them set up for different stores.",
            "Part of our product catalogue is just gone: {n_records} items have been missing since {date}. "
            "Nobody on our team deleted them.",
        ),
        ("{n_records} products vanished from our catalogue",),
        floor="urgent",
        force_escalate=True,
    ),
    S(
        "bug",
        "ui_glitch",
        ("Save button hidden", "Small display issue", "date picker week start"),
        (
            "The Save button is hidden behind the chat widget on smaller screens, so I have to zoom out to "
            "click it.",
            "Tiny thing: the date picker in {product} starts the week on Sunday even though I set Monday in "
            "my preferences.",
        ),
        ("save button hidden behind chat bubble",),
        cap="medium",
    ),
    S(
        "bug",
        "webhooks",
        ("Webhooks stopped firing", "No order.created webhooks since {date}"),
        (
            "Our order.created webhooks stopped firing on {date}. The endpoint is up (we can call it "
            "ourselves) and the webhook log in Brightloom is empty.",
        ),
        ("webhooks not firing since {date}",),
        reasons=("outage", "data_loss"),
    ),
    S(
        "bug",
        "cross_tenant",
        ("I can see another company's data", "SECURITY: wrong customer data showing"),
        (
            "After logging in today, the Customers page shows names and emails that aren't ours. It looks "
            "like another business's data. This is a serious privacy problem.",
        ),
        ("seeing another company's customer list in our account",),
        floor="urgent",
        force_escalate=True,
    ),
    S(
        "bug",
        "tax_calc",
        ("Sales tax calculated wrong", "Tax shows 0% since update"),
        (
            "Sales tax is being calculated at 0% for sales at our {city} store since the last update. Our "
            "tax settings haven't changed.",
        ),
        ("tax 0% at {city} store since update",),
        reasons=("legal",),
    ),
    # -------------------------------------------------------------------------------- feature_request
    S(
        "feature_request",
        "wishlist",
        ("Feature request: {feature}", "Suggestion - {feature}", "Any plans for {feature}?", "idea"),
        (
            "Would you consider adding {feature}? We'd use it every day.",
            "Is {feature} on the roadmap? It's the one thing I keep missing compared to our old system.",
            "Suggestion from a happy customer: {feature}. I think a lot of small shops like ours would use "
            "it.",
        ),
        ("any plans for {feature}?", "pls add {feature}"),
    ),
    S(
        "feature_request",
        "bulk_edit",
        ("Bulk edit prices", "Edit many products at once?"),
        (
            "It would save us hours if we could change prices for a whole category at once instead of "
            "editing {n_records} products one by one.",
        ),
        ("please add bulk price editing",),
    ),
    S(
        "feature_request",
        "granular_roles",
        ("More granular user roles", "Role for cashiers only"),
        (
            "Could you add a role between Staff and Admin? We want store managers to issue refunds without "
            "giving them access to billing.",
        ),
        ("need a role that can refund but not see billing",),
    ),
    S(
        "feature_request",
        "api_endpoint",
        ("API: endpoint for stock history", "Request: webhook for low stock"),
        (
            "We'd love a webhook when stock drops below a threshold, so our purchasing tool can reorder "
            "automatically.",
            "Could the API expose stock movement history? Right now we can only read current levels.",
        ),
        ("low stock webhook please",),
    ),
    S(
        "feature_request",
        "integration_request",
        ("Integration with {integration}?", "Please integrate with our accounting tool"),
        (
            "Do you plan a native integration with {integration}? We export CSVs every week and import them "
            "by hand.",
        ),
        ("native {integration} integration would be great",),
    ),
    S(
        "feature_request",
        "mobile_improvements",
        ("Mobile app suggestion", "Barcode scanning in the app"),
        (
            "It would be great if the mobile app could scan barcodes with the phone camera for stock counts, "
            "so we don't need the separate scanner.",
        ),
        ("let the app scan barcodes with the camera",),
    ),
    # --------------------------------------------------------------------------------------- shipping
    S(
        "shipping",
        "where_is_order",
        ("Where is my order?", "Order {order} not arrived", "Tracking not updating"),
        (
            "Order {order} was supposed to arrive by {date}. Tracking number {tracking} ({carrier}) hasn't "
            "updated in {n_days} days.",
            "I ordered a {hardware} on {date2} and it still hasn't arrived. The {carrier} tracking just says "
            '"in transit".',
        ),
        ("where is order {order}? tracking stuck", "order {order} still not here"),
    ),
    S(
        "shipping",
        "damaged",
        ("Item arrived damaged", "Broken {hardware} on delivery", "Damaged package"),
        (
            "The {hardware} from order {order} arrived with a cracked screen. The box was crushed on one "
            "side. I have photos.",
            "Package came today and the {hardware} inside is rattling and won't turn on. Order {order}.",
        ),
        ("{hardware} arrived broken, order {order}",),
    ),
    S(
        "shipping",
        "wrong_item",
        ("Wrong item received", "Received the wrong product"),
        ("I ordered a {hardware} but received a {hardware2} instead. Order {order}. How do I swap it?",),
        ("got {hardware2} instead of {hardware}",),
    ),
    S(
        "shipping",
        "missing_item",
        ("Item missing from my order", "Incomplete delivery"),
        ("Order {order} arrived but the {accessory} was missing from the box. The packing slip lists it.",),
        ("{accessory} missing from order {order}",),
    ),
    S(
        "shipping",
        "address_change",
        ("Change delivery address", "Wrong shipping address on order {order}"),
        (
            "I need to change the delivery address for order {order}; it hasn't shipped yet. New address is "
            "our {city} store.",
            "I put my old address on order {order} by mistake. Can you update it before it ships?",
        ),
        ("change address for {order} before it ships",),
    ),
    S(
        "shipping",
        "customs",
        ("Package stuck in customs", "Import duties on my order?"),
        (
            "My order {order} is stuck in customs in {country} and {carrier} is asking me to pay import "
            "duties I wasn't told about. Is that expected?",
        ),
        ("order {order} stuck in customs",),
    ),
    S(
        "shipping",
        "delivered_not_received",
        ("Says delivered but not received", "Package marked delivered - nothing here"),
        (
            "{carrier} says order {order} was delivered on {date}, but there's nothing at our door and the "
            "neighbours haven't seen it.",
        ),
        ("tracking says delivered, nothing here. {order}",),
    ),
    S(
        "shipping",
        "ship_to_country",
        ("Delivery time to {city}?", "Shipping question before ordering", "How long does shipping take?"),
        (
            "Before I order a {hardware}: do you deliver to {city}, and roughly how long does delivery take? "
            "Is there a faster option?",
        ),
        ("how long is delivery to {city}?",),
        cap="medium",
    ),
    S(
        "shipping",
        "return_label",
        ("Return label request", "How do I return the {hardware}?"),
        ("I'd like to send back the {hardware} from order {order}. How do I get a return label?",),
        ("need a return label for {order}",),
        cap="medium",
    ),
    S(
        "shipping",
        "partial_bulk_order",
        ("Only part of our order arrived", "Missing terminals from bulk order"),
        (
            "We ordered {n_small} terminals for our new {city} location (order {order}) and only half of "
            "them arrived. Tracking for the second parcel hasn't moved since {date}.",
        ),
        ("half of bulk order {order} missing",),
        floor="medium",
    ),
)

NEAR_MISSES: tuple[Scenario, ...] = (
    # billing that reads like account_access / shipping / bug
    S(
        "billing",
        "charged_after_password_reset",
        (
            "Charged twice after resetting my password",
            "Password reset and then a second charge?",
            "new charge after password reset",
        ),
        (
            "I reset my password on {date} because I'd forgotten it, and logging in works fine now. But "
            "right after that I was charged {plan_price} again, on top of this month's payment. Please "
            "refund the second charge.",
            "After the password reset last week I can get into my account without problems, but it looks "
            "like it created a second subscription: there are now two {plan} charges of {plan_price} on my "
            "card ending {last4}.",
        ),
        ("got charged twice after resetting my password, login itself is fine",),
        decoy="account_access",
    ),
    S(
        "billing",
        "charged_after_account_closed",
        ("Account closed but still being charged", "Can't log in anymore but you still charge me"),
        (
            "You closed my account on {date2} at my request, so of course I can't log in any more. But "
            "you're still charging me {plan_price} every month. I don't want access back, I want the charges "
            "stopped and refunded.",
        ),
        ("account closed, can't log in, still being charged {plan_price}",),
        decoy="account_access",
    ),
    S(
        "billing",
        "email_change_two_subscriptions",
        ("Two subscriptions after changing login email", "Invoiced twice since email change"),
        (
            "I changed the login email for our workspace from {email_old} to {email}, and since then we get "
            "invoiced on two separate subscriptions ({invoice} and one more). Sign-in works fine, it's only "
            "the double billing.",
        ),
        ("changed login email, now billed on 2 subscriptions",),
        decoy="account_access",
    ),
    S(
        "billing",
        "checkout_error_double_charge",
        ("Checkout error then charged twice", "Payment page error - double charge"),
        (
            "Your checkout page showed an error ({error_code}) so I clicked pay again, and now I've been "
            "charged {hw_price} twice. The page works now, I just need one of the charges refunded.",
        ),
        ("checkout errored, paid again, now charged twice",),
        decoy="bug",
    ),
    S(
        "billing",
        "return_refund_missing",
        ("Returned item, no refund yet", "Return received but not refunded"),
        (
            "I returned the {hardware} from order {order} (return tracking {tracking}) and your warehouse "
            "confirmed receipt on {date2}. The refund of {hw_price} still hasn't been issued.",
        ),
        ("you received my return on {date2}, where is my refund of {hw_price}",),
        decoy="shipping",
    ),
    S(
        "billing",
        "cancelled_order_charged",
        ("Charged for a cancelled order", "Order cancelled but card charged"),
        (
            "Order {order} was cancelled before it shipped, and I have the cancellation email, but my card "
            "was still charged {hw_price}.",
        ),
        ("order {order} cancelled but still charged {hw_price}",),
        decoy="shipping",
    ),
    # account_access that reads like billing / bug / shipping
    S(
        "account_access",
        "cant_login_update_card",
        (
            "Can't log in to update my card",
            "Card expired - can't get into account",
            "Need to update payment method but locked out",
        ),
        (
            "My card expired and you emailed me to update it, but I can't log in: the password reset page "
            "says there's no account for {email}. How do I get in to change the card?",
            "I want to update my {card_brand} details before the next invoice, but every time I log in I'm "
            "sent straight back to the login page. Please help me get into the account.",
        ),
        ("can't log in to update my card",),
        decoy="billing",
    ),
    S(
        "account_access",
        "locked_out_need_invoice",
        ("Locked out - need to download invoice", "Can't access invoices, login fails"),
        (
            "Our accountant needs invoice {invoice}, but I've been locked out since I switched phones and "
            "lost my 2FA codes. Please help me get back into the account so I can download it.",
            "I can't sign in to download my invoices: it says my password is wrong, and the reset email "
            "never arrives.",
        ),
        ("locked out, need to get in to download invoice {invoice}",),
        decoy="billing",
    ),
    S(
        "account_access",
        "sms_code_never_arrives",
        ("2FA code never arrives", "Not receiving SMS verification code", "Is your SMS system broken?"),
        (
            "The 2FA code never arrives by SMS. I've tried five times on my {device}. Is your system broken? "
            "I can't get into my account.",
            "Verification codes aren't coming through to my phone (a number from {country}). Everything else "
            "on the phone works. I'm stuck at the login screen.",
        ),
        ("2FA sms code never arrives",),
        decoy="bug",
    ),
    S(
        "account_access",
        "login_error_code",
        ("Login error {auth_error}", "Error when signing in"),
        (
            'Every time I sign in I get error {auth_error}, "session could not be established". I cleared '
            "cookies and tried {browser} and a private window. Other people on my team can log in fine.",
        ),
        ("login fails with {auth_error} just for me",),
        decoy="bug",
    ),
    S(
        "account_access",
        "cant_login_to_track",
        ("Can't log in to check my order", "Account not found but I have an order"),
        (
            "I want to check the status of order {order} but I can't log in to see it. It says \"no account "
            'found" for {email}, even though the order confirmation went to that address.',
        ),
        ("can't log in to see order {order}, says no account found",),
        decoy="shipping",
    ),
    S(
        "account_access",
        "magic_link_invalid",
        ("Sign-in link doesn't work", '"Link invalid or expired"'),
        (
            'The sign-in link you email me always says "link invalid or expired", even when I click '
            "it within a minute. So I can't get into my account at all.",
        ),
        ("sign in link always says expired",),
        decoy="bug",
    ),
    # bug that reads like feature_request / billing / account_access / shipping
    S(
        "bug",
        "filter_button_noop",
        (
            "New filter button does nothing",
            "Filter button not working?",
            "feature request: make the filter button work",
        ),
        (
            "The new filter button on the Orders page does nothing when I click it. No dropdown, no error. "
            "Would be great if it actually filtered :)",
            'Small suggestion: maybe make the new "Filter" button do something? Right now clicking it has no '
            "effect in {browser}.",
        ),
        ("the new filter button does nothing",),
        decoy="feature_request",
        cap="medium",
    ),
    S(
        "bug",
        "export_limit_docs",
        ("Export limited to 1,000 rows?", "Suggestion: larger exports"),
        (
            "It would be nice if the export didn't stop at 1,000 rows: your docs say it supports up to "
            "50,000, and it did last month. Is there a setting I'm missing?",
        ),
        ("export stops at 1000 rows, docs say 50k",),
        decoy="feature_request",
        cap="high",
    ),
    S(
        "bug",
        "invoice_pdf_garbled",
        ("Invoice PDF shows weird characters", "Garbled text on invoices"),
        (
            "The amounts on my invoices are correct, but the PDF shows garbled characters instead of my name "
            "({full}), like boxes and question marks. Looks like an encoding problem when the PDF is "
            "generated.",
        ),
        ("invoice pdf shows garbage characters in my name",),
        decoy="billing",
        cap="high",
    ),
    S(
        "bug",
        "settings_blank_after_login",
        ("Account settings page is blank", "White screen on account settings"),
        (
            "I can log in without any problem, but clicking Account Settings gives a blank white page. The "
            "console says \"TypeError: Cannot read properties of undefined (reading 'map')\".",
        ),
        ("account settings page blank after login",),
        decoy="account_access",
        cap="high",
    ),
    S(
        "bug",
        "tracking_page_error",
        ("Order tracking page broken", "Tracking page error {error_code}"),
        (
            "The order tracking page on your website throws {error_code} for every order, including {order}. "
            "The {carrier} website shows the parcel fine, so it's your page that's broken.",
        ),
        ("your tracking page errors for every order",),
        decoy="shipping",
        cap="high",
    ),
    S(
        "bug",
        "show_password_icon",
        ("Show password icon not working", "Login page eye icon"),
        (
            "The 'show password' eye icon on the login page doesn't do anything in {browser}. I can still "
            "log in, it's just annoying when typing a long password.",
        ),
        ("show-password icon on login page does nothing",),
        decoy="account_access",
        cap="medium",
    ),
    # feature_request that reads like bug / billing / account_access / shipping
    S(
        "feature_request",
        "export_custom_fields",
        ("Export missing custom fields - bug?", "Is this a bug? custom fields not in export"),
        (
            "The export doesn't include our custom fields. Is that a bug? We need them in the CSV for our "
            "warehouse team.",
            "Not sure if this is a bug or by design, but the customer export only has the standard columns. "
            "Could custom fields be added?",
        ),
        ("export doesn't include custom fields, is that a bug?",),
        decoy="bug",
    ),
    S(
        "feature_request",
        "cant_sort_by_date",
        ("Can't sort orders by delivery date - bug?", "Sorting broken?"),
        (
            "Is it a bug that I can't sort the Orders list by delivery date? There's no sort option on that "
            "column at all.",
        ),
        ("is it a bug that orders can't be sorted by delivery date?",),
        decoy="bug",
    ),
    S(
        "feature_request",
        "api_bulk_delete",
        ("API bulk delete not working?", "Is the API broken? No bulk delete"),
        (
            "There's no endpoint to delete products in bulk. Is the API broken or is this just not supported "
            "yet? Deleting {n_records} items one request at a time is painful.",
        ),
        ("no bulk delete in the API?",),
        decoy="bug",
    ),
    S(
        "feature_request",
        "po_on_invoice",
        ("PO number on invoices", "Annual billing option?"),
        (
            "Could you add a field for a purchase order number on invoices? Our finance team rejects "
            "invoices without a PO.",
            "Would you consider offering annual billing for the {plan} plan? We'd rather pay once a year "
            "than monthly.",
        ),
        ("can you add a PO number field to invoices",),
        decoy="billing",
    ),
    S(
        "feature_request",
        "passkeys",
        ("Passkey / security key login", "Support for YubiKey?"),
        (
            "Can you support passkeys or hardware security keys (YubiKey) for login? Our security policy "
            "doesn't allow SMS two-factor, so this is holding back our wider rollout.",
        ),
        ("please support passkeys for login",),
        decoy="account_access",
    ),
    S(
        "feature_request",
        "delivery_options",
        ("Choose a delivery date?", "Ship one order to several stores"),
        (
            "When ordering hardware, could we pick a delivery date, or ship parts of one order to different "
            "store addresses? Right now we place a separate order for each location.",
        ),
        ("let us split one hardware order across store addresses",),
        decoy="shipping",
    ),
    # shipping that reads like billing / bug / account_access
    S(
        "shipping",
        "express_fee_late",
        (
            "Charged for express shipping but it arrived late",
            "Refund express shipping fee",
            "Paid for express, got standard",
        ),
        (
            "I paid {ship_fee} extra for express shipping on order {order}. It did arrive, but {n_days} days "
            "late, which is standard delivery speed. I'd like the express shipping fee refunded.",
            "Order {order} finally came, thanks, the {hardware} works. But I paid for next-day delivery and "
            "it took over a week. Please refund the {ship_fee} express charge.",
        ),
        ("paid {ship_fee} for express on {order}, arrived {n_days} days late",),
        decoy="billing",
        cap="high",
        high_phrases=(
            "This is the second late express order this month, please sort it out this week.",
            "Our books close on {deadline} and I'd like the refund before then.",
        ),
    ),
    S(
        "shipping",
        "express_still_not_here",
        ("Paid for express delivery, still nothing", "Express order late"),
        (
            "I paid {ship_fee} for express delivery on order {order} and it still hasn't arrived. Tracking "
            "{tracking} hasn't moved since {date}.",
        ),
        ("paid for express, order {order} still not here",),
        decoy="billing",
    ),
    S(
        "shipping",
        "paid_not_received",
        ("Paid but never received", "Money taken, no package"),
        (
            "I paid {hw_price} for order {order} on {date2} and my card was charged straight away, but the "
            'package never arrived. Tracking still says "label created".',
        ),
        ("paid for {order} on {date2}, never received it",),
        decoy="billing",
    ),
    S(
        "shipping",
        "invoice_says_delivered",
        ("Invoice says delivered, I have nothing", "Delivered according to invoice?"),
        (
            "Your invoice {invoice} says the {hardware} was delivered on {date}, but I never got it. Nothing "
            "was left with the neighbours either.",
        ),
        ("invoice {invoice} says delivered but I never got it",),
        decoy="billing",
    ),
    S(
        "shipping",
        "order_stuck_processing",
        ("Order stuck in 'processing' - is something broken?", "Order status not changing"),
        (
            'Order {order} has said "processing" for {n_days} days. Is something broken on your side? I just '
            "need it to ship.",
        ),
        ("order {order} stuck on processing for {n_days} days",),
        decoy="bug",
    ),
    S(
        "shipping",
        "guest_checkout_tracking",
        ("How do I track my order without an account?", "No account - tracking?"),
        (
            "I checked out as a guest, so I don't have an account to log in to. How can I track order "
            "{order}? It was meant to arrive by {date}.",
        ),
        ("guest checkout, how do I track {order}",),
        decoy="account_access",
    ),
)

# ---------------------------------------------------------------------------------------------------
# Evidence phrases. Each list matches one rule of the DAG's prompt, so the label is recoverable from text.
# ---------------------------------------------------------------------------------------------------

URGENT_PHRASES: dict[str, tuple[str, ...]] = {
    "bug": (
        "We can't process any sales right now.",
        "Our whole team is blocked until this works.",
        "Checkout is completely broken for us at the moment.",
        "Nothing works at the till, we're turning customers away.",
    ),
    "account_access": (
        "Our whole team is blocked.",
        "I have to run payroll today and can't get in.",
        "I can't do any work at all until I'm back in.",
        "I'm worried someone could get at our customers' data.",
    ),
    "billing": (
        "These charges have pushed our account into overdraft and we can't pay suppliers today.",
        "We can't pay our staff this week because of these charges.",
        "Our card is maxed out by this and we can't restock.",
    ),
    "shipping": (
        "We open on {deadline} and can't trade at all without this equipment.",
        "Our only terminal is dead, so we can't take card payments until this arrives.",
        "We're turning customers away until the hardware is here.",
    ),
    "feature_request": (),
}
URGENT_WORDS = (
    "This is urgent.",
    "URGENT, please help asap.",
    "Please treat this as urgent.",
    "urgent!!",
    "",
)
HIGH_PHRASES: dict[str, tuple[str, ...]] = {
    "bug": (
        "It's slowing down our whole checkout, please prioritise.",
        "We need this working before our sale on {deadline}.",
        "This is blocking me from doing my end-of-month reports.",
    ),
    "account_access": (
        "I need to get in before {deadline} to send our monthly reports.",
        "I'm blocked from doing my job until this is fixed.",
        "I need access before our audit on {deadline}.",
    ),
    "billing": (
        "Our books close on {deadline} and I need this fixed before then.",
        "That's a lot of money for a small business like ours, please sort it out this week.",
        "Our accountant needs the corrected figures by {deadline}.",
    ),
    "shipping": (
        "I need it by {deadline} at the latest.",
        "We're opening a pop-up on {deadline} and need it there.",
        "Please sort this out before {deadline}, we're short on devices.",
    ),
    "feature_request": (
        "We need this before rolling out to our other {n_stores} stores next month.",
        "This is blocking our rollout to the rest of the company, and we decide by {deadline}.",
    ),
}
HIGH_GENERIC = (
    "Please prioritise this.",
    "This is the second time I'm writing about this.",
    "Please look at this soon, it's holding up our work.",
)
MEDIUM_PHRASES = (
    "",
    "",
    "For now I'm working around it, but it's annoying.",
    "Would appreciate an answer this week.",
    "Thanks in advance.",
    "Let me know if you need anything else from me.",
    "",
)
LOW_PHRASES = (
    "No rush on this.",
    "Minor thing, just flagging it.",
    "Not urgent at all.",
    "Whenever you get a chance, no hurry.",
    "Just curious.",
    "Low priority, but wanted to let you know.",
)
ESCALATION: dict[str, tuple[str, ...]] = {
    "legal": (
        "If this isn't resolved this week I will contact my lawyer.",
        "Our legal team is now involved.",
        "I'm talking to a lawyer about this.",
    ),
    "chargeback": (
        "If it isn't refunded by {deadline} I will file a chargeback with my bank.",
        "I've already opened a chargeback with my card issuer.",
        "I'll dispute the charge with my bank if I don't hear back today.",
    ),
    "data_loss": (
        "We've lost data: {n_records} records are gone and we have no backup.",
        "This has caused real data loss for us, {n_records} orders are gone from the history.",
    ),
    "outage": (
        "It's an outage across all {n_stores} of our stores.",
        "Every user in our company ({n_users} people) is affected, it's a full outage for us.",
    ),
    "churn": (
        "If this isn't fixed we will cancel our contract and move to another provider.",
        "Our renewal ({big_amount}/year) is in {n_days} days and we're now evaluating competitors.",
        "I'm copying our account manager: we're seriously considering leaving Brightloom over this.",
    ),
}
ESCALATION_REASONS = {
    "billing": ("chargeback", "chargeback", "legal"),
    "account_access": ("legal",),
    "bug": ("outage", "outage", "data_loss", "legal"),
    "shipping": ("chargeback", "legal"),
    "feature_request": (),
}
DETAILS: dict[str, tuple[str, ...]] = {
    "bug": (
        "I'm using {browser} on {os}.",
        "I already tried clearing the cache and logging out and back in.",
        "Screenshot attached.",
        "It happens every time, not just once.",
        "It started after the update on {date}.",
        "Workspace: {workspace}.",
        "A colleague sees the same thing on her laptop.",
    ),
    "billing": (
        "My account email is {email}.",
        "Our workspace is {workspace}.",
        "The card on file is my {card_brand} ending in {last4}.",
        "I've attached a screenshot of the bank statement.",
        "We're on the {plan} plan.",
    ),
    "account_access": (
        "My login email is {email}.",
        "Workspace: {workspace}.",
        "I'm on {browser}.",
        "I can verify who I am, I'm the {title} at {company}.",
        "I've been a customer for a couple of years.",
    ),
    "shipping": (
        "Delivery address is in {city}, {country}.",
        "Tracking number: {tracking}.",
        "The carrier is {carrier}.",
        "Order number {order}.",
        "I've attached photos of the box.",
    ),
    "feature_request": (
        "We're a team of {n_users} on the {plan} plan.",
        "I know a few other shops in our area would want this too.",
        "Happy to jump on a call to explain our use case.",
        "Our previous system could do this.",
    ),
}
WEB_TOPICS = {
    "billing": "Billing & payments",
    "account_access": "Login & account access",
    "bug": "Something isn't working",
    "feature_request": "Ideas & feedback",
    "shipping": "Orders & delivery",
}
GREETINGS = (
    "Hi,",
    "Hello,",
    "Hi there,",
    "Hello support team,",
    "Dear Brightloom Support,",
    "Hey,",
    "Good morning,",
    "To whom it may concern,",
    "Hi team,",
    "Hello Brightloom,",
)
INTROS = (
    "I hope you're well.",
    "I'm writing about a problem with our account.",
    "First time contacting support, so sorry if this is the wrong place.",
    "Quick question.",
    "Hope someone can help.",
)
SUPPORT_REPLIES = (
    "Hi {first},\n\nThanks for getting in touch! Could you send us a screenshot of what you're seeing and "
    "roughly when it happened?\n\nBest,\n{agent}\nBrightloom Support",
    "Hi {first}, thanks for your patience. I've passed this on to the right team and we'll update you as "
    "soon as we know more.\n\n{agent}",
    "Hello {first},\n\nSorry for the trouble. To verify the account, could you confirm the email address you "
    "use to sign in?\n\nKind regards,\n{agent} | Brightloom Support",
    "Hi {first},\n\nThis should be resolved now. Please let us know if you still see the "
    "problem.\n\nCheers,\n{agent}",
)
EMOJI = {
    "angry": ("😡", "😤", "🤬", "🚨"),
    "sad": ("😩", "😞", "🙏", "😬"),
    "calm": ("🙂", "👍", "😅", "🙏"),
    "shipping": ("📦", "🚚"),
}
# Words that carry the label evidence: typo injection leaves them alone so the evidence stays readable.
PROTECTED = frozenset(
    {
        "urgent",
        "lawyer",
        "chargeback",
        "outage",
        "blocked",
        "minor",
        "refund",
        "charged",
        "invoice",
        "password",
        "delivered",
        "legal",
        "whole",
        "bug",
    }
)


# ---------------------------------------------------------------------------------------------------
# Assembling one ticket
# ---------------------------------------------------------------------------------------------------


class Slots(dict):
    """``format_map`` mapping that fails loudly on a typo'd slot name instead of emitting ``{oops}``."""

    def __missing__(self, key: str) -> str:
        raise KeyError(f"template uses unknown slot {{{key}}}")


@dataclass
class Draft:
    """Everything decided about one ticket before it gets an id (ids follow creation order)."""

    created: datetime
    channel: str
    tier: str
    subject: str
    body: str
    category: str
    priority: str
    escalate: bool


def _allocate(count: int) -> list[str]:
    """Exact category counts by largest remainder, so the split is stable for any ``--count``."""
    total = sum(w for _, w in CATEGORY_SHARE)
    raw = [(name, count * w / total) for name, w in CATEGORY_SHARE]
    counts = {name: int(share) for name, share in raw}
    leftovers = sorted(raw, key=lambda item: (-(item[1] - int(item[1])), item[0]))
    for name, _ in leftovers[: count - sum(counts.values())]:
        counts[name] += 1
    return [name for name, _ in CATEGORY_SHARE for _ in range(counts[name])]


def _created_at(d: Dice) -> datetime:
    """Business-hours-weighted timestamp in the 90-day window; weekends are quieter, like a real queue."""
    days = [(i, 1.0 if (START + timedelta(days=i)).weekday() < 5 else 0.45) for i in range(SPAN_DAYS)]
    hours = [(h, 3.0 if 8 <= h <= 17 else 1.2 if 6 <= h <= 21 else 0.35) for h in range(24)]
    day, hour = d.weighted(days), d.weighted(hours)
    return START + timedelta(days=day, hours=hour, minutes=d.below(60), seconds=d.below(60))


def _slots(d: Dice, loc: Locale, tier: str, created: datetime) -> Slots:
    """Fill every slot a template might use; unused ones are harmless and keep RNG consumption uniform."""
    cur = CURRENCIES[loc.currency]
    first, last = d.choice(loc.first_names), d.choice(loc.last_names)
    company = d.choice(loc.companies)
    domain = f"{_ascii_slug(company, '')}.{loc.tld}"
    if tier == "free" and d.chance(0.8):
        email = (
            f"{_ascii_slug(first)}.{_ascii_slug(last)}{d.choice(('', '', str(d.randint(1, 99))))}@"
            f"{d.choice(loc.free_mail)}"
        )
    else:
        email = f"{_ascii_slug(first)}{d.choice(('.', ''))}{_ascii_slug(last)}@{domain}"
    plan, plan_usd = d.choice(PLANS[tier])
    hardware, hw_usd = d.choice(HARDWARE)
    hardware2 = d.choice([h for h, _ in HARDWARE if h != hardware])
    date_style = d.choice(("long", "long", "long_dm", "short", "iso", loc.date_style, loc.date_style))
    date = created - timedelta(days=d.randint(1, 12))
    date2 = date - timedelta(days=d.randint(5, 40))
    deadline = created + timedelta(days=d.randint(2, 9))
    carrier = d.choice(loc.carriers)
    if carrier == "UPS":
        tracking = "1Z" + "".join(d.choice("0123456789ABCDEFGHJKLMNPRSTVWXY") for _ in range(16))
    elif carrier == "Royal Mail":
        tracking = (
            "".join(d.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
            + str(d.randint(100000000, 999999999))
            + "GB"
        )
    else:
        tracking = str(d.randint(10**11, 10**12 - 1))
    n_seats_actual = d.randint(3, 40) if tier != "enterprise" else d.randint(40, 400)
    phone = loc.phone_prefix.format(a=d.randint(10, 99), b=d.randint(1000, 9999))
    return Slots(
        first=first,
        last=last,
        full=f"{first} {last}",
        email=email,
        email_old=f"{_ascii_slug(first)[:1]}{_ascii_slug(last, '')}@{d.choice(OLD_MAIL_DOMAINS)}",
        company=company,
        domain=domain,
        workspace=_ascii_slug(company, "-"),
        country=loc.country,
        country2=d.choice(OTHER_COUNTRIES),
        city=d.choice(loc.cities),
        title=d.choice(TITLES),
        phone=phone,
        plan=plan,
        plan_price=money(d, cur, plan_usd),
        plan_price_odd=money(d, cur, plan_usd + d.randint(3, 40), False),
        annual_price=money(d, cur, plan_usd * 10 if plan_usd < 200 else plan_usd),
        hardware=hardware,
        hardware2=hardware2,
        hw_price=money(d, cur, hw_usd),
        hw_price_low=money(d, cur, hw_usd * d.randint(70, 90) // 100),
        hw_price_odd=money(d, cur, hw_usd * 7, False),
        ship_fee=money(d, cur, d.randint(12, 45)),
        big_amount=money(d, cur, d.randint(8, 90) * 1000),
        card_brand=d.choice(CARD_BRANDS),
        last4=f"{d.randint(0, 9999):04d}",
        invoice=f"INV-2026-{d.randint(100, 9999):05d}",
        order=f"#BL-{d.randint(100000, 999999)}",
        tracking=tracking,
        carrier=carrier,
        accessory=d.choice(ACCESSORIES),
        product=d.choice(PRODUCTS),
        feature=d.choice(FEATURES),
        integration=d.choice(INTEGRATIONS),
        error_code=d.choice(ERROR_CODES),
        auth_error=d.choice(AUTH_ERRORS),
        browser=d.choice(BROWSERS),
        os=d.choice(OSES),
        device=d.choice(DEVICES),
        sso=d.choice(SSO),
        sso_error=d.choice(SSO_ERRORS),
        decline=d.choice(DECLINES),
        vat=f"{loc.vat_prefix}{d.randint(100000000, 999999999)}",
        date=fmt_date(date, date_style),
        date2=fmt_date(date2, date_style),
        deadline=fmt_date(deadline, date_style),
        n_days=d.randint(3, 14),
        n_users=d.randint(8, 60) if tier != "enterprise" else d.randint(80, 900),
        n_seats=n_seats_actual + d.randint(2, 15),
        n_seats_actual=n_seats_actual,
        n_rows=d.choice(("5,000", "10,000", "20,000", "50,000")),
        n_records=d.randint(40, 3000),
        n_stores=d.randint(3, 12) if tier != "enterprise" else d.randint(12, 60),
        n_small=d.randint(4, 12),
        version=f"4.{d.randint(2, 9)}.{d.randint(0, 5)}",
        hex1=f"{d.below(16**10):010x}",
        hex2=f"{d.below(16**10):010x}",
        agent=d.choice(AGENTS),
    )


def _priority(d: Dice, category: str, tier: str, sc: Scenario) -> str:
    """Category base rates, nudged by tier, clamped to what the scenario can plausibly be."""
    base = {
        "bug": (15, 40, 30, 15),
        "billing": (15, 45, 28, 12),
        "account_access": (8, 37, 38, 17),
        "shipping": (15, 47, 27, 11),
        "feature_request": (62, 28, 10, 0),
    }[category]
    factor = {"free": (1.3, 1.0, 0.8, 0.7), "pro": (1.0, 1.0, 1.0, 1.0), "enterprise": (0.6, 1.0, 1.4, 1.6)}[
        tier
    ]
    weights = [(p, b * f) for p, b, f in zip(PRIORITIES, base, factor, strict=True)]
    lo, hi = PRIORITIES.index(sc.floor), PRIORITIES.index(sc.cap)
    choice = PRIORITIES.index(d.weighted(weights))
    return PRIORITIES[max(lo, min(hi, choice))]


def _escalation(d: Dice, category: str, tier: str, priority: str, sc: Scenario) -> str | None:
    """Pick an escalation reason (or None). Reasons map 1:1 to the DAG prompt's escalation rule."""
    if sc.force_escalate:
        return "inherent"
    fitting = ESCALATION_REASONS[category] if sc.reasons is None else sc.reasons
    reasons = fitting + (("churn",) if tier == "enterprise" else ())
    if priority == "urgent" and reasons and d.chance(0.6 if tier == "enterprise" else 0.45):
        return d.choice(reasons)
    if priority == "high" and tier == "enterprise" and d.chance(0.3):
        return "churn"
    return None


def _typos(d: Dice, text: str, n: int) -> str:
    """Swap, drop or double a letter in ``n`` ordinary words (never in evidence words or slot values)."""
    words = [
        m
        for m in re.finditer(r"(?<![\w@#/.-])[A-Za-z]{5,}(?![\w@#/.-])", text)
        if m.group().lower() not in PROTECTED
    ]
    for m in sorted(d.sample(words, n), key=lambda m: m.start(), reverse=True):
        w, i = m.group(), d.randint(1, len(m.group()) - 3)
        kind = d.below(3)
        if kind == 0:
            w = w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        elif kind == 1:
            w = w[:i] + w[i + 1 :]
        else:
            w = w[:i] + w[i] + w[i:]
        text = text[: m.start()] + w + text[m.end() :]
    return text


def _sloppy(text: str) -> str:
    """Lowercase and drop sentence punctuation, the way people type in chat (decimals survive)."""
    text = re.sub(r"[.,;!](?=\s|$)", "", text.lower())
    return text.replace('"', "").replace("  ", " ")


def _quote(d: Dice, slots: Slots, created: datetime, subject: str) -> str:
    """A previous support reply quoted under the message, Gmail- or Outlook-style."""
    reply = d.choice(SUPPORT_REPLIES).format_map(slots)
    when = created - timedelta(days=d.randint(1, 6), hours=d.randint(0, 8), minutes=d.below(60))
    hour12 = (when.hour % 12) or 12
    if d.chance(0.65):
        header = (
            f"On {WEEKDAYS[when.weekday()]}, {MONTHS[when.month - 1][:3]} {when.day}, {when.year} at "
            f"{hour12}:{when.minute:02d} {'AM' if when.hour < 12 else 'PM'} Brightloom Support "
            f"<{SUPPORT_ADDRESS}> wrote:"
        )
        return header + "\n" + "\n".join(f"> {line}".rstrip() for line in reply.split("\n"))
    return (
        "-----Original Message-----\n"
        f"From: Brightloom Support <{SUPPORT_ADDRESS}>\n"
        f"Sent: {when.day} {MONTHS[when.month - 1]} {when.year} {when.hour:02d}:{when.minute:02d}\n"
        f"Subject: {subject}\n\n{reply}"
    )


def _signature(d: Dice, slots: Slots, tier: str) -> str:
    """Sign-offs get more formal (title, company, phone) as the customer tier goes up."""
    first, full = slots["first"], slots["full"]
    if tier == "enterprise":
        options = (
            f"Best regards,\n{full}\n{slots['title']}, {slots['company']}\n{slots['phone']}",
            f"Kind regards,\n\n{full}\n{slots['title']} | {slots['company']}",
            f"Thanks,\n{full}\n{slots['title']}",
        )
    elif tier == "pro":
        options = (
            f"Thanks,\n{full}",
            f"Best,\n{first}",
            f"Cheers,\n{first}\n{slots['company']}",
            f"--\n{full}\n{slots['company']}\n{slots['phone']}",
            f"Thank you,\n{full}",
        )
    else:
        options = (
            f"Thanks,\n{first}",
            f"{first}",
            f"Thanks\n{full}",
            "thanks",
            f"- {first}",
            f"Regards,\n{full}",
        )
    return d.choice(options)


def _long_block(d: Dice, category: str, slots: Slots, created: datetime) -> str:
    """The multi-paragraph extras of the rare very long ticket (logs, statements, tracking history)."""
    stamp = created - timedelta(hours=d.randint(1, 30))
    if category == "bug":
        lines = [
            "Steps to reproduce:",
            "1. Log in as an admin",
            f"2. Open {slots['product']}",
            "3. Set the date range to the last 90 days and apply a store filter",
            "4. Click the button and wait about 10 seconds",
            "",
            "Expected: the page loads / the action completes.",
            f'Actual: spinner, then "{slots["error_code"]}".',
            "",
            "Log output from our side:",
        ]
        components = ("sync-worker", "api-client", "pos-bridge", "webhook-relay", "report-runner")
        messages = (
            ("ERROR", f"request failed status=502 retry=1 id=req_{slots['hex1']}"),
            ("ERROR", "connection reset by peer"),
            ("WARN", "timeout after 30000ms waiting for upstream"),
            ("ERROR", f"batch {slots['n_small']} of 40 rejected"),
            ("INFO", "token refresh ok"),
            ("INFO", "retrying in 2s"),
            ("WARN", "received 0 items (expected > 0)"),
            ("ERROR", f"upstream returned {slots['error_code']}"),
            ("WARN", "queue depth 1834, lagging"),
        )
        for _ in range(d.randint(14, 30)):
            stamp += timedelta(seconds=d.randint(1, 90), milliseconds=d.below(1000))
            level, message = d.choice(messages)
            where = f"{d.choice(components)}-{d.randint(1, 8)}"
            lines.append(
                f"{fmt_date(stamp, 'iso')}T{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}."
                f"{stamp.microsecond // 1000:03d}Z {level} [{where}] {message}"
            )
        lines += [
            "",
            "Browser console:",
            "TypeError: Cannot read properties of undefined (reading 'rows')",
            f"    at ReportTable.render (app.{slots['hex2'][:6]}.js:1:48213)",
            f"    at renderWithHooks (vendor.{slots['hex1'][:6]}.js:2:11931)",
            f"    at updateFunctionComponent (vendor.{slots['hex1'][:6]}.js:2:14507)",
            "    at beginWork (vendor.js:2:16190)",
        ]
        return "\n".join(lines)
    if category == "billing":
        lines = ["Here is what I see on my statements:", ""]
        when = created - timedelta(days=31 * d.randint(4, 9))
        while when < created:
            row = f"  {fmt_date(when, 'iso')}   BRIGHTLOOM*SUBSCR   {slots['plan_price']}"
            lines.append(row)
            if d.chance(0.35):
                lines.append(row)  # the duplicate charges the customer is angry about
            when += timedelta(days=d.randint(28, 31))
        lines += [
            "",
            f"I first raised this in chat on {slots['date2']} and was told it would be fixed with the next "
            "invoice. It wasn't. Then I emailed and got an automatic reply, and nothing since.",
            "",
            "I've been a customer for a long time and have recommended you to other shop owners, so I really "
            "don't want this to turn ugly, but I need someone to actually look at the account and tell me in "
            "writing what was charged, why, and what will be refunded.",
        ]
        return "\n".join(lines)
    if category == "account_access":
        tried = [
            "reset my password (three times, the last one on " + slots["date"] + ")",
            f"tried {slots['browser']}, a private window and the mobile app",
            "cleared cookies and cache",
            "checked spam, promotions and our company mail filter",
            "asked our IT person to whitelist your sending domain",
            "restarted my phone",
            "waited the 24 hours the lockout message asked for",
            "tried from home and from the office network",
        ]
        lines = ["Here is everything I've tried so far:"] + [
            f"- {t}" for t in d.sample(tried, d.randint(5, 8))
        ]
        lines += [
            "",
            "I understand you have to be careful with account recovery, and I'm happy to verify my "
            f"identity however you need: I can send a photo ID, the last four digits of the card on file, "
            f"or have our {slots['title'].lower()} confirm by phone on {slots['phone']}.",
            "",
            "Honestly this is the most frustrating part: I can see the emails from you, I just can't get "
            "past the login screen.",
        ]
        return "\n".join(lines)
    if category == "shipping":
        lines = [
            f"Order {slots['order']} contents:",
            f"  1 x {slots['hardware']}",
            f"  {d.randint(1, 3)} x {slots['accessory']}",
            f"  {d.randint(2, 10)} x receipt paper roll",
            "",
            f"Tracking history ({slots['carrier']} {slots['tracking']}):",
        ]
        events = (
            "Label created",
            "Picked up",
            "Departed facility",
            "Arrived at facility",
            "In transit",
            "Held at facility: awaiting information",
            "Out for delivery",
            "Delivery attempted",
        )
        when = created - timedelta(days=d.randint(6, 14))
        for event in events[: d.randint(4, len(events))]:
            when += timedelta(hours=d.randint(5, 40), minutes=d.below(60))
            lines.append(f"  {fmt_date(when, 'iso')} {when.hour:02d}:{when.minute:02d}  {event}")
        lines += [
            "",
            "I've called the carrier twice. The first time they said the parcel was damaged in sorting and "
            "would be re-labelled, the second time they said they can't see it at all and that the sender "
            "(you) has to open an investigation. Please do that, or send a replacement.",
        ]
        return "\n".join(lines)
    parts = [
        "Some background on how we work:",
        f"We run {slots['n_stores']} stores and a small webshop, with about {slots['n_users']} staff using "
        "Brightloom every day. Most of our back-office work happens on Monday mornings, when the store "
        "managers reconcile stock and prepare orders for the week.",
        "What we'd need, roughly:",
        "- a way to do this for many items at once instead of one by one",
        "- permissions so that only managers can use it",
        "- an audit log entry for every change, so our accountant can follow it",
        "- ideally an API endpoint too, because our purchasing tool would use it",
        "Right now we work around it with an export, a spreadsheet and an import, which takes one of our "
        "managers most of a morning and goes wrong about once a month.",
        "I know roadmaps are full, so even a rough idea of whether this is planned would help us decide how "
        "much more effort to put into the spreadsheet workaround.",
    ]
    return "\n\n".join([parts[0], parts[1], parts[2] + "\n" + "\n".join(parts[3:7]), parts[7], parts[8]])


def _compose(
    d: Dice,
    sc: Scenario,
    loc: Locale,
    tier: str,
    channel: str,
    created: datetime,
    priority: str,
    reason: str | None,
    slots: Slots,
) -> tuple[str, str]:
    """Turn a scenario into subject + body: pick a phrasing, add evidence, then dress it for the channel."""
    category = sc.category
    roll = d.random()
    length = "short" if roll < 0.12 else "long" if roll < 0.145 else "detailed" if roll < 0.28 else "normal"
    if channel in ("chat", "phone_transcript") and length == "long":
        length = "detailed"

    subject = d.choice(sc.subjects).format_map(slots)
    if length == "short" and sc.shorts:
        core = d.choice(sc.shorts).format_map(slots)
    else:
        core = d.choice(sc.bodies).format_map(slots)

    details: list[str] = []
    if length != "short":
        n_details = d.randint(0, 1) if length == "normal" else d.randint(2, 3)
        details = [t.format_map(slots) for t in d.sample(DETAILS[category], n_details)]

    # Evidence for the priority and escalation labels.
    evidence: list[str] = []
    if priority == "urgent":
        if URGENT_PHRASES[category] and (reason is None or (reason != "inherent" and d.chance(0.5))):
            evidence.append(d.choice(URGENT_PHRASES[category]).format_map(slots))
        word = d.choice(URGENT_WORDS)
        if word:
            evidence.insert(0, word)
        if d.chance(0.35):
            subject = d.choice(("URGENT: ", "URGENT - ", "!!! ", "Urgent: ")) + subject
    elif priority == "high" and d.chance(0.9):
        own = HIGH_PHRASES[category] if sc.high_phrases is None else sc.high_phrases
        pool = own + (HIGH_GENERIC if tier != "free" else ())
        evidence.append(d.choice(pool).format_map(slots))
        if d.chance(0.1):
            subject = "Important: " + subject
    elif priority == "low" and d.chance(0.75):
        evidence.append(d.choice(LOW_PHRASES))
        if d.chance(0.12):
            subject = d.choice(("[minor] ", "(low priority) ", "Minor: ")) + subject
    elif priority == "medium":
        phrase = d.choice(MEDIUM_PHRASES)
        if phrase:
            evidence.append(phrase)
    if reason and reason != "inherent":
        evidence.append(d.choice(ESCALATION[reason]).format_map(slots))
    elif reason == "inherent" and d.chance(0.5):
        evidence.append(
            d.choice(ESCALATION["legal" if sc.key == "cross_tenant" else "data_loss"]).format_map(slots)
        )

    # Customer-authored text, then noise on that text only (support quotes and signatures stay clean).
    text = " ".join([core, *details])
    if d.chance(0.1):
        text = _typos(d, text, d.randint(1, 3))
    tail = " ".join(evidence)
    mood = "angry" if reason else "sad" if priority in ("high", "urgent") else "calm"
    if d.chance(0.04):
        emoji = d.choice(EMOJI["shipping" if category == "shipping" and d.chance(0.5) else mood])
        if tail:
            tail += " " + emoji
        else:
            text += " " + emoji
    sloppy = d.chance(0.4 if channel == "chat" else 0.05)
    if sloppy:
        text, tail = _sloppy(text), _sloppy(tail)
        if d.chance(0.5):
            subject = subject.lower()
    elif d.chance(0.05):
        subject = subject.lower()

    native = ""
    if loc.lang and d.chance(0.12):
        gist = NATIVE_GIST[loc.lang][category]
        native = d.choice((f"{gist} {d.choice(BRIDGES)}".strip(), d.choice(NATIVE_SNIPPETS[loc.lang][:2])))
    closing_native = d.choice(NATIVE_SNIPPETS[loc.lang]) if loc.lang and d.chance(0.06) else ""
    extra = _long_block(d, category, slots, created) if length == "long" else ""

    if channel == "chat":
        body = _chat(d, slots, created, text, tail, native, priority)
        if d.chance(0.45):
            subject = d.choice(
                (
                    f"Chat with {slots['first']}",
                    "Website chat",
                    f"Live chat: {slots['first']}",
                    "Chat conversation",
                )
            )
    elif channel == "phone_transcript":
        body = _phone(d, slots, text, tail, native, voicemail=length == "short")
        if length == "short":
            subject = f"Voicemail from {slots['full']}"
        else:
            subject = d.choice(
                (
                    f"Phone call: {subject}",
                    f"Inbound call - {slots['full']}",
                    f"Call summary: {subject}",
                    "Phone support call",
                )
            )
    elif channel == "web_form":
        body = _web_form(d, sc, slots, text, tail, native, extra)
    else:
        body, subject = _email(
            d, slots, tier, created, subject, text, tail, native, closing_native, extra, length
        )
    return subject, body


def _email(
    d: Dice,
    slots: Slots,
    tier: str,
    created: datetime,
    subject: str,
    text: str,
    tail: str,
    native: str,
    closing_native: str,
    extra: str,
    length: str,
) -> tuple[str, str]:
    """Greeting, message, signature, 'Sent from my iPhone' and sometimes the quoted thread."""
    if length == "short":
        body = " ".join(p for p in (text, tail) if p)
        if d.chance(0.25):
            body += "\n\n" + d.choice(("Sent from my iPhone", "Sent from my Galaxy", "Get Outlook for iOS"))
        if d.chance(0.03):
            subject = "(no subject)"
        return body, subject
    paras: list[str] = []
    if d.chance(0.75):
        greeting = d.choice(GREETINGS)
        paras.append(greeting)
    if native:
        paras.append(native)
    lead = d.choice(INTROS) + " " if d.chance(0.2) else ""
    if tail and d.chance(0.3):
        paras.append(lead + tail)
        paras.append(text)
    else:
        paras.append(lead + text)
        if tail:
            if d.chance(0.5):
                paras[-1] += " " + tail
            else:
                paras.append(tail)
    if extra:
        paras.append(extra)
    if closing_native:
        paras.append(closing_native)
    paras.append(_signature(d, slots, tier))
    if d.chance(0.15 if tier == "free" else 0.08):
        paras.append(
            d.choice(
                (
                    "Sent from my iPhone",
                    "Sent from my iPhone",
                    "Sent from my Galaxy",
                    "Get Outlook for iOS",
                    "Sent from Mail for Windows",
                )
            )
        )
    quoted = length in ("detailed", "long") and d.chance(0.6) or d.chance(0.06)
    if quoted:
        paras.append(_quote(d, slots, created, subject))
        if not subject.lower().startswith("re:"):
            subject = "Re: " + subject
    return "\n\n".join(paras), subject


def _chat(d: Dice, slots: Slots, created: datetime, text: str, tail: str, native: str, priority: str) -> str:
    """Either a bot-handoff transcript with timestamps or just the customer's raw messages."""
    messages = [m for m in re.split(r"(?<=[.?!])\s+", text) if m]
    if native:
        messages.insert(0, native)
    if tail:
        messages.append(tail)
    if d.chance(0.6):
        when = created - timedelta(minutes=d.randint(2, 9))
        name = slots["first"]
        lines: list[str] = []

        def say(who: str, msg: str) -> None:
            nonlocal when
            lines.append(f"[{when.hour:02d}:{when.minute:02d}] {who}: {msg}")
            when += timedelta(seconds=d.randint(10, 100))

        if d.chance(0.5):
            say(name, d.choice(("hi", "hello", "hey", "Hi there")))
        say(
            "Loomie (bot)",
            f"Hi {name}! I'm Loomie, Brightloom's virtual assistant. What can I help you with?",
        )
        say(name, messages[0])
        say("Loomie (bot)", "Thanks! I'm connecting you with a member of our support team.")
        for msg in messages[1:]:
            say(name, msg)
        if priority in ("high", "urgent") and d.chance(0.4):
            say(name, d.choice(("hello??", "anyone there?", "still waiting", "???")))
        return "\n".join(lines)
    return "\n".join(messages)


def _phone(d: Dice, slots: Slots, text: str, tail: str, native: str, voicemail: bool) -> str:
    """An auto-generated call transcript (or voicemail): fillers, spelled-out email, a questioning agent."""
    email_spoken = slots["email"].replace(".", " dot ").replace("@", " at ")
    filler = d.choice(("", "um, ", "yeah so, ", "okay so ", "hi, uh, "))
    if voicemail:
        said = " ".join(p for p in (native, text, tail) if p)
        return (
            f"[Voicemail, auto-transcribed, 0:{d.randint(15, 59):02d}]\n"
            f"Hi, {filler}this is {slots['first']} from {slots['company']}. {said} You can reach me at "
            f"{email_spoken}. Thanks, bye."
        )
    lines = [
        f"[Call transcript, auto-generated, duration {d.randint(2, 24)}:{d.below(60):02d}]",
        f"Agent: Thanks for calling Brightloom support, this is {slots['agent']}. How can I help?",
        f"Caller: {filler}this is {slots['first']} from {slots['company']}. {text}",
    ]
    if native:
        lines.insert(2, f"Caller: {native}")
    lines += [
        "Agent: I'm sorry about that. Can I get the email address on the account?",
        f"Caller: Sure, it's {email_spoken}.",
    ]
    if tail:
        lines += ["Agent: Thank you. Is there anything else I should note?", f"Caller: {tail}"]
    lines += [
        "Agent: Got it. I've logged everything and someone will follow up by email today.",
        d.choice(
            ("Caller: Okay, thanks. Bye.", "Caller: Thank you.", "Caller: Alright. Bye.", "[call ended]")
        ),
    ]
    return "\n".join(lines)


def _web_form(d: Dice, sc: Scenario, slots: Slots, text: str, tail: str, native: str, extra: str) -> str:
    """Contact-form fields; the self-chosen topic is often wrong (near-misses mostly pick the decoy)."""
    if sc.decoy and d.chance(0.6):
        topic = WEB_TOPICS[sc.decoy]
    elif d.chance(0.7):
        topic = WEB_TOPICS[sc.category]
    else:
        topic = d.choice(tuple(WEB_TOPICS.values()) + ("Other", "Other"))
    message = "\n\n".join(p for p in (native, " ".join(p for p in (text, tail) if p), extra) if p)
    fields = [
        f"Name: {slots['full']}",
        f"Email: {slots['email']}",
        f"Company: {slots['company']}",
        f"Topic: {topic}",
    ]
    if sc.category in ("shipping", "billing") and d.chance(0.5):
        fields.append(f"Order number: {slots['order']}")
    elif d.chance(0.3):
        fields.append("Order number:")
    if d.chance(0.15):
        fields.append(
            d.choice(("Attachment: screenshot.png", "Attachment: IMG_2041.jpg", "Attachment: statement.pdf"))
        )
    return "\n".join(fields) + "\n\nMessage:\n" + message


def _draft(d: Dice, category: str) -> Draft:
    """Decide one ticket completely. The order of RNG calls here is part of the file format."""
    near = d.chance(NEAR_MISS_RATE)
    pool = [s for s in (NEAR_MISSES if near else SCENARIOS) if s.category == category]
    sc = d.choice(pool)
    tier = d.weighted((("free", 50), ("pro", 35), ("enterprise", 15)))
    loc = d.weighted([(loc, loc.weight) for loc in LOCALES])
    channel = d.weighted(
        {
            "free": (("email", 35), ("chat", 35), ("web_form", 25), ("phone_transcript", 5)),
            "pro": (("email", 40), ("chat", 25), ("web_form", 25), ("phone_transcript", 10)),
            "enterprise": (("email", 45), ("chat", 15), ("web_form", 15), ("phone_transcript", 25)),
        }[tier]
    )
    created = _created_at(d)
    priority = _priority(d, category, tier, sc)
    reason = _escalation(d, category, tier, priority, sc)
    slots = _slots(d, loc, tier, created)
    subject, body = _compose(d, sc, loc, tier, channel, created, priority, reason, slots)
    return Draft(created, channel, tier, subject, body, category, priority, reason is not None)


def generate_tickets(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[dict[str, str]]:
    """Generate ``count`` ticket rows (all values as strings, ready for ``csv``), sorted by creation time.

    Ticket ids increase with ``created_at`` and have small random gaps, as in a help desk where tickets
    get merged or deleted; they are unique by construction.
    """
    if count < 1:
        raise ValueError("count must be positive")
    d = Dice(seed)
    categories = _allocate(count)
    d.shuffle(categories)
    drafts = [_draft(d, category) for category in categories]
    drafts.sort(key=lambda t: t.created)  # stable: equal timestamps keep generation order
    next_id = 4000 + d.randint(0, 250)
    rows: list[dict[str, str]] = []
    for t in drafts:
        next_id += d.randint(1, 3)
        rows.append(
            {
                "ticket_id": f"TCK-{next_id:06d}",
                "created_at": t.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "channel": t.channel,
                "customer_tier": t.tier,
                "subject": t.subject,
                "body": t.body,
                "expected_category": t.category,
                "expected_priority": t.priority,
                "expected_escalate": "true" if t.escalate else "false",
            }
        )
    return rows


def write_csv(rows: Sequence[dict[str, str]], out: Path) -> None:
    """UTF-8, header row, minimal quoting, ``\\n`` line endings on every OS (``newline=''`` + terminator)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDNAMES, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; defaults reproduce the committed ``airflow_provider_fable/example_data/support_tickets.csv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--count", type=int, default=DEFAULT_COUNT, help="number of tickets (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="RNG seed (default %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output CSV (default airflow_provider_fable/example_data/support_tickets.csv)",
    )
    args = parser.parse_args(argv)
    rows = generate_tickets(args.count, args.seed)
    write_csv(rows, args.out)
    print(f"wrote {len(rows)} tickets to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
