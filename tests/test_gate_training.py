"""Gate training: the label rule, the shared-pass step against inference exits, training and resuming, the
gates-only artifact, init_weight.py, one-line input errors, and the DeepSpeed script on CPU with 1 and 2 processes."""

import ast
import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava.constants import IGNORE_INDEX
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint import Checkpoint
from llava.model.gates_artifact import save_gates
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.training import ExitLabelRule, exit_labels
from llava.train.train import main, resolve_resume, train

from batching import padded_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts/v1_5/finetune_visual_gate.sh")


def test_exit_labels_on_crafted_cases():
    """Independent arithmetic: agreement = share of equal argmaxes; ratio = sum CE(exit) / sum CE(full)."""
    full = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    exit_ = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.5, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 1, 0])
    sample = torch.tensor([0, 0, 1, 1, 2])
    judged = exit_labels(full, exit_, targets, sample, 4, ExitLabelRule(0.99, 1.03))

    def ce(logits, target):
        return math.log(sum(math.exp(v) for v in logits)) - logits[target]

    expected = []
    for s in range(3):
        rows = [i for i in range(5) if sample[i] == s]
        agree = sum(full[i].argmax() == exit_[i].argmax() for i in rows) / len(rows)
        ratio = sum(ce(exit_[i].tolist(), targets[i]) for i in rows) / sum(ce(full[i].tolist(), targets[i]) for i in rows)
        expected.append((agree, ratio, int(agree > 0.99 and ratio < 1.03)))
    for s, (agree, ratio, label) in enumerate(expected):
        assert judged.agree[s].item() == pytest.approx(float(agree))
        assert judged.ratio[s].item() == pytest.approx(ratio, rel=1e-5)
        assert judged.label[s].item() == label
    # Sample 0 identical (safe), 1 argmax flips (unsafe), 2 same argmax but loss up ~25% (unsafe), 3 no tokens.
    assert judged.label.tolist() == [1, 0, 0, 0] and judged.usable.tolist() == [True, True, True, False]


def test_training_exit_continuation_matches_inference_exit(loaded, images):
    tokenizer, model, _, _ = loaded
    model.config.visual_gate_hidden_size = 8
    from llava.model.visual_exit.gate import build_visual_gates

    model.get_model().visual_gates_router = build_visual_gates(model.config)
    try:
        prompts = ["USER: <image>\nWhat is it? ASSISTANT: A red square.</s>", "USER: Hi ASSISTANT: Hello there.</s>",
                   "USER: <image> and <image>? ASSISTANT: Two things.</s>"]
        ids, mask = padded_batch(tokenizer, prompts, "right")
        labels = ids.clone()
        labels[:, :-6] = IGNORE_INDEX  # the last tokens play the answer
        labels[mask == 0] = IGNORE_INDEX
        for layer in (0, 2):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images[:3], gate_training_layer=layer)
                exited = model(input_ids=ids, attention_mask=mask, images=images[:3], exit_config=ExitRequest("fixed", layer + 1).expand())
                full = model(input_ids=ids, attention_mask=mask, images=images[:3])
            mm = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, images[:3])
            sample, position = out.answer_positions
            assert torch.equal(mm.labels[sample, position + 1], mm.labels[sample, position + 1].clamp(min=0))
            assert (out.exit_logits - exited.logits[sample, position]).abs().max() <= 1e-5
            assert (out.full_logits - full.logits[sample, position]).abs().max() <= 1e-5
            assert out.exit_labels.usable.tolist() == [True, False, True]  # the text-only sample has no visual tokens
    finally:
        model.get_model().visual_gates_router = None
        del model.config.visual_gate_hidden_size


