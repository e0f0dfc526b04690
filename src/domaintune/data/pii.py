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
* Decoys: a bare run of digits right after ``order``, ``invoice``, ``tracking``, ``ref``,
  ``ticket`` and the like is a reference, not a phone; one grouped the way the number is dialled
  ("my claim 07700 900123") is a phone, and a Luhn-valid card is a card after any word. A dotted
  quad is never a phone. A dotted quad right after
  ``version``/``build``/``release``/``firmware``/``v`` is a version, not an IP; any other valid
  address is flagged (private and loopback ones too, and a bare four-part version such as
  "crashes on 2.8.7.120": without a version word it cannot be told from an address).
  Dates are flagged only near a birth word; a bare year never is.
* Person names are the weakest type: a title (Mr/Ms/Dr/..., then any word: "dr. nguyen"; a name
  in capitals, "DR. SMITH", "MR JONES", but not an ordinary word: "DR. VISIT", "MS WORD"), a
  context (``my name is``, ``Patient:``, a sign-off such as ``Thanks,`` closing the line, a
  greeting anywhere such as ``Good morning Ines,`` or ``Thanks so much Farah!``, a role such as
  ``beneficiary`` or ``spoke with``, a roster such as ``Attendees:``, a family member or a carer
  in lower case such as ``wife Ines`` or ``nurse Kelly``), two or three capitalised words before
  ``said``/``presented``/..., before an address ("Ana Sousa <ana@...>", not a role
  mailbox such as help@) or before a contract's party ('(the "Tenant")'), surname-first records
  ("SMITH, John"), or a first name from ``first_names.txt`` with the surnames after it. Clinical
  and support text is full of capitalised words that are not people ("with Crohn's disease",
  "call Cardiology", "paid with PayPal"), so weak cues (``for``, ``with``, ``call``, ``Dear``,
  ``I'm``, ``Apologies:``, ``the contact is``) need a listed first name or a first name and a
  surname, and without a title, brands, departments, eponyms, organisations and words after a
  determiner are not names. A name found is evidence within its own text: the surname of a listed
  first name is a name where it recurs alone ("Rossi said"), the other full names of a list that
  holds one are names (not job titles: "Ana Sousa, Account Manager"), and so is the other side of
  "assigned to X by Y". Overlapping names are joined into one finding. A lone unknown word with
  no cue stays ("Oisin broke the build", "per Thandiwe's note"): "Nurse's note" reads the same.
  Lower-case names are taken only after ``my name is``, a title with its period ("dr. nguyen") or a
  form label starting its field ("pt name: jane doe"). Surname particles stay in the name ("Ms.
  van der Berg", "Lucia de la Fuente"); a verb starting the sentence does not ("Call" stays in
  "Call John Smith at ..."), and a word before ``office``/``team``/``branch``/... is a place ("Paris
  office").
* Street addresses are not detected: they are not one of ``PII_TYPES`` ("14 Willow Crescent" stays
  as written; a name in the same text is found as usual).

Pseudonyms are HMAC-SHA256 of the value under the secret, so one secret maps a value to the same
fake in every row, process and run. Fakes keep the shape but come from ranges that name nobody
where such ranges are large enough: e-mails at example.com, cards 16 digits Luhn-valid under the
test BIN 400000, SSNs in the never-issued 9xx area with groups outside the ITIN ranges, IPv4 in the
reserved 240.0.0.0/4, IPv6 in the documentation prefix 2001:db8::/32. IBANs, phones and ids get
keyed digits and letters in the original layout (with a valid IBAN checksum); there are too few
reserved numbers to keep distinct values distinct. Birth dates live in a small space
(1940-2005), so two people can share a fake date, as they can share a real one. Keys are
canonical where the spelling varies: a phone's E.164 form, a birth date's calendar date when the
writing fixes it (03/04/1985 may be March or April and keys as written), so one value gets one fake
in every layout. A lone word after Mr/Ms/Dr gets a fake surname.
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

# Letters of any script on both sides (jürgen@beispiel.de, internationalised domains), and an apostrophe
# inside the local part (o'brien@...). The apostrophe is not in the look-behind, so a quoted address
# ('jane@example.org') still starts at its first letter.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[^\W_][\w.%+'-]*@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,24}\b"
)
_URL_CREDENTIALS = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://(?P<v>[^\s/?#@:]+:[^\s/?#@]+)@[^\s/?#@]+")

# Words after which a bare number is a reference of some kind, not a phone.
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
    # runs that can hold a phone number: 7 to 15 digits (the E.164 maximum).
    for run in _PHONE_RUN.finditer(text):
        window = run.group()
        digits = sum(c.isdigit() for c in window)
        if not 7 <= digits <= 15 or _DOTTED_QUAD.fullmatch(window):
            continue
        # After "order", "case", "claim"... a bare run of digits is the reference, but one grouped
        # the way the number is dialled ("my claim 07700 900123") is a phone all the same.
        reference = _after_reference_word(text, run.start())
        if reference and window.isdigit():  # ungrouped: the reference itself, spare the matcher
            continue
        for start, end, number in _phones_in(window):
            if not reference or _laid_out_as_phone(window[start:end], number):
                yield run.start() + start, run.start() + end


@lru_cache(maxsize=1 << 16)
def _phones_in(window: str) -> tuple[tuple[int, int, phonenumbers.PhoneNumber], ...]:
    """The phone numbers of one digit run, with their parsed numbers. Cached: dates, amounts and
    reference numbers recur across rows, and each costs the matcher a pass per region."""
    # International form reads the same from every region; national forms need each one.
    regions = PHONE_REGIONS[:1] if window.startswith("+") else PHONE_REGIONS
    found: list[tuple[int, int, phonenumbers.PhoneNumber]] = []
    covered: set[int] = set()
    for region in regions:
        for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID):
            covered.update(range(m.start, m.end))
            found.append((m.start, m.end, m.number))
        if all(i in covered for i, c in enumerate(window) if c.isdigit()):
            break
    return tuple(found)


