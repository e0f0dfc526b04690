"""Find personal data in text and redact it: typed placeholders, or keyed fakes that keep the shape.

Detection is offline and rule-based: each type has a pattern plus a validator (Luhn for cards,
mod-97 for IBANs, the SSA's never-issued ranges for SSNs, ``ipaddress`` for IPs, ``phonenumbers``
for phones) or a context word (DOB, MRN, "my name is", ...). Choices worth knowing:

* Context types replace only the value: ``DOB: [DATE_OF_BIRTH]``, ``MRN [ID_NUMBER]``,
  ``Dr. [PERSON]``, and for URLs only the user:password part, ``https://[URL_CREDENTIALS]@host``
  (the host is rarely personal and keeps the text readable).
* Overlaps: the more specific type wins (the order of ``_PRIORITY``: a checksummed card beats an
  ``account`` id around the same digits, a URL's credentials beat the e-mail-like ``pass@host``),
  then the longer span.
* Decoys: a number right after ``order``, ``invoice``, ``tracking``, ``ref``, ``ticket`` and the
  like is never a phone or a card, nor is a dotted quad ever a phone. A dotted quad right after
  ``version``/``build``/``release``/``firmware``/``v`` is a version, not an IP; any other valid
  address is flagged (private and loopback ones too, and a bare four-part version such as
  "crashes on 2.8.7.120": without a version word it cannot be told from an address).
  Dates are flagged only near a birth word; a bare year never is.
* Person names are the weakest type: a title (Mr/Ms/Dr/...), a context (``my name is``,
  ``Patient:``, ``Dear``, a sign-off such as ``Thanks,``, a role such as ``beneficiary`` or
  ``spoke with``), two capitalised words before ``said``/``has``/..., or a first name from
  ``first_names.txt`` with the capitalised surnames after it.

Pseudonyms are HMAC-SHA256 of the value under the secret, so one secret maps a value to the same
fake in every row, process and run. Fakes keep the shape but come from ranges that name nobody
where such ranges are large enough: e-mails at example.com, cards 16 digits Luhn-valid under the
test BIN 400000, SSNs in the never-issued 9xx area with groups outside the ITIN ranges, IPv4 in the
reserved 240.0.0.0/4, IPv6 in the documentation prefix 2001:db8::/32. IBANs, phones and ids get
keyed digits and letters in the original layout (with a valid IBAN checksum); there are too few
reserved numbers to keep distinct values distinct. Birth dates live in a small space
(1940-2005), so two people can share a fake date, as they can share a real one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from datetime import date
from functools import cache, lru_cache
from importlib import resources
from typing import Callable, Iterable, Iterator

import phonenumbers

from domaintune.errors import RecipeError

PII_TYPES: tuple[str, ...] = (
    "email", "phone", "credit_card", "iban", "us_ssn", "ip_address",
    "url_credentials", "date_of_birth", "id_number", "person",
)
MODES: tuple[str, ...] = ("placeholder", "pseudonym")

# Which type keeps an overlapping span: validated and structural types before context ones.
_PRIORITY: tuple[str, ...] = (
    "url_credentials", "email", "iban", "credit_card", "us_ssn", "ip_address",
    "date_of_birth", "id_number", "phone", "person",
)
PHONE_REGIONS: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "AU")


@dataclass(frozen=True)
class Finding:
    """One piece of personal data: its type and where it is (``text[start:end] == text``)."""

    type: str
    start: int
    end: int
    text: str


# --------------------------------------------------------------------------- detectors
# Each detector yields (start, end) spans of values of one type in the text.

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
_URL_CREDENTIALS = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<v>[^\s/?#@:]+:[^\s/?#@]+)@[^\s/?#@]+")

# Words after which a number is a reference of some kind, not a phone or card.
_REFERENCE_BEFORE = re.compile(
    r"(?i:\b(?:order|invoice|inv|application|tracking|track|shipment|parcel|package|ticket|case|ref|reference|"
    r"sku|serial|part|model|item|confirmation|booking|transaction|txn|receipt|batch|lot|po|rma|claim|"
    r"build|version|v|release(?:\s+notes)?|firmware|fw|patch)"
    r"\s*(?:number|num|no\.?|id|code)?\s*[:#.=]?\s*#?\s*)$"
)


def _after_reference_word(text: str, start: int) -> bool:
    return bool(_REFERENCE_BEFORE.search(text, max(0, start - 32), start))


def _find_email(text: str) -> Iterator[tuple[int, int]]:
    if "@" in text:
        # "pass@host" inside https://user:pass@host is a URL's credentials, not an address.
        in_urls = [m.span() for m in _URL_CREDENTIALS.finditer(text)] if "://" in text else []
        for m in _EMAIL.finditer(text):
            if not any(a <= m.start() < b for a, b in in_urls):
                yield m.span()


def _find_url_credentials(text: str) -> Iterator[tuple[int, int]]:
    if "://" in text:
        for m in _URL_CREDENTIALS.finditer(text):
            yield m.span("v")


_PHONE_RUN = re.compile(r"(?<![\w.,/-])(?:\+|\b00|\()?\d[\d \t().\-/]{5,24}\d(?![\w]|[.,]\d)")


_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")  # an address or a version, valid or not


def _find_phone(text: str) -> Iterator[tuple[int, int]]:
    # The matcher costs about 0.1 ms per region even on a short window, so it runs only on digit
    # runs that can hold a phone number: 7 to 15 digits (the E.164 maximum), not after "order" etc.
    for run in _PHONE_RUN.finditer(text):
        window = run.group()
        digits = sum(c.isdigit() for c in window)
        if not 7 <= digits <= 15 or _DOTTED_QUAD.fullmatch(window) or _after_reference_word(text, run.start()):
            continue
        for start, end in _phones_in(window):
            yield run.start() + start, run.start() + end


@lru_cache(maxsize=1 << 16)
def _phones_in(window: str) -> tuple[tuple[int, int], ...]:
    """The phone numbers of one digit run. Cached: dates, amounts and reference numbers recur
    across rows, and each costs the matcher a pass per region."""
    # International form reads the same from every region; national forms need each one.
    regions = PHONE_REGIONS[:1] if window.startswith("+") else PHONE_REGIONS
    found: list[tuple[int, int]] = []
    covered: set[int] = set()
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID):
            covered.update(range(m.start, m.end))
            found.append((m.start, m.end))
        if all(i in covered for i, c in enumerate(window) if c.isdigit()):
            break
    return tuple(found)


_CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")


def luhn_valid(digits: str) -> bool:
    """True when the digit string passes the Luhn checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_network_length_ok(d: str) -> bool:
    # Issuer prefixes of the major networks with their card lengths; random numbers mostly fail.
    n = len(d)
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= int(d[:2]) <= 55 or 2221 <= int(d[:4]) <= 2720:
        return n == 16
    if d[:2] in ("34", "37"):
        return n == 15
    if d.startswith("6011") or d[:2] in ("62", "65") or 644 <= int(d[:3]) <= 649 or 3528 <= int(d[:4]) <= 3589:
        return 16 <= n <= 19
    if d[:2] in ("36", "38", "39") or 300 <= int(d[:3]) <= 305:
        return 14 <= n <= 19
    return False


