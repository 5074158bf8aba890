"""The scoring rules of the tiny world's long answers (llava.world.long_answers), on values worked out by hand."""

import pytest

from llava.world.long_answers import iou, object_f1, parse_box, score


def test_object_f1_counts_objects_as_a_multiset():
    truth = "small red circle, large blue square"
    assert object_f1(truth, truth) == 1.0
    assert object_f1("large blue square, small red circle", truth) == 1.0  # order is exact match's business
    assert object_f1("small red circle", truth) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2
    assert object_f1("small red circle, small red circle, large blue square", truth) == pytest.approx(0.8)  # P 2/3, R 1
    assert object_f1("a green triangle", truth) == 0.0 and object_f1("", truth) == 0.0


def test_boxes_parse_and_overlap_with_corners_included():
    assert parse_box("[1, 2, 30, 40]") == (1, 2, 30, 40) and parse_box(" [1,2,30,40]. ") == (1, 2, 30, 40)
    assert parse_box("1, 2, 30, 40") is None and parse_box("[1, 2, 30]") is None
    assert iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5 x 10 shared of 100 + 100 - 50
    assert iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0 and iou(None, (0, 0, 9, 9)) == 0.0
    assert iou((9, 0, 0, 9), (0, 0, 9, 9)) == 0.0  # an inverted box is no box


def test_scores_per_kind():
    assert score("ground", "[0, 0, 9, 9]", "[0, 0, 9, 9]") == {"correct": True, "iou": 1.0}
    assert score("ground", "[0, 0, 9, 9]", "[5, 0, 14, 9]")["correct"] is False  # IoU 1/3 < 0.5
    assert score("ground", "somewhere", "[5, 0, 14, 9]") == {"correct": False, "iou": 0.0}
    assert score("describe", "Small red circle.", "small red circle") == {"correct": True, "f1": 1.0}
    assert score("read", "K4", "K4") == {"correct": True} and score("read", "K", "K4") == {"correct": False}
