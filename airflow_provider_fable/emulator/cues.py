"""Reading cues the emulated model takes from a request besides the record's own words.

A real model answering a schema it has never seen uses more than keyword overlap: it reads the
label definitions in the system prompt ("- too_expensive: price, price increases, cannot
afford"), band definitions in a field's description ("micro 1-10, small 11-50"), what the
few-shot turns show (which parts of the user turn are template, which answer an example got),
reads through typos ("expnsive") and other languages ("zu teuer"). This module extracts those
cues from the request, schema-generically: nothing here knows a dataset or a DAG.

Everything is a pure function of its input (and cached), like the rest of the model.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

__all__ = [
    "LabelCues",
    "PromptCues",
    "SharedCues",
    "fold",
    "fuzzy_matches",
    "glosses",
    "is_placeholder",
    "label_cues",
    "matching_example",
    "one_slip",
    "prompt_cues",
    "record_key",
]

# --------------------------------------------------------------------------------------------
# Accents and other languages
# --------------------------------------------------------------------------------------------

_FOLD_EXTRA = str.maketrans(
    {"ß": "ss", "ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "æ": "ae", "œ": "oe", "đ": "d"}
)


@lru_cache(maxsize=65536)
def fold(text: str) -> str:
    """``text`` without accents ("fonctionnalités" -> "fonctionnalites", "ciągle" -> "ciagle").

    Word matching works on ASCII letters; without folding an accented word splits in two.
    """
    if text.isascii():
        return text
    # Only the non-ASCII runs are looked at character by character (ASCII has no combining
    # marks), and the extra table only when one of its letters occurs: same result, a fraction
    # of the time on records with a curly quote or two.
    if _FOLD_EXTRA_RE.search(text):
        text = text.translate(_FOLD_EXTRA)
    decomposed = unicodedata.normalize("NFKD", text)
    return decomposed if decomposed.isascii() else _NON_ASCII_RE.sub(_without_marks, decomposed)


_FOLD_EXTRA_RE = re.compile("[ßłŁøØæœđ]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")


def _without_marks(match: re.Match[str]) -> str:
    return "".join(ch for ch in match.group() if not unicodedata.combining(ch))


# Common customer words in German, French, Spanish, Italian, Portuguese, Polish and Dutch, with
# an English gloss. Keys are folded, lower case; a multi-word key matches as a phrase. Cheap
# multilingual cues, not translation: a word found here adds its gloss to the evidence.
_GLOSSARY_TEXT = """
zu teuer|teuer|teure|teurer|trop cher|cher|chere|trop couteux|couteux|demasiado caro|caro|cara|\
muy caro|troppo caro|costoso|costosa|muito caro|za drogo|drogo|drogie|te duur|duur = too expensive
preis|preise|prix|precio|precios|prezzo|preco|cena|prijs|prijzen = price
preiserhohung|hausse de prix|augmentation|subida de precio|aumento|podwyzka|prijsverhoging = price increase
billiger|moins cher|mas barato|piu economico|taniej|goedkoper = cheaper
kosten|cout|couts|coste|costo|costi|koszt|koszty = cost
fehlende|fehlt|fehlen|manque|manquent|il manque|falta|faltan|manca|mancano|brakuje|brak|ontbreekt|ontbreken = missing lacks
funktion|funktionen|funktionalitat|fonction|fonctionnalite|fonctionnalites|funcion|funciones|\
funcionalidad|funzione|funzioni|funcao|funcoes|funkcja|funkcje|funkcji|functie|functies = features
anbieter|fournisseur|proveedor|fornitore|fornecedor|dostawca|leverancier|aanbieder = vendor provider
konkurrenz|wettbewerber|concurrent|concurrence|competencia|competidor|concorrente|concorrenza|\
konkurencja|konkurencji|concurrentie = competitor
gewechselt|wechseln|passe chez|change de|cambiamos|cambiado|nos cambiamos|cambiato|mudamos|\
zmienilismy|przeszlismy|overgestapt = switched
anderen|autre|otro|otra|altro|outro|inny|innego|ander|andere = another
kundenservice|kundendienst|service client|servicio al cliente|atencion al cliente|assistenza|\
obsluga klienta|klantenservice = customer service
soporte|supporto|suporte|wsparcie|pomoc = support
schlecht|schlechter|mauvais|inexistant|malo|mala|pessimo|pessima|slaby|slecht = poor
antwort|reponse|respuesta|respondio|risposta|resposta|odpowiedz|antwoord = answer reply
absturz|sturzt ab|sturzt|abgesturzt|plante|crashe|se cae|se bloquea|si blocca|trava|zawiesza|\
zawiesza sie|crasht|loopt vast = crashes
fehler|erreur|erreurs|errores|errore|errori|erro|blad|bledy|fout|fouten = error
langsam|lento|lenta|wolno|wolny|traag = slow
nicht mehr|plus besoin|n'ai plus besoin|ya no|non piu|ja nao|juz nie|niet meer|niet langer = no longer
brauchen|brauche|besoin|necesito|necesitamos|bisogno|preciso|potrzebuje|potrzebujemy|nodig|nodig hebben = need
geschlossen|schliessen|ferme|fermee|fermeture|cerramos|cerrado|cerrada|chiuso|chiusa|fechado|\
fechamos|zamkniety|zamknieta|zamykamy|gesloten = closed
firma|unternehmen|entreprise|societe|empresa|negocio|azienda|impresa|negocio|sklep|bedrijf|zaak = business company
pausa|przerwa|pauze = pause
voruebergehend|vorubergehend|temporaire|temporal|temporanea|temporaneo|tymczasowa|tijdelijk = temporary
monate|mois|meses|mesi|miesiace|maanden = months
abgebucht|doppelt abgebucht|facture|factures|facture deux fois|cobraron|cobrado|addebitato|\
cobrado duas vezes|pobrano|pobrali|afgeschreven = charged
doppelt|deux fois|dos veces|due volte|duas vezes|dwa razy|twee keer|dubbel = twice
rechnung|facture|factura|fattura|fatura|faktura|factuur = invoice
ruckerstattung|erstattung|remboursement|reembolso|rimborso|zwrot|terugbetaling = refund
keine angabe|sans raison|sans commentaire|ninguna|ninguno|sin motivo|nessuno|nessun motivo|\
nenhum|brak powodu|geen reden|geen = no reason
umzug|ausland|demenage|je demenage|mudo|me mudo|extranjero|trasloco|estero|przeprowadzka|verhuizing = moving abroad
passwort|mot de passe|contrasena|haslo|wachtwoord = password
anmelden|anmeldung|connexion|connecter|iniciar sesion|accedere|zalogowac|logowanie|inloggen = log in
konto|compte|cuenta|conto|konta = account
lieferung|livraison|entrega|consegna|dostawa|levering|bezorging = delivery
paket|colis|paquete|pacco|paczka|pakket = package
dringend|urgente|pilne|pilny = urgent
danke|merci|gracias|grazie|obrigado|dziekuje|bedankt = thanks
"""


def _glossary() -> dict[tuple[str, ...], str]:
    out: dict[tuple[str, ...], str] = {}
    for line in _GLOSSARY_TEXT.replace("\\\n", "").strip().splitlines():
        keys, _, gloss = line.partition(" = ")
        for key in keys.split("|"):
            words = tuple(re.findall(r"[a-z0-9]+", fold(key.strip().lower())))
            if words:
                out[words] = gloss.strip()
    return out


_GLOSSARY = _glossary()
_GLOSS_MAX = max(len(k) for k in _GLOSSARY)
#: First words of the glossary's keys: most words of a record start none, and are skipped at once.
_GLOSS_FIRST = frozenset(k[0] for k in _GLOSSARY)


def glosses(words: Sequence[str]) -> list[str]:
    """English glosses of the foreign words and phrases in ``words`` (folded, lower case)."""
    out: list[str] = []
    if _GLOSS_FIRST.isdisjoint(words):
        return out  # no foreign word starts here (most records): skip the walk
    i = 0
    while i < len(words):
        if words[i] not in _GLOSS_FIRST:
            i += 1
            continue
        for n in range(min(_GLOSS_MAX, len(words) - i), 0, -1):
            gloss = _GLOSSARY.get(tuple(words[i : i + n]))
            if gloss is not None:
                out.append(gloss)
                i += n
                break
        else:
            i += 1
    return out


# --------------------------------------------------------------------------------------------
# Typos
# --------------------------------------------------------------------------------------------

_MIN_FUZZY = 5  # shorter words have too many one-edit neighbours to guess from


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


@lru_cache(maxsize=64)
def _fuzzy_index(vocabulary: frozenset[str]) -> dict[str, frozenset[str]]:
    index: dict[str, set[str]] = {}
    for word in vocabulary:
        if len(word) >= _MIN_FUZZY:
            for key in _deletes(word) | {word}:
                index.setdefault(key, set()).add(word)
    return {k: frozenset(v) for k, v in index.items()}


def fuzzy_matches(word: str, vocabulary: frozenset[str]) -> list[str]:
    """Words of ``vocabulary`` one keyboard slip away from ``word`` (a dropped, doubled,
    swapped or wrong letter), by symmetric deletion; empty when ``word`` is itself known."""
    if len(word) < _MIN_FUZZY or word in vocabulary or not word.isalpha():
        return []
    index = _fuzzy_index(vocabulary)
    found: set[str] = set()
    for key in _deletes(word) | {word}:
        found |= index.get(key, frozenset())
    return sorted(w for w in found if abs(len(w) - len(word)) <= 1)


# --------------------------------------------------------------------------------------------
# Label definitions in the system prompt and the field description
# --------------------------------------------------------------------------------------------

_NEGATED_ASIDE_RE = re.compile(r"\((?:without|not|except|never|unless|excluding)\b[^)]*\)", re.IGNORECASE)
_BAND_DEF_RE = re.compile(
    r"\b([A-Za-z][\w-]*)\s*(?:[:=(]\s*)?(\d[\d,]*)\s*(k)?\s*(?:-|–|to)\s*(\d[\d,]*)\s*(k)?"
    r"|\b([A-Za-z][\w-]*)\s*(?:[:=(]\s*)?(?:over|more than|above|>)\s*(\d[\d,]*)\s*(k)?"
    r"|\b([A-Za-z][\w-]*)\s*(?:[:=(]\s*)?(\d[\d,]*)\s*(k)?\s*(?:\+|or more)",
    re.IGNORECASE,
)


def _num(raw: str, k: str | None) -> int:
    return int(float(raw.replace(",", "")) * (1000 if k else 1))


@dataclass(frozen=True)
class LabelCues:
    """What the request says about one enum's values: definitions and numeric bands."""

    #: value -> definition text found for it (system prompt line or description)
    definitions: Mapping[str, str] = field(default_factory=dict)
    #: value -> (low, high) band stated for it ("micro 1-10", "enterprise over 1000")
    bands: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def _definition_patterns(value: str) -> list[re.Pattern[str]]:
    spoken = re.escape(value).replace("_", "[ _]").replace(r"\-", "[ -]")
    return [
        # "- too_expensive: price, ..." / "too_expensive = ..." at the start of a line
        re.compile(
            rf"^[ \t]*(?:[-*•]|\d+[.)])?[ \t]*[`'\"]?{spoken}[`'\"]?[ \t]*(?::|=|–|—| - )[ \t]*(.+)$",
            re.IGNORECASE | re.MULTILINE,
        ),  # fmt: skip
        # "executive (CEO, founder, managing director)" inside a sentence
        re.compile(rf"(?<![\w-]){spoken}\s*\(([^()]{{3,160}})\)", re.IGNORECASE),
    ]