def _find_credit_card(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text):
        raw = m.group()
        if len(set(c for c in raw if not c.isdigit())) > 1:  # "1234 5678-9012 3456" is not written by people
            continue
        digits = re.sub(r"\D", "", raw)
        if luhn_valid(digits) and _card_network_length_ok(digits) and not _after_reference_word(text, m.start()):
            yield m.span()


# Lengths from the SWIFT IBAN registry.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")


def iban_valid(iban: str) -> bool:
    """True when ``iban`` (spaces allowed) has its country's length and a valid mod-97 checksum."""
    compact = iban.replace(" ", "").upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    return _iban_remainder(compact[4:] + compact[:4]) == 1


def _iban_remainder(rearranged: str) -> int:
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97


def _find_iban(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        length = IBAN_LENGTHS.get(m.group()[:2])
        if length is None:
            continue
        # The pattern may run on into a following code word; cut at the country's length.
        end, seen = m.start(), 0
        while seen < length and end < m.end():
            seen += text[end] != " "
            end += 1
        if seen == length and not (end < len(text) and text[end].isalnum()) and iban_valid(text[m.start():end]):
            yield m.start(), end


_SSN = re.compile(r"(?<![\w-])(?!000|666|9)\d{3}(?P<sep>[- ])(?!00)\d{2}(?P=sep)(?!0000)\d{4}(?![\w-])")
_SSN_IN_CONTEXT = re.compile(
    r"(?i:\b(?:ssn|ss#|social\s+security(?:\s+(?:number|no\.?|#))?)\s*[:#]?\s*(?:is\s+)?)"
    r"(?P<v>(?!000|666|9)\d{3}(?!00)\d{2}(?!0000)\d{4})\b"
)


def _find_us_ssn(text: str) -> Iterator[tuple[int, int]]:
    for m in _SSN.finditer(text):
        yield m.span()
    for m in _SSN_IN_CONTEXT.finditer(text):
        yield m.span("v")


_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?:%\w+)?(?![\w:])"
)


