"""`bash scripts/v1_5/eval/gqa.sh` end to end on CPU: a tiny checkpoint, a GQA-format fixture, LLaVA's layout."""

import json
import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gqa_script_end_to_end(llava_checkpoint, tmp_path):
    gqa = tmp_path / "gqa"
    (gqa / "data" / "images").mkdir(parents=True)
    questions, truth = [], {}
    for i, answer in enumerate(["red", "blue", "red"]):
        Image.new("RGB", (40, 30), (200, 40 * i, 10)).save(gqa / "data" / "images" / f"{i}.jpg")
        questions.append({"question_id": f"20{i}", "image": f"{i}.jpg", "category": "default",
                          "text": "What colour is it?\nAnswer the question using a single word or phrase."})
        truth[f"20{i}"] = {"answer": answer, "types": {"structural": "query", "semantic": "attr"}}
    (gqa / "llava_gqa_testdev_balanced.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(truth))
    env = dict(os.environ, MODEL_PATH=llava_checkpoint, CKPT="tiny", EVAL_ROOT=str(tmp_path), EXIT_MODE="fixed",
               EXIT_LAYER="1", PYTHON=sys.executable, PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts/v1_5/eval/gqa.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = gqa / "answers" / "llava_gqa_testdev_balanced" / "tiny"
    merged = [json.loads(line) for line in (answers / "merge.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in merged] == ["200", "201", "202"]
    predictions = json.loads((gqa / "data" / "testdev_balanced_predictions.json").read_text())
    # Oracle for the converter and scorer: LLaVA's rule applied here by hand.
    expected = [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in merged]
    assert predictions == expected
    correct = sum(p["prediction"] == truth[p["questionId"]]["answer"] for p in expected)
    summary = json.loads((answers / "merge.summary.json").read_text())
    assert abs(summary["accuracy"] - 100 * correct / 3) < 1e-9  # eval_gqa reports percent
    assert summary["samples"] == 3 and summary["errors"] == 0 and summary["exit_layer"] == 1
    assert 0 < summary["flops_reduction"] < 1
    assert "gqa" in result.stdout and "flops_reduction" in result.stdout
