"""The procedural text of the language miniature (issue 17): three skills and the pretraining mix.

Every example is ``prompt + answer`` where the answer ends with ``"."``; a model is scored by exact
match of its greedy continuation of the prompt up to the first ``"."``. Draws are pure functions
of a ``random.Random`` so a build is a function of its seed.

Skills (one fine-tuned model each):

- ``arithmetic``: addition of a digit to a number below 200, ``"137+8="`` → ``"145."``;
- ``reverse``: reverse a list of letters, ``"rev ksbd="`` → ``"dbsk."``;
- ``instruct``: templated instructions over a word (first / last letter, length, upper case),
  several phrasings per instruction, ``"last letter of pmqa?"`` → ``"a."``.

The pretraining mix holds none of these prompt formats, but it holds what the skills compute in
running-text forms (``"137 plus 8 is 145."``, ``"pmqa ends with a."``), next to generic text
(copying, counting runs, letter-case pairs, random words): as with a pretrained LLM, fine-tuning
teaches each model a format and a behaviour on top of knowledge the base already has.
"""

from __future__ import annotations

import random
import string
from typing import Callable, Dict, List, Tuple

LETTERS = string.ascii_lowercase
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +=?:|.,"
SKILLS = ("arithmetic", "reverse", "instruct")

Example = Tuple[str, str]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _operands(rng: random.Random, largest: int = 199) -> Tuple[int, int]:
    return rng.randint(0, largest), rng.randint(0, 9)


def arithmetic(rng: random.Random, largest: int = 199) -> Example:
    a, b = _operands(rng, largest)
    return f"{a}+{b}=", f"{a + b}."


def reverse(rng: random.Random, longest: int = 7) -> Example:
    word = _word(rng, 3, longest)
    return f"rev {word}=", f"{word[::-1]}."


INSTRUCTIONS: Dict[str, Tuple[Tuple[str, ...], Callable[[str], str]]] = {
    "first": (("first letter of {w}?", "give the first letter: {w}?"), lambda w: w[0]),
    "last": (("last letter of {w}?", "give the last letter: {w}?"), lambda w: w[-1]),
    "length": (("length of {w}?", "how many letters in {w}?"), lambda w: str(len(w))),
    "upper": (("upper case {w}?", "write {w} in capitals?"), lambda w: w.upper()),
}


def instruct(rng: random.Random, phrasings: int = 2) -> Example:
    templates, rule = INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))]
    word = _word(rng, 3, 7)
    return rng.choice(templates[:phrasings]).format(w=word), f"{rule(word)}."


# The narrow slice of each skill's prompt format that the pretraining text holds (the rest of the
# format's domain, which the evaluation covers, only the fine-tuned models see)
NARROW: Dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": lambda rng: arithmetic(rng, largest=49),
    "reverse": lambda rng: reverse(rng, longest=4),
    "instruct": lambda rng: instruct(rng, phrasings=1),
}


GENERATORS: Dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "instruct": instruct,
}


def skill_knowledge(rng: random.Random) -> str:
    """What the skills compute, in other surface forms than their prompts (as a pretrained LM has
    seen sums and words in running text but not the task's prompt format)."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = _operands(rng)
        return f"{a} plus {b} is {a + b}."
    word = _word(rng, 3, 7)
    if kind == 1:
        return f"{word} backwards is {word[::-1]}."
    if kind == 2:
        return f"{word} starts with {word[0]}."
    if kind == 3:
        return f"{word} ends with {word[-1]}."
    if kind == 4:
        return f"{word} has {len(word)} letters."
    return f"{word} in capitals is {word.upper()}."


def pretraining_text(
    rng: random.Random,
    knowledge: float = 0.5,
    formats: float = 0.0,
    exclude: frozenset = frozenset(),
) -> str:
    """One line of the pretraining mix: with probability ``formats`` a prompt in the narrow slice
    of a skill's format (:data:`NARROW`, never a prompt of ``exclude``, the held-out prompts),
    with probability ``knowledge`` a :func:`skill_knowledge` line, else generic text (copying,
    counting, case pairs, words)."""
    u = rng.random()
    if u < formats:
        while True:
            prompt, answer = NARROW[rng.choice(SKILLS)](rng)
            if prompt not in exclude:
                return prompt + answer
    if u < formats + knowledge:
        return skill_knowledge(rng)
    kind = rng.randrange(4)
    if kind == 0:  # copying
        word = _word(rng, 2, 9)
        return f"{word}|{word}."
    if kind == 1:  # counting runs over digits, numbers or letters
        start, n = rng.randint(0, 90), rng.randint(3, 7)
        if rng.random() < 0.5:
            return " ".join(str(start + i) for i in range(n)) + "."
        s = rng.randrange(26 - n)
        return LETTERS[s : s + n] + "."
    if kind == 2:  # letter-case pairs
        word = _word(rng, 2, 6)
        return " ".join(c + c.upper() for c in word) + "."
    return " ".join(_word(rng, 1, 6) for _ in range(rng.randint(2, 5))) + "."


# Distinct prompts a skill can draw (where the domain is small enough to matter)
CAPACITY: Dict[str, int] = {"arithmetic": 200 * 10}


def draw_splits(skill: str, sizes: Dict[str, int], seed: int) -> Dict[str, List[Example]]:
    """Disjoint ``train`` / ``val`` / ``test`` examples of ``skill`` (no prompt in two splits).

    Held-out prompts are drawn first (test, then val) so that the train split never holds an
    evaluation prompt; the train split is cut to what the skill's domain has left
    (:data:`CAPACITY`). The draw is deterministic in ``seed``.
    """
    if skill not in GENERATORS:
        raise KeyError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    sizes = dict(sizes)
    if skill in CAPACITY:
        sizes["train"] = min(sizes["train"], CAPACITY[skill] - sizes["test"] - sizes["val"])
    rng = random.Random(f"{skill}-{seed}")
    seen, out = set(), {}
    for split in ("test", "val", "train"):
        rows, tries = [], 0
        while len(rows) < sizes[split]:
            prompt, answer = GENERATORS[skill](rng)
            tries += 1
            if tries > 50 * sizes[split] + 1000:
                raise RuntimeError(f"skill {skill!r}: cannot draw {sizes[split]} distinct prompts")
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append((prompt, answer))
        out[split] = rows
    return out
