"""Scorers of the yes/no and multiple-choice benchmarks (POPE, MME, ScienceQA, MMBench, SEED) on tiny fixtures in
each benchmark's file format. Every expected number is worked out by hand in the comment next to it."""

from __future__ import annotations

import json

import pytest

from llava.eval import eval_mmbench, eval_mme, eval_pope, eval_science_qa, eval_seed

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def answer(qid, text, prompt="") -> dict:
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("No", "no"),
        ("no", "no"),
        ("It is not.", "no"),
        ("Nope", "yes"),  # not exactly No/not/no
        ("NO", "yes"),
        ("No!", "yes"),
        ("Yes, no doubt.", "no"),  # "Yes no doubt" has the token "no"
        ("Yes. No.", "yes"),  # only the text before the first '.' counts
        ("no,thing", "yes"),  # commas are removed, not split on: "nothing"
        ("No\nthere is none", "yes"),  # split on spaces only: the token is "No\nthere"
        ("", "yes"),
    ],
)
def test_pope_answer_parsing(text, parsed):
    assert eval_pope.parse_pope_answer(text) == parsed


def test_score_pope_by_hand():
    # labels yes, yes, no; all answers parse to yes -> TP=2 FP=1 TN=0 FN=0
    m = eval_pope.score_pope(["yes", "yes", "no"], ["Yes", "Yes, there is.", "Nope"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (2, 1, 0, 0)
    assert m["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP) = 2/3
    assert m["recall"] == pytest.approx(1.0)  # TP / (TP + FN) = 2/2
    assert m["f1"] == pytest.approx(0.8)  # 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3)
    assert m["accuracy"] == pytest.approx(2 / 3)  # (TP + TN) / 3
    assert m["yes_ratio"] == pytest.approx(1.0)  # 3 of 3 predictions are yes
    with pytest.raises(ValueError):
        eval_pope.score_pope(["yes"], [])


@pytest.fixture
def pope_files(tmp_path):
    coco = tmp_path / "coco"
    coco.mkdir()
    labels = {
        "adversarial": ["yes", "yes", "no", "no", "yes"],
        "popular": ["no", "no", "yes", "no"],
        "random": ["yes", "no"],
    }
    texts = {
        "adversarial": ["Yes, there is a dog.", "No, there is not.", "Nope", "NO", "Yes. But not really"],
        "popular": ["no", "There is not a cat in the image.", "Yes", "No!"],
        "random": ["Yes", None],  # the second random question has no answer
    }
    questions, answers, qid = [], [], 0
    for category in ("adversarial", "popular", "random"):
        write_jsonl(coco / f"coco_pope_{category}.json",
                    [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog in the image?", "label": label}
                     for i, label in enumerate(labels[category])])
        for text in texts[category]:
            qid += 1
            prompt = f"Is there a thing {qid} in the image?{SHORT}"
            questions.append({"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg", "text": prompt,
                              "category": category})
            if text is not None:
                answers.append(answer(qid, text, prompt))
    (coco / "README.txt").write_text("not an annotation file")
    question_file = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    # Answers in reverse order: pairing follows the question file, not the answers file.
    result_file = write_jsonl(tmp_path / "answers.jsonl", answers[::-1])
    return str(coco), question_file, result_file


def test_pope_per_category_and_mean(pope_files, tmp_path, capsys):
    result = eval_pope.evaluate_pope(*pope_files)
    adv, pop, rnd = (result["categories"][c] for c in ("adversarial", "popular", "random"))
    # adversarial: yes/yes -> TP, "No, there is not"/yes -> FN, "Nope"/no -> FP, "NO"/no -> FP, "Yes. But not"/yes -> TP
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (2, 2, 0, 1)
    assert adv["precision"] == pytest.approx(0.5)  # 2 / (2 + 2)
    assert adv["recall"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert adv["f1"] == pytest.approx(4 / 7)  # 2 * 0.5 * (2/3) / (0.5 + 2/3) = (2/3) / (7/6)
    assert adv["accuracy"] == pytest.approx(0.4)  # (2 + 0) / 5
    assert adv["yes_ratio"] == pytest.approx(0.8)  # 4 of 5 predictions are yes
    # popular: no/no -> TN, "not"/no -> TN, Yes/yes -> TP, "No!"/no -> FP (parsed as yes)
    assert (pop["TP"], pop["FP"], pop["TN"], pop["FN"]) == (1, 1, 2, 0)
    assert pop["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1 -> 2 * 0.5 / 1.5
    assert pop["accuracy"] == pytest.approx(0.75)  # 3 / 4
    # random: one answered question (Yes/yes -> TP); the unanswered one is left out with its label
    assert (rnd["samples"], rnd["unanswered"], rnd["TP"]) == (1, 1, 1)
    assert rnd["f1"] == pytest.approx(1.0) and rnd["accuracy"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(47 / 63)  # (4/7 + 2/3 + 1) / 3 = (12 + 14 + 21) / 63
    assert result["accuracy"] == pytest.approx(43 / 60)  # (0.4 + 0.75 + 1) / 3 = 2.15 / 3

    metrics = tmp_path / "m.json"
    eval_pope.main(["--annotation-dir", pope_files[0], "--question-file", pope_files[1],
                    "--result-file", pope_files[2], "--metrics-out", str(metrics)])
    out = capsys.readouterr().out
    assert "Category: adversarial, # samples: 5" in out
    assert "2\t2\t0\t1" in out  # TP FP TN FN
    assert "0.571, 0.400, 0.500, 0.667, 0.800" in out  # f1, acc, precision, recall, yes_ratio
    assert json.loads(metrics.read_text())["f1_popular"] == pytest.approx(2 / 3)


def test_pope_on_the_asked_questions_of_a_limited_run(pope_files, tmp_path):
    """LIMIT=7 asks the first 7 questions: all 5 adversarial and the first 2 popular ones; labels still pair with
    the whole question file, and the random category, not asked, is left out of the mean."""
    coco, question_file, result_file = pope_files
    asked = tmp_path / "asked.jsonl"
    asked.write_text("".join(open(question_file).readlines()[:7]))
    result = eval_pope.evaluate_pope(coco, question_file, result_file, str(asked))
    assert set(result["categories"]) == {"adversarial", "popular"}
    pop = result["categories"]["popular"]
    assert (pop["TP"], pop["FP"], pop["TN"], pop["FN"], pop["samples"]) == (0, 0, 2, 0, 2)  # no/no, "not"/no
    assert result["accuracy"] == pytest.approx((0.4 + 1.0) / 2)


def test_pope_malformed_answers_name_file_and_line(pope_files, tmp_path):
    bad = tmp_path / "answers.jsonl"
    lines = bad.read_text().splitlines()
    lines[2] = "{not json"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        eval_pope.main(["--annotation-dir", pope_files[0], "--question-file", pope_files[1], "--result-file", str(bad)])
    assert f"{bad}:3: invalid JSON" in str(exit_info.value)
    write_jsonl(bad, [answer(999, "Yes")])
    with pytest.raises(SystemExit, match="999 is not in"):
        eval_pope.main(["--annotation-dir", pope_files[0], "--question-file", pope_files[1], "--result-file", str(bad)])


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize(
    "prediction, parsed",
    [
        ("Yes", "yes"),
        ("NO", "no"),
        ("Yes, it is", "yes"),  # "yes," - first 4 characters hold "yes"
        ("Nope", "no"),  # "nope" holds "no"
        ("not sure", "no"),  # "not " holds "no"
        ("maybe", "other"),
        ("I think yes", "other"),  # "i th": the yes comes too late
        ("The answer is no", "other"),
        ("", "other"),
    ],
)
def test_mme_prediction_parsing(prediction, parsed):
    assert eval_mme.parse_prediction(prediction) == parsed


def test_mme_category_acc_plus_by_hand():
    pairs = [("Yes", "yes"), ("Yes", "no"), ("No", "NO"), ("no", "Not really")]
    c = eval_mme.score_category(pairs)
    # right: T, F, T, T -> acc 3/4; image pairs (T,F) -> no, (T,T) -> yes -> acc+ 1/2
    assert c["acc"] == pytest.approx(0.75) and c["acc_plus"] == pytest.approx(0.5)
    assert c["score"] == pytest.approx(125.0)  # 0.75 * 100 + 0.5 * 100
    # "maybe" is other (wrong), "no" right -> acc 1/2, acc+ 0 -> 50
    c = eval_mme.score_category([("Yes", "maybe"), ("No", "no")])
    assert (c["score"], c["other"]) == (pytest.approx(50.0), 1)
    with pytest.raises(ValueError, match="odd"):
        eval_mme.score_category([("Yes", "yes")])


def test_mme_totals_by_hand():
    scores = {name: 100.0 for name in eval_mme.PERCEPTION}
    scores["existence"] = 200.0
    scores.update(commonsense_reasoning=50.0, numerical_calculation=25.0, text_translation=100.0, code_reasoning=75.0)
    totals = eval_mme.totals(scores)
    assert totals["Perception"] == pytest.approx(1100.0)  # 200 + 9 * 100
    assert totals["Cognition"] == pytest.approx(250.0)  # 50 + 25 + 100 + 75
    del scores["OCR"]
    with pytest.raises(ValueError, match="OCR"):
        eval_mme.totals(scores)


@pytest.fixture
def mme_files(tmp_path):
    data = tmp_path / "MME_Benchmark_release_version"
    (data / "existence").mkdir(parents=True)
    (data / "existence" / "0001.txt").write_text(
        "Is there a dog in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n"
    )
    (data / "artwork" / "images").mkdir(parents=True)
    (data / "artwork" / "questions_answers_YN").mkdir()
    (data / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork created by Manet?  Please answer yes or no.\tNo\n"  # two spaces, as in some MME files
    )
    questions = [
        ("existence/0001.jpg", "Is there a dog in this image?", "Yes, it is"),
        ("existence/0001.jpg", "Is there a cat in this image?", "No"),
        ("artwork/10002.jpg", "Is this artwork created by Monet?", "maybe"),
        ("artwork/10002.jpg", "Is this artwork created by Manet?", "no"),
    ]
    question_records = [{"question_id": qid, "image": qid, "text": text + SHORT, "category": qid.split("/")[0]}
                        for qid, text, _ in questions]
    answers = [answer(qid, prediction, text + SHORT) for qid, text, prediction in questions]
    question_file = write_jsonl(tmp_path / "llava_mme.jsonl", question_records)
    result_file = write_jsonl(tmp_path / "answers.jsonl", answers)
    return tmp_path, str(data), question_file, result_file


def test_mme_convert_then_score(mme_files, capsys):
    root, data, question_file, result_file = mme_files
    out_dir = root / "eval_tool" / "answers" / "ckpt"
    eval_mme.main(["convert", "--question-file", question_file, "--result-file", result_file,
                   "--data-dir", data, "--out-dir", str(out_dir)])
    assert (out_dir / "existence.txt").read_text().splitlines() == [
        "0001.txt\tIs there a dog in this image? Please answer yes or no.\tYes\tYes, it is",
        "0001.txt\tIs there a cat in this image? Please answer yes or no.\tNo\tNo",
    ]
    assert (out_dir / "artwork.txt").read_text().splitlines()[1] == (
        "10002.txt\tIs this artwork created by Manet?  Please answer yes or no.\tNo\tno"  # two-space fallback
    )
    # The other 12 categories: one image each, gt Yes/No, predictions yes/yes -> acc 1/2, acc+ 0 -> 50 each.
    for name in eval_mme.PERCEPTION + eval_mme.COGNITION:
        if name not in ("existence", "artwork"):
            (out_dir / f"{name}.txt").write_text("1.txt\tQ1? Please answer yes or no.\tYes\tyes\n"
                                                 "1.txt\tQ2? Please answer yes or no.\tNo\tyes\n")
    result = eval_mme.score(str(out_dir))
    assert result["categories"]["existence"]["score"] == pytest.approx(200.0)  # both right: 1 * 100 + 1 * 100
    assert result["categories"]["artwork"]["score"] == pytest.approx(50.0)  # maybe=other, no right: 0.5 * 100 + 0 * 100
    assert result["Perception"] == pytest.approx(650.0)  # 200 + 50 + 8 * 50
    assert result["Cognition"] == pytest.approx(200.0)  # 4 * 50
    eval_mme.main(["score", "--results-dir", str(out_dir)])
    assert "total score: 650.0" in capsys.readouterr().out


def test_mme_gt_question_rules():
    truth = {("c", "1.txt", "Q? Please answer yes or no."): "Yes", ("c", "2.txt", "R?  Please answer yes or no."): "No"}
    assert eval_mme.gt_question("Q?" + SHORT, "c", "1.txt", truth) == "Q? Please answer yes or no."
    assert eval_mme.gt_question("R?" + SHORT, "c", "2.txt", truth) == "R?  Please answer yes or no."
    assert eval_mme.gt_question("Q? Please answer yes or no.", "c", "1.txt", truth) == "Q? Please answer yes or no."
    with pytest.raises(KeyError):
        eval_mme.gt_question("S?" + SHORT, "c", "1.txt", truth)
    assert eval_mme.gt_file_of("celebrity/images/tt0032138_shot.0395.jpg") == "tt0032138_shot.txt"


def test_mme_errors_name_the_file(mme_files):
    root, data, question_file, result_file = mme_files
    write_jsonl(root / "answers.jsonl", [answer("existence/0001.jpg", "yes", "Is there a horse?" + SHORT)])
    with pytest.raises(SystemExit, match="no ground truth for existence/0001.txt"):
        eval_mme.main(["convert", "--result-file", result_file, "--data-dir", data, "--out-dir", str(root / "o")])
    results = root / "results"
    results.mkdir()
    with pytest.raises(SystemExit, match="existence.txt: file not found"):
        eval_mme.main(["score", "--results-dir", str(results)])
    (results / "existence.txt").write_text("1.txt\tQ\tYes\tyes\n1.txt\tQ\tYes\n")
    with pytest.raises(SystemExit, match="existence.txt:2: expected 4 tab-separated fields"):
        eval_mme.main(["score", "--results-dir", str(results)])


# ---------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("The answer is B.", "B"),
        ("B. cat", "B"),
        ("b", "FAILED"),  # no case folding
        (" A", "FAILED"),  # no stripping
        ("B.cat", "FAILED"),  # the X. form needs ". "
        ("The answer is B", "FAILED"),  # the pattern needs one character after the letter
        ("Because of x. The answer is Cx", "C"),  # ... and that character may be anything
        ("The answer is A. The answer is B.", "FAILED"),  # two matches
        ("F", "FAILED"),
        ("The answer is F.", "F"),  # parsed, but beyond any choice list -> wrong when scored
    ],
)
def test_science_qa_parsing(text, letter):
    assert eval_science_qa.parse_prediction(text) == letter


@pytest.fixture
def sqa_files(tmp_path):
    base = tmp_path / "scienceqa"
    base.mkdir()
    problems = {  # id: (choices, answer index, has image, model text)
        "1": (["cat", "dog"], 1, True, "The answer is B."),  # B -> right, image
        "2": (["x", "y", "z"], 1, False, "B. y"),  # B -> right
        "3": (["x", "y"], 1, True, "b"),  # FAILED -> wrong, image
        "4": (["x", "y"], 0, True, "C"),  # C is beyond 2 choices -> wrong, image
        "5": (["x", "y", "z"], 0, False, "A"),  # right
        "6": (["x", "y"], 0, False, "The answer is A. The answer is B."),  # two matches: FAILED -> wrong
        "7": (["x", "y"], 0, True, None),  # no answer -> wrong, and outside the image subset
        "8": (["x", "y"], 0, True, "A"),  # not in the test split: ignored
    }
    (base / "problems.json").write_text(json.dumps({
        pid: {"question": f"Q{pid}?", "choices": choices, "answer": gt, "image": "image.png" if image else None,
              "split": "val" if pid == "8" else "test"}
        for pid, (choices, gt, image, _) in problems.items()
    }))
    (base / "pid_splits.json").write_text(json.dumps({"test": [str(i) for i in range(1, 8)], "val": ["8"]}))
    answers = []
    for pid, (choices, _, image, text) in problems.items():
        if text is not None:
            prompt = ("<image>\n" if image else "") + f"Q{pid}?\n" + "\n".join(
                f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices)) + LETTER
            answers.append(answer(pid, text, prompt))
    return str(base), write_jsonl(tmp_path / "answers.jsonl", answers)


def test_science_qa_scores_by_hand(sqa_files, tmp_path, capsys):
    base, result_file = sqa_files
    result = eval_science_qa.evaluate(base, result_file)
    assert (result["total"], result["correct"]) == (7, 3)  # right: 1, 2, 5
    assert result["accuracy"] == pytest.approx(300 / 7)  # 3 / 7 * 100 = 42.857
    assert (result["img_total"], result["img_correct"]) == (3, 1)  # image answers 1, 3, 4; only 1 right
    assert result["img_accuracy"] == pytest.approx(100 / 3)  # 1 / 3 * 100

    out, res = tmp_path / "out.jsonl", tmp_path / "result.json"
    eval_science_qa.main(["--base-dir", base, "--result-file", result_file, "--output-file", str(out),
                          "--output-result", str(res)])
    assert "Total: 7, Correct: 3, Accuracy: 42.86%, IMG-Accuracy: 33.33%" in capsys.readouterr().out
    analysis = json.loads(out.read_text())
    assert [r["question_id"] for r in analysis["correct"]] == ["1", "2", "5"]
    assert {r["question_id"]: r["parsed_ans"] for r in analysis["incorrect"]} == {
        "3": "FAILED", "4": "C", "6": "FAILED", "7": "FAILED"}
    saved = json.loads(res.read_text())
    assert (saved["correct"], saved["count"]) == (3, 7)
    assert saved["results"] == {"1": 1, "2": 1, "3": -1, "4": -1, "5": 0, "6": -1, "7": -1}


def test_science_qa_malformed_input(sqa_files, tmp_path):
    base, result_file = sqa_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(answer("1", "A", "")) + "\n" + json.dumps({"question_id": "2", "text": "A"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: missing field\(s\) prompt"):
        eval_science_qa.main(["--base-dir", base, "--result-file", str(bad), "--output-file", str(tmp_path / "o"),
                              "--output-result", str(tmp_path / "r")])


# ---------------------------------------------------------------- MMBench

MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]


@pytest.fixture
def mmbench_files(tmp_path):
    rows = [  # index, answer, category; 1000000 + i and 2000000 + i are circular copies of i
        (0, "A", "attribute"), (1000000, "B", "attribute"), (2000000, "C", "attribute"),
        (1, "C", "counting"), (1000001, "A", "counting"),
        (2, "D", "counting"),
    ]
    lines = ["\t".join(MMB_HEADER)]
    for index, gt, category in rows:
        lines.append("\t".join([str(index), f"Question {index % 1000000}?", "a hint" if index == 1 else "",
                                "red", "green", "blue", "" if index == 1 else "pink", gt, category,
                                "iVBORw0KGgo=", "src", "l2", "", "dev"]))
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    texts = {0: "A", 1000000: "B.", 2000000: "(C) blue", 1: "C", 1000001: "All of them", 2: "D"}
    answers = [answer(index, text, f"Question {index}?") for index, text in texts.items()]
    return str(tsv), write_jsonl(tmp_path / "answers.jsonl", answers)


@pytest.mark.parametrize(
    "text, letter",
    [("A", "A"), ("B.", "B"), ("(C) blue", "C"), (" D: pink", "D"), ("All of them", None), ("b", None),
     ("The answer is B", None), ("E", None)],
)
def test_mmbench_letter_rule(text, letter):
    assert eval_mmbench.parse_letter(text) == letter


def test_mmbench_circular_score_by_hand(mmbench_files, capsys):
    tsv, result_file = mmbench_files
    result = eval_mmbench.score(tsv, result_file)
    # rows right: 0, 1000000, 2000000, 1, 2; wrong: 1000001 ("All of them" has no letter) -> 5 / 6
    assert (result["rows"], result["rows_correct"]) == (6, 5)
    assert result["accuracy"] == pytest.approx(5 / 6)
    # groups: 0 (3 rows all right) right, 1 (1000001 wrong) wrong, 2 right -> 2 / 3
    assert (result["groups"], result["groups_correct"]) == (3, 2)
    assert result["circular_accuracy"] == pytest.approx(2 / 3)
    assert result["categories"] == {"attribute": pytest.approx(1.0), "counting": pytest.approx(0.5)}  # counting: 1 of 2
    eval_mmbench.main(["score", "--annotation-file", tsv, "--result-file", result_file])
    assert "circular accuracy: 66.67%" in capsys.readouterr().out


def test_mmbench_rotated_rounds_map_back():
    rows = [{"index": "5", "answer": "B"}]
    round0 = {"text": "B", "option_char": ["A", "B", "C"]}
    round1 = {"text": "A", "option_char": ["B", "C", "A"]}  # shown letter A is the original B -> right
    round2 = {"text": "A", "option_char": ["C", "A", "B"]}  # shown letter A is the original C -> wrong
    assert eval_mmbench.score_mmbench(rows, {5: [round0, round1]})["rows_correct"] == 1
    assert eval_mmbench.score_mmbench(rows, {5: [round0, round1, round2]})["rows_correct"] == 0
    assert eval_mmbench.score_mmbench(rows, {})["unanswered"] == 1


def test_mmbench_submission_columns(mmbench_files, tmp_path, caplog):
    tsv, result_file = mmbench_files
    out = tmp_path / "upload" / "ckpt.tsv"
    eval_mmbench.main(["convert", "--annotation-file", tsv, "--result-file", result_file, "--out", str(out)])
    lines = out.read_text().splitlines()
    # hint, category, source, image, comment, l2-category dropped; prediction is the 7th column
    assert lines[0].split("\t") == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert lines[2].split("\t") == ["1000000", "Question 0?", "red", "green", "blue", "pink", "B.", "B", "dev"]
    assert lines[4].split("\t") == ["1", "Question 1?", "red", "green", "blue", "", "C", "C", "dev"]
    xlsx = tmp_path / "upload" / "ckpt.xlsx"
    try:
        import openpyxl
    except ImportError:
        assert not xlsx.exists() and "openpyxl is not installed" in caplog.text
    else:
        sheet = openpyxl.load_workbook(xlsx).active
        assert [cell.value for cell in sheet[1]][6] == "prediction" and sheet["A3"].value == 1000000


def test_mmbench_bad_index_names_file_and_line(tmp_path):
    tsv = tmp_path / "m.tsv"
    tsv.write_text("index\tquestion\tanswer\n0\tQ\tA\nx\tQ\tB\n")
    with pytest.raises(SystemExit, match=r"m.tsv:3: index 'x' is not an integer"):
        eval_mmbench.main(["score", "--annotation-file", str(tsv), "--result-file", str(tmp_path / "none.jsonl")])


# ---------------------------------------------------------------- SEED


@pytest.fixture
def seed_files(tmp_path):
    annotation = {
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
        "questions": [
            {"question_id": "1", "question_type_id": 1, "data_type": "image", "answer": "A", "data_id": "1.jpg"},
            {"question_id": "2", "question_type_id": 1, "data_type": "image", "answer": "B", "data_id": "2.jpg"},
            {"question_id": "3", "question_type_id": 2, "data_type": "image", "answer": "C", "data_id": "3.jpg"},
            {"question_id": "4", "question_type_id": 2, "data_type": "image", "answer": "D", "data_id": "4.jpg"},
            {"question_id": "5", "question_type_id": 10, "data_type": "video", "answer": "A", "data_id": "v5"},
            {"question_id": "6", "question_type_id": 10, "data_type": "video", "answer": "B", "data_id": "v6"},
        ],
    }
    path = tmp_path / "SEED-Bench.json"
    path.write_text(json.dumps(annotation))
    # LLaVA's question file uses integer ids; exact match: "B " and "c" are wrong
    texts = {1: "A", 2: "B ", 3: "c", 4: "D", 5: "A", 6: "B"}
    return str(path), write_jsonl(tmp_path / "merge.jsonl", [answer(i, t) for i, t in texts.items()])


def test_seed_scores_by_hand(seed_files, tmp_path, capsys):
    annotation, result_file = seed_files
    data, answers = eval_seed.load(annotation, result_file)
    result = eval_seed.score_seed(data["questions"], answers, data["question_type"])
    assert list(result["types"]) == [1, 2, 10]  # numeric order, not "1", "10", "2"
    assert result["types"][1]["accuracy"] == pytest.approx(50.0)  # q1 right, q2 "B " wrong
    assert result["types"][2]["accuracy"] == pytest.approx(50.0)  # q3 "c" wrong, q4 right
    assert result["types"][10]["accuracy"] == pytest.approx(100.0)  # q5, q6 right
    assert result["total"] == pytest.approx(400 / 6)  # 4 of 6 right
    assert result["image"] == pytest.approx(50.0)  # 2 of the 4 image questions
    assert result["video"] == pytest.approx(100.0)  # 2 of the 2 video questions

    upload = tmp_path / "answers_upload" / "ckpt.jsonl"
    eval_seed.main(["--annotation-file", annotation, "--result-file", result_file, "--result-upload-file", str(upload)])
    out = capsys.readouterr().out
    assert "Action Recognition: 100.00%" in out and "Total accuracy: 66.67%" in out
    assert "image accuracy: 50.00%" in out and "video accuracy: 100.00%" in out
    assert [json.loads(line) for line in upload.read_text().splitlines()][:2] == [
        {"question_id": "1", "prediction": "A"}, {"question_id": "2", "prediction": "B "}]


def test_seed_unanswered_question_blocks_the_upload(seed_files, tmp_path, capsys):
    annotation, _ = seed_files
    partial = write_jsonl(tmp_path / "partial.jsonl", [answer(1, "A")])
    upload = tmp_path / "upload.jsonl"
    with pytest.raises(SystemExit, match="question '2' has no answer"):
        eval_seed.main(["--annotation-file", annotation, "--result-file", partial, "--result-upload-file", str(upload)])
    assert "image accuracy: 25.00%" in capsys.readouterr().out  # 1 of 4 image questions; printed before stopping
    assert not upload.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "A"}\n[1, 2]\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: expected a JSON object"):
        eval_seed.main(["--annotation-file", annotation, "--result-file", str(bad),
                        "--result-upload-file", str(upload)])
