"""VTW's calibration of K (BASELINES.md §10.3): its divergence and its rule checked by hand, then the command on the
tiny world's model, each mean KL against the model's own forced exits and K saved where the loader reads it."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llava.analysis.calibration import divergence_from_full
from llava.analysis.vtw import first_layer_within
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit import ExitRequest
from llava.world.generate import TEST_QUESTIONS, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")


def test_divergence_is_kl_of_the_withdrawn_from_the_full_distribution():
    """P = (1/2, 1/2), P_d = (3/4, 1/4): KL(P_d ‖ P) = 3/4 log(3/2) + 1/4 log(1/2) by hand; what torch's KLDivLoss
    gives on log P and P_d (the official call); 0 when the two agree."""
    full = torch.log(torch.tensor([[0.5, 0.5]]))
    withdrawn = torch.log(torch.tensor([[0.75, 0.25]]))
    by_hand = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(divergence_from_full(full, withdrawn)[0]) == pytest.approx(by_hand, abs=1e-6)
    official = torch.nn.KLDivLoss(reduction="batchmean")(full.log_softmax(-1), withdrawn.softmax(-1))
    assert float(official) == pytest.approx(by_hand, abs=1e-6)
    assert float(divergence_from_full(full, full)[0]) == pytest.approx(0.0, abs=1e-7)


def test_k_is_the_first_layer_within_eta():
    curve = {5: 0.02, 6: 0.004, 7: 0.0025, 8: 0.005, 9: 0.001}
    assert first_layer_within(curve, 0.003) == 7  # not 9: the first, even if a later one is lower
    assert first_layer_within(curve, 0.0001) is None
    assert first_layer_within(curve, 1.0) == 5


def test_calibration_command_on_the_world_model(tmp_path):
    world = tmp_path / "world"
    generate(str(world), train=2, test=12, seed=4)
    model = tmp_path / "model"
    shutil.copytree(WORLD_MODEL, model)
    result = subprocess.run(
        [sys.executable, "-m", "llava.analysis.vtw", "--model-path", str(model), "--question-file",
         str(world / TEST_QUESTIONS), "--image-folder", str(world / "eval" / "gqa" / "data" / "images"),
         "--output-dir", str(tmp_path / "out"), "--limit", "12", "--first", "1", "--eta", "0.05", "--device", "cpu",
         "--batch-size", "5", "--save"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "vtw.json").read_text())
    mean = {int(layer): value for layer, value in report["mean_kl"].items()}
    assert sorted(mean) == list(range(1, 8)) and report["questions"] == 12
    assert report["layer"] == first_layer_within(mean, 0.05)
    assert f"K = {report['layer']}" in result.stdout
    assert Checkpoint.resolve(str(model)).exit_defaults == ExitRequest("fixed", report["layer"])
    # The curve against each question's own forced exits, one at a time (no batch, no padding).
    from llava.eval.answering import Answerer, RunSpec
    from llava.model.builder import load_model

    checkpoint = Checkpoint.resolve(WORLD_MODEL)
    spec = RunSpec.build(checkpoint, device="cpu", image_folder=str(world / "eval" / "gqa" / "data" / "images"),
                         batch_size=1, exit_mode="none")
    questions = [json.loads(line) for line in (world / TEST_QUESTIONS).read_text().splitlines()]
    expected = dict.fromkeys(mean, 0.0)
    with Answerer(load_model(checkpoint, device="cpu"), spec) as answerer, torch.inference_mode():
        for question in questions:  # alone, no padding: the forward's last position is the prompt's last token
            batch = answerer.batch_inputs([answerer.prepare(question)])
            full = answerer.model(**batch, exit_config=ExitRequest("none").expand()).logits[0, -1]
            for layer in expected:
                withdrawn = answerer.model(**batch, exit_config=ExitRequest("fixed", layer).expand()).logits[0, -1]
                expected[layer] += float(torch.nn.KLDivLoss(reduction="batchmean")(
                    full.log_softmax(-1)[None], withdrawn.softmax(-1)[None])) / len(questions)
    assert all(mean[layer] == pytest.approx(expected[layer], rel=1e-4, abs=1e-7) for layer in mean)


def test_no_layer_within_eta_is_said(tmp_path):
    world = tmp_path / "world"
    generate(str(world), train=2, test=3, seed=4)
    result = subprocess.run(
        [sys.executable, "-m", "llava.analysis.vtw", "--model-path", WORLD_MODEL, "--question-file",
         str(world / TEST_QUESTIONS), "--image-folder", str(world / "eval" / "gqa" / "data" / "images"),
         "--output-dir", str(tmp_path / "out"), "--first", "7", "--eta", "0", "--device", "cpu"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1 and "no layer from 7 keeps the mean KL within η = 0.0" in result.stderr
    assert "Traceback" not in result.stderr