def _find_ip_address(text: str) -> Iterator[tuple[int, int]]:
    if "." in text:
        for m in _IPV4.finditer(text):
            if _valid_ip(m.group()) and not _after_reference_word(text, m.start()):
                yield m.span()
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            candidate = m.group().split("%")[0]
            if any(c.isdigit() for c in candidate) and candidate.count(":") >= 2 and _valid_ip(candidate):
                yield m.span()


def _valid_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DATE = (
    r"(?:\d{4}-\d{1,2}-\d{1,2}"
    r"|\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?(?:\s+of)?\s+{_MONTH},?\s+\d{{4}}"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
# A birth word, then at most a short stretch of the same clause, then the date.
_DATE_OF_BIRTH = re.compile(
    r"(?i)\b(?:born|birth\s*date|date\s+of\s+birth|birthday|dob|d\.o\.b)\b\.?"
    rf"[^.;!?\n]{{0,40}}?(?<![\w/.-])(?P<v>{_DATE})(?![\w/-]|\.\d)"
)


def _find_date_of_birth(text: str) -> Iterator[tuple[int, int]]:
    for m in _DATE_OF_BIRTH.finditer(text):
        yield m.span("v")


_ID_NUMBER = re.compile(
    r"(?i:\b(?:account|acct\.?|a/c|mrn|medical\s+record|policy|passport|"
    r"(?:member|patient|employee|customer|subscriber)\s+(?:id|number|no\.?|\#))"
    r"(?:\s+(?:number|num|no\.?|\#|id))?\s*(?:[:\#=]|\bis\b|\bending\s+in\b)?\s*)"
    r"(?P<v>(?=[A-Za-z0-9-]*\d)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)\b(?!\.\d)"
)
_YEAR = re.compile(r"(?:19|20)\d\d")


def _find_id_number(text: str) -> Iterator[tuple[int, int]]:
    for m in _ID_NUMBER.finditer(text):
        value = m.group("v")
        if len(value) >= 4 and not _YEAR.fullmatch(value):
            yield m.span("v")


# A capitalised word of a name: Smith, McAllister, O'Brien, Smith-Jones, Dong-hyun, José.
_NAME_TOKEN = (r"(?:[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+(?:[A-Z][a-z]+)?|[A-Z]['’][A-Z][a-z]+)"
               r"(?:-[A-Za-zÀ-ÖØ-öø-ÿ][a-zß-öø-ÿ]+)?")
_NAME = rf"{_NAME_TOKEN}(?:[ \t]+(?:[A-Z]\.[ \t]+)?{_NAME_TOKEN}){{0,2}}"
_TITLE = r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor|Sir|Dame|Rev)\.?[ \t]+(?:[A-Z]\.[ \t]+)?"
# Words that introduce a name: self-introductions, form labels, greetings and sign-offs, and the
# roles people are named by in tickets, notes and contracts ("beneficiary X", "spoke with X").
_BEFORE_NAME = (
    r"(?i:\bmy\s+name\s+is|\bmy\s+name's|\bi\s+am\s+called|\bit's|\bthis\s+is|"
    r"\b(?:full\s+|patient\s+|customer\s+)?name\s*:|\bfrom\s*:|\battn\.?\s*:?|\bsigned,?|\bsincerely,|"
    r"\bregards,|\bthanks,|\bthank\s+you,|\bcheers,|\bbest,|\bdear|^hi|^hello|^hey|"
    r"\b(?:patient|client|customer|applicant|beneficiary|(?:account|card|policy)\s*holder|claimant|defendant|"
    r"plaintiff|tenant|landlord|employee|candidate|witness|contact|counsel|manager|for|with|call)"
    r"\s*[:,]?)"
)
# Every cue starts a word with a letter: asserting that first lets the engine leave the other
# positions at once instead of trying each of the cues there (2.6x faster, the same matches).
_PERSON_CONTEXT = re.compile(rf"\b(?=[A-Za-z])(?:{_BEFORE_NAME}\s*(?:{_TITLE})?|{_TITLE})(?P<v>{_NAME})",
                             re.MULTILINE)
