"""The federated benchmark's users: examples/intents split across simulated households.

Every user's data is generated like examples/intents (its room names, action templates and
labels; alice and bob are its own users, from ``intents_data.user_examples``), seeded, with
nothing fitted to the results:

- **own words**: the user's words for their rooms in every action template, plus phrases
  for a lamp only their household names ("switch the fairy lights off"). alice and bob are
  examples/intents' users; the others are made here: each says "den" for a room of their
  own (a seeded draw, so "den" means different rooms to different users, as it does to
  alice and bob) and three more words drawn from a pool, each for another room, so the
  words clash between users. A quarter of the own-word phrases is held out
  (``intents_data``'s split: every fourth);
- **new generic phrasings**: templates the base head never saw (``NEW_TEMPLATES``: other
  ways to say the four actions) with the generic room names every household uses. Every
  (template, room name) pair is one phrase; a quarter of the pairs (every fourth of a
  seeded shuffle) is the **shared generic test set** every user is scored on; the rest
  is dealt out to the users without overlap, so each user holds a different slice
  (non-IID): a federation sees all of it, a single user an eighth.

A user's held-out set is their own-word test phrases plus the shared generic test set.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from types import ModuleType

__all__ = ["UserData", "NEW_TEMPLATES", "make_users", "intents_data"]

_INTENTS = Path(__file__).resolve().parents[1] / "examples" / "intents" / "intents_data.py"

#: action label → phrasings the base head was not fitted on ({room}, {light} as in intents_data).
NEW_TEMPLATES = {
    "light_on": ["i need some light in the {room}", "brighten up the {room}", "lights up in the {room}",
                 "illuminate the {room}", "give me the {light} in the {room}", "the {room} is too dark",
                 "the {room} needs the {light} on", "could the {room} {light} come on"],
    "light_off": ["darken the {room}", "lights out in the {room}", "no more {light} in the {room}",
                  "the {room} is too bright", "shut the {room} {light}", "cut the {light} in the {room}",
                  "i am done with the {room} {light}", "the {room} {light} can go off now"],
    "warmer": ["the {room} is freezing", "crank up the heat in the {room}", "i am chilly in the {room}",
               "bump the {room} thermostat up", "more heat in the {room}", "the {room} feels icy",
               "get the {room} toasty", "the {room} needs to be warmer"],
    "cooler": ["the {room} is boiling", "i am sweating in the {room}", "bring the {room} temperature down",
               "less heat in the {room}", "the {room} needs some air conditioning", "chill the {room} a little",
               "the {room} feels like an oven", "knock the {room} thermostat down"],
}
_LIGHTS = ["light", "lights", "lamp"]
#: Words a generated user may have for a room ("den" every one of them has, for a room of its own).
_WORD_POOL = ["snug", "nook", "parlour", "cubby", "attic", "back room", "hideaway", "studio", "scullery",
              "garret", "lair", "retreat", "annex", "galley", "loft", "nest", "front room", "cookhouse"]
_LAMP_POOL = ["fairy lights", "floor lamp", "ceiling light", "desk lamp", "string lights", "uplighter"]
_NAMES = ["carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj", "olivia", "peggy"]

Row = dict[str, str]


def intents_data() -> ModuleType:
    """examples/intents/intents_data.py (a script beside build.py, not a package)."""
    spec = importlib.util.spec_from_file_location("lorad_example_intents_data", _INTENTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class UserData:
    name: str
    #: word → room label (the user's own words; lamps included)
    words: dict[str, str]
    train: list[Row]
    own_test: list[Row]


def _own_examples(data: ModuleType, words: dict[str, str], lamps: dict[str, str], seed: str) -> list[Row]:
    """``intents_data.user_examples`` for a generated user (the same templates and lamp phrases)."""
    rng = random.Random(seed)
    out = []
    for (word, room), (action, templates) in product(words.items(), data.ACTIONS.items()):
        for template in templates:
            out.append({"text": template.format(room=word, light=rng.choice(_LIGHTS)), "label": f"{room}/{action}"})
    for lamp, room in lamps.items():
        for action in ("light_on", "light_off"):
            verb = "on" if action == "light_on" else "off"
            for text in (f"turn {verb} the {lamp}", f"switch the {lamp} {verb}", f"{lamp} {verb}", f"{lamp} {verb} please"):
                out.append({"text": text, "label": f"{room}/{action}"})
    rng.shuffle(out)
    return out


def _generic_pool(data: ModuleType, seed: int) -> list[Row]:
    """Every (new template, generic room name, lamp word where the template has one) phrase."""
    rows = [{"text": template.format(room=name, light=light), "label": f"{room}/{action}"}
            for (room, names), (action, templates) in product(data.ROOMS.items(), NEW_TEMPLATES.items())
            for name, template in product(names, templates)
            for light in (_LIGHTS if "{light}" in template else _LIGHTS[:1])]
    random.Random(f"generic:{seed}").shuffle(rows)
    return rows


def make_users(count: int, *, generic_share: int, seed: int = 0) -> tuple[list[UserData], list[Row]]:
    """``count`` users (alice and bob first), each with ``generic_share`` new generic
    phrasings, and the shared generic test set."""
    data = intents_data()
    if not 2 <= count <= 2 + len(_NAMES):
        raise ValueError(f"--users {count}: between 2 and {2 + len(_NAMES)}")
    rng = random.Random(f"users:{seed}")
    rooms = list(data.ROOMS)
    owns: list[tuple[str, dict[str, str], list[Row]]] = []
    for name in list(data.USERS)[:2]:
        owns.append((name, dict(data.USERS[name]), data.user_examples(name, seed)))
    for name in _NAMES[:count - 2]:
        order = rooms[:]
        rng.shuffle(order)
        words = dict(zip(["den", *rng.sample(_WORD_POOL, 3)], order, strict=True))
        lamps = {rng.choice(_LAMP_POOL): rng.choice(rooms)}
        owns.append((name, {**words, **lamps}, _own_examples(data, words, lamps, f"{name}:{seed}")))
    pool = _generic_pool(data, seed)
    generic_test, generic_train = pool[::4], [r for i, r in enumerate(pool) if i % 4]
    users = []
    for name, words, rows in owns:
        own_train, own_test = [r for j, r in enumerate(rows) if j % 4], rows[::4]
        share = random.Random(f"{name}:generic:{seed}").sample(generic_train, generic_share)
        train = own_train + share
        random.Random(f"{name}:train:{seed}").shuffle(train)
        users.append(UserData(name, words, train, own_test))
    return users, generic_test
