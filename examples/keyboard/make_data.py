"""Per-user phone messages for the keyboard example, generated offline from templates (no download, fully seeded).

Three users type short casual messages on their phones, and their words clash: "Sam" is
alice's daughter (a piano recital at Maple Hall), bob's team lead (who wants the
postmortem) and carol's sheepdog (who brings the ewes down off Ling Moor); "Jo" is alice's
charge nurse, bob's partner and carol's vet. Each user also has trade words the others
never type (obs, IV abx, Datix / #incident-bridge, p99, the canary / hoggs, tupping, silage),
recurring phrases and sign-offs, and places they go. A language model that learned one
user's messages should predict that user's next words far better than the base model:
the point of a per-user adapter. Every text is 1–3 sentences and 8–40 words.

    python examples/keyboard/make_data.py [--out DIR] [--seed N]

writes, for each user, ``users/<user>/train.jsonl`` (300 texts) and ``users/<user>/test.jsonl``
(80 texts) with one ``{"text": ..., "user": ...}`` per line, and ``users/<user>/train.txt`` (the
training texts, one per line). The test texts come from the same templates and fillers with
other random draws; none of them is also a training text. The output is byte-identical on
every run for the same seed.

``next_word_cases(text)`` gives the (prefix, next word) pairs of the "next-word top-3
accuracy" metric that ``benchmarks/keyboard`` computes on the test texts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["USERS", "TRAIN_TEXTS", "TEST_TEXTS", "MIN_WORDS", "MAX_WORDS", "Persona", "user_texts", "next_word_cases",
           "write_all", "main"]

TRAIN_TEXTS = 300
TEST_TEXTS = 80
MIN_WORDS, MAX_WORDS = 8, 40
#: the first words whose next word is scored: the keyboard has some context by then
FIRST_SCORED_WORD = 3
_TRAILING_PUNCTUATION = ".,!?;:"


class Persona(NamedTuple):
    """One user's way of writing: sentence templates with ``{slot}`` fillers, sign-offs.

    A NamedTuple, not a dataclass, so that the script also loads by path (``importlib``) without
    being registered in ``sys.modules``.
    """

    who: str
    sentences: tuple[str, ...]
    signoffs: tuple[str, ...]
    slots: Mapping[str, tuple[str, ...]]


#: fillers every user's templates may name; a persona's own slots are added to these
_COMMON_SLOTS: Mapping[str, tuple[str, ...]] = {
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "when": ("tonight", "tomorrow", "on Friday", "this weekend", "on Tuesday", "on Sunday"),
    "clock": ("6:30", "7", "7:15", "8", "8:45", "9:30", "10"),
    "hour": ("5", "5:30", "6", "6:30", "7"),
    "count": ("two", "three", "four", "five", "six", "eight"),
}
#: short first sentences anyone might type
_OPENERS = ("Hey!", "Ugh.", "Quick one.", "Heads up!", "Morning!", "Sorry!")

USERS: Mapping[str, Persona] = {
    "alice": Persona(
        who="an ICU nurse on Ward 7B at St Brigid's; Sam is her daughter, Jo her charge nurse",
        sentences=(
            "On nights again {when}, handover at 7:30 on Ward 7B.",
            "Sam's recital is at {hour} at Maple Hall, can you pick her up after?",
            "Can you get Sam from Maple Hall at {hour}, I'm stuck on the ward.",
            "Sam has swimming at Kingsway pool {when}, her kit bag is by the door.",
            "Did Sam practise her piece for the recital at Maple Hall?",
            "Sam needs her swimming kit for Kingsway pool in the morning.",
            "Remind Sam her recital dress for Maple Hall is on her bed.",
            "Jo is charge nurse {when} so handover should be quick.",
            "Jo asked if I can swap to a bank shift on {day}, might say yes.",
            "Jo put the new rota for 7B up and I'm on nights again.",
            "Bed {bed} is on IV abx every {hours} hours, obs due at {clock}.",
            "Bed {bed} sats dropped to {sats} so we called the outreach team.",
            "Bloods for bed {bed} came back fine, the reg is happy.",
            "Another Datix for bed {bed}, the pump alarmed all night.",
            "Obs on bed {bed} every hour tonight, so no break for me.",
            "Drug round done on 7B, the fluid balance charts are a mess again.",
            "Running late off the ward, handover overran again, sorry.",
            "Parked at St Brigid's in the multi-storey, level {level} again.",
            "Long shift on 7B, {count} admissions before lunch and no break.",
            "Can you start dinner, I'll be home after handover around {clock}.",
            "Coffee at the Elm Street Costa before my shift on {day}?",
            "Off the ward at last, handover done, heading home now.",
        ),
        signoffs=("Love you, mum x", "A x", "xx", "Love, mum x"),
        slots={
            "bed": ("3", "4", "6", "7", "9", "11", "12", "14"),
            "hours": ("6", "8", "12"),
            "sats": ("86", "88", "89", "90", "91"),
            "level": ("2", "3", "4", "5"),
        },
    ),
    "bob": Persona(
        who="a site reliability engineer, often on call; Sam is his team lead, Jo his partner",
        sentences=(
            "On call again {when}, ping me on the #incident-bridge channel if anything pages.",
            "Sam wants the postmortem for the {service} outage by {day}.",
            "Sam approved the rollback, rolling back the canary in {region} now.",
            "Sam wants action items on the postmortem before the retro on {day}.",
            "Standup with Sam at 10:30, then heads down on the helm chart.",
            "Deploy freeze until {day}, Sam says no merges to main.",
            "PagerDuty woke me at {clock}, {service} p99 latency spiked again.",
            "Rolling back the canary, {service} error rate is over {pct} percent.",
            "Opened a SEV{sev} for {service}, runbook is linked in #incident-bridge.",
            "kubectl is hanging on the {region} cluster again, draining the nodes.",
            "The {service} pods are crashlooping after the deploy, paging the DBA on call.",
            "Handing the pager to {teammate} at 9, on call is theirs until {day}.",
            "p99 is back under {ms} ms, closing the incident and updating the ticket.",
            "Pager went off again, {service} is alerting on disk pressure in {region}.",
            "Still on the bridge, the {service} rollback is halfway through {region}.",
            "Terraform plan for {region} looks clean, applying after standup.",
            "Working from the Dock Street office on {day}, lunch at Brewline?",
            "Grabbing a flat white at Brewline then back on the bridge.",
            "Jo says dinner at 8, I should be off the bridge by then.",
            "Tell Jo I'm stuck on the incident bridge, start without me.",
            "Jo wants to go climbing at the Foundry on {day} if I'm not on call.",
        ),
        signoffs=("Will update the ticket.", "Ping me on #incident-bridge.", "- b", "Back on the bridge."),
        slots={
            "service": ("billing-api", "checkout", "auth-gateway", "search-indexer"),
            "region": ("us-east-2", "eu-west-1", "ap-south-1"),
            "teammate": ("Priya", "Marcus", "Dana", "Kenji"),
            "sev": ("1", "2", "3"),
            "pct": ("2", "5", "8", "12"),
            "ms": ("200", "250", "300", "400"),
        },
    ),
    "carol": Persona(
        who="a hill sheep farmer; Sam is her collie, Jo her vet",
        sentences=(
            "Sam brought the ewes down off Ling Moor this morning, good dog.",
            "Sam brought the hoggs in from Hollow Field before the rain.",
            "Sam is shattered after gathering Ling Moor, flat out by the Aga.",
            "Sam and I have checked the top field, all present and counted.",
            "Jo the vet is coming on {day} to scan the ewes in the top field.",
            "Jo the vet says the lame ewe needs her foot trimmed and a jab.",
            "Jo the vet reckons it's just orf, nothing to worry about.",
            "Checked the lambing shed at {clock}, one ewe struggling, Jo the vet is on her way.",
            "Lambing has started, {count} sets of twins in the shed overnight.",
            "Taking {count} hoggs to Hexby mart on {day}, the trailer is hitched.",
            "Texel lambs made {price} quid a head at Hexby mart, best this year.",
            "Store lambs averaged {price} quid at Hexby mart, not bad at all.",
            "Need {count} bales of silage from Greaves' yard before the weekend.",
            "Feed order from Greaves' yard comes {day}, {count} bags of ewe nuts.",
            "The Texel tup is in with the ewes in Hollow Field till {day}.",
            "Tupping starts {when}, the raddle is on the Texel tup.",
            "Drenching the lambs on {day}, can you help on the gate?",
            "Quad has a flat again, walking up to the top field.",
            "Silage is in, {bales} bales wrapped and stacked by the shed.",
            "Rain all day, the ewes are sheltering under the wall in Hollow Field.",
            "Fence is down on the top field again, {count} ewes out on the lane.",
            "Shearing gang is booked for {day}, fingers crossed it stays dry.",
        ),
        signoffs=("Cheers, C", "Back in for tea at 6.", "Ta, C", "C x"),
        slots={
            "price": ("88", "92", "97", "104", "112"),
            "bales": ("140", "160", "180", "210"),
        },
    ),
}

_SLOT = re.compile(r"\{(\w+)\}")


def _fill(template: str, slots: Mapping[str, tuple[str, ...]], rng: random.Random) -> str:
    """``template`` with each ``{slot}`` replaced by a random filler, left to right."""
    return _SLOT.sub(lambda m: rng.choice(slots[m.group(1)]), template)


def _message(persona: Persona, slots: Mapping[str, tuple[str, ...]], rng: random.Random) -> str:
    """One message: 1–3 sentences of the persona's templates, perhaps an opener or a sign-off."""
    body = rng.choices((1, 2, 3), weights=(3, 5, 2))[0]
    parts = [_fill(t, slots, rng) for t in rng.sample(persona.sentences, body)]
    if len(parts) < 3 and rng.random() < 0.4:
        parts.append(rng.choice(persona.signoffs))
    if len(parts) < 3 and rng.random() < 0.15:
        parts.insert(0, rng.choice(_OPENERS))
    return " ".join(parts)