def _laid_out_as_phone(raw: str, number: phonenumbers.PhoneNumber) -> bool:
    """True when ``raw`` has an international prefix or the digit groups of the number's national
    format: "07700 900123" and "(415) 555-2671" are written as phones, "7712345678" is not."""
    if raw.startswith(("+", "00")):
        return True
    groups = [len(g) for g in _DIGIT_GROUP.findall(raw)]
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    return len(groups) > 1 and groups == [len(g) for g in _DIGIT_GROUP.findall(national)]


_DIGIT_GROUP = re.compile(r"\d+")


_CARD = re.compile(r"(?<![\w.,-])\d(?:[ .-]?\d){12,18}(?![\w-]|[.,]\d)")
_DOTTED_CARD = re.compile(r"\d{4}(?:\.\d{4}){2,3}(?:\.\d{1,3})?")  # 4111.1111.1111.1111, not 1.2345678...


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
    # No reference-word exemption: the Luhn check and the network prefix and length already make a
    # chance match rare, and a card quoted after "order" or "booking" is still a card.
    for m in _CARD.finditer(text):
        raw = m.group()
        separators = set(c for c in raw if not c.isdigit())
        if len(separators) > 1:  # "1234 5678-9012 3456" is not written by people
            continue
        if separators == {"."} and not _DOTTED_CARD.fullmatch(raw):
            continue
        digits = re.sub(r"\D", "", raw)
        if luhn_valid(digits) and _card_network_length_ok(digits):
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
# Any case and spaces or hyphens between groups: the mod-97 checksum keeps lowercase words out.
_IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}")


def _compact_iban(iban: str) -> str:
    return re.sub(r"[ -]", "", iban).upper()


def iban_valid(iban: str) -> bool:
    """True when ``iban`` (spaces or hyphens allowed, any case) has its country's length and a
    valid mod-97 checksum."""
    compact = _compact_iban(iban)
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    return _iban_remainder(compact[4:] + compact[:4]) == 1


def _iban_remainder(rearranged: str) -> int:
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97


def _find_iban(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        length = IBAN_LENGTHS.get(m.group()[:2].upper())
        if length is None:
            continue
        # The pattern may run on into a following code word; cut at the country's length.
        end, seen = m.start(), 0
        while seen < length and end < m.end():
            seen += text[end] not in " -"
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
    r"(?:\d{4}[-/.]\d{1,2}[-/.]\d{1,2}"
    r"|\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?(?:\s+of)?(?:\s+|-){_MONTH}(?:,?\s+|-)\d{{4}}"
    rf"|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}"
    r"|(?:19|20)\d{6})"  # 19850312: checked to be a real date below
)
# A birth word, then at most a short stretch of the same clause, then the date; or "b." right
# before the date, as in "Jane Doe (b. 12/03/1985)".
_DATE_OF_BIRTH = re.compile(
    r"(?i)(?=[bd])(?:\b(?:born|birth\s*date|date\s+of\s+birth|birthday|dob|d\.o\.b)\b\.?[^.;!?\n]{0,40}?"
    r"|(?<![\w.])(?-i:b)\.[ \t]?)"
    rf"(?<![\w/.-])(?P<v>{_DATE})(?![\w/-]|\.\d)"
)


def _find_date_of_birth(text: str) -> Iterator[tuple[int, int]]:
    for m in _DATE_OF_BIRTH.finditer(text):
        value = m.group("v")
        if not value.isdigit() or _canonical_date(value):
            yield m.span("v")


_MONTH_NUMBER = {name[:3].casefold(): i for i, name in enumerate(
    ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
     "November", "December"), start=1)}


def _canonical_date(value: str) -> str | None:
    """The ISO date a birth date means, or None where the writing leaves it open: 03/04/1985 is
    March or April, so it keeps its own key rather than be merged with the wrong one."""
    year = month = day = None
    if m := re.fullmatch(r"(\d{4})[-/.]?(\d{1,2})[-/.]?(\d{1,2})", value):
        year, month, day = map(int, m.groups())
    elif m := re.fullmatch(r"(\d{1,2})([/.-])(\d{1,2})[/.-](\d{2}|\d{4})", value):
        a, sep, b, y = m.groups()
        a, b = int(a), int(b)
        if a > 12 or sep == ".":  # 25/03/1985; dots are written day first
            day, month = a, b
        elif b > 12:
            month, day = a, b
        else:
            return None
        year = int(y) if len(y) == 4 else _birth_century(int(y))
    else:
        words = re.findall(r"[A-Za-z]+|\d+", value)
        numbers = [int(w) for w in words if w.isdigit()]
        months = [_MONTH_NUMBER.get(w[:3].casefold()) for w in words if not w.isdigit() and w.casefold() != "of"]
        months = [m for m in months if m]  # drops the "th" of "4th"
        if len(numbers) != 2 or len(months) != 1:
            return None
        day, year, month = *numbers, months[0]
    try:
        return date(year, month, day).isoformat() if 1900 <= year <= date.today().year else None
    except ValueError:
        return None


def _birth_century(yy: int) -> int:
    # A two-digit birth year after this year's is last century's: "8/22/89" is 1989.
    this_year = date.today().year
    return 2000 + yy if 2000 + yy <= this_year else 1900 + yy


