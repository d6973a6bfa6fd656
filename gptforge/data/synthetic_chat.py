"""Synthetic instruction conversations, made by code: what `gptforge quickstart --chat` teaches a tiny model.

Owns the skills (their question templates, the word list, the table of facts, the greetings), the held-out
split and how conversations are composed from skills. Every skill is small enough for a character-level
model of ~100k parameters to learn in a few CPU minutes, and its answers are checkable at a glance:

    arithmetic   what is 7 + 5?            -> 12          (+, - and * on 0..9; - never goes below 0)
    reverse      reverse: cat dog sun      -> sun dog cat (the order of 2 to 4 words)
    upper-case   upper-case: cat dog       -> CAT DOG
    count        count the words: cat dog  -> 2
    facts        what colour is the sky?   -> blue        (a table the set itself teaches; some invented)
    greeting     hi                        -> Hello! How can I help you?
    goodbye      bye / thanks              -> Goodbye! / You are welcome! Goodbye!
    follow-up    what is 3 + 4? -> 7, and times 2? -> 14;  reverse: cat dog -> dog cat, now upper-case it -> DOG CAT

Held out means never asked in training (compared lower-cased, so capitalising a question does not make it
new): for arithmetic, facts, greetings and goodbyes one phrasing of a fact is held out while the fact is
taught in its other phrasings (so held-out questions test the same facts in the trained templates); for the
word skills whole sets of words are held out (no order of them occurs in training, as question or answer),
so the model has to do the operation, not recall it. A follow-up's first question is held out the same way,
and its step (say "and times 2?" from 7) occurs in training from other questions: the model has to read the
previous turn's answer.

Conversations are lists of {"role", "content"} messages (user first, assistant last); a training
conversation may open with a greeting, hold one or two skills and close with a goodbye, within
MAX_TOKENS characters and markers, so a chat can go on from one skill to the next. Everything comes from
one seeded random.Random: the same seed gives the same conversations.
"""

from __future__ import annotations

import json
import operator
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

Messages = list[dict[str, str]]
Turn = tuple[str, str]  # (what the user says, what the assistant answers)

SKILLS = ("arithmetic", "reverse", "upper-case", "count", "facts", "greeting", "goodbye", "follow-up")
# A conversation's length in a char tokenizer's tokens (characters, plus <|bos|> and two markers and <|end|>
# a turn): the quickstart's block_size holds every conversation whole.
MAX_TOKENS = 128
N_TRAIN = 30_000
HELDOUT_PER_SKILL = {"arithmetic": 50, "reverse": 50, "upper-case": 50, "count": 50, "facts": 32,
                     "greeting": 10, "goodbye": 10, "follow-up": 60}

# ---------------------------------------------------------------------------------------------
# The skills' material

OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "+": ("plus", operator.add), "-": ("minus", operator.sub), "*": ("times", operator.mul)}
ARITHMETIC_TEMPLATES = ("what is {a} {op} {b}?", "{a} {op} {b} = ?", "compute {a} {op} {b}", "what is {a} {word} {b}?")
# A follow-up applies one more step to the previous answer: small steps keep the table a tiny model must
# learn small (the previous answer is 0..18: follow-ups come after + and - only).
FOLLOW_UP_STEPS = {"plus": (range(1, 6), operator.add), "minus": (range(1, 6), operator.sub),
                   "times": (range(2, 4), operator.mul)}
FOLLOW_UP_TEMPLATE = "and {word} {n}?"

WORDS = ("cat", "dog", "sun", "red", "blue", "fish", "tree", "bird", "moon", "star", "cake", "milk", "book",
         "lamp", "frog", "rain", "snow", "ship", "king", "rose", "hat", "cup", "box", "egg")
PHRASE_WORDS = (2, 4)  # fewest and most words in a phrase
PHRASE_SKILLS: dict[str, tuple[tuple[str, ...], Callable[[str], str]]] = {
    "reverse": (("reverse: {p}", "reverse the words: {p}"), lambda p: " ".join(reversed(p.split()))),
    "upper-case": (("upper-case: {p}", "uppercase: {p}"), str.upper),
    "count": (("count the words: {p}", "how many words: {p}"), lambda p: str(len(p.split()))),
}
# "it" is the previous answer; a count is a number, so nothing follows it
PHRASE_FOLLOW_UPS = {"reverse": "now reverse it", "upper-case": "now upper-case it", "count": "now count its words"}

