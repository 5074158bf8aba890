"""The tiny world: deterministic, in LLaVA's formats, and every answer — and every patch label the vision tower is
pretrained on — right according to an independent reading of the rendered image (colour blobs found by flood
fill; shape from how much of its box a blob fills)."""

import json
import random
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from llava.eval.eval_gqa import score_gqa
from llava.eval.io import read_jsonl
from llava.world.generate import (
    COLOURS,
    GATE_TRAIN_DATA,
    KINDS,
    RELATIONAL,
    TEST_IMAGES,
    TEST_QUESTIONS,
    TEST_TRUTH,
    TRAIN_DATA,
    generate,
    main as generate_main,
    random_scene,
    render,
)
from llava.world.long_answers import GLYPH_SIZE, GLYPHS, LONG_KINDS, PROMPTS
from llava.world.pretrain_tower import ATTRIBUTES, patch_labels


def palette_masks(image):
    """{colour: (H, W) bool} of the pixels drawn in each palette colour."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return {colour: np.abs(pixels - np.array(rgb)).sum(-1) < 30 for colour, rgb in COLOURS.items()}


def connected_components(mask, diagonal=False):
    """The pixel lists of `mask`'s connected blobs (4-neighbours, or 8 with `diagonal`)."""
    height, width = mask.shape
    seen = np.zeros((height, width), dtype=bool)
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if diagonal else [])
    components = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, points = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            points.append((cy, cx))
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(points)
    return components


