"""Prepare a large JSONL file in bounded memory: `domaintune data prepare` on generated support tickets.

Generates a JSONL file of about --mb megabytes (default 1024) of varied support-ticket rows with
planted personal data, exact and near duplicates and a few broken rows, then runs
``prepare_recipe`` on it in a child process while sampling that process's memory, and prints
rows, wall time, rows/s, peak RSS and what each step dropped. ``--compare-memory`` runs the
in-memory path on the same file as the baseline (only for sizes that fit in memory).

    .venv/bin/python bench/data_scale.py --mb 1024
    .venv/bin/python bench/data_scale.py --mb 50 --compare-memory
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

LABELS = {
    "billing": ["I was charged twice for my {plan} plan this month", "my invoice {ref} shows the wrong amount of {amount}",
                "the refund for order {ref} never reached my card", "why did the price of {plan} go up to {amount}",
                "please cancel the automatic renewal before {date}", "the payment failed although my card is valid"],
    "shipping": ["my parcel {ref} has been stuck in {city} since {date}", "the courier left the box at the wrong door",
                 "tracking for {ref} has not moved for five days", "can I change the delivery address to {city}",
                 "the {product} arrived with a cracked case", "half of my order is missing from the box"],
    "account": ["I cannot log in after resetting my password", "the two-factor code never arrives on my phone",
                "please merge my two accounts into one", "how do I change the e-mail on my profile",
                "my account was locked after {count} attempts", "I want to delete my account and my data"],
    "technical": ["the {product} app crashes when I open settings", "sync stops at {count} percent every time",
                  "the {product} will not pair over bluetooth", "export to CSV produces an empty file",
                  "after the update to {version} the screen flickers", "notifications stopped working on {product}"],
    "sales": ["do you offer a discount for {count} seats", "can I get a quote for the {plan} plan",
              "is there an education price for the {product}", "we want to upgrade our team to {plan}",
              "what is the difference between {plan} and the basic plan", "can we pay yearly by bank transfer"],
}
OPENINGS = ["Hi,", "Hello team,", "Good morning,", "Hey,", "Dear support,", "", "Hi there,", "Urgent:", "Quick question:"]
DETAILS = ["I tried again this morning and it is the same.", "This is the third time I am writing about it.",
           "My colleague sees the same thing on her laptop.", "It worked fine until last week.",
           "I have attached a screenshot.", "Nothing in the help pages covers this.", "We are a team of {count}.",
           "I am on the {plan} plan.", "The order was placed on {date}.", "I live in {city}.", ""]
CLOSINGS = ["Thanks.", "Thank you!", "Regards, a long-time customer", "Please help.", "Cheers", "", "Kind regards"]
FILL = {
    "plan": ["Starter", "Team", "Business", "Enterprise", "Pro", "Family", "Student"],
    "product": ["Nimbus X2", "Aero tablet", "Pulse watch", "Orbit speaker", "Lumen lamp", "Vega router", "Kite camera"],
    "city": ["Leeds", "Lyon", "Porto", "Graz", "Utrecht", "Cork", "Gdansk", "Turin", "Malmo", "Bilbao"],
}
PII = ["write to {first}.{last}@mailbox.example", "call me on +44 20 7946 0{n3}", "my card 4111 1111 1111 1111",
       "IBAN GB82 WEST 1234 5698 7654 32", "my SSN is 078-05-1120", "my IP is 192.168.{n1}.{n2}",
       "you can reach {first} {last} at 555-01{n2:02d}"]
FIRST = ["Amelia", "Jonas", "Priya", "Mateo", "Chloe", "Kwame", "Ingrid", "Yusuf", "Hana", "Oliver"]
LAST = ["Watts", "Berger", "Nair", "Silva", "Dubois", "Mensah", "Larsen", "Demir", "Sato", "Reid"]


def ticket(rng: random.Random, row: int) -> dict:
    label = rng.choice(list(LABELS))
    slots = {"ref": f"{rng.choice('ABCDEFGH')}{rng.randint(10000, 99999)}", "amount": f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d}",
             "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", "count": rng.randint(2, 500),
             "version": f"{rng.randint(1, 9)}.{rng.randint(0, 20)}", **{k: rng.choice(v) for k, v in FILL.items()}}
    parts = [rng.choice(OPENINGS), rng.choice(LABELS[label]).format(**slots) + ".", rng.choice(DETAILS).format(**slots),
             rng.choice(LABELS[label]).format(**slots) + "." if rng.random() < 0.3 else "", rng.choice(CLOSINGS)]
    if rng.random() < 0.05:
        parts.insert(2, rng.choice(PII).format(first=rng.choice(FIRST).lower(), last=rng.choice(LAST).lower(),
                                                n1=rng.randint(0, 255), n2=rng.randint(0, 99), n3=rng.randint(100, 999)))
    return {"text": " ".join(p for p in parts if p), "label": label, "channel": rng.choice(["chat", "email", "phone"]),
            "customer": f"c{rng.randint(1, 200000)}", "created": slots["date"], "id": row}


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of tickets to ``path``: about 3% exact repeats (case and
    punctuation changed), 3% near duplicates (a word changed), 0.1% broken rows. Returns the rows."""
    rng = random.Random(seed)
    recent: list[dict] = []
    target, written, rows = megabytes * 2**20, 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            draw = rng.random()
            if draw < 0.001:
                line = rng.choice(['{"text": "cut off', json.dumps({"text": " ", "label": "billing"})])
            else:
                row = ticket(rng, rows)
                if recent and draw < 0.031:
                    row = dict(rng.choice(recent), id=rows)
                    row["text"] = row["text"].upper() + " !!"
                elif recent and draw < 0.061:
                    row = dict(rng.choice(recent), id=rows)
                    words = row["text"].split()
                    words[rng.randrange(len(words))] = rng.choice(["today", "again", "now", "still", "really"])
                    row["text"] = " ".join(words)
                recent.append(row)
                if len(recent) > 5000:
                    recent.pop(rng.randrange(len(recent)))
                line = json.dumps(row)
            fh.write(line + "\n")
            written += len(line) + 1
            rows += 1
    return rows


