"""Scorers exact to the bit: each reported number is the official scorer's arithmetic in the official order.

Every fixture is chosen so that the other order of operations gives a different double (asserted too), and each
expected value is written out by hand in the reference's order: GQA `eval.py` (mean, then × 100), LLaVA's
`eval_textvqa.py` (100 × mean), MME `calculation.py` (acc × 100 + acc+ × 100), LLaVA's `eval_science_qa.py` and SEED
converter (correct / total × 100), `eval_pope.py` (F1 from precision and recall), and the VQAv2 / VizWiz evaluators
(`round(100 × sum / n, 2)` under Python 2's and Python 3's rounding). Also the vqaEval normalisation rules and its
leave-one-annotator-out accuracy.
"""

from __future__ import annotations

import json

import pytest

from llava.eval import eval_pope, eval_science_qa, eval_seed, eval_vqa
from llava.eval.eval_gqa import score_gqa
from llava.eval.eval_mme import score_category
from llava.eval.eval_vqa import score_textvqa
from llava.eval.vqa_eval import (
    VIZWIZ_CONTRACTIONS,
    round_python2,
    round_python3,
    score_vizwiz,
    score_vqav2,
    vizwiz_question_accuracy,
    vqaeval_normalize,
    vqav2_question_accuracy,
)

SHORT = "\nAnswer the question using a single word or phrase."


def vqa_entries(*answers: str) -> list[dict]:
    """Answer entries as the official VQAv2 annotations hold them (`answer_id` 1..10)."""
    return [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i, text in enumerate(answers)]


# ------------------------------------------------------------------------------------------- order of operations


def test_gqa_is_the_mean_times_100() -> None:
    questions = {
        str(i): {"answer": "yes", "types": {"structural": "verify", "semantic": "attr"}, "isBalanced": True}
        for i in range(3)
    }
    predictions = [{"questionId": "0", "prediction": "yes"}, {"questionId": "1", "prediction": "no"},
                   {"questionId": "2", "prediction": "no"}]
    official = 1 / 3 * 100  # eval.py: avg(scores) * 100
    assert official != 100 * 1 / 3
    metrics = score_gqa(questions, predictions)
    assert metrics["accuracy"] == official
    assert metrics["binary"] == official
    assert metrics["structural"]["verify"] == official and metrics["semantic"]["attr"] == official


def test_textvqa_is_100_times_the_mean() -> None:
    annotations = [
        {"image_id": "a", "question": "Q1?", "answers": ["cat"] * 3 + ["dog"] * 7},
        {"image_id": "b", "question": "Q2?", "answers": ["yes"] * 10},
        {"image_id": "c", "question": "Q3?", "answers": ["red"] * 10},
    ]
    results = [{"question_id": image, "prompt": question + SHORT, "text": text}
               for image, question, text in (("a", "Q1?", "cat"), ("b", "Q2?", "Yes"), ("c", "Q3?", "blue"))]
    # Q1: leaving out one of the 3 "cat" leaves 2 -> 2/3 (3 times); leaving out a "dog" leaves 3 -> 1 (7 times)
    soft = sum([2 / 3] * 3 + [1.0] * 7) / 10
    official = 100.0 * ((soft + 1.0 + 0.0) / 3)  # eval_textvqa: 100. * (sum / n)
    assert official != 100.0 * (soft + 1.0 + 0.0) / 3
    assert score_textvqa(annotations, results) == {"samples": 3, "accuracy": official}


def test_mme_adds_acc_times_100_and_acc_plus_times_100() -> None:
    # 3 images: both right, one right, one right -> acc 4/6, acc+ 1/3
    pairs = [("Yes", "yes"), ("No", "no"), ("Yes", "yes"), ("No", "yes"), ("Yes", "no"), ("No", "no")]
    official = 4 / 6 * 100 + 1 / 3 * 100  # calculation.py: task_score += v * 100 for acc, then acc_plus
    assert official != 100 * (4 / 6 + 1 / 3)
    result = score_category(pairs)
    assert (result["acc"], result["acc_plus"]) == (4 / 6, 1 / 3)
    assert result["score"] == official


@pytest.fixture
def sqa_files(tmp_path) -> tuple[str, str]:
    """Three test problems with an image; only the first is answered right."""
    base = tmp_path / "scienceqa"
    base.mkdir()
    problems = {str(i): {"choices": ["x", "y"], "answer": 0} for i in range(1, 4)}
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    answers = [{"question_id": pid, "prompt": "<image>\nQ?\nA. x\nB. y", "text": "A" if pid == "1" else "B"}
               for pid in problems]
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text("".join(json.dumps(a) + "\n" for a in answers))
    return str(base), str(result_file)