# Six phrasings a relation: a fact is taught in five, so the model learns to answer from the thing asked
# about, whatever the phrasing (with four, it learned the phrasings' strings and missed a held-out one).
FACTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "colour": (("what colour is {e}?", "what color is {e}?", "{e} is what colour?", "tell me the colour of {e}",
                "which colour is {e}?", "what is the colour of {e}?"),
               {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
                "a tomato": "red", "a carrot": "orange", "a plum": "purple"}),
    "sound": (("what does {e} say?", "what sound does {e} make?", "{e} says what?", "which sound does {e} make?",
               "what noise does {e} make?", "how does {e} sound?"),
              {"a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa",
               "an owl": "hoot", "a lion": "roar", "a bee": "buzz"}),
    "legs": (("how many legs does {e} have?", "how many legs has {e}?", "{e} has how many legs?",
              "count the legs of {e}", "what number of legs does {e} have?", "legs on {e}?"),
             {"a spider": "8", "an ant": "6", "a dog": "4", "a bird": "2", "a fish": "0", "a snake": "0",
              "a horse": "4", "a crab": "10"}),
    # invented, so the answer can only come from this set
    "capital": (("what is the capital of {e}?", "name the capital of {e}", "which city is the capital of {e}?",
                 "the capital of {e} is?", "what city is the capital of {e}?", "capital of {e}?"),
                {"Zorbia": "Plim", "Quenland": "Tarrow", "Blovia": "Mesk", "Drumia": "Kell", "Fennor": "Lusk",
                 "Garovia": "Brint", "Hexland": "Orra", "Jumbria": "Nox"}),
}

GREETINGS = ("hi", "hello", "hey", "hi there", "hello there", "hey there", "good morning", "good evening",
             "good afternoon", "hiya", "howdy", "greetings", "hello friend", "hi friend", "hey friend")
GREETING_REPLY = "Hello! How can I help you?"
BYES = ("bye", "goodbye", "bye bye", "see you", "see you later", "ok bye", "good night", "bye for now")
THANKS = ("thanks", "thank you", "thanks a lot", "ok thanks", "thank you very much", "many thanks", "thanks, bye")
BYE_REPLY, THANKS_REPLY = "Goodbye!", "You are welcome! Goodbye!"
ENDINGS = ("", "!", ".")  # greetings and goodbyes come bare or with either mark

P_CAPITAL = 0.25  # a question's first letter is capitalised this often
P_GREETING, P_SECOND, P_GOODBYE = 0.25, 0.3, 0.25  # how often a training conversation opens, goes on, closes
UNIT_WEIGHTS = {"arithmetic": 3, "reverse": 2, "upper-case": 2, "count": 2, "facts": 4, "follow-up": 5,
                "greeting": 1, "goodbye": 1}


@dataclass
class SyntheticChat:
    """The training conversations and, per skill, the held-out ones (their questions never in training)."""

    train: list[Messages]
    heldout: dict[str, list[Messages]]


def arithmetic_questions(a: int, op: str, b: int) -> list[str]:
    """Every phrasing of `a op b`, in ARITHMETIC_TEMPLATES' order."""
    return [t.format(a=a, op=op, b=b, word=OPS[op][0]) for t in ARITHMETIC_TEMPLATES]


def arithmetic_facts() -> list[tuple[int, str, int]]:
    """(a, op, b) for every question the set asks: a and b in 0..9, no negative differences."""
    return [(a, op, b) for op in OPS for a in range(10) for b in range(10) if not (op == "-" and b > a)]


ARITHMETIC_FACTS = arithmetic_facts()


def fact_questions() -> list[tuple[list[str], str]]:
    """(every phrasing, answer) of each fact in FACTS."""
    return [([t.format(e=e) for t in templates], answer)
            for templates, table in FACTS.values() for e, answer in table.items()]


def _variants(bases: tuple[str, ...]) -> list[list[str]]:
    return [[b + end for end in ENDINGS] for b in bases]


# ---------------------------------------------------------------------------------------------
# The held-out split


@dataclass
class _Split:
    """What is held out: question keys (lower-cased) and sets of words."""

    questions: set[str]
    word_sets: set[frozenset[str]]

    def held(self, question: str) -> bool:
        return question.lower() in self.questions


def _hold_one_of_each(rng: random.Random, groups: list[list[str]], n: int) -> list[str]:
    """One phrasing each of `n` of the groups (a fact's phrasings): held out, the others stay in training."""
    return [rng.choice(g) for g in rng.sample(groups, n)]


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(*PHRASE_WORDS)))


