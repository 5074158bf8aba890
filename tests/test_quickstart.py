"""scripts/quickstart.sh, reduced to minutes: the committed tiny-world model, a small world, a few gate steps, one
threshold and two fixed layers. Checked against the run's own answers scored independently, and the FLOPs
ordering that the cost formula implies."""

import json
import os
import subprocess
import sys

from PIL import Image

from llava.eval.io import read_jsonl
from llava.world.generate import TEST_TRUTH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a markdown table at the start of `text` (what follows its first blank line is not the table)."""
    rows = [line.strip("|").split("|") for line in text.split("\n\n")[0].splitlines()[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_quickstart_reduced(tmp_path):
    world, results = tmp_path / "world", tmp_path / "results"
    env = dict(
        os.environ, PYTHON=sys.executable, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        WORLD=str(world), TRAIN_IMAGES="64", TEST_IMAGES="48", BASE_MODEL=BASE_MODEL,
        INIT_MODEL=str(tmp_path / "init"), GATED_MODEL=str(tmp_path / "gated"), GATE_STEPS="3", GATE_BATCH_SIZE="4",
        THRESHOLDS="0.5", FIXED_LAYERS="0 2", FASTV_LAYER="2", FASTV_RATIOS="0 1", DYNAMIC_FASTV_THRESHOLDS="0.5",
        METHODS="fastv pdrop", BUDGETS="48", BUDGET_RULES="equal paper", GATES_AFTER="divprune", SHORTV="1",
        SHORTV_QUESTIONS="4", EVAL_BATCH_SIZE="16", RESULTS=str(results),
    )
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts/quickstart.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "gated" / "visual_gates.safetensors").is_file()

    rows = table_rows((results / "table.md").read_text())
    shortv = json.loads((results / "shortv.json").read_text())
    shortv_label = shortv["stages"].replace(":", "-")
    # a stage list is named by its recorded stages: DivPrune at equal 48 and paper 48 (16 of 196), gates after
    assert list(rows) == [
        "none", "dynamic-0.5", "fixed-0", "fixed-2", "fastv-2-0", "fastv-2-1", "dynamic+fastv-0.5-2-0.5",
        "fastv-equal48", "pdrop-equal48", "divprune-0.2448979592+gates-0.99", "divprune-0.08333333333+gates-0.99",
        shortv_label,
    ]
    # paper 48 is 16 of 196 here: below what the layers before the first pruning average for both methods
    unreached = (results / "table.md").read_text().split("\n\n")[1].splitlines()
    assert [line.split(":")[0] for line in unreached] == ["fastv-paper48", "pdrop-paper48"]
    assert shortv["questions"] == 4 and len(shortv["replaced"]) == 5  # round(0.6 · 8) of the world's layers
    truth = json.loads((world / TEST_TRUTH).read_text())
    answers_root = world / "eval/gqa/answers/llava_gqa_testdev_balanced/quickstart"
    folders = {json.loads((folder / "merge.summary.json").read_text())["settings"]["exit_label"]: folder
               for folder in answers_root.iterdir() if (folder / "merge.summary.json").is_file()}
    for name, (accuracy, _, exit_layer, _, reduction) in rows.items():  # every row scored by hand
        answers = read_jsonl(str(folders[name] / "merge.jsonl"), ("question_id",))
        assert len(answers) == 48
        correct = sum(a["text"].rstrip(".").lower() == truth[a["question_id"]]["answer"] for a in answers)
        assert float(accuracy) == round(100 * correct / len(answers), 1)
        if name.startswith("fixed-"):
            assert float(exit_layer) == int(name.split("-")[1])
    reductions = {name: float(row[4].rstrip(" %")) for name, row in rows.items()}
    assert reductions["none"] == 0.0 < reductions["fixed-2"] < reductions["fixed-0"]
    # FastV keeping every token is the model itself; dropping every token after K is the fixed exit after K.
    assert rows["fastv-2-0"] == rows["none"]
    assert rows["fastv-2-1"] == rows["fixed-2"]
    assert 0.0 < reductions["dynamic+fastv-0.5-2-0.5"]
    # One budget, one cost: 48 of 196 visual tokens on average, whichever layers each method prunes at.
    assert abs(reductions["fastv-equal48"] - reductions["pdrop-equal48"]) < 2.0
    costs = table_rows((results / "costs.md").read_text())  # three units: tokens, LM / vision FLOPs, prefill time
    assert float(costs["none"][3]) == 1.0 and all(float(row[3]) > 0 for row in costs.values())
    assert abs(float(costs["fastv-equal48"][0]) - 48) <= 1 and abs(float(costs["pdrop-equal48"][0]) - 48) <= 1
    # The committed model reads the image: without its visual tokens (fixed-0) it falls back to text priors.
    assert float(rows["none"][0]) >= float(rows["fixed-0"][0]) + 10
    # the gates after DivPrune never cost more than DivPrune's tokens; ShortV's frozen layers cost less than none
    assert float(costs["divprune-0.2448979592+gates-0.99"][0]) <= 48
    assert 0.0 < reductions[shortv_label] and float(rows[shortv_label][2]) == 8.0  # nothing leaves: all layers see all

    for plot in ("accuracy_vs_tflops.png", "exit_layer_histogram.png"):
        with Image.open(results / plot) as image:
            assert image.size[0] > 500 and image.size[1] > 400