def test_science_qa_order_and_llava_result_keys(sqa_files, tmp_path) -> None:
    base, result_file = sqa_files
    official = 1 / 3 * 100  # eval_science_qa: correct / total * 100
    assert official != 100 * 1 / 3
    out, res, metrics = tmp_path / "out.jsonl", tmp_path / "result.json", tmp_path / "metrics.json"
    eval_science_qa.main(["--base-dir", base, "--result-file", result_file, "--output-file", str(out),
                          "--output-result", str(res), "--metrics-out", str(metrics)])
    saved = json.loads(res.read_text())
    assert list(saved) == ["acc", "correct", "count", "results", "outputs"]  # LLaVA's keys, in its order
    assert saved["acc"] == official
    assert json.loads(metrics.read_text()) == {"img_accuracy": official, "accuracy": official, "img_correct": 1,
                                               "img_total": 3, "correct": 1, "total": 3}


def test_seed_is_correct_over_count_times_100() -> None:
    questions = [{"question_id": i, "answer": "A", "question_type_id": 1, "data_type": "image"} for i in range(3)]
    result = eval_seed.score_seed(questions, {0: "A", 1: "B", 2: "C"}, {"Scene": 1})
    official = 1 / 3 * 100  # convert_seed_for_submission: correct / count * 100
    assert official != 100 * 1 / 3
    assert result["types"][1]["accuracy"] == official and result["total"] == official and result["image"] == official


def test_pope_f1_from_precision_and_recall() -> None:
    # TP 1, FN 4, TN 1: precision 1, recall 1/5
    labels = ["yes"] * 5 + ["no"]
    answers = ["Yes"] + ["No"] * 5
    precision, recall = 1 / (1 + 0), 1 / (1 + 4)
    official = 2 * precision * recall / (precision + recall)  # eval_pope: 2*precision*recall / (precision + recall)
    assert official != 2 * 1 / (2 * 1 + 0 + 4)
    metrics = eval_pope.score_pope(labels, answers)
    assert (metrics["TP"], metrics["FN"], metrics["TN"], metrics["FP"]) == (1, 4, 1, 0)
    assert metrics["f1"] == official
    assert metrics["accuracy"] == (1 + 1) / (1 + 1 + 0 + 4) and metrics["yes_ratio"] == 1 / 6


# ------------------------------------------------------------------------------------------- vqaEval normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # commas are punctuation like the rest: no space around -> a space ("red,blue" -> "red blue"); but a
        # digit-comma-digit anywhere deletes every mark instead ("1,000" -> "1000", "3,4-5" -> "345")
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),
        ("1,000", "1000"),
        ("3,4-5", "345"),
        ("3, 4-5", "3 4 5"),
        # a mark with a space on either side is deleted everywhere, otherwise it becomes a space
        ("black-and-white", "black and white"),
        ("black - white", "black white"),
        ("@home", "home"),
        ("What?", "what"),
        ("yes!", "yes"),
        # `'`, `:` are not punctuation here; "'s" is not split off (EvalAI's processor splits it)
        ("man's hat", "man's hat"),
        ("10:30", "10:30"),
        # a period not followed by a digit is deleted
        ("Yes.", "yes"),
        ("e.g.", "eg"),
        ("a.b", "ab"),
        ("3.5", "3.5"),
        ("5.", "5"),
        (".5", ".5"),
        # number words zero..ten and none become digits; a/an/the are dropped (after the digit mapping)
        ("Two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("a", ""),
        # contractions restored from the table; its capital-I keys never match lower-cased words
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("couldn'tve", "couldn't've"),
        ("somebody'd", "somebodyd"),
        ("im", "im"),
    ],
)
def test_vqaeval_normalisation(raw: str, expected: str) -> None:
    assert vqaeval_normalize(raw) == expected


def test_vqaeval_deletes_at_most_32_periods() -> None:
    assert vqaeval_normalize("." * 40 + "x") == "." * 8 + "x"  # re.UNICODE (32) passed as the count


