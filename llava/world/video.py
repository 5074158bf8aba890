"""The tiny world's video questions: short clips of the world's scenes, one shape a frame, and which shape a given
frame shows — the answer is in one frame only, so a model must keep that frame's tokens apart from the others'.

    python -m llava.world.video --out playground/data/tiny_world/eval/video [--test 200] [--seed 0]

Writes, under OUT, in the GQA layout the world's image questions use (so `llava.eval.eval_gqa` scores it and the
loader answers it with `--image-folder OUT/data/frames`):
- `data/frames/NNNNN/FFF.png`: each clip's frames (2 to 4, sampled at 1 frame per second, `fps` in the question);
- `llava_video_questions.jsonl`: `question_id`, `video` (the clip's folder), `fps`, `text` ("Which shape is in the
  second frame?" with LLaVA's short-answer suffix), `category` "video";
- `data/testdev_balanced_questions.json`: the answers in GQA's layout.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from tqdm import tqdm

from llava.world.generate import COLOURS, IMAGE_SIZE, SHAPES, SHORT_ANSWER, SIZES, Shape, render

QUESTIONS = "llava_video_questions.jsonl"
TRUTH = os.path.join("data", "testdev_balanced_questions.json")
FRAMES = os.path.join("data", "frames")
FPS = 1.0
ORDINALS = ("first", "second", "third", "fourth")


def random_frame(rng: random.Random) -> Shape:
    size = rng.choice(sorted(SIZES))
    margin = SIZES[size] + 2
    return Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), size,
                 rng.randint(margin, IMAGE_SIZE - margin), rng.randint(margin, IMAGE_SIZE - margin))


def generate_videos(out: str, test: int, seed: int) -> int:
    """Write `test` clips and their questions; returns how many."""
    rng = random.Random(f"video-{seed}")
    questions, truth = [], {}
    for index in tqdm(range(test), desc="generating the tiny world's videos", unit="clip"):
        clip = [random_frame(rng) for _ in range(rng.randint(2, len(ORDINALS)))]
        asked = rng.randrange(len(clip))
        folder = f"{index:05d}"
        os.makedirs(os.path.join(out, FRAMES, folder), exist_ok=True)
        for number, shape in enumerate(clip):
            render([shape]).save(os.path.join(out, FRAMES, folder, f"{number:03d}.png"))
        question = f"Which shape is in the {ORDINALS[asked]} frame?"
        question_id = f"video-{index:05d}"
        questions.append({"question_id": question_id, "video": folder, "fps": FPS, "text": question + SHORT_ANSWER,
                          "category": "video"})
        answer = clip[asked].kind
        truth[question_id] = {"answer": answer, "question": question, "types": {"structural": "video", "semantic": "video"}}
    with open(os.path.join(out, QUESTIONS), "w") as handle:
        handle.writelines(json.dumps(q) + "\n" for q in questions)
    with open(os.path.join(out, TRUTH), "w") as handle:
        json.dump(truth, handle)
    return len(questions)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="playground/data/tiny_world/eval/video")
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{generate_videos(args.out, args.test, args.seed)} video questions in {args.out}")


if __name__ == "__main__":
    main()