@lru_cache(maxsize=512)
def label_cues(values: tuple[str, ...], system: str, description: str) -> LabelCues:
    """Definitions and bands of ``values`` found in the system prompt and the field description.

    A definition's negated asides ("(without naming a switch)") are dropped: they name what the
    label is *not* about.
    """
    definitions: dict[str, str] = {}
    for value in values:
        parts: list[str] = []
        for pattern in _definition_patterns(value):
            for source in (description, system):
                for m in pattern.finditer(source):
                    parts.append(m.group(1))
        if parts:
            text = " ; ".join(parts)
            definitions[value] = _NEGATED_ASIDE_RE.sub(" ", text)
    bands: dict[str, tuple[int, int]] = {}
    lowered = {v.lower().replace("_", " "): v for v in values}
    for source in (description, system):
        for m in _BAND_DEF_RE.finditer(source):
            if m.group(1):
                name, band = (
                    m.group(1),
                    (_num(m.group(2), m.group(3) or m.group(5)), _num(m.group(4), m.group(5))),
                )
            elif m.group(6):
                name, band = m.group(6), (_num(m.group(7), m.group(8)) + 1, 10**12)
            else:
                name, band = m.group(9), (_num(m.group(10), m.group(11)), 10**12)
            value = lowered.get(name.lower().replace("_", " "))
            if value is not None and value not in bands and band[0] <= band[1]:
                bands[value] = band
    return LabelCues(definitions, bands)