def test_vizwiz_contraction_table_is_mostly_curly() -> None:
    assert vqaeval_normalize("dont", VIZWIZ_CONTRACTIONS) == "don\u2019t"
    assert vqaeval_normalize("cant", VIZWIZ_CONTRACTIONS) == "can't"  # one of the straight values
    assert vqaeval_normalize("couldn'tve", VIZWIZ_CONTRACTIONS) == "couldn\u2019t\u2019ve"  # straight key
    assert vqaeval_normalize("hed\u2019ve", VIZWIZ_CONTRACTIONS) == "he\u2019d\u2019ve"  # curly key
    assert vqaeval_normalize("hed've", VIZWIZ_CONTRACTIONS) == "hed've"


# ------------------------------------------------------------------------------------ leave-one-annotator-out


@pytest.mark.parametrize(
    ("answers", "per_left_out"),
    [
        # leaving out the matching answer leaves 0 matches, leaving out any other leaves 1 -> 1/3
        (["cat"] + ["dog"] * 9, [0.0] + [1 / 3] * 9),
        (["dog"] * 8 + ["cat"] * 2, [2 / 3] * 8 + [1 / 3] * 2),
        (["cat", "dog", "cat", "dog", "cat"] + ["dog"] * 5, [2 / 3, 1, 2 / 3, 1, 2 / 3] + [1] * 5),
        (["cat"] * 4 + ["dog"] * 6, [1] * 10),
        (["dog"] * 10, [0.0] * 10),
    ],
)
def test_vqav2_leave_one_out_by_hand(answers: list[str], per_left_out: list[float]) -> None:
    assert vqav2_question_accuracy("cat", vqa_entries(*answers)) == sum(per_left_out) / 10


def test_vqav2_normalises_only_when_the_answers_differ() -> None:
    # ten identical answers: prediction and answers are compared as they are (after newline/tab/strip cleaning)
    assert vqav2_question_accuracy("Yes", vqa_entries(*["yes"] * 10)) == 0.0
    assert vqav2_question_accuracy(" yes\n", vqa_entries(*["yes"] * 10)) == 1.0
    assert vqav2_question_accuracy("2", vqa_entries(*["two"] * 10)) == 0.0
    # answers differ: both sides normalised ("Two" and "two" -> "2"), 3 matches
    expected = sum([2 / 3] * 3 + [1] * 7) / 10
    assert vqav2_question_accuracy("Two", vqa_entries("2", "two", "the 2", *["3"] * 7)) == expected


def test_vqav2_leaves_out_every_entry_equal_to_the_one_left_out() -> None:
    # vqaEval drops the entries equal (as dicts) to the one left out; official entries differ by answer_id, but
    # without it the three equal "cat" entries all go together: cat out -> 0 matches, dog out -> 3 -> 1
    entries = [{"answer": "cat"}] * 3 + [{"answer": "dog"}] * 7
    assert vqav2_question_accuracy("cat", entries) == sum([0] * 3 + [1] * 7) / 10


def test_vizwiz_normalises_the_prediction_only() -> None:
    assert vizwiz_question_accuracy("Two.", [{"answer": "2"}] * 10) == 1.0
    assert vizwiz_question_accuracy("2", [{"answer": "two"}] * 10) == 0.0  # the answers stay raw
    assert vizwiz_question_accuracy("dont", [{"answer": "don\u2019t"}] * 3 + [{"answer": "x"}] * 7) == (
        sum([2 / 3] * 3 + [1] * 7) / 10)


# -------------------------------------------------------------------------------------------- reported numbers


def _vqav2_annotations(count: int, answer_type: str = "other") -> list[dict]:
    return [{"question_id": i, "question_type": "what is", "answer_type": answer_type,
             "answers": vqa_entries(*["cat"] * 10)} for i in range(count)]


def test_vqav2_reports_round_of_100_sum_over_n_python2() -> None:
    # 23 of 160 right: vqaEval's 100 * 23 / 160 is exactly 14.375, Python 2 rounds the tie up -> 14.38;
    # the other order, 23 / 160 * 100 = 14.374999999999998, would report 14.37
    annotations = _vqav2_annotations(160)
    predictions = {i: "cat" if i < 23 else "dog" for i in range(160)}
    assert round_python2(23 / 160 * 100) == 14.37
    result = score_vqav2(annotations, predictions)
    assert result["accuracy"] == round_python2(100 * 23.0 / 160) == 14.38
    assert result["per_answer_type"] == {"other": 14.38} and result["per_question_type"] == {"what is": 14.38}
    assert (result["questions"], result["unscored"]) == (160, 0)


