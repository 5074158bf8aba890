"""The tiny world's questions beyond one word: `describe` (every object, left to right), `ground` (an object's box in
image coordinates) and `read` (the glyphs written in the scene), each with one exactly checkable answer, and the
rules that score them.

How much of the image a question needs varies within each kind: a scene holds 1-3 objects to describe, one of 1-3
to ground, and 1-4 glyphs to read. Glyphs are large black letters or digits (Pillow's own FreeType font), written
as one word where no shape is; only scenes that carry a word get `read` questions. Answers:
- describe: "small red circle, large blue square" — objects by their x centre, left to right (ties: top first);
- ground: "[x1, y1, x2, y2]" — the object's drawn box, in pixels of the 112 px image, corners included;
- read: the word, "K4".
Scores: describe by exact match and per-object F1 (objects as a multiset); ground by IoU ≥ 0.5 and the mean IoU
(a prediction that is no box scores IoU 0); read by exact match.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from llava.world.generate import IMAGE_SIZE, SHORT_ANSWER, SIZES, Shape

LONG_KINDS = ("describe", "ground", "read")
GLYPHS = "ACEFHKLMNPRTUXY3479"  # capitals and digits no other one resembles at this size
GLYPH_SIZE = 20  # font size in pixels: glyphs about 13 x 14 px, two tower patches a side
GLYPH_GAP = 3  # pixels between glyphs, so that each stays one blob
GLYPH_COLOUR = (0, 0, 0)
IOU_CORRECT = 0.5
PROMPTS = {  # what follows the question instead of the short-answer instruction
    "describe": "\nList every object from left to right as size colour shape, separated by commas.",
    "ground": "\nAnswer with its box as [x1, y1, x2, y2] in pixels.",
    "read": SHORT_ANSWER,
}


def instruction(kind: str) -> str:
    """What follows a question of `kind`: a long kind's own instruction, else LLaVA's short-answer one."""
    return PROMPTS.get(kind, SHORT_ANSWER)


@dataclass(frozen=True)
class Word:
    """Glyphs written left to right from (x, y), the top-left corner of the first one's box."""

    text: str
    x: int
    y: int

    def glyph_boxes(self) -> list[tuple[int, int, int, int]]:
        """Each glyph's (x1, y1, x2, y2) ink box, as drawn."""
        font, boxes, left = glyph_font(), [], self.x
        for char in self.text:
            x1, y1, x2, y2 = font.getbbox(char)
            boxes.append((left, self.y, left + x2 - x1 - 1, self.y + y2 - y1 - 1))
            left += x2 - x1 + GLYPH_GAP
        return boxes

    def box(self) -> tuple[int, int, int, int]:
        boxes = self.glyph_boxes()
        return boxes[0][0], min(b[1] for b in boxes), boxes[-1][2], max(b[3] for b in boxes)


def glyph_font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=GLYPH_SIZE)


def shape_box(shape: Shape) -> tuple[int, int, int, int]:
    half = SIZES[shape.size]
    return shape.x - half, shape.y - half, shape.x + half, shape.y + half


def _clear(box, others, margin: int = 3) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + margin < a1 or a2 + margin < x1 or y2 + margin < b1 or b2 + margin < y1 for a1, b1, a2, b2 in others)


def random_word(shapes: list[Shape], rng: random.Random, attempts: int = 200) -> Word | None:
    """1-4 glyphs placed where no shape is (fewer when the scene leaves no room; None when not even one fits)."""
    length = rng.randint(1, 4)
    while length:
        text = "".join(rng.choice(GLYPHS) for _ in range(length))
        for _ in range(attempts):
            word = Word(text, rng.randint(2, IMAGE_SIZE - 20), rng.randint(2, IMAGE_SIZE - 18))
            x1, y1, x2, y2 = word.box()
            if x2 < IMAGE_SIZE - 2 and y2 < IMAGE_SIZE - 2 and _clear(word.box(), [shape_box(s) for s in shapes]):
                return word
        length -= 1
    return None


def write_word(image: Image.Image, word: Word | None) -> Image.Image:
    if word is not None:
        draw, font = ImageDraw.Draw(image), glyph_font()
        for char, (x1, y1, _, _) in zip(word.text, word.glyph_boxes()):
            left, top, _, _ = font.getbbox(char)
            draw.text((x1 - left, y1 - top), char, font=font, fill=GLYPH_COLOUR)
    return image


def in_reading_order(shapes: list[Shape]) -> list[Shape]:
    return sorted(shapes, key=lambda shape: (shape.x, shape.y))


def describe(shapes: list[Shape]) -> str:
    return ", ".join(f"{s.size} {s.colour} {s.kind}" for s in in_reading_order(shapes))


def box_text(box: tuple[int, int, int, int]) -> str:
    return "[" + ", ".join(str(value) for value in box) + "]"


def ask_long(kind: str, shapes: list[Shape], word: Word | None, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of a long kind about the scene, None when it cannot support one."""
    if kind == "describe":
        return "Describe every object from left to right.", describe(shapes)
    if kind == "ground":
        shape = rng.choice(shapes)
        return f"Where is the {shape.size} {shape.colour} {shape.kind}?", box_text(shape_box(shape))
    if kind == "read" and word is not None:
        return "What is written?", word.text
    return None


# -- scoring --------------------------------------------------------------------------------------------------------

def objects(text: str) -> Counter:
    return Counter(part.strip().rstrip(".").lower() for part in text.split(",") if part.strip().rstrip("."))


def object_f1(prediction: str, truth: str) -> float:
    predicted, true = objects(prediction), objects(truth)
    overlap = sum((predicted & true).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(true.values())
    return 2 * precision * recall / (precision + recall)


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    match = re.fullmatch(r"\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]\s*\.?\s*", text)
    return tuple(int(value) for value in match.groups()) if match else None


def iou(box: tuple[int, int, int, int] | None, other: tuple[int, int, int, int]) -> float:
    """Intersection over union of two pixel boxes, corners included; 0 for no box or an empty one."""
    if box is None or box[2] < box[0] or box[3] < box[1]:
        return 0.0
    width = min(box[2], other[2]) - max(box[0], other[0]) + 1
    height = min(box[3], other[3]) - max(box[1], other[1]) + 1
    inter = max(width, 0) * max(height, 0)
    area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)  # noqa: E731
    return inter / (area(box) + area(other) - inter)


def score(kind: str, prediction: str, truth: str) -> dict:
    """{"correct": bool, and the kind's graded measure: "f1" (describe) or "iou" (ground)}; exact match elsewhere."""
    if kind == "ground":
        overlap = iou(parse_box(prediction), parse_box(truth))
        return {"correct": overlap >= IOU_CORRECT, "iou": overlap}
    exact = prediction.strip().rstrip(".").lower() == truth.strip().lower()
    if kind == "describe":
        return {"correct": exact, "f1": object_f1(prediction, truth)}
    return {"correct": exact}
