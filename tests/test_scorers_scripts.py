"""`vqav2.sh` and `vizwiz.sh` write the upload always, and score val answers offline only when the ground truth
is there (metrics `{}` otherwise).

The model is replaced by a stand-in loader that writes fixed answers and its settings record (PYTHON points at a
wrapper that routes `-m llava.eval.model_vqa_loader` to it), so a run only pays for the scripts' own steps;
`test_eval_scripts.py` runs the real loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAKE_LOADER = '''
import argparse, json, os
from llava.eval.run_settings import write_settings
parser = argparse.ArgumentParser()
parser.add_argument("--question-file")
parser.add_argument("--answers-file")
args, _ = parser.parse_known_args()
texts = json.load(open(os.environ["FAKE_ANSWERS"]))
with open(args.answers_file, "w") as out:
    for line in open(args.question_file):
        question = json.loads(line)
        out.write(json.dumps({"question_id": question["question_id"], "prompt": question["text"],
                              "text": texts[str(question["question_id"])]}) + "\\n")
write_settings(args.answers_file, {"model": "stand-in"})
'''


def run_script(name: str, tmp_path: Path, answers: dict, **env: str) -> None:
    """Run scripts/v1_5/eval/<name> on EVAL_ROOT=tmp_path with the stand-in loader answering `answers`."""
    (tmp_path / "fake_loader.py").write_text(FAKE_LOADER)
    (tmp_path / "answers.json").write_text(json.dumps({str(k): v for k, v in answers.items()}))
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = -m ] && [ "$2" = llava.eval.model_vqa_loader ]; then shift 2; '
        f'exec "{sys.executable}" "{tmp_path / "fake_loader.py"}" "$@"; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")  # a checkpoint folder the stand-in never reads
    full_env = dict(os.environ, EVAL_ROOT=str(tmp_path), CKPT="tiny", PYTHON=str(wrapper), PYTHONPATH=str(ROOT),
                    MODEL_PATH=str(tmp_path / "model"),
                    FAKE_ANSWERS=str(tmp_path / "answers.json"), CUDA_VISIBLE_DEVICES="", **env)
    result = subprocess.run(["bash", str(ROOT / "scripts/v1_5/eval" / name)], env=full_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_vqav2_script_scores_val_when_annotations_exist(tmp_path) -> None:
    vqav2 = tmp_path / "vqav2"
    vqav2.mkdir()
    split = "llava_vqav2_mscoco_val2014"
    write_jsonl(vqav2 / f"{split}.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "Q?"} for i in (1, 2, 3)])
    answers = {1: "Yes.", 2: "Two", 3: "blue"}
    env = {"SPLIT": split, "VQAV2_TEST_FILE": str(vqav2 / f"{split}.jsonl"), "VQAV2_IMAGES": str(vqav2 / "val2014")}
    metrics_file = vqav2 / "answers" / split / "tiny" / "metrics.json"
    upload_file = vqav2 / "answers_upload" / split / "tiny.json"

    run_script("vqav2.sh", tmp_path, answers, **env)  # no ground truth yet
    assert json.loads(metrics_file.read_text()) == {}
    expected_upload = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "2"},
                       {"question_id": 3, "answer": "blue"}]
    assert json.loads(upload_file.read_text()) == expected_upload

    entries = [["yes"] * 10, ["2", "two"] + ["3"] * 8, ["red"] * 10]
    (vqav2 / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(texts)]}
        for i, texts in zip((1, 2, 3), entries)
    ]}))
    upload_file.unlink()
    run_script("vqav2.sh", tmp_path, answers, **env)
    assert json.loads(upload_file.read_text()) == expected_upload
    metrics = json.loads(metrics_file.read_text())
    # q1 "yes" vs ten "yes": 1; q2 "2" matches "2" and "two": (2 * 1/3 + 8 * 2/3) / 10 = 0.6; q3: 0
    # 100 * 1.6 / 3 = 53.33...
    assert (metrics["accuracy"], metrics["questions"], metrics["unscored"]) == (53.33, 3, 0)
    summary = json.loads((vqav2 / "answers" / split / "tiny" / "merge.summary.json").read_text())
    assert summary["accuracy"] == 53.33 and summary["benchmark"] == "vqav2"


def test_vizwiz_script_scores_val_when_annotations_exist(tmp_path) -> None:
    """The same wiring as VQAv2's (the run without ground truth is covered there)."""
    vizwiz = tmp_path / "vizwiz"
    vizwiz.mkdir()
    write_jsonl(vizwiz / "llava_val.jsonl",
                [{"question_id": i, "image": f"VizWiz_val_{i}.jpg", "text": "Q?"} for i in (0, 1)])
    answers = {0: "Coca-Cola", 1: "Unanswerable"}
    env = {"VIZWIZ_QUESTIONS": str(vizwiz / "llava_val.jsonl"), "VIZWIZ_IMAGES": str(vizwiz / "val")}
    (vizwiz / "val.json").write_text(json.dumps([
        {"image": "VizWiz_val_0.jpg", "answer_type": "other", "answers": [{"answer": "coca cola"}] * 10},
        {"image": "VizWiz_val_1.jpg", "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable"}] * 3 + [{"answer": "no"}] * 7},
    ]))
    run_script("vizwiz.sh", tmp_path, answers, **env)
    assert json.loads((vizwiz / "answers_upload" / "tiny.json").read_text()) == [
        {"image": "VizWiz_val_0.jpg", "answer": "coca cola"}, {"image": "VizWiz_val_1.jpg", "answer": "unanswerable"}]
    metrics = json.loads((vizwiz / "answers" / "tiny" / "metrics.json").read_text())
    # q0: "coca cola" ten times: 1; q1: 3 of 10 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; 100 * 1.9 / 2 = 95
    assert metrics["accuracy"] == 95.0
    assert metrics["per_answer_type"] == {"other": 100.0, "unanswerable": 90.0}