@pytest.mark.parametrize("reduction", ["divprune:0.5", "downsample:1", "visionzip:2:1", "cdpruner:5"])
def test_training_after_an_input_reduction_judges_what_inference_runs(loaded, images, reduction):
    """With a reduction before the LLM, the training pass's two continuations are inference's `REDUCTION` and
    `REDUCTION,fixed:k+1` on the same batch: the gates learn on what the reduction keeps."""
    tokenizer, model, _, _ = loaded
    model.config.visual_gate_hidden_size = 8
    from llava.model.visual_exit.gate import build_visual_gates

    model.get_model().visual_gates_router = build_visual_gates(model.config)
    try:
        prompts = ["USER: <image>\nWhat is it? ASSISTANT: A red square.</s>", "USER: <image> Hi ASSISTANT: Hello there.</s>"]
        ids, mask = padded_batch(tokenizer, prompts, "right")
        labels = ids.clone()
        labels[:, :-6] = IGNORE_INDEX
        labels[mask == 0] = IGNORE_INDEX
        before = ExitRequest("stages", stages=reduction).expand()
        questions = ["What is it?", "Hi"]  # what CDPruner ranks by (the training collator's first questions)
        for layer in (0, 2):
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images[:2], gate_training_layer=layer,
                            exit_config=before, instructions=questions)
                exited = model(input_ids=ids, attention_mask=mask, images=images[:2], instructions=questions,
                               exit_config=ExitRequest("stages", stages=f"{reduction},fixed:{layer + 1}").expand())
                full = model(input_ids=ids, attention_mask=mask, images=images[:2], exit_config=before, instructions=questions)
                unreduced = model(input_ids=ids, attention_mask=mask, images=images[:2])
            sample, position = out.answer_positions
            assert (out.exit_logits - exited.logits[sample, position]).abs().max() <= 1e-5
            assert (out.full_logits - full.logits[sample, position]).abs().max() <= 1e-5
            assert (out.full_logits - unreduced.logits[sample, position]).abs().max() > 1e-4  # it did reduce
    finally:
        model.get_model().visual_gates_router = None
        del model.config.visual_gate_hidden_size


@pytest.fixture(scope="module")
def gate_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate-data")
    records = []
    for i, (name, rgb) in enumerate([("red", (220, 20, 20)), ("green", (20, 200, 20)), ("blue", (20, 20, 220))] * 4):
        Image.new("RGB", (40 + i, 30), rgb).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {name}."}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def init_checkpoint(llava_checkpoint, tmp_path_factory):
    from init_weight import main as init_weight

    out = str(tmp_path_factory.mktemp("exit-init"))
    init_weight(["--model-path", llava_checkpoint, "--output-dir", out, "--gate-hidden-size", "16", "--seed", "1"])
    return out


def train_args(checkpoint, data, output_dir, *extra):
    return [
        "--model_name_or_path", checkpoint, "--data_path", str(data / "data.json"), "--image_folder", str(data),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "3", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--use_cpu", "True", "--seed", "3", "--save_steps", "1", *extra,
    ]


def test_init_weight_adds_reference_initialised_gates(init_checkpoint, llava_checkpoint):
    _, base, _, _ = load_pretrained_model(llava_checkpoint, device="cpu")
    _, model, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    gates = model.get_model().visual_gates_router
    assert len(gates) == model.config.num_hidden_layers and model.config.visual_gate_hidden_size == 16
    for gate in gates:
        for linear in (gate.w1, gate.w2):
            fan_out, fan_in = linear.weight.shape
            assert linear.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform bound
            assert linear.weight.std() > 0.3 * math.sqrt(2 / (fan_in + fan_out))
    base_state = base.state_dict()
    assert all(torch.equal(t, base_state[n]) for n, t in model.state_dict().items() if "visual_gates" not in n)


def test_training_changes_only_the_gates_and_resumes(init_checkpoint, gate_data, tmp_path):
    trainer = train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "2"))
    assert trainer.state.global_step == 2
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("gate_accuracy" in entry and "exit_ratio" in entry for entry in history)

    _, before, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    _, after, _, _ = load_pretrained_model(str(tmp_path / "run"), device="cpu")  # the gates-only artifact
    old, new = before.state_dict(), after.state_dict()
    gate_names = [n for n in new if n.startswith("model.visual_gates_router.")]
    assert all(torch.equal(new[n], old[n]) for n in new if n not in gate_names)
    assert any(not torch.equal(new[n], old[n]) for n in gate_names)

    # Resuming from step 1 reproduces step 2 exactly.
    resumed = train(train_args(init_checkpoint, gate_data, tmp_path / "resumed", "--max_steps", "2",
                               "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-1")))
    assert resumed.state.global_step == 2
    final, again = load_file(tmp_path / "run" / "visual_gates.safetensors"), load_file(tmp_path / "resumed" / "visual_gates.safetensors")
    assert all(torch.allclose(final[n], again[n], atol=1e-6) for n in final)


def test_training_on_from_a_gates_artifact_keeps_its_base(init_checkpoint, gate_data, tmp_path):
    train(train_args(init_checkpoint, gate_data, tmp_path / "first", "--max_steps", "1"))
    train(train_args(str(tmp_path / "first"), gate_data, tmp_path / "second", "--max_steps", "1"))
    artifact = json.loads((tmp_path / "second" / "visual_gates.json").read_text())
    assert artifact["base_model"] == os.path.abspath(init_checkpoint)
    load_pretrained_model(str(tmp_path / "second"), device="cpu")


