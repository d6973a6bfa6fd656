"""gptforge.data.synthetic_chat: the same set for a seed, held-out questions never in training, every answer right
(checked here by code of the test's own, not the module's), follow-ups answered from the previous turn."""

import re

import pytest

from gptforge.chat_template import validate_messages
from gptforge.data import synthetic_chat as sc


@pytest.fixture(scope="module")
def chats():
    return sc.generate(0)


def user_turns(conversations):
    return [m["content"] for c in conversations for m in c if m["role"] == "user"]


def pairs(conv):
    return [(conv[i]["content"], conv[i + 1]["content"]) for i in range(0, len(conv), 2)]


ARITHMETIC = re.compile(r"^(?:what is |compute )?(\d) (\+|-|\*|plus|minus|times) (\d)(?:\?| = \?)?$")
FOLLOW_UP = re.compile(r"^and (plus|minus|times) (\d)\?$")
PHRASE = re.compile(r"^(reverse|reverse the words|upper-case|uppercase|count the words|how many words): ([a-z ]+)$")


def expected(question, previous):
    """The right answer to `question` (lower-cased), worked out here; `previous` is the answer before it.
    None: a question that is not arithmetic, words or a follow-up (facts and greetings, checked apart)."""
    if m := ARITHMETIC.match(question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "plus": a + b, "-": a - b, "minus": a - b, "*": a * b, "times": a * b}[op])
    if m := FOLLOW_UP.match(question):
        n, p = int(m[2]), int(previous)
        return str({"plus": p + n, "minus": p - n, "times": p * n}[m[1]])
    if m := PHRASE.match(question):
        words = m[2].split()
        return {"reverse": " ".join(words[::-1]), "upper-case": m[2].upper(), "count": str(len(words))}[
            {"reverse the words": "reverse", "uppercase": "upper-case", "count the words": "count",
             "how many words": "count"}.get(m[1], m[1])]
    follow = {"now reverse it": lambda p: " ".join(p.split()[::-1]), "now upper-case it": str.upper,
              "now count its words": lambda p: str(len(p.split()))}
    return follow[question](previous) if question in follow else None


def test_the_same_seed_gives_the_same_set_and_another_seed_another():
    a, b, c = sc.generate(3, 500), sc.generate(3, 500), sc.generate(4, 500)
    assert a.train == b.train and a.heldout == b.heldout
    assert a.train != c.train and a.heldout != c.heldout
    assert len(a.train) == 500 and list(a.heldout) == list(sc.SKILLS)
    assert {k: len(v) for k, v in a.heldout.items()} == sc.HELDOUT_PER_SKILL


def test_every_conversation_is_usable_and_fits_the_context(chats):
    for conv in chats.train + [c for cs in chats.heldout.values() for c in cs]:
        assert validate_messages(conv) is None
        assert 1 + sum(len(m["content"]) + 2 for m in conv) <= sc.MAX_TOKENS


def test_held_out_questions_never_occur_in_training(chats):
    trained = {q.lower() for q in user_turns(chats.train)}
    trained_words = {frozenset(m["content"].split(": ")[-1].lower().split()) for c in chats.train for m in c}
    for skill, convs in chats.heldout.items():
        for conv in convs:
            # a follow-up's scored unit starts a turn earlier: its first question is the held-out one
            question = conv[-4 if skill == "follow-up" else -2]["content"]
            assert question.lower() not in trained, (skill, question)
            if PHRASE.match(question.lower()):  # no order of its words was asked or answered in training
                assert frozenset(question.split(": ")[1].split()) not in trained_words, question


def test_every_answer_is_right(chats):
    checked = 0
    for conv in chats.train + [c for cs in chats.heldout.values() for c in cs]:
        previous = None
        for question, answer in pairs(conv):
            want = expected(question.lower(), previous)
            if want is not None:
                assert answer == want, (question, answer, previous)
                checked += 1
            elif question.lower().rstrip("!.") in sc.GREETINGS:
                assert answer == "Hello! How can I help you?"
            elif question.lower().rstrip("!.") in sc.THANKS:
                assert answer == "You are welcome! Goodbye!"
            elif question.lower().rstrip("!.") in sc.BYES:
                assert answer == "Goodbye!"
            previous = answer
    assert checked > 20_000


def test_facts_have_one_answer_in_every_phrasing_and_the_held_out_ones_are_taught(chats):
    """A fact's entity (the words its phrasings share) gets one answer, and every held-out fact is taught
    in training in another phrasing."""
    patterns = [(r, re.compile("^" + re.escape(t.lower()).replace(re.escape("{e}"), "(.+)") + "$"))
                for r, (ts, _) in enumerate(sc.FACTS.values()) for t in ts]

    def entity(question):
        found = [(r, m[1]) for r, p in patterns if (m := p.match(question.lower()))]
        return found[0] if found else None

    answers = {}
    for q, a in (p for c in chats.train for p in pairs(c)):
        if (key := entity(q)) is not None:
            assert answers.setdefault(key, a) == a, q
    for conv in chats.heldout["facts"]:
        key = entity(conv[-2]["content"])
        assert key in answers and answers[key] == conv[-1]["content"]
    assert answers[(0, "the sky")] == "blue"


def test_follow_ups_need_the_previous_answer(chats):
    """A follow-up's answer is worked out from the previous answer, and the follow-up alone does not say it
    (training answers it differently after other turns); the step a held-out arithmetic follow-up takes from
    its number occurs in training from other questions."""
    trained_steps, answers = set(), {}
    for conv in chats.train:
        turns = pairs(conv)
        for (_, before), (q, a) in zip(turns, turns[1:]):
            if FOLLOW_UP.match(q.lower()) or q.lower().startswith("now "):
                trained_steps.add((before, q.lower()))
                answers.setdefault(q.lower(), set()).add(a)
    for conv in chats.heldout["follow-up"]:
        (_, before), (q, a) = pairs(conv)[-2:]
        assert a == expected(q.lower(), before) and len(answers[q.lower()]) > 1, (q, a)
        if FOLLOW_UP.match(q.lower()):
            assert (before, q.lower()) in trained_steps, (before, q)
    followed = [pairs(c)[-1][0].lower() for c in chats.heldout["follow-up"]]
    assert sum(map(bool, map(FOLLOW_UP.match, followed))) == sc.HELDOUT_PER_SKILL["follow-up"] // 2
