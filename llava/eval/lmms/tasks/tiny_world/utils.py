"""The tiny world's GQA-format test split as lmms-eval tasks (read from the folder lmms-eval runs in, as the YAMLs'
`data_files`): images and truth beside the question file that `scripts/v1_5/eval/gqa.sh` answers; its video
questions (`python -m llava.world.video`) likewise, each video a folder of frames."""

from __future__ import annotations

import functools
import os

from llava.eval.eval_gqa import gqa_prediction
from llava.eval.io import read_json
from llava.mm_utils import load_image
from llava.world import video
from llava.world.long_answers import score

GQA_DIR = os.path.join("playground", "data", "tiny_world", "eval", "gqa")
IMAGES = os.path.join(GQA_DIR, "data", "images")
TRUTH = os.path.join(GQA_DIR, "data", "testdev_balanced_questions.json")
VIDEO_DIR = os.path.join("playground", "data", "tiny_world", "eval", "video")
# The long-answer world (`generate --long-kinds describe,ground,read`): its own questions, images and truth.
LONG_DIR = os.path.join("playground", "data", "tiny_world_long_test", "eval", "gqa")


@functools.cache
def truth() -> dict:
    return read_json(TRUTH)


def doc_to_visual(doc: dict) -> list:
    return [load_image(os.path.join(IMAGES, doc["image"]))]


def doc_to_text(doc: dict) -> str:
    return doc["text"]  # the question with LLaVA's short-answer suffix, as gqa.sh asks it


def doc_to_target(doc: dict) -> str:
    return truth()[str(doc["question_id"])]["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    """Every answer the test split has for this question's kind (colours for a colour question, ...)."""
    kind = truth()[str(doc["question_id"])]["types"]["structural"]
    return sorted({q["answer"] for q in truth().values() if q["types"]["structural"] == kind})


def process_results(doc: dict, results: list[str]) -> dict:
    """GQA's exact match after LLaVA's conversion, in percent."""
    return {"accuracy": 100.0 * (gqa_prediction(results[0]) == doc_to_target(doc))}


@functools.cache
def video_truth() -> dict:
    return read_json(os.path.join(VIDEO_DIR, video.TRUTH))


def video_doc_to_visual(doc: dict) -> list:
    """The clip's frame folder (the model reads the frames, at the doc's `fps`)."""
    return [os.path.abspath(os.path.join(VIDEO_DIR, video.FRAMES, doc["video"]))]


def video_doc_to_target(doc: dict) -> str:
    return video_truth()[str(doc["question_id"])]["answer"]


def video_process_results(doc: dict, results: list[str]) -> dict:
    return {"accuracy": 100.0 * (gqa_prediction(results[0]) == video_doc_to_target(doc))}


@functools.cache
def long_truth() -> dict:
    return read_json(os.path.join(LONG_DIR, "data", "testdev_balanced_questions.json"))


def long_doc_to_visual(doc: dict) -> list:
    return [load_image(os.path.join(LONG_DIR, "data", "images", doc["image"]))]


def long_doc_to_target(doc: dict) -> str:
    return long_truth()[str(doc["question_id"])]["answer"]


def of_kind(kind: str):
    """The dataset's questions of one long kind (each kind its own task, with its own metrics)."""
    return lambda dataset: dataset.filter(lambda doc: doc["category"] == kind)


describe_docs, ground_docs, read_docs = of_kind("describe"), of_kind("ground"), of_kind("read")


def long_process_results(doc: dict, results: list[str]) -> dict:
    """The kind's own rule (llava.world.long_answers): `accuracy` in percent (exact match; IoU >= 0.5 for a box),
    and describe's per-object `f1` or ground's `iou`."""
    scored = score(doc["category"], gqa_prediction(results[0]), long_doc_to_target(doc))
    return {"accuracy": 100.0 * scored.pop("correct"), **scored}