def test_gates_train_after_cdpruner_on_each_samples_first_question(init_checkpoint, gate_data, tmp_path):
    train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "1", "--input_reduction", "cdpruner:5"))
    assert json.loads((tmp_path / "run" / "visual_gates.json").read_text())["input_reduction"] == "cdpruner:5"


def test_gates_trained_after_a_reduction_run_after_it_by_default(init_checkpoint, gate_data, tmp_path):
    train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "1", "--input_reduction", "divprune:0.5"))
    artifact = json.loads((tmp_path / "run" / "visual_gates.json").read_text())
    assert artifact["input_reduction"] == "divprune:0.5"
    checkpoint = Checkpoint.resolve(str(tmp_path / "run"))
    assert checkpoint.exit_defaults == ExitRequest("stages", stages="divprune:0.5,gates:0.5")
    _, model, _, _ = load_pretrained_model(str(tmp_path / "run"), device="cpu")
    assert ExitRequest.from_model_config(model.config) == checkpoint.exit_defaults  # what a bare forward runs
    train(train_args(str(tmp_path / "run"), gate_data, tmp_path / "on", "--max_steps", "1"))  # training on keeps it
    assert json.loads((tmp_path / "on" / "visual_gates.json").read_text())["input_reduction"] == "divprune:0.5"


def test_full_checkpoint_loads_with_trained_gates(init_checkpoint, gate_data, tmp_path):
    train(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "1", "--save_full_model", "True"))
    _, full, _, _ = load_pretrained_model(str(tmp_path / "run" / "full_model"), device="cpu")
    gates = load_file(tmp_path / "run" / "visual_gates.safetensors")
    state = full.state_dict()
    assert all(torch.equal(state[n], t) for n, t in gates.items())


def test_init_weight_refuses_existing_gates_unless_reinit(init_checkpoint, tmp_path, capsys):
    from init_weight import main as init_weight

    _, model, _, _ = load_pretrained_model(init_checkpoint, device="cpu")
    save_gates(model, str(tmp_path / "artifact"), init_checkpoint)
    found = {init_checkpoint: "gates of width 16 in its weights",
             str(tmp_path / "artifact"): f"a gates-only artifact (width 16, base {init_checkpoint})"}
    for source, gates in found.items():
        with pytest.raises(SystemExit) as refused:
            init_weight(["--model-path", source, "--output-dir", str(tmp_path / "out")])
        assert refused.value.code == (
            f"init_weight.py: error: {source} already holds {gates}; --reinit replaces them with fresh ones")
        assert not (tmp_path / "out").exists()

    init_weight(["--model-path", init_checkpoint, "--output-dir", str(tmp_path / "out"), "--gate-hidden-size", "8",
                 "--reinit"])
    assert "fresh gates of width 8 replaced in" in capsys.readouterr().out
    _, fresh, _, _ = load_pretrained_model(str(tmp_path / "out"), device="cpu")
    assert fresh.get_model().visual_gates_router[0].w1.weight.shape[0] == fresh.config.visual_gate_hidden_size == 8


@pytest.mark.parametrize("case, message", [
    ("data file", r"nowhere\.json: data file not found"),
    ("json", r"bad\.json:2: invalid JSON"),
    ("images", r"unreadable/data\.json: no usable sample among 2: 2 × unreadable image \(e\.g\. 0\)"),
    ("model", r"no-model: no config\.json here"),
    ("sampler", r"--exit_layer_sampler '2-9': the range must lie within 0-2"),
    ("resume latest", r"--resume_from_checkpoint True: no checkpoint-\* folder in .*/run to resume from"),
    ("resume folder", r"--resume_from_checkpoint .*/checkpoint-7: not a checkpoint folder"),
    ("reduction", r"--input_reduction prune:fastv:1:0.5: only reductions before the LLM .* Prune acts inside"),
    ("reduction spec", r"--input_reduction divprune:2: exit stage 'divprune:2'"),
])
def test_input_errors_end_in_one_line(init_checkpoint, gate_data, tmp_path, case, message):
    (tmp_path / "bad.json").write_text('[\n  {"id": "1",}\n]')
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "data.json").write_text(json.dumps(json.loads((gate_data / "data.json").read_text())[:2]))
    for i in (0, 1):
        (unreadable / f"{i}.png").write_text("version https://git-lfs.github.com/spec/v1")  # an LFS pointer
    extra = {
        "data file": ["--data_path", str(tmp_path / "nowhere.json")],
        "json": ["--data_path", str(tmp_path / "bad.json")],
        "images": ["--data_path", str(unreadable / "data.json"), "--image_folder", str(unreadable)],
        "model": ["--model_name_or_path", str(tmp_path / "no-model")],
        "sampler": ["--exit_layer_sampler", "2-9"],
        "resume latest": ["--resume_from_checkpoint", "True"],
        "resume folder": ["--resume_from_checkpoint", str(tmp_path / "checkpoint-7")],
        "reduction": ["--input_reduction", "prune:fastv:1:0.5"],
        "reduction spec": ["--input_reduction", "divprune:2"],
    }[case]
    with pytest.raises(SystemExit) as stopped:
        main(train_args(init_checkpoint, gate_data, tmp_path / "run", "--max_steps", "1", *extra))
    assert isinstance(stopped.value.code, str) and "\n" not in stopped.value.code
    assert stopped.value.code.startswith("train.py: error: ") and re.search(message, stopped.value.code)