def _split(rng: random.Random) -> tuple[_Split, dict[str, list[str]]]:
    """The held-out split, and per kind the held-out questions to build held-out conversations from."""
    n_follow = HELDOUT_PER_SKILL["follow-up"] // 2  # half the follow-ups start from arithmetic, half from words
    groups = [arithmetic_questions(*f) for f in ARITHMETIC_FACTS]
    plus_minus = [g for g, f in zip(groups, ARITHMETIC_FACTS) if f[1] != "*"]  # what follow-ups come after
    follow = _hold_one_of_each(rng, plus_minus, n_follow)
    rest = [g for g in groups if not set(g) & set(follow)]
    arith = _hold_one_of_each(rng, rest, HELDOUT_PER_SKILL["arithmetic"])
    facts = _hold_one_of_each(rng, [q for q, _ in fact_questions()], HELDOUT_PER_SKILL["facts"])
    greetings = _hold_one_of_each(rng, _variants(GREETINGS), HELDOUT_PER_SKILL["greeting"])
    goodbyes = _hold_one_of_each(rng, _variants(BYES + THANKS), HELDOUT_PER_SKILL["goodbye"])
    n_phrases = sum(HELDOUT_PER_SKILL[s] for s in PHRASE_SKILLS) + HELDOUT_PER_SKILL["follow-up"] - n_follow
    phrases: list[str] = []
    word_sets: set[frozenset[str]] = set()
    while len(phrases) < n_phrases:
        p = _phrase(rng)
        if frozenset(p.split()) not in word_sets:
            word_sets.add(frozenset(p.split()))
            phrases.append(p)
    held = {q.lower() for q in follow + arith + facts + greetings + goodbyes}
    return _Split(held, word_sets), {"arithmetic": arith, "follow-up": follow, "facts": facts,
                                     "greeting": greetings, "goodbye": goodbyes, "phrases": phrases}


# ---------------------------------------------------------------------------------------------
# Answers


def arithmetic_answer(question: str) -> int:
    """The answer to one of ARITHMETIC_TEMPLATES' questions (the set's own arithmetic, by its operator)."""
    words = question.rstrip("?").replace("=", " ").split()
    nums = [int(w) for w in words if w.isdigit()]
    symbol = next(s for s, (word, _) in OPS.items() if s in words or word in words)
    return OPS[symbol][1](nums[0], nums[1])


def _fact_answer() -> dict[str, str]:
    return {q.lower(): answer for qs, answer in fact_questions() for q in qs}


FACT_ANSWERS = _fact_answer()
FACT_PHRASINGS = [qs for qs, _ in fact_questions()]
FOLLOWED_FACTS = [f for f in ARITHMETIC_FACTS if f[1] != "*"]  # follow-ups come after + and - only


def goodbye_reply(said: str) -> str:
    return THANKS_REPLY if said.rstrip("!.").lower() in THANKS else BYE_REPLY


# ---------------------------------------------------------------------------------------------
# Units: the turns of one skill


def _surface(rng: random.Random, text: str) -> str:
    """A user's text as typed: sometimes with a capital first letter."""
    return text[:1].upper() + text[1:] if rng.random() < P_CAPITAL else text


def _pick(rng: random.Random, choices: Callable[[], str], split: _Split) -> str:
    """A question from `choices` that is not held out."""
    while True:
        q = choices()
        if not split.held(q):
            return q


def _arithmetic(rng: random.Random, question: str) -> Turn:
    return _surface(rng, question), str(arithmetic_answer(question))


def _follow_up(rng: random.Random, previous: int) -> Turn:
    """One more step on the previous answer, never below 0."""
    while True:
        word = rng.choice(list(FOLLOW_UP_STEPS))
        steps, fn = FOLLOW_UP_STEPS[word]
        n = rng.choice(list(steps))
        if fn(previous, n) >= 0:
            return FOLLOW_UP_TEMPLATE.format(word=word, n=n), str(fn(previous, n))


def _phrase_turns(rng: random.Random, skill: str, phrase: str, follow: bool) -> list[Turn]:
    templates, fn = PHRASE_SKILLS[skill]
    turns = [(_surface(rng, rng.choice(templates).format(p=phrase)), fn(phrase))]
    if follow:
        nxt = rng.choice([s for s in PHRASE_SKILLS if s != skill])
        turns.append((_surface(rng, PHRASE_FOLLOW_UPS[nxt]), PHRASE_SKILLS[nxt][1](turns[0][1])))
    return turns


def _train_phrase(rng: random.Random, split: _Split) -> str:
    while True:
        p = _phrase(rng)
        if frozenset(p.split()) not in split.word_sets:
            return p