# --------------------------------------------------------------------------------------------
# The prompt around the record: system text, template words, few-shot answers
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[a-z0-9]+")


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(fold(text).lower())


def normalise_record(text: str) -> str:
    """Case, accents, punctuation and spacing removed: the key few-shot records are matched by."""
    return " ".join(_tokens(text))


@dataclass(frozen=True)
class PromptCues:
    """The parts of a request around the record being answered."""

    system: str = ""
    #: words every user turn shares (the prompt template), not evidence about the record
    template_words: frozenset[str] = frozenset()
    #: normalised record text of each few-shot user turn -> the JSON answer it was given
    examples: Mapping[str, Any] = field(default_factory=dict)
    #: every user turn quotes its record (``Reason given: "{reason}" (tier {plan})``): the quote
    #: is the record, the rest is context (a plan called "business" is no business closure)
    quoted_record: bool = False
    #: the model asked (samples of different models differ)
    model: str = ""


def answered_turns(messages: Sequence[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(user text, answer) of each user turn followed by an assistant turn holding a JSON object:
    the few-shot examples a prompt carries (other turns are not examples and are skipped)."""
    for i, message in enumerate(messages[:-1]):
        if not (isinstance(message, Mapping) and message.get("role") == "user"):
            continue
        reply = messages[i + 1]
        if not (isinstance(reply, Mapping) and reply.get("role") == "assistant"):
            continue
        try:
            answer = json.loads(_text_of(reply.get("content")))
        except ValueError:
            continue
        if isinstance(answer, dict):
            yield _text_of(message.get("content")), answer


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(b.get("text", "")) for b in content if isinstance(b, Mapping) and b.get("type") == "text"
        )
    return ""


def _system_text(system: Any) -> str:
    return _text_of(system) if not isinstance(system, str) else system


_QUOTED_RE = re.compile(r'"([^"\n]*)"|\u201c([^\u201d\n]*)\u201d')
_PLACEHOLDERS = frozenset(
    "n a na none nil null nothing tbd tba x xx xxx no comment no comments no reason unknown "
    "not applicable empty blank".split()
)


def record_key(text: str, template_words: Iterable[str]) -> str:
    """What identifies the record in a user turn, normalised.

    A template that quotes the free-text value (``Reason given: "{reason}"``) names the record by
    the quoted text; otherwise it is the words that are not the template's, numbers left out.
    """
    quoted = [a or b for a, b in _QUOTED_RE.findall(text)]
    if quoted:
        return normalise_record(" ".join(quoted))
    template = template_words if isinstance(template_words, (set, frozenset)) else set(template_words)
    return " ".join([w for w in _tokens(text) if w not in template and not w.isdigit()])


def quoted_text(text: str) -> str:
    """The quoted segments of a user turn, joined."""
    return " ".join(a or b for a, b in _QUOTED_RE.findall(text))


def is_placeholder(key: str) -> bool:
    """True when a record key carries no content: empty, "n/a", "-", "none", "no comment"...,
    also in another language ("keine Angabe", "sans raison", "ninguna")."""
    words = key.split()
    if not words or all(w in _PLACEHOLDERS or len(w) == 1 for w in words):
        return True
    return len(words) <= 3 and glosses(words) == ["no reason"] * len(glosses(words)) and bool(glosses(words))


def one_slip(typed: str, word: str) -> bool:
    """True when ``typed`` is ``word`` with one letter dropped, doubled/added or two neighbours
    swapped: the usual keyboard slips. A wrong letter is left out on purpose: it mostly turns
    one real word into another ("change"/"charge"), which is not a typo to correct."""
    if typed == word:
        return False
    if len(typed) == len(word):
        diff = [i for i, (a, b) in enumerate(zip(typed, word, strict=True)) if a != b]
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and typed[diff[0]] == word[diff[1]]
            and typed[diff[1]] == word[diff[0]]
        )
    short, long_ = (typed, word) if len(typed) < len(word) else (word, typed)
    if len(long_) - len(short) != 1:
        return False
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def matching_example(key: str, examples: Mapping[str, Any]) -> Any:
    """The few-shot answer whose record is this record (same normalised text), or None."""
    if key in examples:
        return examples[key]
    words = set(key.split())
    if len(words) < 3:
        return None
    for other, answer in examples.items():
        theirs = set(other.split())
        if len(words & theirs) >= 0.8 * max(len(words), len(theirs)):
            return answer
    return None


def prompt_cues(params: Mapping[str, Any]) -> PromptCues:
    """System text, template words and few-shot answers of a Messages request."""
    messages = params.get("messages") if isinstance(params.get("messages"), list) else []
    users = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
    texts = [_text_of(m.get("content")) for m in users]
    template: frozenset[str] = frozenset()
    if len(texts) >= 2:
        sets = [set(_tokens(t)) for t in texts]
        template = frozenset(set.intersection(*sets))
    examples: dict[str, Any] = {}
    for text, answer in answered_turns(messages):
        examples[record_key(text, template)] = answer
    quoted = len(texts) >= 2 and all(_QUOTED_RE.search(t) for t in texts)
    return PromptCues(
        _system_text(params.get("system")), template, examples, quoted, str(params.get("model", ""))
    )


_NO_TEMPLATE: frozenset[str] = frozenset()


class SharedCues:
    """``prompt_cues`` split in two: what all requests of one prompt share, read once.

    A batch is thousands of requests that differ only in their last user turn (the record);
    the system text, the few-shot turns and their parsed answers are the same for all. This
    holds what ``prompt_cues`` derives from everything before the last message, and ``cues``
    finishes the job for one record with the same result as ``prompt_cues(params)``.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        messages = params["messages"]
        prefix = messages[:-1]
        users = [m for m in prefix if isinstance(m, Mapping) and m.get("role") == "user"]
        texts = [_text_of(m.get("content")) for m in users]
        self.system = _system_text(params.get("system"))
        self.model = str(params.get("model", ""))
        self.count = len(texts)
        self.common: frozenset[str] | None = (
            frozenset(set.intersection(*[set(_tokens(t)) for t in texts])) if texts else None
        )
        self.all_quoted = all(_QUOTED_RE.search(t) for t in texts)
        #: (quoted key or None, tokens, answer) of each few-shot user turn answered in the prefix
        self.pairs: list[tuple[str | None, list[str], dict[str, Any]]] = []
        for text, answer in answered_turns(prefix):
            quoted = [a or b for a, b in _QUOTED_RE.findall(text)]
            self.pairs.append((normalise_record(" ".join(quoted)) if quoted else None, _tokens(text), answer))
        self._examples: dict[frozenset[str], dict[str, Any]] = {}
        self._cues: dict[tuple[frozenset[str], bool], PromptCues] = {}

    def cues(self, content: Any) -> PromptCues:
        """``prompt_cues`` of the request whose last message is a user turn with ``content``.

        The result is immutable and only depends on the template words and whether the record
        is quoted: one object per such pair is handed to every request that has it."""
        if self.common is None and self.count == 0:
            # No other user turn (most batches): nothing of the record is read here.
            return self._cues_for(_NO_TEMPLATE, False)
        last_text = _text_of(content)
        template: frozenset[str] = _NO_TEMPLATE
        if self.common is not None:
            template = frozenset(self.common.intersection(_tokens(last_text)))
        quoted = self.count >= 1 and self.all_quoted and bool(_QUOTED_RE.search(last_text))
        return self._cues_for(template, quoted)

    def _cues_for(self, template: frozenset[str], quoted: bool) -> PromptCues:
        hit = self._cues.get((template, quoted))
        if hit is not None:
            return hit
        examples = self._examples.get(template)
        if examples is None:
            examples = {}
            for quoted_key, tokens, answer in self.pairs:
                key = (
                    quoted_key
                    if quoted_key is not None
                    else " ".join(w for w in tokens if w not in template and not w.isdigit())
                )
                examples[key] = answer
            if len(self._examples) < 64:
                self._examples[template] = examples
        cues = PromptCues(self.system, template, examples, quoted, self.model)
        if len(self._cues) < 128:
            self._cues[(template, quoted)] = cues
        return cues