def run_child(recipe: Path, output: Path, streaming: bool, workers: int | None) -> dict:
    """Prepare in a child process; sample its RSS (and its workers') every 0.2 s."""
    code = ("import sys, json; from rich.console import Console; from domaintune.data.prepare import prepare_recipe;"
            f"d, p = prepare_recipe({str(recipe)!r}, output_dir={str(output)!r}, streaming={streaming}, "
            f"workers={workers}, console=Console(stderr=True));"
            "print(json.dumps({k: p.card[k] for k in ('rows_in', 'kept', 'dropped', 'dropped_total', 'pii')}))")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    process = psutil.Process(child.pid)
    peak_main = peak_tree = 0
    while child.poll() is None:
        try:
            main = process.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in process.children(recursive=True))
        except psutil.Error:
            break
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        time.sleep(0.2)
    out, _ = child.communicate()
    wall = time.perf_counter() - start
    if child.returncode:
        raise SystemExit(f"prepare failed with exit code {child.returncode}")
    return {"wall_s": wall, "peak_rss_mb": peak_main / 2**20, "peak_tree_rss_mb": peak_tree / 2**20,
            "card": json.loads(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1024, help="size of the generated file in MB (default 1024)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs available)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temporary directory)")
    parser.add_argument("--compare-memory", action="store_true", help="also run the in-memory path (the baseline)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        data = directory / f"tickets-{args.mb:g}mb.jsonl"
        start = time.perf_counter()
        lines = generate(data, args.mb)
        print(f"generated {data.stat().st_size / 2**20:,.0f} MB, {lines:,} lines in {time.perf_counter() - start:.0f} s",
              flush=True)
        recipe = directory / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "scale", "task": "classification", "base_model": "minilm-l6",
                                          "data": {"train": data.name, "on_bad_rows": "skip"}}), encoding="utf-8")
        runs = [("streaming", True)] + ([("in-memory", False)] if args.compare_memory else [])
        results = {}
        for name, streaming in runs:
            result = results[name] = run_child(recipe, directory / f"out-{name}", streaming, args.workers)
            card = result["card"]
            print(f"{name}: {card['rows_in']:,} rows in {result['wall_s']:.0f} s ({card['rows_in'] / result['wall_s']:,.0f} "
                  f"rows/s); peak RSS {result['peak_rss_mb']:,.0f} MB (with workers {result['peak_tree_rss_mb']:,.0f} MB); "
                  f"kept {card['kept']['train']:,} train + {card['kept']['eval']:,} eval", flush=True)
            dropped = {step: c["train"] + c["eval"] for step, c in card["dropped"].items() if c["train"] + c["eval"]}
            print(f"  dropped {card['dropped_total']:,}: {dropped}; PII redacted in {card['pii']['rows_with_pii']:,} rows: "
                  f"{card['pii']['found']}", flush=True)
        if args.compare_memory:
            s, m = results["streaming"], results["in-memory"]
            print(f"streaming / in-memory: peak RSS {s['peak_rss_mb'] / m['peak_rss_mb']:.2f}x, "
                  f"wall time {s['wall_s'] / m['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
