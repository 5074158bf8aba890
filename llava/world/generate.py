"""The embedded tiny world: synthetic scenes of coloured shapes and questions about them, in LLaVA's formats.

    python -m llava.world.generate --out playground/data/tiny_world [--train 20000] [--test 2000] [--seed 0]

Writes, under OUT, in the layout LLaVA's scripts expect (so `scripts/v1_5/eval/gqa.sh` runs on it with
EVAL_ROOT=OUT/eval, its default):
- `images/NNNNN.png` (training) and `eval/gqa/data/images/NNNNN.png` (held out): 1 to 3 shapes (circle, square,
  triangle) of 5 colours and 2 sizes on a grey background;
- `train.json`: LLaVA training conversations (up to 4 questions of different kinds per image, with
  `--relational-questions` more of the relational kinds or of `--extra-kinds`, `--only-kinds` to keep the turns of
  some kinds only;
  `<image>` first, short answers), and
  `train_single_turn.json`: the first question of each (gate training uses single turns, as the paper does);
- `eval/gqa/llava_gqa_testdev_balanced.jsonl`: GQA-style questions (`question_id`, `image`, `text` with LLaVA's
  short-answer suffix, `category` = question kind);
- `eval/gqa/data/testdev_balanced_questions.json`: GQA's ground-truth layout ({question_id: {"answer", "types":
  {"structural", ...}}}), so `llava.eval.eval_gqa` scores the world unchanged;
- `world.json`: the settings it was made with and its counts per kind. `--reuse` keeps a folder whose record
  matches the settings asked for, and writes the world afresh otherwise (the quickstart's way never to evaluate an
  older world by mistake).

Question kinds: colour, shape, position (left/right), counting, existence (yes/no), comparison (size). Every
question names an object by an attribute only it has in its scene, so each has exactly one right answer. The
same seed always gives the same world.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw
from tqdm import tqdm

IMAGE_SIZE = 112
BACKGROUND = (128, 128, 128)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40), "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}  # half-widths in pixels
KINDS = ("colour", "shape", "position", "counting", "existence", "comparison")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
NUMBER_WORDS = {1: "1", 2: "2", 3: "3"}
TRAIN_IMAGES = "images"
TRAIN_DATA = "train.json"  # multi-turn: several questions per image, for training the world's LLaVA
GATE_TRAIN_DATA = "train_single_turn.json"  # the first question of each, as the paper trains gates on single turns
TEST_QUESTIONS = "eval/gqa/llava_gqa_testdev_balanced.jsonl"
TEST_TRUTH = "eval/gqa/data/testdev_balanced_questions.json"
WORLD_RECORD = "world.json"  # the settings the world was made with, and its counts
TEST_IMAGES = "eval/gqa/data/images"


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: int
    y: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def random_scene(rng: random.Random) -> list[Shape]:
    """1-3 shapes, no two overlapping and no two with the same colour and kind."""
    shapes: list[Shape] = []
    target, attempts = rng.randint(1, 3), 0
    while len(shapes) < target:
        attempts += 1
        if attempts > 100:  # the shapes placed so far leave no room: start the scene again
            shapes, attempts = [], 0
        size = rng.choice(list(SIZES))
        half = SIZES[size]
        x, y = rng.randint(half + 2, IMAGE_SIZE - half - 3), rng.randint(half + 2, IMAGE_SIZE - half - 3)
        shape = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), size, x, y)
        clear = all(abs(shape.x - s.x) > half + SIZES[s.size] + 2 or abs(shape.y - s.y) > half + SIZES[s.size] + 2 for s in shapes)
        if clear and all(s.name != shape.name for s in shapes):
            shapes.append(shape)
    return shapes


def draw_shapes(image: Image.Image, shapes: list[Shape], fills: list) -> Image.Image:
    """Draw each shape onto `image` filled with its entry of `fills` (a colour, or a label in an "L" image)."""
    draw = ImageDraw.Draw(image)
    for shape, fill in zip(shapes, fills, strict=True):
        half = SIZES[shape.size]
        box = (shape.x - half, shape.y - half, shape.x + half, shape.y + half)
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(shape.x, shape.y - half), (shape.x - half, shape.y + half), (shape.x + half, shape.y + half)], fill=fill)
    return image


def render(shapes: list[Shape]) -> Image.Image:
    return draw_shapes(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND), shapes, [COLOURS[s.colour] for s in shapes])


def object_map(shapes: list[Shape]) -> Image.Image:
    """Per pixel: 0 for background, i + 1 where shape i is drawn (the same pixels `render` colours)."""
    return draw_shapes(Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0), shapes, list(range(1, len(shapes) + 1)))


def _unique(shapes: list[Shape], attribute: str) -> list[Shape]:
    """Shapes whose `attribute` value no other shape in the scene shares."""
    values = [getattr(s, attribute) for s in shapes]
    return [s for s in shapes if values.count(getattr(s, attribute)) == 1]


def ask(kind: str, shapes: list[Shape], rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of this kind about the scene, or None when the scene cannot support one."""
    if kind == "colour":
        candidates = _unique(shapes, "kind")
        if candidates:
            shape = rng.choice(candidates)
            return f"What colour is the {shape.kind}?", shape.colour
    elif kind == "shape":
        candidates = _unique(shapes, "colour")
        if candidates:
            shape = rng.choice(candidates)
            return f"What shape is the {shape.colour} object?", shape.kind
    elif kind == "position":
        if len(shapes) >= 2:
            a, b = rng.sample(shapes, 2)
            if abs(a.x - b.x) > 8:
                side = "left" if a.x < b.x else "right"
                return f"Is the {a.name} to the left or to the right of the {b.name}?", side
    elif kind == "counting":
        return "How many shapes are there?", NUMBER_WORDS[len(shapes)]
    elif kind == "existence":
        if rng.random() < 0.5:
            shape = rng.choice(shapes)
            return f"Is there a {shape.name}?", "yes"
        absent = [f"{c} {k}" for c in COLOURS for k in SHAPES if all(s.name != f"{c} {k}" for s in shapes)]
        return f"Is there a {rng.choice(absent)}?", "no"
    elif kind == "comparison":
        pairs = [(a, b) for a in shapes for b in shapes if a.size != b.size]
        if pairs:
            a, b = rng.choice(pairs)
            return f"Is the {a.name} bigger than the {b.name}?", "yes" if a.size == "large" else "no"
    return None


