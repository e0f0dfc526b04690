"""PII detection and redaction: each type, its decoys, placeholders, keyed pseudonyms, and the
labelled evaluation set."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from domaintune.data.pii import PII_TYPES, Finding, PiiRedactor, first_names, iban_valid, luhn_valid
from domaintune.errors import RecipeError

EVAL_SET = Path(__file__).parent / "data" / "pii_eval.jsonl"


def _bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "pii_eval.py"
    spec = importlib.util.spec_from_file_location("pii_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


POSITIVES = [
    ("email", "Write to maria.lopez+billing@mail.example.com today.", "maria.lopez+billing@mail.example.com"),
    ("phone", "Call me on (415) 555-2671 after lunch.", "(415) 555-2671"),
    ("phone", "Office: +44 20 7946 0958, ask for reception.", "+44 20 7946 0958"),
    ("phone", "Mein Handy: 0151 23456789.", "0151 23456789"),
    ("phone", "Appelez le 06 12 34 56 78 svp", "06 12 34 56 78"),
    ("phone", "my cell is 98765 43210", "98765 43210"),
    ("phone", "Sydney office (02) 9876 5432 or mobile 0412 345 678", "(02) 9876 5432"),
    ("credit_card", "Charge card 4111-1111-1111-1111 for the deposit.", "4111-1111-1111-1111"),
    ("credit_card", "Amex 3782 822463 10005 on file", "3782 822463 10005"),
    ("iban", "Pay to DE89 3704 0044 0532 0130 00 by Friday.", "DE89 3704 0044 0532 0130 00"),
    ("iban", "IBAN GB82WEST12345698765432, thanks", "GB82WEST12345698765432"),
    ("us_ssn", "SSN 123-45-6789 on the W-9.", "123-45-6789"),
    ("us_ssn", "social security number: 234567890", "234567890"),
    ("ip_address", "Blocked 203.0.113.7 at the edge.", "203.0.113.7"),
    ("ip_address", "Host fe80::1ff:fe23:4567:890a answered.", "fe80::1ff:fe23:4567:890a"),
    ("url_credentials", "Clone https://deploy:hunter2@git.example.org/repo.git now", "deploy:hunter2"),
    ("date_of_birth", "Patient DOB: 03/04/1985, allergic to nuts.", "03/04/1985"),
    ("date_of_birth", "She was born on 4 May 1990 in Leeds.", "4 May 1990"),
    ("date_of_birth", "d.o.b. 1979-11-23", "1979-11-23"),
    ("id_number", "MRN 00123456 admitted to ward 3.", "00123456"),
    ("id_number", "Policy number: PX-99812 renewed.", "PX-99812"),
    ("id_number", "passport no. K12345678 expired", "K12345678"),
    ("id_number", "Member ID AB1234567 is active.", "AB1234567"),
    ("person", "Dr. Priya Raman reviewed the chart.", "Priya Raman"),
    ("person", "Hello, my name is Oluwaseun Adeyemi and I need help.", "Oluwaseun Adeyemi"),
    ("person", "Patient: John Smith, stable.", "John Smith"),
    ("person", "The parcel never came.\nThanks, Keiko", "Keiko"),
]


@pytest.mark.parametrize(("kind", "text", "value"), POSITIVES)
def test_each_type_is_detected(kind, text, value):
    findings = PiiRedactor().find(text)
    assert Finding(kind, text.index(value), text.index(value) + len(value), value) in findings


DECOYS = [
    "My order NW-71073 arrived late; see order #A12345.",
    "Order 7712345678 shipped, ticket 9876543210 closed.",
    "Upgrade from v2.13.0 to version 1.2.3.4 fixed it.",
    "It cost $1,299.99 (or €45,00) at 14:30:15 on 12/03/2024.",
    "The meeting moved to 2024-02-11; revenue grew in 2023.",
    "Tracking 1Z999AA10123456784 and 9400111899223856710012.",
    "Card 4532 7713 2241 9080 failed the check; so did 1234567812345678.",
    "Old IBAN DE88 3704 0044 0532 0130 00 was mistyped.",
    "Invalid SSNs: 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567, 123-45-0000.",
    "Addresses 256.1.1.1 and 10.0.300.1 are not valid; time 10:30:45, MAC 00:1A:2B:3C:4D:5E.",
    "Product SKU-4471-B and part X200-PRO are back in stock.",
    "My account is locked and the policy changed in 2023.",
    "Dear Customer, thanks for contacting Support. Regards, The Team",
    "BP 142/88, HR 76, lisinopril 10 mg daily for 4 weeks.",
    "Release notes 3.1.9.231: faster sync and fewer crashes.",
]


@pytest.mark.parametrize("text", DECOYS)
def test_decoys_are_not_flagged(text):
    assert PiiRedactor().find(text) == []


MIXED = ("Hi, I'm writing about order NW-71073. Call me on +44 20 7946 0958 or email jane.doe@example.org. "
         "Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, SSN 123-45-6789, from 192.168.1.20 and "
         "2001:db8::8a2e:370:7334. DOB: 03/04/1985, MRN 00123456. Repo https://admin:s3cr3t@git.example.org/x. "
         "Thanks, Jane Doe")


def test_findings_cover_every_type_in_order_without_overlap():
    findings = PiiRedactor().find(MIXED)
    assert {f.type for f in findings} == set(PII_TYPES)
    assert all(MIXED[f.start:f.end] == f.text for f in findings)
    assert all(a.end <= b.start for a, b in zip(findings, findings[1:]))


def test_placeholders_replace_values_and_keep_context_words():
    redactor = PiiRedactor()
    out, findings = redactor.redact(MIXED)
    for f in findings:
        assert f.text not in out
    for kind in PII_TYPES:
        assert f"[{kind.upper()}]" in out
    assert "DOB: [DATE_OF_BIRTH]" in out and "MRN [ID_NUMBER]" in out
    assert "https://[URL_CREDENTIALS]@git.example.org/x" in out
    assert "order NW-71073" in out
    assert redactor.redact(MIXED) == (out, findings)  # no state carried between calls


def test_more_specific_type_wins_an_overlap():
    assert [f.type for f in PiiRedactor().find("account number 4111 1111 1111 1111")] == ["credit_card"]
    assert [f.type for f in PiiRedactor().find("ftp://bob:pw@mail.example.com")] == ["url_credentials"]


def test_type_subset_finds_only_those_types():
    findings = PiiRedactor(types=["email", "us_ssn"]).find(MIXED)
    assert sorted(f.type for f in findings) == ["email", "us_ssn"]
    out, _ = PiiRedactor(types=["phone"]).redact(MIXED)
    assert "[PHONE]" in out and "jane.doe@example.org" in out


@pytest.mark.parametrize(("kwargs", "where", "allowed"), [
    ({"types": ["email", "postcode"]}, "data.pii.types", "credit_card"),
    ({"mode": "mask"}, "data.pii.mode", "pseudonym"),
])
def test_unknown_type_or_mode_is_a_recipe_error_listing_the_choices(kwargs, where, allowed):
    with pytest.raises(RecipeError) as info:
        PiiRedactor(**kwargs)
    assert info.value.where == where and allowed in info.value.hint


def test_pseudonym_mode_needs_a_secret():
    with pytest.raises(RecipeError) as info:
        PiiRedactor(mode="pseudonym")
    assert "DOMAINTUNE_PII_SECRET" in info.value.hint


def _pseudonymise(text: str, secret: str) -> dict[str, str]:
    """Map each original value to its fake, by walking the redacted text alongside the findings."""
    out, findings = PiiRedactor(mode="pseudonym", secret=secret).redact(text)
    fakes, shift = {}, 0
    for f, g in zip(findings, findings[1:] + [None]):
        tail = text[f.end:g.start] if g else text[f.end:]
        start = f.start + shift
        end = out.index(tail, start) if tail else len(out)
        fakes[f.text] = out[start:end]
        shift += (end - start) - (f.end - f.start)
    return fakes


def test_pseudonyms_are_consistent_per_secret_and_distinct_per_value():
    text = "Mail jane@example.org, then bob@example.org, then jane@example.org again."
    out, _ = PiiRedactor(mode="pseudonym", secret="k1").redact(text)
    fakes = re.findall(r"\S+@example\.com", out)
    assert len(fakes) == 3 and fakes[0] == fakes[2] != fakes[1]
    assert out == PiiRedactor(mode="pseudonym", secret=b"k1").redact(text)[0]  # other instance, bytes key
    assert PiiRedactor(mode="pseudonym", secret="k2").redact(text)[0] != out
    assert _pseudonymise(MIXED, "k1") == _pseudonymise(MIXED, "k1")


def test_pseudonyms_keep_the_shape_and_hide_the_original():
    fakes = _pseudonymise(MIXED, "secret")
    by_type = {f.type: fakes[f.text] for f in PiiRedactor().find(MIXED)}
    out, findings = PiiRedactor(mode="pseudonym", secret="secret").redact(MIXED)
    assert {f.type for f in findings} == set(PII_TYPES)
    for f in findings:
        assert f.text not in out
    assert re.fullmatch(r"[a-z0-9.]+@example\.com", by_type["email"])
    card = by_type["credit_card"].replace(" ", "")
    assert len(card) == 16 and luhn_valid(card) and card.startswith("400000") and by_type["credit_card"][4] == " "
    iban = by_type["iban"]
    assert iban_valid(iban) and iban[:2] == "DE" and len(iban) == len("DE89 3704 0044 0532 0130 00")
    assert re.fullmatch(r"9\d\d-\d\d-\d{4}", by_type["us_ssn"])
    assert sum(c.isdigit() for c in by_type["phone"]) == 12 and by_type["phone"].startswith("+44 ")
    assert datetime.strptime(by_type["date_of_birth"], "%m/%d/%Y")
    assert [w.istitle() for w in by_type["person"].split()] == [True, True] and by_type["person"] != "Jane Doe"
    # The fakes name nobody real: never-issued SSNs, the documentation and reserved IP ranges.
    assert not [f for f in PiiRedactor(types=["us_ssn"]).find(out)]
    ips = {ipaddress.ip_address(f.text) for f in PiiRedactor(types=["ip_address"]).find(out)}
    assert ipaddress.ip_address("192.168.1.20") not in ips and len(ips) == 2
    assert all(ip in ipaddress.ip_network("240.0.0.0/4") or ip in ipaddress.ip_network("2001:db8::/32") for ip in ips)


def test_fake_person_names_come_from_the_packaged_list():
    out, findings = PiiRedactor(types=["person"], mode="pseudonym", secret="s").redact("Thanks, Keiko")
    assert findings and out.startswith("Thanks, ") and out != "Thanks, Keiko"
    assert PiiRedactor(types=["person"]).find(out)  # a first name from the list is recognised again


def test_eval_set_gold_spans_are_well_formed():
    rows = [json.loads(line) for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 400
    assert sum(not row["spans"] for row in rows) >= 50  # lines with decoys only
    for row in rows:
        spans = sorted((s["start"], s["end"]) for s in row["spans"])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        for span in row["spans"]:
            value = row["text"][span["start"]:span["end"]]
            assert span["type"] in PII_TYPES and value.strip() == value != ""


def test_structured_types_reach_095_on_the_labelled_set():
    scores = _bench().evaluate(EVAL_SET)
    for kind in PII_TYPES:
        if kind == "person":
            continue
        assert scores[kind]["support"] >= 10, kind
        assert scores[kind]["precision"] >= 0.95 and scores[kind]["recall"] >= 0.95, (kind, scores[kind])


def test_the_word_start_guard_on_person_cues_changes_no_match():
    # _PERSON_CONTEXT asserts a word starting with a letter before trying its cues (for speed):
    # that holds only while every cue and title starts that way, which this checks on the labelled set.
    from domaintune.data import pii

    unguarded = re.compile(rf"(?:{pii._BEFORE_NAME}\s*(?:{pii._TITLE})?|{pii._TITLE})(?P<v>{pii._NAME})", re.MULTILINE)
    texts = [json.loads(line)["text"] for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]
    texts += ["Hi Anna,\nthanks", "hello Bob", "x\nhey Carla Diaz", "Dr. Emil Ferro said", "(attn: Gina Holt)"]
    spans = lambda pattern, text: [(m.span(), m.span("v")) for m in pattern.finditer(text)]
    assert sum(bool(spans(unguarded, t)) for t in texts) > 100
    assert all(spans(pii._PERSON_CONTEXT, t) == spans(unguarded, t) for t in texts)


# Found by an audit: each value leaked through the redactor as it was.
LEAKS = [
    ("email", "Mail jürgen.müller@beispiel.de today", "jürgen.müller@beispiel.de"),
    ("email", "reach me at o'brien@example.ie", "o'brien@example.ie"),
    # A Luhn-valid card is a card after any word: reference words spare phones, not cards.
    ("credit_card", "for my order 4111 1111 1111 1111 was charged", "4111 1111 1111 1111"),
    ("credit_card", "payment for booking: 4111 1111 1111 1111", "4111 1111 1111 1111"),
    ("credit_card", "Ref 4111111111111111", "4111111111111111"),
    ("credit_card", "card 4111.1111.1111.1111 declined", "4111.1111.1111.1111"),
    ("iban", "iban de89 3704 0044 0532 0130 00", "de89 3704 0044 0532 0130 00"),
    ("iban", "send it to GB82-WEST-1234-5698-7654-32 please", "GB82-WEST-1234-5698-7654-32"),
    ("date_of_birth", "DOB 1985/03/12", "1985/03/12"),
    ("date_of_birth", "DOB: 12-Mar-1985", "12-Mar-1985"),
    ("date_of_birth", "DOB: 19850312", "19850312"),
    ("date_of_birth", "Jane Doe (b. 12/03/1985)", "12/03/1985"),
    ("person", "my name is john smith", "john smith"),
    ("person", "seen by dr. nguyen", "nguyen"),
    ("person", "I'm Oluwaseun Adeyemi", "Oluwaseun Adeyemi"),
    ("person", "I am Oluwaseun Adeyemi", "Oluwaseun Adeyemi"),
    ("person", "JOHN SMITH called yesterday", "JOHN SMITH"),
    ("person", "Patient: SMITH, John", "SMITH, John"),
    ("person", "Mensah, Siddharth - DOB Nov 7, 1955", "Mensah, Siddharth"),
    ("person", "Per my conversation with Brennan in legal, the contract stands.", "Brennan"),
    ("person", "hey it's Tendai, my new number is below", "Tendai"),
    # A name in capitals after a title, in records' style.
    ("person", "Seen by DR. SMITH today", "SMITH"),
    ("person", "MR. JONES called", "JONES"),
    ("person", "Patient MRS. O'BRIEN-PATEL", "O'BRIEN-PATEL"),
    ("person", "DR SMITH reviewed", "SMITH"),
    ("person", "per PROF. A. KUMAR", "KUMAR"),
    ("person", "Referred by Dr. MÜLLER", "MÜLLER"),
    ("person", "MR. JOHN A. SMITH ARRIVED", "JOHN A. SMITH"),
    ("id_number", "Passport No. 12 345 678", "12 345 678"),
    ("id_number", "driver's license D1234567", "D1234567"),
    ("id_number", "NI number: QQ123456C", "QQ123456C"),
    ("id_number", "tax id 12-3456789", "12-3456789"),
    ("id_number", "EIN 12-3456789", "12-3456789"),
    ("id_number", "Medicare number 1EG4-TE5-MK73", "1EG4-TE5-MK73"),
    # Grouped as a phone is dialled: a phone, even after a reference word.
    ("phone", "I called about my claim 07700 900123", "07700 900123"),
    ("phone", "Call about case 07700 900123", "07700 900123"),
]


@pytest.mark.parametrize(("kind", "text", "value"), LEAKS)
def test_audited_leaks_are_redacted(kind, text, value):
    start = text.index(value)
    assert Finding(kind, start, start + len(value), value) in PiiRedactor().find(text)
    assert value not in PiiRedactor().redact(text)[0]


# Ordinary words that became [PERSON] and destroyed the meaning of the text (clinical notes most of
# all), and phrases close to the new rules that must stay as they are.
UNTOUCHED = [
    "Patient with Crohn's disease, for Parkinson review",
    "Presents with Down syndrome",
    "Diagnosed with Parkinson's Disease; Addison's disease follow-up; he has Bell's palsy",
    "call Cardiology",
    "Referred to Cardiology and Oncology",
    "Patient: Parkinson review",
    "Works with Windows 11",
    "Works for Chrome",
    "Written with Python",
    "I paid with PayPal",
    "I paid with Visa",
    "paid with Apple Pay",
    "The Amazon Echo was dropped",
    "From: Accounts Payable",
    "Dear Northwind",
    "Dear Northwind Traders,",
    "Dear Customer Service Team,",
    "For Sale",
    "For Example, the app",
    "It's Broken",
    "This is Urgent",
    "Hello World",
    "Thanks, Great service",
    "Regards, The Team",
    "The order for Galaxy S22 shipped",
    "signed up with Google",
    "signed up with Google Chrome",
    "Windows Update has failed",
    "Accounts Payable has confirmed",
    "Microsoft Teams has crashed",
    "PayPal said no",
    "Visual Studio Code was slow",
    "New York is expensive",
    "Spoke to Customer Service",
    "I am Very Angry",
    "I'm So Sorry",
    "I am Still Waiting",
    "I use MS Teams and MS Word daily",
    "I miss Python already",
    "the dr. said rest",
    "my name is not on the list",
    "my name is spelled wrong",
    "ANA POSITIVE, ESR RAISED",
    "Subject: Invoice, March",
    "Note: Python, Java",
    "the Sofia office",
    "claim 12345678 was paid",
    "policy 2023 10 days left",
    "Ich habe ein 2024 gekauftes Gerät",
    "Version 2.0 of the license GPL-3",
    "according to New York Times",
    "Give 5 cc Normal Saline",
    "Tickets with San Francisco Giants",
    "flew to Port Elizabeth",
    # A title in capitals before an ordinary or a short word: a visit, a product, an abbreviation.
    "DR. VISIT SCHEDULED",
    "PLEASE CALL THE CLINIC",
    "ER VISIT",
    "MS WORD",
    "MS DOS and MS SQL Server",
    "MS EXCEL CRASHES",
    "THE PROFESSOR SAID NO",
]


@pytest.mark.parametrize("text", UNTOUCHED)
def test_ordinary_phrases_are_left_alone(text):
    assert PiiRedactor().redact(text) == (text, [])


@pytest.mark.parametrize(("text", "name"), [
    ("Discharge summary for Thandiwe Novak (date of birth withheld)", "Thandiwe Novak"),
    ("Remind me to call Magnus Johansson tomorrow", "Magnus Johansson"),
    ("I'm John and my order is late", "John"),
    ("this is Sarah from billing", "Sarah"),
    ("Hi Anneliese, your laptop is ready", "Anneliese"),
    ("Thanks, Maria for your help", "Maria"),
    ("Dear Anna, thanks for writing", "Anna"),
    ("Dear Ms. Patel, thanks for writing", "Patel"),
    ("Mr. West called", "West"),
    ("PLEASE CALL JOHN SMITH ASAP", "JOHN SMITH"),
    ("The patient is JOHN SMITH.", "JOHN SMITH"),
    ("According to Ines Silva, the server was patched.", "Ines Silva"),
    ("cc: Oisin Kim", "Oisin Kim"),
    ("Thanks Maria Great job", "Maria"),
])
def test_weak_cues_still_find_people(text, name):
    # Weak cues ("for", "call", "I'm", "Dear") need a listed first name or a first name and surname;
    # a title vouches for any word.
    assert [f.text for f in PiiRedactor().find(text)] == [name]


# Names whose first name is not in first_names.txt, found by their context or by another name in the
# same text (none of these were found before); the names and sentences are not the labelled set's.
@pytest.mark.parametrize(("text", "names"), [
    # Greetings and thanks anywhere in the text, one word closed by a comma or "!".
    ("Good afternoon Zephyrine, your replacement ships today.", ["Zephyrine"]),
    ("Great news. Hi Leocadia, the part arrived.", ["Leocadia"]),
    ("Thank you very much Bartosz! It works now.", ["Bartosz"]),
    # The display name of an address, a party defined in a contract, a role "is", minutes.
    ("Forwarded message from Teodora Ionescu <t.ionescu@mail.example.org> below", ["Teodora Ionescu"]),
    ('This lease is between Northgate Estates Ltd and Kalani Mahoe (the "Tenant").', ["Kalani Mahoe"]),
    ("Your account manager is Nnamdi Okeke, on leave until May.", ["Nnamdi Okeke"]),
    ("Apologies: Tadeusz Wrona.", ["Tadeusz Wrona"]),
    ("Ward round: Radu Ionescu presented the overnight admissions.", ["Radu Ionescu"]),
    # The other names of a list, or of an assignment, that holds a person.
    ("Present at the review: Carmen Ortiz, Wojciech Zielinski and Ama Owusu.",
     ["Carmen Ortiz", "Wojciech Zielinski", "Ama Owusu"]),
    ("Case reassigned to Kalani by Yusuf on Friday.", ["Kalani", "Yusuf"]),
    # The surname of a name found earlier in the text, on its own.
    ("Seen with Lucia Venkataraman today. Venkataraman agreed to the plan.", ["Lucia Venkataraman", "Venkataraman"]),
    # Two rules that each find one end of a four-word name: one finding, no word left out.
    ("Reply from Ana Luisa Esperanza Ferreira <alef@mail.example.org>: fine.", ["Ana Luisa Esperanza Ferreira"]),
])
def test_names_without_a_listed_first_name_are_found_by_context(text, names):
    assert [f.text for f in PiiRedactor(types=["person"]).find(text)] == names


@pytest.mark.parametrize(("text", "names"), [
    ("Thanks so much Team! The replacement works.", []),
    ("Good morning Everyone, the site is back up.", []),
    ("Good evening Doctor, the rash is worse.", []),
    ("Many thanks Amazon!", []),
    ("Great news. Hello World!", []),
    ("Northwind Helpdesk <helpdesk@northwind.example> wrote:", []),  # a role mailbox
    ("Reply from Cloud Billing <noreply@cloud.example.com>: invoice attached.", []),
    ('Acme Cloud Platform ("the Service") is provided as is.', []),  # a defined thing, not a party
    ('Brightline Holdings Ltd ("the Buyer") agrees.', []),
    ("Apologies: Sales Ops", []),
    ("The contact is Customer Service.", []),
    ("The owner is Finance.", []),
    ("Ticket assigned to Tier Two by Triage.", []),  # neither side is a person
    ("Ticket assigned to Yusuf by Triage Bot at 09:00.", ["Yusuf"]),
    ("Royal Mail collected the parcel on Monday.", []),
    ("Microsoft Teams opened twice.", []),
    ("We ship to New York, San Francisco and Los Angeles.", []),
    ("Windows Update, Microsoft Edge and Google Chrome", []),
    # A list that holds a person, with a job title, places or departments beside the name.
    ("Regards, Carmen Ortiz, Account Manager, Northwind Traders", ["Carmen Ortiz"]),
    ("Carmen Ortiz, Cape Town, South Africa", ["Carmen Ortiz"]),
    ("Attendees: Carmen Ortiz, Product Management, Finance Team.", ["Carmen Ortiz"]),
])
def test_context_cues_leave_teams_things_and_places_alone(text, names):
    assert [f.text for f in PiiRedactor(types=["person"]).find(text)] == names


# A second audit: each rule below with its near misses (names and sentences differ from the audit's).
def _people(text: str) -> list[str]:
    return [f.text for f in PiiRedactor(types=["person"]).find(text)]


@pytest.mark.parametrize(("text", "names"), [
    # A family member or a carer in lower case names the next word, known or not.
    ("Her husband Tobias reports the dizziness began at noon.", ["Tobias"]),
    ("Reviewed with pharmacist Ingeborg before discharge", ["Ingeborg"]),
    ("Seen by dr Okafor on the ward", ["Okafor"]),
    ("my partner Sam drove me in", ["Sam"]),
    ("Checked by nurse Practitioner Okonkwo", ["Okonkwo"]),  # the job is not part of the name
    ("our integration partner Stripe is down", []),
    ("Blocked for user agent Mozilla/5.0 (X11; Linux)", []),
    ("Spoke to the agent\nResolution: refund issued", []),
    ("Brother printer jammed again", []),
])
def test_family_and_carer_words_name_the_next_word(text, names):
    assert _people(text) == names


@pytest.mark.parametrize(("text", "names"), [
    ("Mary phoned twice about the bill", ["Mary"]),
    ("Escalated by Alex on Tuesday", ["Alex"]),
])
def test_common_first_names_are_listed(text, names):
    assert _people(text) == names


@pytest.mark.parametrize(("text", "names"), [
    ("patient name: oluwaseun adeyemi dob 1/2/1980", ["oluwaseun adeyemi"]),
    ("Re: pt name: tomasz wrona", ["tomasz wrona"]),
    ("surname: okafor", ["okafor"]),
    ("file name: report final", []),
    ("user name: admin", []),
    ("name: none", []),
    ("the product name: widget pro", []),
])
def test_lower_case_names_after_a_form_label(text, names):
    assert _people(text) == names


@pytest.mark.parametrize(("text", "names"), [
    ("Dr. de Souza saw her at noon", ["de Souza"]),
    ("Mr van Dijk phoned", ["van Dijk"]),
    ("Dr. St. Clair called back", ["St. Clair"]),
    ("Hello from Lucia de la Fuente", ["Lucia de la Fuente"]),
    ("full name: juan de la fuente", ["juan de la fuente"]),
    ("Tickets for Rio de Janeiro", []),
    ("Paid with de Beers credit", []),
    ("Flights to San Jose del Cabo", []),
])
def test_surname_particles_stay_inside_the_name(text, names):
    assert _people(text) == names


@pytest.mark.parametrize(("text", "names"), [
    ("Forward Kwame Rossi the invoice", ["Kwame Rossi"]),
    ("Remind Patricia about the refill.", ["Patricia"]),
    ("Done. Invite Ana Sousa to the call", ["Ana Sousa"]),
    ("Notify Joseph Okafor <j.okafor@mail.example.org> of the change", ["Joseph Okafor"]),
    ("Call Center hours are 9-5", []),
    ("Contact Support for help", []),
    ("Email Marketing will reply", []),
    ("Ask Jeeves", []),
    ("See Attached", []),
])
def test_an_instruction_verb_is_cut_off_the_front_of_a_name(text, names):
    assert _people(text) == names


@pytest.mark.parametrize(("text", "names"), [
    ("Meeting with Lagos office on Friday", []),
    ("Spoke with Sofia team about the outage", []),
    ("Call with Denver branch moved", []),
    ("Regards, Carmen Ortiz Team Lead", ["Carmen Ortiz"]),
])
def test_a_word_before_office_or_team_is_a_place_not_a_person(text, names):
    assert _people(text) == names


def _fake_of(text: str, value: str, secret: str = "k") -> str:
    return _pseudonymise(text, secret)[value]


def test_a_phone_gets_one_fake_in_every_layout():
    # Keyed on the E.164 form: the national and international layouts of one number share the fake
    # digits after the country code or trunk 0, each fake in its own layout.
    intl = _fake_of("Office: +44 20 7946 0958, ask for reception.", "+44 20 7946 0958")
    national = _fake_of("Office: 020 7946 0958, ask for reception.", "020 7946 0958")
    compact = _fake_of("Office: +442079460958, ask for reception.", "+442079460958")
    assert intl.startswith("+44 ") and national.startswith("0") and re.fullmatch(r"\+44\d{10}", compact)
    digits = lambda s: re.sub(r"\D", "", s)  # noqa: E731
    assert digits(intl)[2:] == digits(national)[1:] == digits(compact)[2:] != "2079460958"
    us = _fake_of("Call me on (415) 555-2671 after lunch.", "(415) 555-2671")
    assert digits(us) == digits(_fake_of("Call me on +1 415 555 2671 after lunch.", "+1 415 555 2671"))[1:]


def test_a_birth_date_gets_one_fake_in_every_unambiguous_layout():
    layouts = {"1985-03-12": "%Y-%m-%d", "12 March 1985": "%d %B %Y", "March 12, 1985": "%B %d, %Y",
               "1985/03/12": "%Y/%m/%d", "12-Mar-1985": "%d-%b-%Y", "19850312": "%Y%m%d",
               "12.03.1985": "%d.%m.%Y", "25/03/1985": "%d/%m/%Y"}
    fake_dates = {value: datetime.strptime(_fake_of(f"DOB {value}, seen today", value), layout)
                  for value, layout in layouts.items()}
    assert len(set(fake_dates.values()) - {fake_dates["25/03/1985"]}) == 1  # one date, every layout
    assert datetime(1985, 3, 12) not in fake_dates.values()
    assert fake_dates["25/03/1985"] == datetime.strptime(_fake_of("DOB 1985-03-25, seen", "1985-03-25"), "%Y-%m-%d")
    # 03/12/1985 is 12 March in the US and 3 December elsewhere: keyed as written, not guessed, so
    # it gets a fake of its own (in its own layout) rather than share one with the wrong date.
    ambiguous = _fake_of("DOB 03/12/1985, seen today", "03/12/1985")
    assert datetime.strptime(ambiguous, "%m/%d/%Y") != fake_dates["1985-03-12"]


def test_a_lone_word_after_a_title_gets_a_fake_surname():
    fake = _fake_of("Dear Ms. Patel, your results are in.", "Patel")
    assert fake.istitle() and fake not in first_names()
    assert _fake_of("Dear Ms. Priya Patel, your results are in.", "Priya Patel").split()[0] in first_names()


def test_names_in_capitals_after_a_title_keep_the_title_and_the_capitals():
    text = "DR. SMITH AND DR. JONES TO REVIEW; MS. LEE IS HERE"
    assert [f.text for f in PiiRedactor().find(text)] == ["SMITH", "JONES", "LEE"]
    assert PiiRedactor().redact(text)[0] == "DR. [PERSON] AND DR. [PERSON] TO REVIEW; MS. [PERSON] IS HERE"
    surname = _fake_of("Seen by DR. SMITH today", "SMITH")
    assert surname.isupper() and surname.title() not in first_names()
    given, family = _fake_of("MR. JOHN SMITH ARRIVED", "JOHN SMITH").split()
    assert given.isupper() and family.isupper() and given.title() in first_names()


def test_fake_names_keep_the_case_and_order_of_the_original():
    assert _fake_of("JOHN SMITH called yesterday", "JOHN SMITH").isupper()
    assert _fake_of("my name is john smith", "john smith").islower()
    surname, given = _fake_of("Patient: SMITH, John", "SMITH, John").split(", ")
    assert surname.isupper() and given.istitle()


def test_ibans_keep_their_case_and_separators_and_stay_valid():
    for value in ("de89 3704 0044 0532 0130 00", "GB82-WEST-1234-5698-7654-32"):
        fake = _fake_of(f"IBAN {value} thanks", value)
        assert iban_valid(fake) and fake != value
        assert [c for c in fake if c in " -"] == [c for c in value if c in " -"]
        assert fake[:2] == value[:2]


def test_a_secret_gives_the_same_fakes_as_in_earlier_versions():
    # Updates mix rows pseudonymised by earlier versions with new ones: a name added to the list
    # (found, never drawn as a fake) must not move the fakes. Values recorded before such additions.
    redactor = PiiRedactor(mode="pseudonym", secret="golden-secret")
    assert [redactor.redact(t)[0] for t in ("my name is John Smith", "Thanks, Keiko",
                                            "Patient: Ana Sousa, call 555-0100")] == \
        ["my name is Enrique Mogasi", "Thanks, Felipe", "Patient: Alexei Furoka, call 555-0100"]
    from domaintune.data.pii import _first_names_in_order

    assert {"Mary", "Alex"} <= first_names() and not {"Mary", "Alex"} & set(_first_names_in_order())