def test_resume_true_means_the_numerically_latest_checkpoint(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert resolve_resume("True", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert resolve_resume("False", str(tmp_path)) is None and resolve_resume(None, str(tmp_path)) is None


def run_script(checkpoint, data, output_dir, *args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    """finetune_visual_gate.sh on the tiny model, with MASTER_PORT left to the script, called from `cwd`."""
    environment = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    environment.update(MODEL_PATH=checkpoint, DATA_PATH=str(data / "data.json"), IMAGE_FOLDER=str(data),
                       OUTPUT_DIR=str(output_dir), WORKERS="0", PYTHON=sys.executable, PYTHONPATH=ROOT,
                       PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", SCRIPT, *args], env=environment, cwd=cwd, capture_output=True, text=True, timeout=600)


def concurrently(*runs: functools.partial) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: run(), runs))


def succeeded(result: subprocess.CompletedProcess) -> str:
    """stdout + stderr of a run that must have succeeded."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def logged_steps(output: str) -> list[dict]:
    return [ast.literal_eval(line) for line in output.splitlines() if line.startswith("{'loss'")]


def gate_metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k.startswith(("gate_accuracy", "exit_ratio", "predicted_exit_ratio"))}


def test_finetune_script_two_cpu_processes_train_as_one_save_once_and_resume(init_checkpoint, gate_data, tmp_path):
    """Two trainings at once, with DeepSpeed's default port taken: 1 process of batch 4 and 2 processes of batch 2
    (the same global batch) train the same gates and log the same gate metrics; the 2-process run writes each
    save once; `--resume_from_checkpoint True` continues from the latest checkpoint left and ends where it did."""
    steps = ("--max_steps", "3", "--save_steps", "1", "--save_total_limit", "3", "--learning_rate", "1e-2")
    script = functools.partial(run_script, init_checkpoint, gate_data)
    with socket.socket() as busy:
        try:
            busy.bind(("", 29500))
            busy.listen()
        except OSError:
            pass  # taken already: just as good
        one, two = map(succeeded, concurrently(
            functools.partial(script, tmp_path / "one", *steps, BATCH_SIZE="4", NUM_PROCS="1"),
            functools.partial(script, tmp_path / "two", *steps, "--log_level_replica", "info",
                              BATCH_SIZE="2", NUM_PROCS="2"),
        ))
    ports = [re.search(r"--master_port=(\d+)", output).group(1) for output in (one, two)]
    assert ports[0] != ports[1] and "29500" not in ports

    alone, parallel = (load_file(tmp_path / run / "visual_gates.safetensors") for run in ("one", "two"))
    initial = load_pretrained_model(init_checkpoint, device="cpu")[1].state_dict()
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in alone.items())
    assert all(torch.allclose(alone[name], parallel[name], atol=1e-6) for name in alone)
    log_one, log_two = logged_steps(one), logged_steps(two)
    assert len(log_one) == len(log_two) == 3 and all("gate_accuracy" in entry for entry in log_two)
    assert [gate_metrics(e) for e in log_one] == [gate_metrics(e) for e in log_two]  # counted over both processes
    assert [float(e["loss"]) for e in log_one] == pytest.approx([float(e["loss"]) for e in log_two], rel=1e-3)
    # Both processes log at INFO (--log_level_replica info), yet each save is written once.
    saves = [str(tmp_path / "two" / f"checkpoint-{step}") for step in (1, 2, 3)] + [str(tmp_path / "two")]
    assert re.findall(r"gates saved to (\S+)", two) == saves

    shutil.rmtree(tmp_path / "two" / "checkpoint-3")
    resumed = logged_steps(succeeded(script(tmp_path / "two", *steps, "--resume_from_checkpoint", "True",
                                            BATCH_SIZE="2", NUM_PROCS="2")))
    assert len(resumed) == 1 and gate_metrics(resumed[0]) == gate_metrics(log_two[2])  # step 3 only: from checkpoint-2
    again = load_file(tmp_path / "two" / "visual_gates.safetensors")
    assert all(torch.allclose(again[name], parallel[name], atol=1e-6) for name in parallel)


def test_finetune_script_input_errors_are_one_line(init_checkpoint, gate_data, tmp_path):
    (tmp_path / "data.json").write_text('[\n  {"id": "1",}\n]')
    missing = tmp_path / "zero9.json"
    results = concurrently(
        functools.partial(run_script, init_checkpoint, tmp_path, tmp_path / "run", NUM_PROCS="2"),
        # a relative path is read from the caller's folder
        functools.partial(run_script, init_checkpoint, gate_data, tmp_path / "run", cwd=tmp_path, DEEPSPEED_CONFIG=missing.name),
    )
    lines = [f"train.py: error: {tmp_path / 'data.json'}:2: invalid JSON (Expecting property name enclosed in double "
             "quotes)", f"finetune_visual_gate.sh: error: DEEPSPEED_CONFIG={missing}: no such file"]
    for result, line in zip(results, lines):
        assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
        # once, though both processes met the malformed file
        assert [text for text in result.stderr.splitlines() if "error:" in text] == [line]


def test_two_cpu_processes_through_the_trainers_ddp(init_checkpoint, gate_data, tmp_path):
    """torchrun without DeepSpeed (the Trainer's own DDP, under gradient checkpointing, where it would not look for
    unused parameters): each step trains the sampled layer's gate only, so the others have no gradient that step;
    the run sets find_unused_parameters itself and trains as one process does."""
    args = train_args(init_checkpoint, gate_data, tmp_path / "ddp", "--max_steps", "3", "--per_device_train_batch_size",
                      "2", "--dataloader_num_workers", "0", "--ddp_backend", "gloo", "--gradient_checkpointing", "True")
    with socket.socket() as free:
        free.bind(("", 0))
        port = str(free.getsockname()[1])
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(PYTHONPATH=ROOT, MASTER_PORT=port)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
         os.path.join(ROOT, "llava/train/train.py"), *args], env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trained = load_file(tmp_path / "ddp" / "visual_gates.safetensors")
    initial = load_pretrained_model(init_checkpoint, device="cpu")[1].state_dict()
    assert any(not torch.equal(tensor, initial[name]) for name, tensor in trained.items())
    single = train(train_args(init_checkpoint, gate_data, tmp_path / "one", "--max_steps", "3",
                              "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0"))
    assert single.state.global_step == 3
    alone = load_file(tmp_path / "one" / "visual_gates.safetensors")
    assert all(torch.allclose(alone[name], trained[name], atol=1e-5) for name in alone)


@pytest.mark.parametrize("family, reduction", [("llava-hf", "divprune:0.5"), ("qwen2-vl", "divprune:0.5:keep")])
def test_a_familys_training_after_an_input_reduction_judges_what_inference_runs(family, reduction):
    from families import Sample, batch, exit_model, stock_model

    stock = stock_model(family)
    model = exit_model(stock, gate_hidden_size=8)
    size = None if family == "llava-hf" else (4, 4)
    inputs = batch(family, stock, [Sample(3, [size], 6), Sample(2, [size], 8)], padding_side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :-4] = IGNORE_INDEX
    before = ExitRequest("stages", stages=reduction).expand()
    with torch.no_grad():
        out = model(**inputs, labels=labels, gate_training_layer=1, exit_config=before)
        exited = model(**inputs, exit_config=ExitRequest("stages", stages=f"{reduction},fixed:2").expand())
        full = model(**inputs, exit_config=before)
        unreduced = model(**inputs)
    sample, position = out.answer_positions
    assert (out.exit_logits - exited.logits[sample, position]).abs().max() <= 1e-5
    assert (out.full_logits - full.logits[sample, position]).abs().max() <= 1e-5
    assert (out.full_logits - unreduced.logits[sample, position]).abs().max() > 1e-4