RELATIONAL = ("position", "comparison", "existence")  # the kinds that bind a name to an object: the slowest to learn
EXTRA_ATTEMPTS = 20  # draws per extra question before the scene is taken to have no new one of its kind


def questions_about(shapes: list[Shape], rng: random.Random, limit: int) -> list[tuple[str, str, str]]:
    """Up to `limit` (kind, question, answer) of distinct kinds, in random order; at least one (counting always fits)."""
    kinds = rng.sample(KINDS, len(KINDS))
    asked = [(kind, *qa) for kind in kinds if (qa := ask(kind, shapes, rng)) is not None]
    return asked[:limit]


def relational_questions(
    shapes: list[Shape], asked: list, count: int, rng: random.Random, kinds: tuple[str, ...] = RELATIONAL,
) -> list[tuple[str, str, str]]:
    """Up to `count` more (kind, question, answer) of `kinds`, none already in `asked` (e.g. the same pair the other
    way round): the hardest kinds get more of the answer loss at no extra image tokens."""
    seen, extra = {question for _, question, _ in asked}, []
    for _ in range(count):
        for _ in range(EXTRA_ATTEMPTS):
            kind = rng.choice(kinds)
            qa = ask(kind, shapes, rng)
            if qa is not None and qa[0] not in seen:
                extra.append((kind, *qa))
                seen.add(qa[0])
                break
    return extra