_ID_NUMBER = re.compile(
    r"\b(?=[A-Za-z])(?:(?i:\b(?:account|acct\.?|a/c|mrn|medical\s+record|policy|passport|driver['’]?s?\s+licen[cs]e|"
    r"driving\s+licen[cs]e|national\s+insurance|tax\s+(?:id|identification)|medicare|medicaid|nhs|"
    r"social\s+insurance|national\s+id|(?:member|patient|employee|customer|subscriber)\s+(?:id|number|no\.?|\#)))"
    # Acronyms only in capitals: "ein", "tin" and "ni" are words in German, English and Italian.
    r"|\b(?:EIN|TIN|ITIN|NINO|NI|SIN|DL)\b)"
    r"(?i:(?:\s+(?:number|num|no\.?|\#|id))?\s*(?:[:\#=]|\bis\b|\bending\s+in\b)?\s*)"
    # Digits in spaced groups ("12 345 678", the way passports and NHS numbers are printed), or one code.
    r"(?P<v>\d{1,4}(?:[ ]\d{3,4}){1,4}(?![\w-])"
    r"|(?=[A-Za-z0-9-]*\d)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)\b(?!\.\d)"
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
# Lower-case surname particles join the words of one name ("Maria de la Cruz", "Ms. van der Berg"):
# a run cut at them leaves a word of the name as written.
_PARTICLE_WORDS = frozenset("van von der den de da di du la le del della bin al ibn ter ten".split())
_PARTICLES = rf"(?:(?:{'|'.join(sorted(_PARTICLE_WORDS))})[ \t]+){{1,2}}"
_NAME = rf"{_NAME_TOKEN}(?:[ \t]+(?:[A-Z]\.[ \t]+)?(?:{_PARTICLES})?{_NAME_TOKEN}){{0,2}}"
_TITLE = r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor|Sir|Dame|Rev)\.?[ \t]+(?:[A-Z]\.[ \t]+)?"
# Words that introduce a name, grouped by how much they prove, because a capitalised word after
# "for" or "with" is far more often a product, a department or a condition ("with Windows 11",
# "call Cardiology", "with Crohn's disease") than a person:
#   strong: self-introductions, form labels, the roles people are named by in tickets, notes and
#     contracts, and talking to someone ("spoke with"): the capitalised words after them are a name;
#   signoff: the name must end the line ("Thanks, Keiko", not "Thanks, Great service");
#   greeting: a known first name, first name and surname, or one word closed by a comma or "!"
#     ("Hi Anneliese,", "Good morning Ines,", "Thanks so much Farah!", "it's Tendai, my new number");
#     anywhere in the text, since replies quote and run on ("Great news. Hi Ruth, ...");
#   weak: a known first name, or first name and surname ("for Thandiwe Novak", not "for Chrome"); the
#     roster labels of minutes and the "X is" of roles belong here, because what follows them is as
#     often a team or a thing ("Apologies: Sales Ops", "the owner is Finance");
#   relation: a family member or a carer named in passing ("wife Ines says", "seen by nurse Kelly"):
#     one word is enough, but only in lower case and on the same line, because "Mother Nature",
#     "Brother printer" and "the agent\nResolution:" are not people; "partner" only after a
#     possessive ("my partner Sam"), since "integration partner Stripe" is a company, and "agent" not
#     in "user agent Mozilla/5.0".
_BEFORE_NAME = (
    r"(?:"
    r"(?i:(?P<strong>\bmy\s+name\s+is|\bmy\s+name's|\bi\s+am\s+called|"
    r"\b(?:full\s+|patient\s+|customer\s+)?name\s*:|\battn\.?\s*:?|"
    r"\b(?:spoke|speak|talked|talk|chatted|met|meeting|conversation|call|interview|consulted)\s+(?:with|to)|"
    r"\b(?:patient|client|customer|applicant|beneficiary|(?:account|card|policy)\s*holder|claimant|defendant|"
    r"plaintiff|tenant|landlord|employee|candidate|witness|contact|counsel|manager)\s*[:,]?)"
    r"|(?P<signoff>\bsigned,?|\bsincerely,|\bregards,|\bthanks,|\bthank\s+you,|\bcheers,|\bbest,)"
    r"|(?P<greeting>\b(?:hi|hello|hey)\b|\bgood\s+(?:morning|afternoon|evening)|"
    r"\b(?:thanks|thank\s+you)\s+(?:so|very)\s+much|\bmany\s+thanks|\bit's|\bthis\s+is)"
    r"|(?P<weak>\bdear|\bfrom\s*:|\bi['’]m|\bi\s+am|\baccording\s+to|^cc\b:?|\bcc:|\bfor|\bwith|\bcall|"
    r"\b(?:attendees|apologies|participants|invitees|in\s+attendance)\s*:|"
    r"\b(?:contact|manager|supervisor|landlord|owner|assignee)\s+(?:is|was)))"
    r"|(?P<relation>\b(?:wife|husband|son|daughter|mother|father|brother|sister|fianc[eé]e?|"
    r"(?:my|his|her|their|your|our)\s+partner|nurse|doctor|dr\.?|physician|surgeon|therapist|pharmacist|"
    r"midwife|(?<!user )(?<!user-)agent|technician|caseworker)(?=[ \t]+[A-Z]))"
    r")"
)
# Every cue starts a word with a letter: asserting that first lets the engine leave the other
# positions at once instead of trying each of the cues there (2.6x faster, the same matches).
# A name may start with its particle ("Ms. van der Berg", "Dr. St. Clair"); _name_span keeps one only
# after a title or a strong cue.
_NAME_PREFIX_WORDS = _PARTICLE_WORDS | {"St."}
_PERSON_CONTEXT = re.compile(
    rf"\b(?=[A-Za-z])(?:{_BEFORE_NAME}\s*(?:{_TITLE})?|{_TITLE})(?P<v>(?:{_PARTICLES}|St\.[ \t]+)?{_NAME})",
    re.MULTILINE)
