"""ScienceQA and MMBench loaders: LLaVA's prompts and record fields, circular rounds, resume by round."""

import base64
import io
import json

from PIL import Image

from llava.eval.eval_mmbench import score_mmbench
from llava.eval.model_vqa_mmbench import main as mmbench_loader
from llava.eval.model_vqa_science import LETTER_PROMPT
from llava.eval.model_vqa_science import main as science_loader

COMMON = ["--temperature", "0", "--max_new_tokens", "3", "--device", "cpu", "--conv-mode", "vicuna_v1"]


def test_science_loader_prompts(llava_checkpoint, tmp_path):
    (tmp_path / "1").mkdir()
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "1" / "image.png")
    records = [
        {"id": "1", "image": "1/image.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich is green?\nA. leaf\nB. sky"}, {"from": "gpt", "value": "A"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Which is hot?\nA. ice\nB. fire"}, {"from": "gpt", "value": "B"}]},
    ]
    (tmp_path / "q.json").write_text(json.dumps(records))
    answers = tmp_path / "a.jsonl"
    science_loader(["--model-path", llava_checkpoint, "--question-file", str(tmp_path / "q.json"), "--image-folder",
                    str(tmp_path), "--answers-file", str(answers), "--single-pred-prompt", *COMMON])
    out = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in out] == ["1", "2"]
    assert out[0]["prompt"] == "<image>\nWhich is green?\nA. leaf\nB. sky" + LETTER_PROMPT
    assert out[1]["prompt"] == "Which is hot?\nA. ice\nB. fire" + LETTER_PROMPT
    assert out[0]["exit_layer"] > 0 and out[1]["exit_layer"] == 0


def tsv_with(rows, path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(header)] + ["\t".join(str(row.get(k, "")) for k in header) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def png_base64(rgb):
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), rgb).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_loader_rotates_options_and_resumes_by_round(llava_checkpoint, tmp_path):
    rows = [
        {"index": 0, "question": "Colour?", "hint": "A plain square.", "A": "red", "B": "blue", "C": "green",
         "answer": "A", "category": "attr", "image": png_base64((200, 10, 10))},
        {"index": 1, "question": "Shape?", "hint": "nan", "A": "square", "B": "circle", "answer": "A",
         "category": "attr", "image": png_base64((10, 10, 200))},
    ]
    tsv_with(rows, tmp_path / "mmb.tsv")
    answers = tmp_path / "a.jsonl"
    args = ["--model-path", llava_checkpoint, "--question-file", str(tmp_path / "mmb.tsv"), "--answers-file", str(answers),
            "--single-pred-prompt", "--all-rounds", "--batch-size", "2", *COMMON]
    mmbench_loader(args)
    out = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["question_id"], r["round_id"]) for r in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert out[0]["prompt"] == "A plain square.\nColour?\nA. red\nB. blue\nC. green"
    assert out[1]["options"] == ["blue", "green", "red"] and out[1]["option_char"] == ["B", "C", "A"]
    assert out[4]["prompt"] == "Shape?\nA. circle\nB. square"
    # Killed after three rounds: the rerun answers exactly the two missing (question, round) pairs.
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:3]) + "\n")
    mmbench_loader(args)
    again = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(r["question_id"], r["round_id"]) for r in again] == [(r["question_id"], r["round_id"]) for r in out]
    # The circular scorer maps each round's letter back through option_char: answering "A" in round 1 means "B".
    fake = {0: [dict(out[0], text="A"), dict(out[1], text="C"), dict(out[2], text="B")]}
    assert score_mmbench(rows[:1], fake)["circular_accuracy"] == 1.0
    fake[0][1] = dict(out[1], text="B")  # "B" in round 1 is the original "C": wrong, so the group is wrong
    assert score_mmbench(rows[:1], fake)["circular_accuracy"] == 0.0