# Two or three capitalised words followed by what people do in reports ("X Y said", "X Y has").
_NAME_BEFORE_VERB = re.compile(
    rf"(?P<v>{_NAME_TOKEN}(?:[ \t]+{_NAME_TOKEN}){{1,2}})(?=[ \t]+(?:said|says|has|had|was|is|will|called|"
    r"wrote|asked|reported|requested|mentioned|confirmed|agreed|signed|joined|left|phoned|emailed)\b)"
)
_CAPITALISED_RUN = re.compile(rf"\b{_NAME}")
# Capitalised words that context patterns and first names run into but that are not names.
_NOT_NAME = frozenset("""
    The This That These Those There Here It I We You They He She Our Your My His Her Their A An And Or But
    Thanks Thank Regards Best Cheers Hi Hello Dear Sincerely Team Support Customer Service Services Sales
    Billing Admin All Everyone Sir Madam Monday Tuesday Wednesday Thursday Friday Saturday Sunday
    January February March April May June July August September October November December
    Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Wed Thu Fri Sat Sun
    Please Ok Okay Yes No Not Sorry Unknown Patient Client Department Office Ltd Inc Corp Group
    Mr Mrs Ms Miss Mx Dr Prof Professor Dame Rev Agreement Contract Company Bank Court Clinic Hospital
""".split())