def test_python2_and_python3_rounding_differ_on_ties() -> None:
    # 1 of 32 right: 100 * 1 / 32 = 3.125 exactly; vqaEval (Python 2) reports 3.13, VizWiz's port (Python 3) 3.12
    assert (round_python2(3.125), round_python3(3.125)) == (3.13, 3.12)
    assert round_python2(2.675) == 2.67  # not a tie: 2.675 is 2.67499999... as a double
    vqav2 = score_vqav2(_vqav2_annotations(32), {i: "cat" if i == 0 else "dog" for i in range(32)})
    vizwiz = score_vizwiz(
        [{"image": f"{i}.jpg", "answer_type": "other", "answers": [{"answer": "cat"}] * 10} for i in range(32)],
        {f"{i}.jpg": "cat" if i == 0 else "dog" for i in range(32)},
    )
    assert (vqav2["accuracy"], vizwiz["accuracy"]) == (3.13, 3.12)


def test_vqav2_scores_the_answered_questions_and_rejects_unknown_ones() -> None:
    annotations = _vqav2_annotations(3, "yes/no")
    result = score_vqav2(annotations, {0: "cat", 2: "dog"})
    assert (result["accuracy"], result["questions"], result["unscored"]) == (50.0, 2, 1)
    with pytest.raises(ValueError, match="answers.jsonl: no annotation for question_id 7"):
        score_vqav2(annotations, {7: "cat"}, source="answers.jsonl")


def test_vqav2_cli_scores_what_the_upload_carries(tmp_path, capsys) -> None:
    annotation_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotation_file.write_text(json.dumps({"annotations": [
        {"question_id": 1, "image_id": 9, "question_type": "is the", "answer_type": "yes/no",
         "answers": vqa_entries(*["yes"] * 10), "multiple_choice_answer": "yes"},
        {"question_id": 2, "image_id": 9, "question_type": "how many", "answer_type": "number",
         "answers": vqa_entries("2", "two", *["3"] * 8), "multiple_choice_answer": "3"},
    ]}))
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text(json.dumps({"question_id": 1, "text": "Yes."}) + "\n"
                           + json.dumps({"question_id": 2, "text": "Two"}) + "\n")
    metrics_file = tmp_path / "metrics.json"
    eval_vqa.main(["vqav2", "--annotation-file", str(annotation_file), "--result-file", str(result_file),
                   "--metrics-out", str(metrics_file)])
    # q1: the upload's "yes" (EvalAI-normalised "Yes.") equals ten "yes" -> 1; q2: "2" matches "2" and "two"
    # -> leave a match out: 1/3 (twice), a "3" out: 2/3 (8 times)
    q2 = sum([1 / 3] * 2 + [2 / 3] * 8) / 10
    expected = round_python2(100 * (1.0 + q2) / 2)
    metrics = json.loads(metrics_file.read_text())
    assert metrics["accuracy"] == expected == 80.0
    assert metrics["per_answer_type"] == {"yes/no": 100.0, "number": round_python2(100 * q2 / 1)}
    out = capsys.readouterr().out
    assert "Overall Accuracy is: 80.00" in out and "number : 60.00" in out


def test_vizwiz_cli_maps_answers_to_images(tmp_path) -> None:
    annotation_file = tmp_path / "val.json"
    annotation_file.write_text(json.dumps([
        {"image": "VizWiz_val_0.jpg", "question": "What?", "answerable": 1, "answer_type": "other",
         "answers": [{"answer": "coca cola", "answer_confidence": "yes"}] * 10},
        {"image": "VizWiz_val_1.jpg", "question": "What?", "answerable": 0, "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10},
    ]))
    question_file = tmp_path / "llava_val.jsonl"
    question_file.write_text("".join(json.dumps({"question_id": i, "image": f"VizWiz_val_{i}.jpg"}) + "\n"
                                     for i in range(2)))
    result_file = tmp_path / "answers.jsonl"
    result_file.write_text(json.dumps({"question_id": 0, "text": "Coca-Cola"}) + "\n"
                           + json.dumps({"question_id": 1, "text": "Unanswerable"}) + "\n")
    metrics = eval_vqa.run_vizwiz(str(annotation_file), str(question_file), str(result_file))
    # "Coca-Cola" -> "coca cola" (hyphen to space): right; "Unanswerable" -> "unanswerable": right
    assert (metrics["accuracy"], metrics["per_answer_type"]) == (100.0, {"other": 100.0, "unanswerable": 100.0})
    result_file.write_text(json.dumps({"question_id": 5, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="question_id 5 is not in"):
        eval_vqa.run_vizwiz(str(annotation_file), str(question_file), str(result_file))
