"""Smart-home intent data, generated offline from templates (no download, fully seeded).

Labels are ``<room>/<action>``: the base head learns the generic phrasings every household
uses ("turn on the living room light"); each user's words for their own rooms and lamps
("the den", "the big light") are what that user's adapter learns. The same phrase can mean
different rooms to different users ("the den" is alice's living room and bob's office), so
no single head can serve both: that is the personalisation task.

``python intents_data.py [OUT_DIR]`` writes ``labels.json``, ``generic_{train,test}.jsonl`` and
``users/<name>/{train,test}.jsonl`` (one ``{"text": ..., "label": ...}`` per line).
"""

from __future__ import annotations

import json
import random
import sys
from itertools import product
from pathlib import Path

__all__ = ["ROOMS", "ACTIONS", "LABELS", "USERS", "generic_examples", "user_examples", "write_all"]

#: room label → the names every household uses for it
ROOMS = {
    "living_room": ["living room", "lounge", "sitting room"],
    "kitchen": ["kitchen"],
    "bedroom": ["bedroom", "master bedroom"],
    "office": ["office", "study"],
}
#: action label → templates; {room} is filled with a room name, {light} with a lamp word
ACTIONS = {
    "light_on": ["turn on the {room} {light}", "switch on the {light} in the {room}", "{room} {light} on",
                 "can you turn the {room} {light} on", "{light} on in the {room} please", "put the {light} on in the {room}"],
    "light_off": ["turn off the {room} {light}", "switch off the {light} in the {room}", "{room} {light} off",
                  "can you turn the {room} {light} off", "{light} off in the {room} please", "kill the {light} in the {room}"],
    "warmer": ["make the {room} warmer", "turn up the heating in the {room}", "it is cold in the {room}",
               "raise the temperature in the {room}", "heat up the {room}", "warm up the {room} a bit"],
    "cooler": ["make the {room} cooler", "turn down the heating in the {room}", "it is too hot in the {room}",
               "lower the temperature in the {room}", "cool down the {room}", "the {room} is stuffy, cool it down"],
}
_LIGHTS = ["light", "lights", "lamp"]
LABELS = [f"{room}/{action}" for room, action in product(ROOMS, ACTIONS)]

#: user → (their word for a room or lamp → the room label it means); rooms they name generically are left out
USERS = {
    "alice": {"den": "living_room", "snug": "office", "galley": "kitchen", "loft": "bedroom"},
    "bob": {"den": "office", "nest": "bedroom", "front room": "living_room", "cookhouse": "kitchen"},
}
#: lamp words that only mean something in one household: they name the room by its lamp
_USER_LAMPS = {"alice": {"big light": "living_room"}, "bob": {"reading lamp": "office"}}


def _fill(template: str, room: str, rng: random.Random) -> str:
    return template.format(room=room, light=rng.choice(_LIGHTS))


def generic_examples(seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for (room_label, names), (action, templates) in product(ROOMS.items(), ACTIONS.items()):
        for name, template in product(names, templates):
            out.append({"text": _fill(template, name, rng), "label": f"{room_label}/{action}"})
    rng.shuffle(out)
    return out


def user_examples(user: str, seed: int = 0) -> list[dict[str, str]]:
    """The user's own words in every action's templates, plus lamp phrases ("switch on the big light")."""
    rng = random.Random(f"{user}:{seed}")
    out = []
    for (word, room_label), (action, templates) in product(USERS[user].items(), ACTIONS.items()):
        for template in templates:
            out.append({"text": _fill(template, word, rng), "label": f"{room_label}/{action}"})
    for lamp, room_label in _USER_LAMPS[user].items():
        for action in ("light_on", "light_off"):
            verb = "on" if action == "light_on" else "off"
            for text in (f"turn {verb} the {lamp}", f"switch the {lamp} {verb}", f"{lamp} {verb}", f"{lamp} {verb} please"):
                out.append({"text": text, "label": f"{room_label}/{action}"})
    rng.shuffle(out)
    return out


def _split(rows: list[dict[str, str]], test_every: int = 4) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return [r for i, r in enumerate(rows) if i % test_every], rows[::test_every]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_all(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "labels.json").write_text(json.dumps(LABELS, indent=1) + "\n", encoding="utf-8")
    train, test = _split(generic_examples())
    _write_jsonl(out_dir / "generic_train.jsonl", train)
    _write_jsonl(out_dir / "generic_test.jsonl", test)
    for user in USERS:
        train, test = _split(user_examples(user))
        _write_jsonl(out_dir / "users" / user / "train.jsonl", train)
        _write_jsonl(out_dir / "users" / user / "test.jsonl", test)


if __name__ == "__main__":
    write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data")
