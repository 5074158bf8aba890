"""EvalAI normalisation, soft VQA accuracy, TextVQA scoring, VQAv2/VizWiz uploads and GQA convert/score.

Fixtures are tiny files in the benchmarks' own formats; every expected number is worked out by hand in a comment.
"""

from __future__ import annotations

import json

import pytest

from llava.eval import eval_gqa, eval_vqa
from llava.eval.answer_processor import normalize_answer, vqa_accuracy
from llava.eval.eval_gqa import convert_gqa, score_gqa
from llava.eval.eval_vqa import question_from_prompt, score_textvqa, vizwiz_submission, vqav2_submission

SHORT = "Answer the question using a single word or phrase."


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def write_json(path, payload) -> str:
    path.write_text(json.dumps(payload))
    return str(path)


def answer(question_id, prompt: str, text: str) -> dict:
    """An answer record as `model_vqa_loader` writes it."""
    return {
        "question_id": question_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {},
    }


# ------------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # number words become digits; "none" counts as zero
        ("Two", "2"),
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        # articles a/an/the are dropped, a lone article leaves nothing
        ("The red car", "red car"),
        ("an apple", "apple"),
        ("A", ""),
        # punctuation: trailing period and '!' go; a mark without spaces around it becomes a space
        ("Yes.", "yes"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("black - white", "black white"),
        ("(yes)", "yes"),
        # commas are deleted before anything else, so "red,blue" glues together
        ("red,blue", "redblue"),
        ("red, blue", "red blue"),
        ("1,000", "1000"),
        ("Why?", "why"),
        # a period followed by a digit stays, any other period goes
        ("3.5", "3.5"),
        ("5.", "5"),
        ("e.g.", "eg"),
        # 's is split off as its own token
        ("man's hat", "man 's hat"),
        # newlines and tabs are spaces
        ("What\nNo\tway", "what no way"),
        # contractions written without the apostrophe are restored
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("cant", "can't"),
        ("wont", "won't"),
        ("youre", "you're"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        # reference quirk: its first-person keys are capitalised ("Im"), so lower-cased "im" is never restored
        ("im", "im"),
        ("ive", "ive"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_at_most_32_periods_are_removed() -> None:
    # the reference passes re.UNICODE (== 32) as the substitution count: 40 periods - 32 removed = 8 left
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"


# ------------------------------------------------------------------------------------------------- vqa accuracy


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # leave-one-out over 10 annotators; each subset scores min(1, matches among the other 9 / 3)
        (0, 0.0),
        # 9 subsets keep the match (1/3), 1 drops it (0): 9 * 1/3 / 10 = 0.3
        (1, 0.3),
        # 8 subsets keep both (2/3), 2 keep one (1/3): (16/3 + 2/3) / 10 = 0.6
        (2, 0.6),
        # 7 subsets keep all three (1), 3 keep two (2/3): (7 + 2) / 10 = 0.9
        (3, 0.9),
        # every subset keeps at least 3: 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_counts(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    # "Yes." and ten "yes" normalise alike (the EvalAI processor always normalises the prediction): 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == pytest.approx(1.0)
    # "Two" -> "2", answers "2", "two", "the 2" all -> "2": 3 matches of 10 -> 0.9
    assert vqa_accuracy("Two", ["2", "two", "the 2"] + ["3"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_any_number_of_answers() -> None:
    # 4 answers, 2 match: leaving out a match (2 ways) leaves 1 -> 1/3, leaving out a non-match (2 ways) leaves
    # 2 -> 2/3; (2/3 + 4/3) / 4 = 0.5
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog"]) == pytest.approx(0.5)
    # one answer: its only subset is empty -> 0; no answers -> 0
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    assert vqa_accuracy("cat", []) == 0.0


# ------------------------------------------------------------------------------------------------------ textvqa


def test_question_from_prompt() -> None:
    assert question_from_prompt(f"What brand?\nReference OCR token: Coca, Cola\n{SHORT}") == "what brand?"
    assert question_from_prompt(f"Reference OCR token: A\nWhat Brand?\n{SHORT}") == "what brand?"
    assert question_from_prompt(f"What Color?\n{SHORT}") == "what color?"
    assert question_from_prompt("OCR tokens: a b Question: What Year? Short answer:") == "what year?"


def textvqa_files(tmp_path, results: list[dict]) -> tuple[str, str]:
    annotations = {
        "dataset_type": "val",
        "dataset_name": "textvqa",
        "dataset_version": "0.5.1",
        "data": [
            {
                "question": "What brand is this?",
                "image_id": "img1",
                "question_id": 34602,
                "answers": ["coca cola"] * 3 + ["coke"] * 7,
                "image_classes": ["Bottle"],
                "flickr_original_url": "",
                "flickr_300k_url": "",
                "image_width": 1024,
                "image_height": 768,
                "set_name": "val",
            },
            {
                # same image, another question: question_id of the answers is the image id, not unique
                "question": "What is the number?",
                "image_id": "img1",
                "question_id": 34603,
                "answers": ["12", "12"] + ["21"] * 8,
                "set_name": "val",
            },
            {
                "question": "What color is the sign?",
                "image_id": "img2",
                "question_id": 34604,
                "answers": ["red"] * 10,
                "set_name": "val",
            },
        ],
    }
    return (
        write_json(tmp_path / "TextVQA_0.5.1_val.json", annotations),
        write_jsonl(tmp_path / "answers.jsonl", results),
    )


TEXTVQA_RESULTS = [
    # 3-line OCR prompt: "Coca Cola." -> "coca cola", 3 annotators agree -> 0.9
    answer("img1", f"What brand is this?\nReference OCR token: Coca, Cola\n{SHORT}", "Coca Cola."),
    # 3-line OCR prompt: "12", 2 annotators agree -> 0.6
    answer("img1", f"What is the number?\nReference OCR token: 12\n{SHORT}", "12"),
    # 2-line prompt (no OCR tokens): "Blue" vs ten "red" -> 0
    answer("img2", f"What color is the sign?\n{SHORT}", "Blue"),
]


def test_textvqa_cli(tmp_path, capsys) -> None:
    annotation_file, result_file = textvqa_files(tmp_path, TEXTVQA_RESULTS)
    metrics_file = tmp_path / "metrics.json"
    eval_vqa.main(
        ["textvqa", "--annotation-file", annotation_file, "--result-file", result_file,
         "--metrics-out", str(metrics_file)]
    )
    out = capsys.readouterr().out
    # (0.9 + 0.6 + 0) / 3 = 0.5 -> 50.00%
    assert "Samples: 3" in out
    assert "Accuracy: 50.00%" in out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["samples"] == 3
    assert metrics["accuracy"] == pytest.approx(50.0)


def test_textvqa_function_without_files() -> None:
    annotations = {"data": [{"image_id": "i", "question": "Which Way?", "answers": ["left"] * 2 + ["right"] * 8}]}
    results = [answer("i", f"which way?\nReference OCR token: LEFT\n{SHORT}", "Left")]
    # "Left" -> "left", 2 annotators agree -> 0.6 -> 60%
    assert score_textvqa(annotations, results) == {"samples": 1, "accuracy": pytest.approx(60.0)}


def test_textvqa_errors_name_file_and_line(tmp_path) -> None:
    annotation_file, result_file = textvqa_files(tmp_path, TEXTVQA_RESULTS)
    with open(result_file, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(SystemExit, match=r"answers\.jsonl:4: invalid JSON"):
        eval_vqa.main(["textvqa", "--annotation-file", annotation_file, "--result-file", result_file])

    unknown = [TEXTVQA_RESULTS[0], answer("img9", f"What?\nReference OCR token: x\n{SHORT}", "x")]
    annotation_file, result_file = textvqa_files(tmp_path, unknown)
    with pytest.raises(SystemExit, match=r"answers\.jsonl:2: no annotation for image 'img9'"):
        eval_vqa.main(["textvqa", "--annotation-file", annotation_file, "--result-file", result_file])


# -------------------------------------------------------------------------------------------------------- vqav2


def test_vqav2_submission_with_missing_answer(tmp_path, capsys) -> None:
    question = "How many dogs are there?\n" + SHORT
    test_file = write_jsonl(
        tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
        [
            {"question_id": 1, "image": "COCO_test2015_000000000001.jpg", "text": question, "category": "default"},
            {"question_id": 2, "image": "COCO_test2015_000000000001.jpg", "text": question, "category": "default"},
            {"question_id": 3, "image": "COCO_test2015_000000000014.jpg", "text": question, "category": "default"},
        ],
    )
    src = write_jsonl(tmp_path / "merge.jsonl", [answer(1, question, "Two"), answer(3, question, "The dog.")])
    dst = tmp_path / "upload" / "answers_upload.json"
    eval_vqa.main(["vqav2-submission", "--src", src, "--test-file", test_file, "--dst", str(dst)])
    # 1: "Two" -> "2"; 2: no answer -> ""; 3: "The dog." -> "dog"
    assert json.loads(dst.read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "dog"},
    ]
    assert "unanswered (empty answer): 1" in capsys.readouterr().out


def test_vqav2_function_without_files() -> None:
    questions = [{"question_id": 7}, {"question_id": 8}]
    assert vqav2_submission([{"question_id": 8, "text": "Yes!"}], questions) == [
        {"question_id": 7, "answer": ""},
        {"question_id": 8, "answer": "yes"},
    ]


# ------------------------------------------------------------------------------------------------------- vizwiz


VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT


def test_vizwiz_submission(tmp_path) -> None:
    annotation_file = write_jsonl(
        tmp_path / "llava_test.jsonl",
        [
            {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?" + VIZWIZ_SUFFIX},
            {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What brand?" + VIZWIZ_SUFFIX},
        ],
    )
    result_file = write_jsonl(
        tmp_path / "answers.jsonl",
        [
            answer(1, "What brand?" + VIZWIZ_SUFFIX, "Dont know"),
            answer(0, "What is this?" + VIZWIZ_SUFFIX, "Unanswerable"),
        ],
    )
    dst = tmp_path / "upload.json"
    eval_vqa.main(
        ["vizwiz-submission", "--annotation-file", annotation_file, "--result-file", result_file, "--dst", str(dst)]
    )
    # question-file order; "Unanswerable" -> "unanswerable", "Dont know" -> "don't know"
    assert json.loads(dst.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "don't know"},
    ]


def test_vizwiz_missing_answer_is_an_error(tmp_path) -> None:
    questions = [{"question_id": 0, "image": "a.jpg"}, {"question_id": 1, "image": "b.jpg"}]
    with pytest.raises(ValueError, match="no answer for question_id 1"):
        vizwiz_submission(questions, [{"question_id": 0, "text": "yes"}])
    annotation_file = write_jsonl(tmp_path / "llava_test.jsonl", questions)
    result_file = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 0, "text": "yes"}])
    with pytest.raises(SystemExit, match=r"answers\.jsonl: no answer for question_id 1"):
        eval_vqa.main(
            ["vizwiz-submission", "--annotation-file", annotation_file, "--result-file", result_file,
             "--dst", str(tmp_path / "upload.json")]
        )


# ---------------------------------------------------------------------------------------------------------- gqa


def gqa_question(answer_text: str, structural: str, semantic: str, balanced: bool = True) -> dict:
    """A question of testdev_balanced_questions.json (fields the scorer does not read trimmed)."""
    return {
        "semantic": [],
        "entailed": [],
        "equivalent": [],
        "question": "?",
        "imageId": "n1",
        "isBalanced": balanced,
        "groups": {"global": None, "local": "x"},
        "answer": answer_text,
        "semanticStr": "",
        "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
        "types": {"detailed": "x", "semantic": semantic, "structural": structural},
        "fullAnswer": "",
    }


def test_gqa_convert(tmp_path) -> None:
    src = write_jsonl(
        tmp_path / "merge.jsonl",
        [
            answer("201307251", "q", "Yes."),  # trailing period gone, lower-cased -> "yes"
            answer("201640614", "q", "Left.."),  # every trailing period goes -> "left"
            answer("202225914", "q", " No"),  # whitespace is not stripped -> " no"
            answer("20968379", "q", "St. Louis"),  # inner period stays -> "st. louis"
            answer("20968380", "q", "yes. "),  # the period is not trailing (a space follows) -> "yes. "
        ],
    )
    dst = tmp_path / "testdev_balanced_predictions.json"
    eval_gqa.main(["convert", "--src", src, "--dst", str(dst)])
    assert json.loads(dst.read_text()) == [
        {"questionId": "201307251", "prediction": "yes"},
        {"questionId": "201640614", "prediction": "left"},
        {"questionId": "202225914", "prediction": " no"},
        {"questionId": "20968379", "prediction": "st. louis"},
        {"questionId": "20968380", "prediction": "yes. "},
    ]


def test_gqa_score(tmp_path, capsys) -> None:
    questions = {
        "q1": gqa_question("yes", "verify", "attr"),  # "Yes." -> "yes": right
        "q2": gqa_question("left", "query", "rel"),  # "left": right
        "q3": gqa_question("no", "logical", "obj"),  # " No" -> " no": wrong (whitespace kept)
        "q4": gqa_question("table", "query", "cat"),  # no prediction: wrong, counted missing
        "q5": gqa_question("blue", "choose", "attr"),  # "Blue" -> "blue": right
        "q6": gqa_question("red", "query", "attr", balanced=False),  # not balanced: not scored
    }
    questions_file = write_json(tmp_path / "testdev_balanced_questions.json", questions)
    src = write_jsonl(
        tmp_path / "merge.jsonl",
        [answer("q1", "", "Yes."), answer("q2", "", "left"), answer("q3", "", " No"), answer("q5", "", "Blue"),
         answer("q6", "", "blue")],
    )
    predictions_file = str(tmp_path / "testdev_balanced_predictions.json")
    eval_gqa.main(["convert", "--src", src, "--dst", predictions_file])
    metrics_file = tmp_path / "metrics.json"
    eval_gqa.main(
        ["score", "--questions", questions_file, "--predictions", predictions_file, "--metrics-out", str(metrics_file)]
    )
    out = capsys.readouterr().out
    # 5 balanced questions, right: q1, q2, q5 -> 3/5 = 60.00%
    assert "Accuracy: 60.00%" in out
    # binary = verify/logical/choose: q1 right, q3 wrong, q5 right -> 2/3 = 66.67%; open = query: q2 right, q4 wrong
    assert "Binary: 66.67%" in out
    assert "Open: 50.00%" in out
    metrics = json.loads(metrics_file.read_text())
    assert metrics["questions"] == 5
    assert metrics["correct"] == 3
    assert metrics["missing"] == 1
    assert metrics["accuracy"] == pytest.approx(60.0)
    assert metrics["binary"] == pytest.approx(200 / 3)
    assert metrics["open"] == pytest.approx(50.0)
    # per structural type: verify 1/1, logical 0/1, choose 1/1, query 1/2
    assert metrics["structural"] == {
        "choose": pytest.approx(100.0),
        "logical": pytest.approx(0.0),
        "query": pytest.approx(50.0),
        "verify": pytest.approx(100.0),
    }
    # per semantic type: attr q1 right, q5 right -> 100; rel 100; obj 0; cat 0
    assert metrics["semantic"] == {
        "attr": pytest.approx(100.0),
        "cat": pytest.approx(0.0),
        "obj": pytest.approx(0.0),
        "rel": pytest.approx(100.0),
    }


def test_gqa_functions_without_files() -> None:
    predictions = convert_gqa([{"question_id": "1", "text": "Yes."}, {"question_id": "2", "text": "Cat"}])
    assert predictions == [{"questionId": "1", "prediction": "yes"}, {"questionId": "2", "prediction": "cat"}]
    questions = {"1": gqa_question("yes", "verify", "attr"), "2": gqa_question("dog", "query", "cat")}
    # "yes" right, "cat" vs "dog" wrong -> 1/2 = 50%; binary 1/1, open 0/1
    metrics = score_gqa(questions, predictions)
    assert (metrics["accuracy"], metrics["binary"], metrics["open"], metrics["missing"]) == (50.0, 100.0, 0.0, 0)


def test_gqa_malformed_inputs_name_the_file(tmp_path) -> None:
    no_answer = {"q1": {"types": {"structural": "query"}}}
    bad_questions = write_json(tmp_path / "testdev_balanced_questions.json", no_answer)
    predictions = write_json(tmp_path / "testdev_balanced_predictions.json", [])
    with pytest.raises(SystemExit, match=r"testdev_balanced_questions\.json: question q1: missing field 'answer'"):
        eval_gqa.main(["score", "--questions", bad_questions, "--predictions", predictions])
    src = tmp_path / "merge.jsonl"
    src.write_text(json.dumps(answer("1", "", "yes")) + "\n" + json.dumps({"question_id": "2"}) + "\n")
    with pytest.raises(SystemExit, match=r"merge\.jsonl:2: missing field\(s\) text"):
        eval_gqa.main(["convert", "--src", str(src), "--dst", str(tmp_path / "out.json")])
