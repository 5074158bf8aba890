"""LLaVA's three commands, in the order its README gives them, on a fresh copy of the repository with no
arguments: `python init_weight.py`, `bash scripts/v1_5/finetune_visual_gate.sh`, `bash scripts/v1_5/eval/gqa.sh`.
Only sizes are reduced (a small generated world, two gate steps); every path is the commands' own default."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_copy(destination) -> None:
    """The tracked files as they are in the working tree: what a clone of this commit holds."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(destination, name))


def test_llava_commands_in_order_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    fresh_copy(clone)
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(clone), TRAIN_IMAGES="48", TEST_IMAGES="12",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def run(*command):
        result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    early = subprocess.run(["bash", "scripts/v1_5/eval/gqa.sh"], cwd=clone, env=env, capture_output=True, text=True)
    assert early.returncode == 1 and "Traceback" not in early.stderr
    assert "no trained gates yet in ./checkpoints/tiny-world-llava-visual-gate: run `python init_weight.py`" in early.stderr

    init = run(sys.executable, "init_weight.py")
    assert (clone / "checkpoints/tiny-world-llava-exit-init/config.json").is_file()
    assert "fresh gates of width 2048 added to checkpoints/tiny-world-llava" in init.stdout

    train = run("bash", "scripts/v1_5/finetune_visual_gate.sh", "--max_steps", "2", "--dataloader_num_workers", "0")
    assert "generating" in train.stdout + train.stderr  # the default world was missing, and the user is told
    assert (clone / "playground/data/tiny_world/train_single_turn.json").is_file()
    assert (clone / "checkpoints/tiny-world-llava-visual-gate/visual_gates.safetensors").is_file()

    run("bash", "scripts/v1_5/eval/gqa.sh")
    answers_root = clone / "playground/data/tiny_world/eval/gqa/answers/llava_gqa_testdev_balanced"
    (run_folder,) = answers_root.iterdir()
    assert run_folder.name.startswith("tiny-world-llava-visual-gate_")
    answers = [json.loads(line) for line in (run_folder / "merge.jsonl").read_text().splitlines()]
    questions = (clone / "playground/data/tiny_world/eval/gqa/llava_gqa_testdev_balanced.jsonl").read_text().splitlines()
    assert len(answers) == len(questions) > 0 and not [a for a in answers if "error" in a]
    summary = json.loads((run_folder / "merge.summary.json").read_text())
    assert summary["samples"] == len(questions) and summary["accuracy"] is not None
    # The trained gates decide by default, as the reference's model does (init_weight.py saved dynamic, τ = 0.5).
    assert run_folder.name == "tiny-world-llava-visual-gate_dynamic-0.5"
    assert summary["settings"]["exit"] == {"mode": "dynamic", "threshold": 0.5}

    limited = subprocess.run(["bash", "scripts/v1_5/eval/gqa.sh"], cwd=clone, env={**env, "LIMIT": "5"},
                             capture_output=True, text=True, timeout=900)
    assert limited.returncode == 0, limited.stderr[-3000:]
    limited_folder = answers_root / "tiny-world-llava-visual-gate_dynamic-0.5_limit5"
    assert len((limited_folder / "merge.jsonl").read_text().splitlines()) == 5
    metrics = json.loads((limited_folder / "metrics.json").read_text())
    assert metrics["questions"] == 5 and metrics["missing"] == 0  # scored on the five it asked