_ENDS_WITH_TITLE = re.compile(rf"{_TITLE}$")
# Two or three capitalised words followed by what only people do or are: what they do in reports
# and minutes ("X Y said", "X Y presented"), the display name of an address ("X Y <x@example.org>",
# but not of a role mailbox: "Northwind Helpdesk <help@...>"), or a party defined in a contract
# ("X Y (the "Contractor")"; "... ("the Agreement")" names a thing).
_FULL_NAME = rf"{_NAME_TOKEN}(?:[ \t]+(?:{_PARTICLES})?{_NAME_TOKEN}){{1,2}}"
_ROLE_MAILBOX = (r"(?i:no-?reply|do-?not-?reply|support|help|helpdesk|info|sales|billing|accounts?|admin|"
                 r"team|service|contact|hello|notifications?|news|marketing|orders?|returns|careers|jobs|hr|"
                 r"postmaster|webmaster|abuse|security)(?![a-z])")
# Parties that are people, or companies named with Ltd, Inc and the like (which _ORG_WORDS drops).
_PARTY = (r"Contractor|Consultant|Employee|Tenant|Landlord|Licensee|Licensor|Borrower|Lender|Guarantor|Buyer|"
          r"Seller|Purchaser|Lessee|Lessor|Recipient|Trustee|Executor")
_NAME_BEFORE_CUE = re.compile(
    rf"(?P<v>{_FULL_NAME})(?=[ \t]+(?:said|says|has|had|was|is|will|called|wrote|asked|reported|requested|"
    r"mentioned|confirmed|agreed|signed|joined|left|phoned|emailed|presented|opened|chaired|attended|collected|"
    r"explained|noted|raised|replied|responded|arrived|declined|refused|complained|described|stated)\b"
    rf"|[ \t]*<(?!{_ROLE_MAILBOX})[^\s<>@]+@"
    rf"|[ \t]*\([ \t]*(?:the[ \t]+)?[\"“]?(?:the[ \t]+)?(?:{_PARTY})[\"”]?[ \t]*\))"
)
_CAPITALISED_RUN = re.compile(rf"\b{_NAME}")
_NAME_WORD = re.compile(_NAME_TOKEN)
# Two or more full names in a row, separated by commas, semicolons, "and" or "&"; and both sides of
# an assignment ("assigned to Jonas by Mei").
_LIST_ITEM = re.compile(_FULL_NAME)
_NAME_LIST = re.compile(rf"{_FULL_NAME}(?:(?:[ \t]*[,;][ \t]*|[ \t]+(?:and|&)[ \t]+){_FULL_NAME})+")
_ASSIGNMENT = re.compile(rf"\b(?i:(?:re)?assigned[ \t]+to)[ \t]+(?P<to>{_NAME})[ \t]+by[ \t]+(?P<by>{_NAME})")
# A name in capitals, JOHN SMITH: only a listed first name of four letters or more with a surname,
# since short capitalised words are mostly abbreviations (ANA, MIA, EVA).
_FOUR_CAPITALS = re.compile(r"[A-Z]{4}")
_CAPS_NAME = re.compile(r"\b(?=(?P<first>[A-Z]{4,})[ \t]+(?P<last>[A-Z]{2,}(?:['’-][A-Z]{2,})?)\b)")
# A name in capitals after a title in either case, as records write it: "DR. SMITH", "PROF. A. KUMAR",
# "Mrs O'BRIEN-PATEL". Capitals, like lower case, do not show where a name ends, so its words are
# judged as lower-case names are: an ordinary word ends the name or shows there was none
# ("DR. VISIT", "MS WORD"). The run is in a look-ahead so that it does not swallow the next title
# ("DR. SMITH AND DR. JONES"); the first-letter look-ahead halves the time, as in _PERSON_CONTEXT.
_CAPS_TOKEN = r"(?:[A-ZÀ-ÖØ-Þ]['’])?[A-ZÀ-ÖØ-Þ]{2,}(?:-[A-ZÀ-ÖØ-Þ]{2,})?"
_TITLED_CAPS_NAME = re.compile(
    r"\b(?=[DMPRSdmprs])(?P<title>(?i:mr|mrs|ms|miss|mx|dr|prof|professor|sir|dame|rev))(?P<dot>\.)?"
    rf"[ \t]+(?:[A-Z]\.[ \t]+)?(?=(?P<v>{_CAPS_TOKEN}(?:[ \t]+(?:[A-Z]\.[ \t]+)?{_CAPS_TOKEN}){{0,2}})\b)"
)
# Surname first, as in records and lists: "SMITH, John", "Haddad, Carlos - DOB ...": at the start
# of a line or after a label, and closed by punctuation or the line's end.
_INVERTED_NAME = re.compile(
    rf"(?:^|(?<=:))[ \t]*(?P<v>(?P<last>{_NAME_TOKEN}|[A-Z]{{2,}}(?:['’-][A-Z]{{2,}})?),[ \t]+"
    rf"(?P<first>{_NAME_TOKEN}))(?=[ \t]*(?:[-–—(,;|]|$))",
    re.MULTILINE,
)
# A name in lower case, only where the cue leaves no doubt: "my name is john smith", "dr. nguyen".
_LOWER_NAME_VALUE = (r"(?P<v>(?-i:[a-zß-öø-ÿ][a-zß-öø-ÿ'’-]+"
                     rf"(?:[ \t]+(?:{_PARTICLES})?[a-zß-öø-ÿ][a-zß-öø-ÿ'’-]+){{0,2}}))")