def _draw(persona: Persona, rng: random.Random, n: int, exclude: frozenset[str]) -> list[str]:
    """``n`` distinct messages of 8–40 words, none in ``exclude``, in the order drawn."""
    slots = {**_COMMON_SLOTS, **persona.slots}
    seen: set[str] = set()
    out: list[str] = []
    for _ in range(200 * n):
        text = _message(persona, slots, rng)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in seen and text not in exclude:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"only {len(out)} distinct messages of {n} for {persona.who!r}: add templates or fillers")


def user_texts(user: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, test)`` texts of ``user``: separate random streams, no text in both."""
    persona = USERS[user]
    train = _draw(persona, random.Random(f"{user}:train:{seed}"), TRAIN_TEXTS, frozenset())
    test = _draw(persona, random.Random(f"{user}:test:{seed}"), TEST_TEXTS, frozenset(train))
    if set(train) & set(test):
        raise RuntimeError(f"{user}: a test text is also a training text")
    return train, test


def next_word_cases(text: str) -> list[tuple[str, str]]:
    """The (prefix, next word) pairs of ``text`` scored by the next-word top-3 accuracy metric.

    Words are the whitespace-separated pieces of ``text`` (``text.split()``). For each word
    index ``i >= 3`` (0-based; the first three words give the keyboard context), ``prefix`` is
    ``text`` up to and including the whitespace just before word ``i``, as a keyboard sees it
    when the user is about to type that word, and the target is word ``i`` with trailing
    ``.,!?;:`` stripped (``"7:30."`` → ``"7:30"``; inner and leading characters stay: ``"Sam's"``,
    ``"#incident-bridge"``). Words that are empty after stripping (``"!"``) are skipped.

    >>> next_word_cases("On call again tonight, ping me!")
    [('On call again ', 'tonight'), ('On call again tonight, ', 'ping'), ('On call again tonight, ping ', 'me')]
    """
    cases = []
    for i, word in enumerate(re.finditer(r"\S+", text)):
        target = word.group().rstrip(_TRAILING_PUNCTUATION)
        if i >= FIRST_SCORED_WORD and target:
            cases.append((text[:word.start()], target))
    return cases


def _jsonl(user: str, texts: Sequence[str]) -> bytes:
    return "".join(json.dumps({"text": t, "user": user}, sort_keys=True) + "\n" for t in texts).encode("utf-8")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_all(out_dir: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write every user's files under ``out_dir/users/``; return the number of texts per user and split."""
    sizes = {}
    for user in USERS:
        train, test = user_texts(user, seed)
        folder = out_dir / "users" / user
        _write(folder / "train.jsonl", _jsonl(user, train))
        _write(folder / "test.jsonl", _jsonl(user, test))
        _write(folder / "train.txt", "".join(t + "\n" for t in train).encode("utf-8"))
        sizes[user] = {"train": len(train), "test": len(test)}
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data", help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0: the committed data)")
    args = parser.parse_args(argv)
    sizes = write_all(args.out, args.seed)
    print(json.dumps({"out": str(args.out), "texts": sizes}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