def read_objects(image):
    """[(colour, shape, size, x_centre, y_centre, (x1, y1, x2, y2))] for every blob of a palette colour."""
    blobs = []
    for colour, drawn in palette_masks(image).items():
        for points in connected_components(drawn):
            ys, xs = zip(*points)
            box = (max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1)
            fill = len(points) / box
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            size = "large" if max(xs) - min(xs) > 40 else "small"
            blobs.append((colour, shape, size, (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2,
                          (min(xs), min(ys), max(xs), max(ys))))
    return blobs


def read_scene(image):
    """[(colour, shape, size, x_centre)] for every blob of a palette colour."""
    return [blob[:4] for blob in read_objects(image)]


def glyph_templates():
    """{char: its ink mask}, each glyph drawn alone in the world's font: what the word's blobs are matched to."""
    templates = {}
    for char in GLYPHS:
        canvas = Image.new("L", (40, 40), 128)
        ImageDraw.Draw(canvas).text((5, 5), char, font=ImageFont.load_default(size=GLYPH_SIZE), fill=0)
        ink = np.asarray(canvas) < 64
        ys, xs = np.nonzero(ink)
        templates[char] = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return templates


def read_word(image):
    """The dark blobs left to right, each read as the glyph whose ink it overlaps most ("" without any)."""
    ink = np.asarray(image.convert("L")) < 64
    templates, word = glyph_templates(), []
    for points in sorted(connected_components(ink, diagonal=True), key=lambda points: min(x for _, x in points)):
        ys, xs = zip(*points)
        crop = ink[min(ys) : max(ys) + 1, min(xs) : max(xs) + 1]

        def overlap(template):
            height, width = max(crop.shape[0], template.shape[0]), max(crop.shape[1], template.shape[1])
            a, b = np.zeros((height, width), bool), np.zeros((height, width), bool)
            a[: crop.shape[0], : crop.shape[1]], b[: template.shape[0], : template.shape[1]] = crop, template
            return (a & b).sum() / (a | b).sum()

        word.append(max(templates, key=lambda char: overlap(templates[char])))
    return "".join(word)


def expected_long_answer(question, image):
    objects = read_objects(image)
    if question == "Describe every object from left to right.":
        return ", ".join(f"{size} {colour} {shape}" for colour, shape, size, *_ in sorted(objects, key=lambda o: o[3:5]))
    if m := re.fullmatch(r"Where is the (\w+) (\w+) (\w+)\?", question):
        box = next(o[5] for o in objects if (o[2], o[0], o[1]) == (m[1], m[2], m[3]))
        return "[" + ", ".join(map(str, box)) + "]"
    if question == "What is written?":
        return read_word(image)
    return None


def expected_answer(question, blobs):
    names = {f"{c} {s}": (c, s, size, x) for c, s, size, x in blobs}
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return next(c for c, s, _, _ in blobs if s == m[1])
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return next(s for c, s, _, _ in blobs if c == m[1])
    if m := re.fullmatch(r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?", question):
        return "left" if names[m[1]][3] < names[m[2]][3] else "right"
    if question == "How many shapes are there?":
        return str(len(blobs))
    if m := re.fullmatch(r"Is there a (\w+ \w+)\?", question):
        return "yes" if m[1] in names else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) bigger than the (\w+ \w+)\?", question):
        return "yes" if (names[m[1]][2], names[m[2]][2]) == ("large", "small") else "no"
    raise AssertionError(f"unknown question {question!r}")


def check_training_conversations(world, counts, images, max_turns):
    """Every training turn is a distinct question answered right by the pixels; the single-turn file is each first."""
    train = json.loads((world / TRAIN_DATA).read_text())
    assert len(train) == images and sum(counts["train"].values()) == sum(len(r["conversations"]) // 2 for r in train)
    for record in train:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and 1 <= len(turns) // 2 <= max_turns
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        image = Image.open(world / "images" / record["image"])
        blobs = read_scene(image)
        asked = [t["value"].removeprefix("<image>\n").split("\n")[0] for t in turns[::2]]
        assert len(set(asked)) == len(asked)
        for question, answer in zip(asked, turns[1::2]):
            long = expected_long_answer(question, image)
            assert answer["value"] == (long if long is not None else expected_answer(question, blobs)), question
    single = json.loads((world / GATE_TRAIN_DATA).read_text())
    assert single == [{**record, "conversations": record["conversations"][:2]} for record in train]


def test_world_answers_match_the_pictures(tmp_path):
    counts = generate(str(tmp_path), train=60, test=60, seed=5)
    assert sum(counts["test"].values()) == 60 and all(n > 0 for n in counts["test"].values())
    questions = read_jsonl(str(tmp_path / TEST_QUESTIONS), ("question_id", "image", "text", "category"))
    truth = json.loads((tmp_path / TEST_TRUTH).read_text())
    for question in questions:
        blobs = read_scene(Image.open(tmp_path / TEST_IMAGES / question["image"]))
        asked = question["text"].split("\n")[0]
        assert truth[question["question_id"]]["answer"] == expected_answer(asked, blobs), (question, blobs)
    check_training_conversations(tmp_path, counts, images=60, max_turns=4)
    # GQA's scorer reads the world as it is: the truth itself scores 100.
    predictions = [{"questionId": q, "prediction": t["answer"]} for q, t in truth.items()]
    assert score_gqa(truth, predictions)["accuracy"] == 100.0


def test_long_answers_match_the_pictures_and_leave_the_rest_of_the_world(tmp_path):
    """describe, ground and read, re-read from the pixels (palette blobs in reading order, their boxes, the dark
    blobs matched to glyphs), on held-out and training turns; the shapes and the other turns stay the world's."""
    plain = generate(str(tmp_path / "plain"), train=80, test=150, seed=5)
    counts = generate(str(tmp_path / "long"), train=80, test=150, seed=5, long_kinds=LONG_KINDS)
    assert all(counts["test"][kind] > 0 and counts["train"][kind] > 0 for kind in LONG_KINDS)
    assert counts["train"]["describe"] == counts["train"]["ground"] == 80  # one of each per training image
    assert {kind: counts["train"][kind] for kind in KINDS} == plain["train"]
    questions = read_jsonl(str(tmp_path / "long" / TEST_QUESTIONS), ("question_id", "image", "text", "category"))
    truth = json.loads((tmp_path / "long" / TEST_TRUTH).read_text())
    lengths = {kind: set() for kind in LONG_KINDS}
    for question in questions:
        image = Image.open(tmp_path / "long" / TEST_IMAGES / question["image"])
        asked, kind = question["text"].split("\n")[0], question["category"]
        long = expected_long_answer(asked, image)
        answer = truth[question["question_id"]]["answer"]
        assert answer == (long if long is not None else expected_answer(asked, read_scene(image))).lower(), question
        if kind in LONG_KINDS:
            assert question["text"].endswith(PROMPTS[kind])
            lengths[kind].add(len(answer.split(", ")) if kind == "describe" else len(answer))
    assert lengths["describe"] == {1, 2, 3} and len(lengths["read"]) >= 3  # 1-3 objects, 1-4 glyphs
    check_training_conversations(tmp_path / "long", counts, images=80, max_turns=7)
    # A word is drawn only where no shape is: the shapes read the same as in the world without words.
    for name in ("images/00003.png", "images/00011.png"):
        assert read_scene(Image.open(tmp_path / "long" / name)) == read_scene(Image.open(tmp_path / "plain" / name))


def test_relational_questions_add_right_answers_of_the_relational_kinds(tmp_path):
    plain = generate(str(tmp_path / "plain"), train=60, test=20, seed=5, questions_per_image=6)
    richer = generate(str(tmp_path / "richer"), train=60, test=20, seed=5, questions_per_image=6, relational=3)
    check_training_conversations(tmp_path / "richer", richer, images=60, max_turns=9)
    extra = {kind: richer["train"][kind] - plain["train"][kind] for kind in KINDS}
    assert all(extra[kind] > 0 for kind in RELATIONAL) and all(extra[kind] == 0 for kind in KINDS if kind not in RELATIONAL)
    # The extra turns only add: the same scenes, the same first turns, the same held-out split.
    for name in (TEST_QUESTIONS, TEST_TRUTH, "images/00007.png", f"{TEST_IMAGES}/00072.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "richer" / name).read_bytes()
    plain_train, richer_train = (json.loads((tmp_path / world / TRAIN_DATA).read_text()) for world in ("plain", "richer"))
    for before, after in zip(plain_train, richer_train, strict=True):
        assert after["conversations"][: len(before["conversations"])] == before["conversations"]


def test_extra_kinds_add_turns_of_those_kinds_only(tmp_path):
    plain = generate(str(tmp_path / "plain"), train=60, test=20, seed=5, questions_per_image=6)
    weighted = generate(str(tmp_path / "weighted"), train=60, test=20, seed=5, questions_per_image=6, relational=3,
                        extra_kinds=("position",))
    check_training_conversations(tmp_path / "weighted", weighted, images=60, max_turns=9)
    extra = {kind: weighted["train"][kind] - plain["train"][kind] for kind in KINDS}
    assert extra["position"] > 0 and all(extra[kind] == 0 for kind in KINDS if kind != "position")


def test_only_kinds_keeps_those_turns_of_the_same_world(tmp_path):
    full = generate(str(tmp_path / "full"), train=60, test=20, seed=5, questions_per_image=6, relational=3)
    focused = generate(str(tmp_path / "focused"), train=60, test=20, seed=5, questions_per_image=6, relational=3,
                       only_kinds=("position",))
    assert focused["train"]["position"] == full["train"]["position"] > 0
    assert all(n == 0 for kind, n in focused["train"].items() if kind != "position")
    expected = []  # the full world's conversations, read by question wording, cut down to their left/right turns
    for record in json.loads((tmp_path / "full" / TRAIN_DATA).read_text()):
        turns = record["conversations"]
        kept = [(q["value"].removeprefix("<image>\n"), a) for q, a in zip(turns[::2], turns[1::2])
                if "to the left or to the right" in q["value"]]
        if kept:
            conversation = []
            for turn, (question, answer) in enumerate(kept):
                conversation += [{"from": "human", "value": ("<image>\n" if turn == 0 else "") + question}, answer]
            expected.append({**record, "conversations": conversation})
    assert json.loads((tmp_path / "focused" / TRAIN_DATA).read_text()) == expected
    check_training_conversations(tmp_path / "focused", focused, images=len(expected), max_turns=9)
    for name in (TEST_QUESTIONS, TEST_TRUTH, "images/00007.png", f"{TEST_IMAGES}/00072.png"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "focused" / name).read_bytes()


@pytest.mark.parametrize("option", ["--only-kinds", "--extra-kinds"])
def test_kind_options_name_an_unknown_kind(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        generate_main(["--out", str(tmp_path), "--train", "2", "--test", "1", option, "position,size"])
    assert f"{option}: unknown kind(s) size" in capsys.readouterr().err


def test_same_seed_same_world(tmp_path):
    generate(str(tmp_path / "a"), train=10, test=5, seed=1)
    generate(str(tmp_path / "b"), train=10, test=5, seed=1)
    for name in (TRAIN_DATA, GATE_TRAIN_DATA, TEST_QUESTIONS, TEST_TRUTH, "images/00007.png", f"{TEST_IMAGES}/00012.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_reuse_keeps_a_world_of_the_same_settings_only(tmp_path, capsys):
    """--reuse keeps a folder whose world.json records the settings asked for, and writes it afresh otherwise: a
    world of other kinds (or one without a record) is never evaluated by mistake."""
    out, args = tmp_path / "world", ["--train", "6", "--test", "4", "--seed", "2"]
    generate_main(["--out", str(out), *args])
    record = json.loads((out / "world.json").read_text())
    assert record["settings"]["long_kinds"] == [] and record["counts"]["test"]["colour"] >= 0
    truth = (out / TEST_TRUTH).read_text()
    (out / TEST_TRUTH).write_text("{}")  # a change --reuse must keep
    generate_main(["--out", str(out), "--reuse", *args])
    assert "kept" in capsys.readouterr().out and (out / TEST_TRUTH).read_text() == "{}"
    generate_main(["--out", str(out), "--reuse", *args, "--long-kinds", "describe"])
    assert "records other settings" in capsys.readouterr().out
    assert json.loads((out / "world.json").read_text())["settings"]["long_kinds"] == ["describe"]
    assert (out / TEST_TRUTH).read_text() != "{}"  # written afresh
    (out / "world.json").unlink()
    generate_main(["--out", str(out), "--reuse", *args])
    assert (out / TEST_TRUTH).read_text() == truth


def test_tower_patch_labels_match_the_pictures():
    """Per 8x8 patch: the colour drawn on most of it if that is at least a quarter of it (else "none"), and that
    blob's shape, size, name (colour and shape) and the 8-px column of its centre (checked where one blob has the
    colour: two could share a patch's quarter)."""
    rng, patch, checked = random.Random(11), 8, 0
    for _ in range(40):
        shapes = random_scene(rng)
        image = render(shapes)
        scene = read_scene(image)
        labels = patch_labels(shapes, patch).numpy()
        grid = image.size[0] // patch
        names, masks = zip(*palette_masks(image).items())
        cover = np.stack([m.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1) for m in masks])
        expected = np.where(cover.max(axis=0) >= 0.25, cover.argmax(axis=0) + 1, 0)
        colours = {colour for colour, _, _, _ in scene}
        if all(sum(c == colour for c, _, _, _ in scene) == 1 for colour in colours):
            assert (labels[0] == expected).all()
        assert all(((labels[0] == 0) == (row == 0)).all() for row in labels[1:])
        for colour, shape, size, x_centre in scene:
            owned = labels[0] == ATTRIBUTES["colour"].index(colour)
            if sum(c == colour for c, _, _, _ in scene) == 1 and owned.any():
                assert (labels[1][owned] == ATTRIBUTES["shape"].index(shape)).all()
                assert (labels[2][owned] == ATTRIBUTES["size"].index(size)).all()
                assert (labels[3][owned] == ATTRIBUTES["name"].index(f"{colour} {shape}")).all()
                columns = {ATTRIBUTES["column"].index(str(int(x) // 8)) for x in (x_centre - 0.5, x_centre + 0.5)}
                assert set(labels[4][owned].tolist()) <= columns and len(set(labels[4][owned].tolist())) == 1
                checked += 1
    assert checked > 40


def test_video_answers_match_the_frames(tmp_path):
    """Each clip's answer is the one shape read from the pixels of the frame its question names; clips have 2-4
    frames, so the asked frame varies, and the shapes differ between frames often enough that a wrong frame fails."""
    from llava.world import video

    assert video.generate_videos(str(tmp_path), test=40, seed=3) == 40
    questions = read_jsonl(str(tmp_path / video.QUESTIONS), ("question_id", "video", "fps", "text"))
    truth = json.loads((tmp_path / video.TRUTH).read_text())
    asked_frames, differs = set(), 0
    for question in questions:
        frames = sorted((tmp_path / video.FRAMES / question["video"]).iterdir())
        assert 2 <= len(frames) <= 4 and question["fps"] == video.FPS
        ordinal = re.fullmatch(r"Which shape is in the (\w+) frame\?", question["text"].split("\n")[0]).group(1)
        asked = video.ORDINALS.index(ordinal)
        shapes = [read_scene(Image.open(frame)) for frame in frames]
        assert all(len(blobs) == 1 for blobs in shapes)
        assert truth[question["question_id"]]["answer"] == shapes[asked][0][1]
        asked_frames.add(asked)
        differs += len({blobs[0][1] for blobs in shapes}) > 1
    assert asked_frames == {0, 1, 2, 3} and differs > 20
    predictions = [{"questionId": q, "prediction": t["answer"]} for q, t in truth.items()]
    assert score_gqa(truth, predictions)["accuracy"] == 100.0