_LOWER_NAME = re.compile(
    r"\b(?=[A-Za-z])(?i:\bmy\s+name\s+is|\bmy\s+name's|\bi\s+am\s+called|\b(?:mr|mrs|ms|mx|dr|prof)\.)[ \t]+"
    + _LOWER_NAME_VALUE
)
# And after a form label that starts its field ("pt name: jane doe"; not "file name: report", "user
# name: admin"). Its look-behinds cost a third more at every word, so it runs only where "name" is.
_LOWER_LABELLED_NAME = re.compile(
    r"(?<![\w-][ \t])(?<![\w-])(?i:(?:(?:full|first|last|given|family|patient|pt|customer|client|caller)[ \t]+)?"
    r"(?:sur)?name[ \t]*:)[ \t]+" + _LOWER_NAME_VALUE
)
# Capitalised words that context patterns and first names run into but that are not names: trimmed
# off both ends of a run.
_NOT_NAME = frozenset("""
    The This That These Those There Here It I We You They He She Our Your My His Her Their A An And Or But
    Thanks Thank Regards Best Cheers Hi Hello Dear Sincerely Team Support Customer Service Services Sales
    Billing Admin All Everyone Everybody Folks Guys Colleagues Doctor Nurse Sir Madam
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday
    January February March April May June July August September October November December
    Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Wed Thu Fri Sat Sun
    Please Ok Okay Yes No Not Sorry Unknown Patient Client Department Office Ltd Inc Corp Group
    Mr Mrs Ms Miss Mx Dr Prof Professor Dame Rev Agreement Contract Company Bank Court Clinic Hospital
""".split())
# Ordinary capitalised words that are never a name without a title before them ("Mr. Down" is a
# person, "with Down syndrome" is not): also trimmed off the ends of a run.
_COMMON_WORDS = frozenset("""
    Very Really So Just Still Also Now Super Extremely Totally Quite Absolutely Completely
    Happy Sad Angry Upset Glad Unhappy Disappointed Frustrated Confused Sure Done Fine Good Great Bad Awful
    Broken Urgent Important New Free Help Update Example Sale Info Information Note Notes Review Report
    Summary Request Issue Problem Error Question Feedback Welcome Reminder Warning Notice Invoice Order
    World Today Tomorrow Yesterday Morning Afternoon Evening Night Weekend Home Work
    System Automation Bot Robot Workflow Scheduler Triage Queue Rule
    Apple Amazon Google Microsoft Windows Chrome Firefox Safari Android Python Java Linux Ubuntu Excel Outlook
    Teams Zoom Slack Visa Mastercard Amex Pay Echo Galaxy Pixel Kindle Prime Netflix Spotify Facebook
    Instagram Twitter Samsung Huawei Xiaomi Sony Lenovo Intel Nvidia Visual Studio Code Office Word Cloud
    Crohn Parkinson Alzheimer Hodgkin Tourette Asperger Raynaud Down Syndrome Disease
""".split())
# Words that make a run a place, even around a first name: San Francisco, Port Elizabeth, Maria St.
_PLACE_WORDS = frozenset("""
    New San Santa Saint St Los Las Port Fort Lake Mount Hong Saudi Sri Costa Puerto Rio United Street Road Avenue
    Cape North South Africa America Kingdom Republic Islands City County
""".split())
# Words that make a run an organisation or a department, not a person ("Accounts Payable", "Acme
# Holdings Ltd", "Royal Mail", "Product Management").
_ORG_WORDS = frozenset("""
    Ltd Limited Inc Corp Corporation LLC LLP PLC Plc GmbH Co Company Group Holdings Partners Associates
    Bank Insurance Hospital Clinic Pharmacy Surgery University College School Council Agency Ministry
    Department Dept Services Solutions Systems Technologies Labs Foundation Institute Association
    Traders Trading Industries Enterprises Accounts Payable Receivable Developers Maintainers Contributors
    Committee Mail Post Express Couriers Logistics Airlines Airways Management Marketing Engineering
    Finance Operations Procurement Compliance Payroll Facilities Security Legal Research
""".split())
# Words of job titles, which follow a name in signatures ("Ana Sousa, Senior Account Manager").
_JOB_WORDS = frozenset("""
    Manager Director Engineer Officer Assistant Specialist Analyst Consultant Coordinator Executive President
    Representative Advisor Adviser Administrator Supervisor Lead Head Chief Senior Junior Associate Intern
    Nurse Surgeon Physician Pharmacist Therapist Technician Agent Partner Secretary Accountant Developer
    Practitioner Registrar Resident Paramedic Midwife Receptionist
""".split())
# Word endings of English nouns and adjectives that no common name has (Cardiology, Payable).
_ENGLISH_ENDING = re.compile(r"\w{3,}(?:ology|ologist|iatry|iatrics|ness|tion|sion|ship|able|ible|ful|less|ous)")
# A capital inside a word that is not a name prefix (Mc, Mac, O', De, La, Van...) marks a brand: PayPal.
_BRAND_CAPS = re.compile(r"(?!Mc|Mac|De|Di|Da|Du|La|Le|Van|Von|Fitz)[A-Z][a-z]+[A-Z][a-z]+")
# A determiner before the run makes it a thing: "the Amazon Echo", "my Galaxy S22".
_DETERMINER_BEFORE = re.compile(r"(?i:\b(?:the|a|an|my|your|our|their|his|its|this|that|these|those|every|"
                                r"each|any)[ \t]+)$")
# An eponym, not a person: "Crohn's disease", "Bell's palsy", "Down syndrome".
_EPONYM_AFTER = re.compile(r"(?:['’]s)?[ \t]+(?i:disease|syndrome|palsy|sarcoma|lymphoma|disorder|phenomenon|"
                           r"maneuver|manoeuvre|procedure|ulcer|reflex|fracture|tumou?r|anomaly)\b")
# A run directly before one of these is a place or a team: "the Paris office", "meeting with Berlin
# team", not "Ana Sousa, Team Lead".
_SITE_AFTER = re.compile(r"[ \t]+(?i:office|team|branch|site|department|dept|store|shop|clinic|hospital|campus|"
                         r"hq|headquarters|warehouse|depot)\b(?![ \t]+(?i:lead|leader|manager|head|member)\b)")