def _train_unit(rng: random.Random, skill: str, split: _Split) -> list[Turn]:
    """The turns of one training example of `skill` (none of them held out)."""
    if skill in ("arithmetic", "follow-up") and (skill == "arithmetic" or rng.random() < 0.5):
        facts = ARITHMETIC_FACTS if skill == "arithmetic" else FOLLOWED_FACTS
        q = _pick(rng, lambda: rng.choice(arithmetic_questions(*rng.choice(facts))), split)
        turns = [_arithmetic(rng, q)]
        return turns if skill == "arithmetic" else turns + [_follow_up(rng, int(turns[0][1]))]
    if skill == "follow-up":
        return _phrase_turns(rng, rng.choice(["reverse", "upper-case"]), _train_phrase(rng, split), True)
    if skill in PHRASE_SKILLS:
        return _phrase_turns(rng, skill, _train_phrase(rng, split), False)
    if skill == "facts":
        q = _pick(rng, lambda: rng.choice(rng.choice(FACT_PHRASINGS)), split)
        return [(_surface(rng, q), FACT_ANSWERS[q.lower()])]
    if skill == "greeting":
        return [(_surface(rng, _pick(rng, lambda: rng.choice(GREETINGS) + rng.choice(ENDINGS), split)),
                 GREETING_REPLY)]
    said = _surface(rng, _pick(rng, lambda: rng.choice(BYES + THANKS) + rng.choice(ENDINGS), split))
    return [(said, goodbye_reply(said))]


def _tokens(turns: list[Turn]) -> int:
    """A conversation's length in a char tokenizer's tokens: <|bos|>, and per turn two markers and two <|end|>."""
    return 1 + sum(len(u) + len(a) + 4 for u, a in turns)


def _messages(turns: list[Turn]) -> Messages:
    return [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]


def _train_conversation(rng: random.Random, split: _Split) -> Messages:
    """A greeting (sometimes), one or two skills, a goodbye (sometimes), within MAX_TOKENS."""
    skills, weights = list(UNIT_WEIGHTS), list(UNIT_WEIGHTS.values())
    while True:
        first = rng.choices(skills, weights)[0]
        turns = _train_unit(rng, first, split)
        if first not in ("greeting", "goodbye"):
            if rng.random() < P_GREETING:
                turns = _train_unit(rng, "greeting", split) + turns
            if rng.random() < P_SECOND:
                turns += _train_unit(rng, rng.choices(skills[:6], weights[:6])[0], split)
            if rng.random() < P_GOODBYE:
                turns += _train_unit(rng, "goodbye", split)
        if _tokens(turns) <= MAX_TOKENS:
            return _messages(turns)


# ---------------------------------------------------------------------------------------------
# Held-out conversations: the scored skill last, sometimes after a trained greeting or skill


def _heldout_units(rng: random.Random, held: dict[str, list[str]]) -> dict[str, list[list[Turn]]]:
    phrases = iter(held["phrases"])  # each held-out set of words is asked once
    units: dict[str, list[list[Turn]]] = {
        "arithmetic": [[_arithmetic(rng, q)] for q in held["arithmetic"]],
        "facts": [[(_surface(rng, q), FACT_ANSWERS[q.lower()])] for q in held["facts"]],
        "greeting": [[(_surface(rng, q), GREETING_REPLY)] for q in held["greeting"]],
        "goodbye": [[(_surface(rng, q), goodbye_reply(q))] for q in held["goodbye"]],
    }
    for skill in PHRASE_SKILLS:
        units[skill] = [_phrase_turns(rng, skill, next(phrases), False) for _ in range(HELDOUT_PER_SKILL[skill])]
    # half the follow-ups after a held-out + or - question, half after a held-out set of words
    n = HELDOUT_PER_SKILL["follow-up"]
    follow = [[_arithmetic(rng, q)] for q in held["follow-up"]]
    units["follow-up"] = [t + [_follow_up(rng, int(t[0][1]))] for t in follow]
    units["follow-up"] += [_phrase_turns(rng, rng.choice(["reverse", "upper-case"]), next(phrases), True)
                           for _ in range(n - len(follow))]
    return units


def _heldout(rng: random.Random, split: _Split, held: dict[str, list[str]]) -> dict[str, list[Messages]]:
    out: dict[str, list[Messages]] = {}
    for skill, units in _heldout_units(rng, held).items():
        out[skill] = []
        for turns in units:
            if skill == "goodbye" or (skill != "greeting" and rng.random() < 0.3):
                before = _train_unit(rng, "greeting" if skill != "goodbye" else
                                     rng.choice(["arithmetic", "facts", "reverse"]), split)
                if _tokens(before + turns) <= MAX_TOKENS:
                    turns = before + turns
            out[skill].append(_messages(turns))
    return {skill: out[skill] for skill in SKILLS}


def generate(seed: int = 0, n_train: int = N_TRAIN) -> SyntheticChat:
    """`n_train` training conversations and the held-out ones of every skill; the same seed, the same set."""
    rng = random.Random(seed)
    split, held = _split(rng)
    train = [_train_conversation(rng, split) for _ in range(n_train)]
    return SyntheticChat(train, _heldout(rng, split, held))


def write_jsonl(path: str | Path, conversations: list[Messages]) -> None:
    """One {"messages": [...]} row a line: the format `gptforge prepare --chat messages` and `eval --task chat` read."""
    Path(path).write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