def generate(
    out: str, train: int, test: int, seed: int, questions_per_image: int = 4, relational: int = 0,
    only_kinds: tuple[str, ...] | None = None, extra_kinds: tuple[str, ...] = RELATIONAL,
    long_kinds: tuple[str, ...] = (),
) -> dict:
    """Write the world; returns counts of questions per split and kind. The `relational` extra turns per training
    image are of `extra_kinds`. `only_kinds` keeps only the training turns of those kinds (drawn as without it, so
    scenes and held-out split stay the same; an image left with no turn drops out of the training files): a
    focused curriculum for a kind the model has not learned; `extra_kinds` weights one within the whole world.
    `long_kinds` (llava.world.long_answers) adds a turn of each to every training image, at random places in its
    conversation, and asks them of their share of the test images; with `read`, half the scenes carry a word. They
    draw from their own stream: the shapes and the other turns stay those of the same seed without them."""
    from llava.world.long_answers import ask_long, instruction, random_word, write_word  # it builds on our scenes

    rng = random.Random(seed)
    relational_rng = random.Random(f"relational-{seed}")  # its own stream: the extra turns change nothing else
    long_rng = random.Random(f"long-{seed}")  # likewise for the long kinds and the words
    for folder in (TRAIN_IMAGES, TEST_IMAGES):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    multi_turn, single_turn, questions, truth = [], [], [], {}
    kinds = KINDS + tuple(long_kinds)
    counts = {"train": dict.fromkeys(kinds, 0), "test": dict.fromkeys(kinds, 0)}
    for index in tqdm(range(train + test), desc="generating the tiny world", unit="image"):
        shapes = random_scene(rng)
        asked = questions_about(shapes, rng, questions_per_image if index < train else 1)
        word = random_word(shapes, long_rng) if "read" in long_kinds and long_rng.random() < 0.5 else None
        long_turns = [(kind, *qa) for kind in long_kinds if (qa := ask_long(kind, shapes, word, long_rng)) is not None]
        if index < train:
            asked += relational_questions(shapes, asked, relational, relational_rng, extra_kinds)
            for turn in long_turns:  # anywhere in the conversation, first included, as they are asked at test time
                asked.insert(long_rng.randint(0, len(asked)), turn)
            asked = [turn for turn in asked if only_kinds is None or turn[0] in only_kinds]
        elif long_turns and long_rng.random() < len(long_kinds) / len(kinds):
            asked = [long_rng.choice(long_turns)]
        image = f"{index:05d}.png"
        picture = write_word(render(shapes), word)
        picture.save(os.path.join(out, TRAIN_IMAGES if index < train else TEST_IMAGES, image))
        if index >= train:
            kind, question, answer = asked[0]
            counts["test"][kind] += 1
            question_id = f"world-{index:05d}"
            questions.append({"question_id": question_id, "image": image, "text": question + instruction(kind), "category": kind})
            # GQA's answers are lower case, as its scorer compares predictions (a word is read "K4", scored "k4")
            truth[question_id] = {"answer": answer.lower(), "question": question, "types": {"structural": kind, "semantic": kind}}
        elif asked:
            turns = []
            for turn, (kind, question, answer) in enumerate(asked):
                counts["train"][kind] += 1
                turns += [
                    {"from": "human", "value": ("<image>\n" if turn == 0 else "") + question + instruction(kind)},
                    {"from": "gpt", "value": answer},
                ]
            multi_turn.append({"id": f"world-{index:05d}", "image": image, "conversations": turns})
            single_turn.append({**multi_turn[-1], "conversations": turns[:2]})
    with open(os.path.join(out, TRAIN_DATA), "w") as handle:
        json.dump(multi_turn, handle)
    with open(os.path.join(out, GATE_TRAIN_DATA), "w") as handle:
        json.dump(single_turn, handle)
    with open(os.path.join(out, TEST_QUESTIONS), "w") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in questions)
    with open(os.path.join(out, TEST_TRUTH), "w") as handle:
        json.dump(truth, handle)
    return counts


def settings_record(args: argparse.Namespace) -> dict:
    """What a world is made from: every generation setting, with lists as written."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(args).items()
            if name not in ("out", "reuse")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="playground/data/tiny_world")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions-per-image", type=int, default=4, help="training conversations' turns of distinct kinds")
    parser.add_argument(
        "--relational-questions", type=int, default=0,
        help="extra training turns per image, of the --extra-kinds",
    )
    parser.add_argument(
        "--extra-kinds", default=",".join(RELATIONAL), type=lambda text: tuple(text.split(",")),
        help=f"comma-separated kinds the extra turns are drawn from [{','.join(RELATIONAL)}]",
    )
    parser.add_argument(
        "--only-kinds", default=None, type=lambda text: tuple(text.split(",")),
        help=f"comma-separated kinds ({', '.join(KINDS)}): training turns of these kinds only",
    )
    parser.add_argument(
        "--long-kinds", default=(), type=lambda text: tuple(text.split(",")),
        help="comma-separated long kinds (describe, ground, read) added to the world's questions",
    )
    parser.add_argument("--reuse", action="store_true",
                        help=f"keep OUT if its {WORLD_RECORD} records these same settings (else write it afresh)")
    args = parser.parse_args(argv)
    from llava.world.long_answers import LONG_KINDS

    every = KINDS + tuple(kind for kind in LONG_KINDS if kind in args.long_kinds)
    for option, kinds, known in (("--only-kinds", args.only_kinds, every), ("--extra-kinds", args.extra_kinds, KINDS),
                                 ("--long-kinds", args.long_kinds, LONG_KINDS)):
        unknown = sorted(set(kinds or ()) - set(known))
        if unknown:
            parser.error(f"{option}: unknown kind(s) {', '.join(unknown)}; the kinds are {', '.join(known)}")
    record_path, settings = os.path.join(args.out, WORLD_RECORD), settings_record(args)
    if args.reuse and os.path.isfile(record_path):
        with open(record_path) as handle:
            if json.load(handle).get("settings") == settings:
                print(f"{args.out}: the world of these settings is there ({WORLD_RECORD}); kept")
                return
        print(f"{args.out}: its {WORLD_RECORD} records other settings; writing the world afresh")
    counts = generate(
        args.out, args.train, args.test, args.seed, args.questions_per_image, args.relational_questions,
        args.only_kinds, args.extra_kinds, args.long_kinds,
    )
    with open(record_path, "w") as handle:
        json.dump({"settings": settings, "counts": counts}, handle, indent=1)
    for split, per_kind in counts.items():
        print(f"{split}: " + ", ".join(f"{kind} {n}" for kind, n in per_kind.items()))


if __name__ == "__main__":
    main()