# Verbs that start an instruction, and so a sentence, in front of a name: "Call John Smith at ...",
# "Ask Maria about it". At a sentence start they are cut off the run, not taken for a first name.
_IMPERATIVES = frozenset("""
    Call Email Contact Ask Tell Ping Text Message Meet Invite Remind Thank Cc Forward Send Notify Inform
    Escalate Assign Page Phone See Let Have Get Reply Copy Introduce Add Remove
""".split())
_SENTENCE_START = re.compile(r"(?:^|[.!?;:(\n\"“*•>–—-])[ \t]*$")
_WORD = re.compile(r"\S+")
_LOWER_WORD_NEXT = re.compile(r"[ \t]+[a-z]")  # a sign-off name runs on into a sentence
_CLOSES_GREETING = re.compile(r"[ \t]*(?:[,!]|\n|(?:from|here|again|speaking)\b)")
# Lower-case words that end a lower-case name, or show there was none ("my name is not listed").
_LOWER_NOT_NAME = frozenset("""
    a an the and or but nor so yet is was are were be been being am has had have will would can could shall
    should may might must do does did not no yes on in at to of for from with by about as into over under
    it its this that these those there here i me my we us our you your he him his she her they them their
    also still now then just very too please thanks thank sorry ok okay who which what when where why how
    today tomorrow yesterday tonight said says told asked called wrote office appointment visit note notes
    missing wrong spelled spelt misspelled incorrect correct different same listed shown blank empty unknown
    none anonymous redacted withheld unavailable test user admin guest age dob sex male female mrn id phone
    email address
""".split())


_DETECTION_ONLY = "# -- detection only --"


