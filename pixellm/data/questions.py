"""Question families over a shape scene: referring, multi-referring, reasoning, counting, no target.

Every question carries its targets in answer order and an answer text holding one ``{seg}`` after
each target description (the MUSE ``text_answers`` convention). The wording stays inside the tiny
tokenizer's word list (pixellm/model/tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pixellm.data.world import COLOURS, COOL, POINTY, ROUND, SHAPES, SIZES, WARM, Scene, Shape

__all__ = [
    "MAX_TARGETS",
    "Question",
    "count_question",
    "join_names",
    "multi_refer_question",
    "no_target_question",
    "reasoning_questions",
    "refer_question",
    "relation_question",
    "segment_answer",
]

MAX_TARGETS = 6  # questions with more targets are not generated (keeps answers short)
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class Question:
    """One question about a scene. ``targets`` are in answer order; ``answer`` holds ``{seg}``s."""

    family: str  # refer | multi_refer | reason | relation | count | none
    text: str
    targets: list[Shape]
    answer: str


def join_names(names: list[str]) -> str:
    """``["a", "b", "c"]`` → ``"a, b and c"``."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def segment_answer(descriptions: list[str], none_text: str) -> str:
    """One ``"the <description> {seg}"`` per target, joined; ``none_text`` when there are none."""
    if not descriptions:
        return none_text
    return join_names([f"the {d} {{seg}}" for d in descriptions]) + "."


def refer_question(scene: Scene, shape: Shape) -> Question:
    """ "Please segment the small red circle." — exactly one target."""
    return Question(
        "refer",
        f"Please segment the {shape.description}.",
        [shape],
        segment_answer([shape.description], ""),
    )


def multi_refer_question(scene: Scene, shapes: list[Shape]) -> Question:
    """Several named shapes, answered in the order they were asked."""
    names = join_names([f"the {s.description}" for s in shapes])
    return Question(
        "multi_refer",
        f"Please segment {names}.",
        list(shapes),
        segment_answer([s.description for s in shapes], ""),
    )


def _group(scene: Scene, text: str, keep: Callable[[Shape], bool], none: str) -> Question:
    targets = scene.left_to_right([s for s in scene.shapes if keep(s)])
    return Question("reason", text, targets, segment_answer([t.description for t in targets], none))


def reasoning_questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """Attribute reasoning: could roll, sharp corners, warm/cool colours, one colour, one kind."""
    colours = sorted({s.colour for s in scene.shapes})
    colour = colours[int(rng.integers(len(colours)))]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    return [
        _group(
            scene, "Which shapes could roll?", lambda s: s.kind in ROUND, "No shape could roll."
        ),
        _group(
            scene,
            "Which shapes have sharp corners?",
            lambda s: s.kind in POINTY,
            "No shape has sharp corners.",
        ),
        _group(
            scene,
            "Please segment the warm coloured shapes.",
            lambda s: s.colour in WARM,
            "There are no warm coloured shapes.",
        ),
        _group(
            scene,
            "Please segment the cool coloured shapes.",
            lambda s: s.colour in COOL,
            "There are no cool coloured shapes.",
        ),
        _group(
            scene,
            f"Please segment all the {colour} shapes.",
            lambda s: s.colour == colour,
            f"There are no {colour} shapes.",
        ),
        _group(
            scene,
            f"Please segment all the {kind}s.",
            lambda s: s.kind == kind,
            f"There are no {kind}s in this image.",
        ),
    ]


def relation_question(scene: Scene, anchor: Shape, side: str, extreme: str) -> Question:
    """ "the largest shape left of the blue square" — one target, or none."""
    if side == "left":
        cands = [s for s in scene.shapes if s is not anchor and s.cx < anchor.cx]
    else:
        cands = [s for s in scene.shapes if s is not anchor and s.cx > anchor.cx]
    text = f"Please segment the {extreme} shape {side} of the {anchor.description}."
    if not cands:
        return Question(
            "relation", text, [], f"There is no shape {side} of the {anchor.description}."
        )
    pick = (
        max(cands, key=lambda s: s.size_rank)
        if extreme == "largest"
        else min(cands, key=lambda s: s.size_rank)
    )
    return Question("relation", text, [pick], segment_answer([pick.description], ""))


def no_target_question(scene: Scene, rng: np.random.Generator) -> Question:
    """A referring question about a shape that is not in the scene; zero targets."""
    present = {s.description for s in scene.shapes}
    for _ in range(50):
        desc = (
            f"{list(SIZES)[int(rng.integers(3))]} {list(COLOURS)[int(rng.integers(len(COLOURS)))]} "
            f"{SHAPES[int(rng.integers(len(SHAPES)))]}"
        )
        if desc not in present:
            break
    return Question("none", f"Please segment the {desc}.", [], f"There is no {desc} in this image.")


def count_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Counting VQA without masks: ``(question, answer)``."""
    if rng.random() < 0.5:
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        n = sum(s.kind == kind for s in scene.shapes)
        plural, noun = f"{kind}s", (kind if n == 1 else f"{kind}s")
    else:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        n = sum(s.colour == colour for s in scene.shapes)
        plural, noun = f"{colour} shapes", (f"{colour} shape" if n == 1 else f"{colour} shapes")
    verb = "is" if n == 1 else "are"
    return f"How many {plural} are there?", f"There {verb} {_NUMBERS[n]} {noun}."