@cache
def first_names() -> frozenset[str]:
    """The packaged first-name list (``first_names.txt``)."""
    text = resources.files("domaintune.data").joinpath("first_names.txt").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _name_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Trim words that are not names off both ends of a capitalised run."""
    words = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", text[start:end])]
    while words and text[words[0][0]:words[0][1]] in _NOT_NAME:
        words.pop(0)
    while words and text[words[-1][0]:words[-1][1]] in _NOT_NAME:
        words.pop()
    return (words[0][0], words[-1][1]) if words else None


def _find_person(text: str) -> Iterator[tuple[int, int]]:
    for m in (*_PERSON_CONTEXT.finditer(text), *_NAME_BEFORE_VERB.finditer(text)):
        span = _name_span(text, *m.span("v"))
        if span:
            yield span
    names = first_names()
    for m in _CAPITALISED_RUN.finditer(text):
        words = m.group().split()
        if any(w in names for w in words):
            span = _name_span(text, *m.span())
            if span:
                yield span


_ANY_DIGIT = re.compile(r"\d")

_DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "email": _find_email, "phone": _find_phone, "credit_card": _find_credit_card, "iban": _find_iban,
    "us_ssn": _find_us_ssn, "ip_address": _find_ip_address, "url_credentials": _find_url_credentials,
    "date_of_birth": _find_date_of_birth, "id_number": _find_id_number, "person": _find_person,
}


# --------------------------------------------------------------------------- pseudonyms

class _Keyed:
    """A deterministic stream of choices drawn from HMAC-SHA256(secret, type, value, attempt)."""

    def __init__(self, secret: bytes, kind: str, value: str, attempt: int):
        self._key = hmac.new(secret, f"{kind}\x00{value}\x00{attempt}".encode(), hashlib.sha256).digest()
        self._pool = b""
        self._block = 0

    def below(self, n: int) -> int:
        """A number in ``range(n)``; 8 bytes per draw keep the modulo bias negligible."""
        while len(self._pool) < 8:
            self._pool += hmac.new(self._key, self._block.to_bytes(4, "big"), hashlib.sha256).digest()
            self._block += 1
        chunk, self._pool = self._pool[:8], self._pool[8:]
        return int.from_bytes(chunk, "big") % n

    def digits(self, n: int) -> str:
        return "".join(str(self.below(10)) for _ in range(n))

    def hex(self, n: int) -> str:
        return "".join("0123456789abcdef"[self.below(16)] for _ in range(n))

    def like(self, value: str) -> str:
        """Same layout as ``value``: digits become digits, letters letters of the same case."""
        out = []
        for ch in value:
            if ch.isdigit():
                out.append(str(self.below(10)))
            elif ch.isascii() and ch.isalpha():
                letter = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[self.below(26)]
                out.append(letter if ch.isupper() else letter.lower())
            else:
                out.append(ch)
        return "".join(out)


def _fake_email(value: str, k: _Keyed) -> str:
    return f"user.{k.hex(12)}@example.com"


def _fake_phone(value: str, k: _Keyed) -> str:
    # Keep an international prefix (+CC / 00CC) or a trunk 0 so the fake reads as the same kind of number.
    m = re.match(r"(?:\+|00)\d{1,3}|\(?0", value)
    head = m.group() if m else ""
    return head + re.sub(r"\d", lambda _: str(k.below(10)), value[len(head):])


def _fake_credit_card(value: str, k: _Keyed) -> str:
    body = "400000" + k.digits(9)
    digits = body + next(d for d in "0123456789" if luhn_valid(body + d))
    sep = next((c for c in value if not c.isdigit()), "")
    return sep.join(digits[i:i + 4] for i in range(0, 16, 4))


def _fake_iban(value: str, k: _Keyed) -> str:
    compact = value.replace(" ", "").upper()
    bban = k.like(compact[4:])
    check = 98 - _iban_remainder(bban + compact[:2] + "00")
    fake = iter(f"{compact[:2]}{check:02d}{bban}")
    return "".join(c if c == " " else next(fake) for c in value)


def _fake_us_ssn(value: str, k: _Keyed) -> str:
    sep = next((c for c in value if not c.isdigit()), "")
    # Area 9xx is never issued as an SSN; groups 01-49 are outside the ITIN ranges too.
    return f"9{k.below(100):02d}{sep}{1 + k.below(49):02d}{sep}{1 + k.below(9999):04d}"


def _fake_ip_address(value: str, k: _Keyed) -> str:
    if ":" in value:
        groups = ":".join(k.hex(4) for _ in range(6))
        return str(ipaddress.IPv6Address(f"2001:db8:{groups}"))
    return f"{240 + k.below(15)}.{k.below(256)}.{k.below(256)}.{1 + k.below(254)}"


def _fake_url_credentials(value: str, k: _Keyed) -> str:
    return f"user{k.hex(6)}:{k.hex(16)}"


_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                "October", "November", "December")


def _fake_date_of_birth(value: str, k: _Keyed) -> str:
    fake = date(1940 + k.below(66), 1 + k.below(12), 1 + k.below(28))
    if re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}", value):
        return fake.isoformat()
    numeric = re.fullmatch(r"(\d{1,2})([/.-])(\d{1,2})[/.-](\d{2,4})", value)
    if numeric:
        first, sep, _, year = numeric.groups()
        y = f"{fake.year}" if len(year) == 4 else f"{fake.year % 100:02d}"
        day_first = int(first) > 12 or sep == "."
        a, b = (fake.day, fake.month) if day_first else (fake.month, fake.day)
        return f"{a:02d}{sep}{b:02d}{sep}{y}"
    month = _MONTH_NAMES[fake.month - 1]
    if value[0].isdigit():
        return f"{fake.day} {month} {fake.year}"
    return f"{month} {fake.day}, {fake.year}"


def _fake_id_number(value: str, k: _Keyed) -> str:
    return k.like(value)


_SYLLABLES = tuple(c + v for c in "bdfghklmnprstvz" for v in "aeiou")


@cache
def _first_names_in_order() -> tuple[str, ...]:
    return tuple(sorted(first_names()))


def _fake_person(value: str, k: _Keyed) -> str:
    names = _first_names_in_order()
    first = names[k.below(len(names))]
    if len(value.split()) == 1:
        return first
    surname = "".join(_SYLLABLES[k.below(len(_SYLLABLES))] for _ in range(3)).capitalize()
    return f"{first} {surname}"


_FAKERS: dict[str, Callable[[str, _Keyed], str]] = {
    "email": _fake_email, "phone": _fake_phone, "credit_card": _fake_credit_card, "iban": _fake_iban,
    "us_ssn": _fake_us_ssn, "ip_address": _fake_ip_address, "url_credentials": _fake_url_credentials,
    "date_of_birth": _fake_date_of_birth, "id_number": _fake_id_number, "person": _fake_person,
}


def _normalise(kind: str, value: str) -> str:
    """The key a value is pseudonymised under, so that spellings of one value share a fake."""
    if kind in ("phone", "credit_card", "us_ssn"):
        return re.sub(r"\D", "", value)
    if kind == "iban":
        return value.replace(" ", "").upper()
    if kind == "ip_address":
        return str(ipaddress.ip_address(value.split("%")[0]))
    if kind in ("email", "person"):
        return " ".join(value.split()).casefold()
    return value


# --------------------------------------------------------------------------- the redactor

class PiiRedactor:
    """Find and redact personal data of the chosen types.

    ``types``: names from ``PII_TYPES`` (default: all). ``mode``: ``"placeholder"`` replaces each
    value by ``[TYPE]``; ``"pseudonym"`` by a fake of the same shape keyed by ``secret`` (required;
    a recipe run reads it from the variable named by ``data.pii.secret_env``). The redactor holds
    no state between calls: the same text always gives the same result.
    """

    def __init__(self, types: Iterable[str] | None = None, mode: str = "placeholder",
                 secret: str | bytes | None = None):
        chosen = PII_TYPES if types is None else tuple(dict.fromkeys(types))
        unknown = [t for t in chosen if t not in PII_TYPES]
        if unknown:
            raise RecipeError(f"unknown PII type(s): {', '.join(map(repr, unknown))}", where="data.pii.types",
                              hint=f"use any of {', '.join(PII_TYPES)}")
        if mode not in MODES:
            raise RecipeError(f"unknown PII mode {mode!r}", where="data.pii.mode",
                              hint=f"use one of {', '.join(MODES)}")
        if mode == "pseudonym" and not secret:
            raise RecipeError(
                "pseudonym mode needs a secret key", where="data.pii.secret_env",
                hint="set DOMAINTUNE_PII_SECRET (or the variable named by data.pii.secret_env) to a long random string",
            )
        self.types = tuple(t for t in _PRIORITY if t in chosen)
        self.mode = mode
        self._secret = secret.encode() if isinstance(secret, str) else secret

    def find(self, text: str) -> list[Finding]:
        """Findings in ``text``, sorted by position and never overlapping."""
        has_digits = _ANY_DIGIT.search(text) is not None
        kept: list[Finding] = []
        taken: list[tuple[int, int]] = []
        for kind in self.types:
            if not has_digits and kind not in ("email", "url_credentials", "person"):
                continue
            spans = sorted(set(_DETECTORS[kind](text)), key=lambda s: (s[0] - s[1], s[0]))
            for start, end in spans:
                if all(end <= a or start >= b for a, b in taken):
                    taken.append((start, end))
                    kept.append(Finding(kind, start, end, text[start:end]))
        return sorted(kept, key=lambda f: f.start)

    def redact(self, text: str) -> tuple[str, list[Finding]]:
        """``text`` with every finding replaced, and the findings (positions in the original text)."""
        findings = self.find(text)
        parts, last = [], 0
        for f in findings:
            parts += [text[last:f.start], self._replacement(f)]
            last = f.end
        parts.append(text[last:])
        return "".join(parts), findings

    def _replacement(self, finding: Finding) -> str:
        if self.mode == "placeholder":
            return f"[{finding.type.upper()}]"
        key = _normalise(finding.type, finding.text)
        # Redraw in the rare case a fake equals or contains the value ("Li" -> "Lina").
        attempt = 0
        while True:
            fake = _FAKERS[finding.type](finding.text, _Keyed(self._secret, finding.type, key, attempt))
            if finding.text.casefold() not in fake.casefold():
                return fake
            attempt += 1