@cache
def _name_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``first_names.txt`` as (the names fakes are drawn from, the names added later, found only)."""
    lines = resources.files("domaintune.data").joinpath("first_names.txt").read_text(encoding="utf-8").splitlines()
    cut = lines.index(_DETECTION_ONLY) if _DETECTION_ONLY in lines else len(lines)

    def names(part: list[str]) -> tuple[str, ...]:
        return tuple(line.strip() for line in part if line.strip() and not line.startswith("#"))

    return names(lines[:cut]), names(lines[cut:])


@cache
def first_names() -> frozenset[str]:
    """The packaged first-name list (``first_names.txt``), every name in it."""
    return frozenset(name for part in _name_lists() for name in part)


@cache
def _first_names_folded() -> frozenset[str]:
    return frozenset(name.casefold() for name in first_names())


def _ordinary_word(word: str) -> bool:
    """True for a capitalised word that is not a name unless a title vouches for it."""
    return (word in _NOT_NAME or word in _COMMON_WORDS or word in _PLACE_WORDS or _ENGLISH_ENDING.fullmatch(word) is not None
            or _BRAND_CAPS.fullmatch(word) is not None)


def _name_span(text: str, start: int, end: int, rule: str = "strong",
               names: frozenset[str] | None = None) -> tuple[int, int] | None:
    """The name in the capitalised run ``text[start:end]`` found by ``rule``, or None.

    ``rule`` is "title" (after Mr/Dr/...), a cue kind of ``_BEFORE_NAME``, "after" (before "said",
    an address, a contract's party) or "first_name" (the run holds a known name: ``names``, by
    default the listed first names). A title vouches for any word.
    Otherwise organisations, eponyms, places and teams ("Paris office") and things after a
    determiner are dropped; a strong cue or a listed first name keeps the name inside a run of
    ordinary words ("Thanks Maria Great job"), but for the weaker rules one such word makes the run
    a thing ("according to New York Times"), and they ask for a listed first name or a first name
    and a surname."""
    words = [m.span() for m in _WORD.finditer(text, start, end)]
    names = first_names() if names is None else names
    if rule != "title":
        if any(text[a:b] in _ORG_WORDS or text[a:b] in _PLACE_WORDS for a, b in words):
            return None
        if rule not in ("strong", "relation", "first_name") and any(
                text[a:b] not in _NOT_NAME and text[a:b] not in names and _ordinary_word(text[a:b])
                for a, b in words):
            return None

    def ordinary(word: str) -> bool:
        return word in _NOT_NAME if rule == "title" else word not in names and _ordinary_word(word)

    while words and (ordinary(text[words[0][0]:words[0][1]]) or _not_first_word(text, words, rule)):
        words.pop(0)
    while words and (ordinary(last := text[words[-1][0]:words[-1][1]]) or last in _PARTICLE_WORDS):
        words.pop()
    if not words:
        return None
    span = (words[0][0], words[-1][1])
    if rule == "title":
        return span
    if (_DETERMINER_BEFORE.search(text, max(0, span[0] - 8), span[0]) or _EPONYM_AFTER.match(text, span[1])
            or _SITE_AFTER.match(text, span[1])):
        return None
    known_first = text[words[0][0]:words[0][1]] in names
    if rule in ("strong", "relation"):
        return span
    if rule == "signoff":
        return span if known_first or not _LOWER_WORD_NEXT.match(text, span[1]) else None
    if rule == "first_name":
        return span if any(text[a:b] in names for a, b in words) else None
    if known_first or len(words) >= 2:
        return span
    if rule == "greeting" and _CLOSES_GREETING.match(text, span[1]):
        return span
    return None


def _not_first_word(text: str, words: list[tuple[int, int]], rule: str) -> bool:
    """True when the first word of a run is not part of the name found by ``rule``: a particle
    without the title or strong cue that vouches for it ("with de Souza" could be "with de Beers"),
    a job after a family or carer word ("nurse Practitioner Kelly"), or a verb starting the sentence
    ("Call John Smith"; after a title or a strong cue the first word is the name: "Patient: Page Ward")."""
    a, b = words[0]
    word = text[a:b]
    if rule == "title":
        return False
    if word in _NAME_PREFIX_WORDS:
        return rule != "strong"
    if rule == "relation":
        return word in _JOB_WORDS
    return (rule != "strong" and len(words) > 1 and word in _IMPERATIVES
            and _SENTENCE_START.search(text, max(0, a - 8), a) is not None)


def _find_person(text: str) -> list[tuple[int, int]]:
    found = [span for span in _cued_names(text) if span]
    found += [*_names_in_capitals(text), *_titled_names_in_capitals(text), *_inverted_names(text),
              *_lower_case_names(text)]
    if found:
        found += [*_names_again(text, found), *_names_listed_with(text, found), *_names_assigned_with(text, found)]
    return _joined([span for span in found if span])


def _joined(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping names as one: a run holds at most three words, so two rules may each find one end of
    a longer name ("John Paul Adrian" and "Paul Adrian Glaubitz <...>"), and either alone leaks a word."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if joined and start < joined[-1][1]:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def _cued_names(text: str) -> Iterator[tuple[int, int] | None]:
    for m in _PERSON_CONTEXT.finditer(text):
        if _ENDS_WITH_TITLE.search(text, m.start(), m.start("v")):
            rule = "title"
        else:
            rule = next(kind for kind in ("strong", "signoff", "greeting", "weak", "relation")
                        if m.group(kind) is not None)
        yield _name_span(text, *m.span("v"), rule)
    for m in _NAME_BEFORE_CUE.finditer(text):
        yield _name_span(text, *m.span("v"), "after")
    names = first_names()
    for m in _CAPITALISED_RUN.finditer(text):
        if any(w in names for w in m.group().split()):
            yield _name_span(text, *m.span(), "first_name")


# The rules below take a person found by the rules above as evidence for the words around it, within
# the same text only: a name is written the same way each time, and lists and pairs hold like things.


def _names_again(text: str, found: list[tuple[int, int]]) -> Iterator[tuple[int, int] | None]:
    """Where the surname of a listed first name found in the text occurs again: "Kwame Rossi ...
    Rossi said". Only the words after a listed first name are taught: a run found by a cue alone
    may be a thing ("Commons Lang is"), and the words before a first name may start the sentence
    ("Remove Kwame Rossi"); ordinary words are never taught."""
    names = first_names()
    taught = set()
    for a, b in found:
        words = _NAME_WORD.findall(text, a, b)
        first = next((i for i, w in enumerate(words) if w in names), len(words))
        taught.update(w for w in words[first + 1:] if w not in names and not _ordinary_word(w))
    taught = {w for w in taught if text.count(w) > 1}  # most texts name a person once: spare the pass
    if taught:
        known = names | taught
        for m in _CAPITALISED_RUN.finditer(text):
            if any(w in taught for w in m.group().split()):
                yield _name_span(text, *m.span(), "first_name", known)


def _names_listed_with(text: str, found: list[tuple[int, int]]) -> Iterator[tuple[int, int] | None]:
    """The other full names of a list that holds a person: "Attendees: Mei Lin, Jonas Berg, Ana Sousa".
    A job title is the line of a signature, not another person ("Ana Sousa, Account Manager")."""
    for m in _NAME_LIST.finditer(text):
        items = [item.span() for item in _LIST_ITEM.finditer(text, *m.span())]
        if any(_overlaps(item, span) for item in items for span in found):
            for a, b in items:
                if not any(w in _JOB_WORDS for w in text[a:b].split()):
                    yield _name_span(text, a, b, "weak")


def _names_assigned_with(text: str, found: list[tuple[int, int]]) -> Iterator[tuple[int, int] | None]:
    """The other side of an assignment whose one side is a person: "assigned to Jonas by Mei"."""
    if "ssigned" in text:
        for m in _ASSIGNMENT.finditer(text):
            to, by = m.span("to"), m.span("by")
            if any(_overlaps(to, span) for span in found):
                yield _name_span(text, *by)
            if any(_overlaps(by, span) for span in found):
                yield _name_span(text, *to)


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _names_in_capitals(text: str) -> Iterator[tuple[int, int]]:
    if not _FOUR_CAPITALS.search(text):
        return
    for m in _CAPS_NAME.finditer(text):
        last = m.group("last")
        if m.group("first").title() in first_names() and not _plain_in_capitals(last):
            yield m.start("first"), m.end("last")


def _plain_in_capitals(word: str) -> bool:
    """True for a word in capitals that is an ordinary word, not a name: WORD, CLINIC, VISIT, IS."""
    return _ordinary_word(word.title()) or word.casefold() in _LOWER_NOT_NAME


def _titled_names_in_capitals(text: str) -> Iterator[tuple[int, int]]:
    names = first_names()
    for m in _TITLED_CAPS_NAME.finditer(text):
        # A title in capitals without its period is often an abbreviation (MS DOS, MR MRI, DR DB),
        # so a short word after one must be a listed first name, as in _CAPS_NAME.
        abbreviation = m.group("title").isupper() and not m.group("dot")
        kept = []
        for word in _WORD.finditer(text, *m.span("v")):
            w = word.group()
            if w.endswith(".") and len(w) == 2:  # a middle initial, kept only inside the name
                continue
            if w.title() not in names and (
                    _plain_in_capitals(w) or (kept and w.endswith(("ING", "ED", "LY")))
                    or (not kept and abbreviation and len(w) < 4)):
                break
            kept.append(word)
        if kept:
            yield kept[0].start(), kept[-1].end()


def _inverted_names(text: str) -> Iterator[tuple[int, int]]:
    if "," not in text:
        return
    for m in _INVERTED_NAME.finditer(text):
        last, first = m.group("last"), m.group("first")
        if not any(_ordinary_word(w.title()) or w.title() in _ORG_WORDS for w in (last, first)):
            yield m.span("v")


def _lower_case_names(text: str) -> Iterator[tuple[int, int]]:
    folded = _first_names_folded()
    labelled = _LOWER_LABELLED_NAME.finditer(text) if "ame" in text or "AME" in text else ()
    for m in (*_LOWER_NAME.finditer(text), *labelled):
        kept = []
        for word in _WORD.finditer(m.group("v")):
            w = word.group()
            if w not in folded and (w in _LOWER_NOT_NAME or w.endswith(("ing", "ed", "ly"))):
                break
            kept.append(word)
        if kept:
            yield m.start("v") + kept[0].start(), m.start("v") + kept[-1].end()


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
    # Keep an international prefix (+CC / 00CC) or a trunk 0 so the fake reads as the same kind of
    # number. The digits after it are drawn in order from a key on the E.164 form, so "+44 20 7946
    # 0958" and "020 7946 0958" get the same fake number, each in its own layout.
    parsed = _parse_phone(value)
    m = re.match(rf"(?:\+|00)[ \t]*{parsed.country_code}" if parsed else r"(?:\+|00)\d{1,3}", value)
    m = m or re.match(r"\(?0", value)
    head = m.group() if m else ""
    return head + re.sub(r"\d", lambda _: str(k.below(10)), value[len(head):])


def _parse_phone(value: str) -> phonenumbers.PhoneNumber | None:
    """The number as the first region that finds it valid reads it (international form: any)."""
    for region in PHONE_REGIONS[:1] if value.startswith("+") else PHONE_REGIONS:
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return number
    return None


def _fake_credit_card(value: str, k: _Keyed) -> str:
    body = "400000" + k.digits(9)
    digits = body + next(d for d in "0123456789" if luhn_valid(body + d))
    sep = next((c for c in value if not c.isdigit()), "")
    return sep.join(digits[i:i + 4] for i in range(0, 16, 4))


def _fake_iban(value: str, k: _Keyed) -> str:
    compact = _compact_iban(value)
    bban = k.like(compact[4:])
    check = 98 - _iban_remainder(bban + compact[:2] + "00")
    fake = iter(f"{compact[:2]}{check:02d}{bban}")
    # The original's separators and case: "de89 3704 ..." stays lower case, "GB82-WEST-..." hyphenated.
    return "".join(c if c in " -" else next(fake) if c.isupper() or c.isdigit() else next(fake).lower()
                   for c in value)


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
    if year_first := re.fullmatch(r"\d{4}([-/.]?)\d{1,2}[-/.]?\d{1,2}", value):
        sep = year_first.group(1)
        return f"{fake.year}{sep}{fake.month:02d}{sep}{fake.day:02d}"
    if re.fullmatch(r"\d{1,2}-[A-Za-z]+\.?-\d{4}", value):  # 12-Mar-1985
        return f"{fake.day:02d}-{_MONTH_NAMES[fake.month - 1][:3]}-{fake.year}"
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
    # Not the names added later: a fake is picked by its place in this list, which must not move.
    return tuple(sorted(_name_lists()[0]))


def _fake_person(value: str, k: _Keyed) -> str:
    names = _first_names_in_order()
    first = names[k.below(len(names))]
    words = value.split()
    if len(words) == 1:
        return _same_case(first, value)
    surname = _fake_surname(value, k)
    if "," in value:  # "SMITH, John" keeps surname first
        return f"{_same_case(surname, words[0])}, {_same_case(first, words[-1])}"
    return _same_case(f"{first} {surname}", value)


def _fake_surname(value: str, k: _Keyed) -> str:
    # Made of syllables, not taken from a list, so that it names nobody in particular.
    return _same_case("".join(_SYLLABLES[k.below(len(_SYLLABLES))] for _ in range(3)).capitalize(), value)


def _same_case(fake: str, value: str) -> str:
    """``fake`` in capitals or lower case where ``value`` is ("JOHN SMITH", "john smith")."""
    return fake.upper() if value.isupper() else fake.lower() if value.islower() else fake


# After these titles a lone word is a surname ("Ms. Patel"); after Sir and Dame it is a first name.
_SURNAME_TITLE_BEFORE = re.compile(r"\b(?i:mr|mrs|ms|miss|mx|dr|prof|professor|rev)\.?[ \t]+(?:[A-Z]\.[ \t]+)?$")


_FAKERS: dict[str, Callable[[str, _Keyed], str]] = {
    "email": _fake_email, "phone": _fake_phone, "credit_card": _fake_credit_card, "iban": _fake_iban,
    "us_ssn": _fake_us_ssn, "ip_address": _fake_ip_address, "url_credentials": _fake_url_credentials,
    "date_of_birth": _fake_date_of_birth, "id_number": _fake_id_number, "person": _fake_person,
}


def _normalise(kind: str, value: str) -> str:
    """The key a value is pseudonymised under, so that spellings of one value share a fake."""
    if kind == "phone":
        number = _parse_phone(value)
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164) if number \
            else re.sub(r"\D", "", value)
    if kind in ("credit_card", "us_ssn"):
        return re.sub(r"\D", "", value)
    if kind == "iban":
        return _compact_iban(value)
    if kind == "date_of_birth":
        return _canonical_date(value) or value
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
            parts += [text[last:f.start], self._replacement(f, text)]
            last = f.end
        parts.append(text[last:])
        return "".join(parts), findings

    def _replacement(self, finding: Finding, text: str) -> str:
        if self.mode == "placeholder":
            return f"[{finding.type.upper()}]"
        key = _normalise(finding.type, finding.text)
        faker = _FAKERS[finding.type]
        if (finding.type == "person" and " " not in finding.text and finding.text.title() not in first_names()
                and _SURNAME_TITLE_BEFORE.search(text, max(0, finding.start - 16), finding.start)):
            faker = _fake_surname  # "Ms. Patel" -> "Ms. Kodaru", not "Ms. Isabel"
        # Redraw in the rare case a fake equals or contains the value ("Li" -> "Lina").
        attempt = 0
        while True:
            fake = faker(finding.text, _Keyed(self._secret, finding.type, key, attempt))
            if finding.text.casefold() not in fake.casefold():
                return fake
            attempt += 1
