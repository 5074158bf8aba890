"""llava.analysis.stages on the tiny world's trained model: attention masses against transformers' own eager
attention maps (and summing to 1 per query), the oracle exit layers against gate training's labels (step 3), and
the CLI's files and plots."""

import csv
import json
import os

import pytest
import torch
from PIL import Image

from llava.analysis.stages import (
    AttentionRecorder,
    analyse_batch,
    attention_masses,
    main,
    oracle_exit_layers,
    teacher_forced_batch,
    text_queries,
    token_groups,
)
from llava.eval.io import read_jsonl
from llava.eval.answering import Answerer, RunSpec
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit.gate import build_visual_gates
from llava.model.visual_exit.training import ExitLabelRule, answer_positions
from llava.world.generate import TEST_IMAGES, TEST_QUESTIONS, generate

from test_visual_exit import masked_reference_logits_by_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    generate(str(folder), train=0, test=12, seed=11)
    return folder


@pytest.fixture(scope="module")
def world_loaded():
    return load_model(Checkpoint.resolve(WORLD_MODEL), device="cpu")


@pytest.fixture(scope="module")
def world_model(world_loaded):
    return world_loaded.as_tuple()


def answerer_of(loaded, image_folder: str, **template) -> Answerer:
    spec = RunSpec.build(loaded.checkpoint, device="cpu", image_folder=image_folder, exit_mode="none", **template)
    return Answerer(loaded, spec)


@pytest.fixture(scope="module")
def forced(world, world_loaded):
    """A teacher-forced batch of six world questions (one padded batch) and its analysis."""
    questions = read_jsonl(str(world / TEST_QUESTIONS), ("question_id",))[:6]
    with torch.no_grad(), answerer_of(world_loaded, str(world / TEST_IMAGES), conv_mode="vicuna_v1") as answerer:
        prepared = [answerer.prepare(q) for q in questions]
        batch = teacher_forced_batch(answerer, prepared, max_new_tokens=6)
        return batch, analyse_batch(world_loaded.model, batch, ExitLabelRule())


def test_attention_masses_match_the_eager_attention_map(world_model, forced):
    _, model, _, _ = world_model
    batch, analysis = forced
    with torch.no_grad():
        forced_inputs = batch.teacher_forced
        mm = model.prepare_inputs_labels_for_multimodal(forced_inputs["input_ids"], forced_inputs["attention_mask"],
                                                         forced_inputs["labels"], forced_inputs["images"])
        sample, position, _ = answer_positions(mm.labels)
        valid, visual = mm.attention_mask.bool(), mm.visual_mask
        never = torch.full(visual.shape, model.config.num_hidden_layers)
        for layer in range(model.config.num_hidden_layers):
            _, probabilities = masked_reference_logits_by_token(model, mm, never, attention_layer=layer)
            masses = attention_masses(probabilities, token_groups(visual, valid))
            for b in range(len(batch.records)):
                last_visual = int(visual[b].nonzero().max())
                prompt_end = int(position[sample == b].min())
                queries = range(last_visual + 1, prompt_end + 1)
                first_visual = int(visual[b].nonzero().min())
                mean = probabilities[b].mean(dim=0)  # head average, by hand
                expected = torch.tensor([
                    [float(mean[q, visual[b]].sum()), float(mean[q, first_visual:][~visual[b, first_visual:]].sum()),
                     float(mean[q, :first_visual][valid[b, :first_visual]].sum())] for q in queries
                ])
                assert torch.allclose(masses[b, list(queries)], expected, atol=1e-5)
                assert torch.allclose(masses[b, list(queries)].sum(dim=-1), torch.ones(len(queries)), atol=1e-5)
                text_to_visual = float(expected[:, 0].mean())
                assert analysis.attention[b, layer, 0].item() == pytest.approx(text_to_visual, abs=1e-5)
                visual_to_visual = float(mean[visual[b]][:, visual[b]].sum(dim=-1).mean())
                assert analysis.attention[b, layer, 3].item() == pytest.approx(visual_to_visual, abs=1e-5)


def test_text_queries_are_the_question_after_the_image():
    visual = torch.tensor([[False, True, True, False, False, False]])
    valid = torch.tensor([[True, True, True, True, True, True]])
    assert text_queries(visual, valid, torch.tensor([4])).tolist() == [[False, False, False, True, True, False]]
    assert token_groups(visual, valid)[0].tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 0, 0, 0, 0, 0]]


def test_oracle_exit_layers_equal_gate_training_labels(world_model, forced):
    _, model, _, _ = world_model
    batch, analysis = forced
    layers = model.config.num_hidden_layers
    model.config.visual_gate_hidden_size = 8
    model.get_model().visual_gates_router = build_visual_gates(model.config)
    try:
        with torch.no_grad():
            training = [
                model(**{key: batch.teacher_forced[key] for key in ("input_ids", "attention_mask", "labels", "images")},
                      gate_training_layer=k).exit_labels
                for k in range(layers - 1)
            ]
    finally:
        model.get_model().visual_gates_router = None
        del model.config.visual_gate_hidden_size
    for k, judged in enumerate(training):  # gate k decides an exit after layer k: forced exit K = k + 1
        assert judged.label.tolist() == analysis.label[:, k + 1].tolist(), k
        assert torch.allclose(judged.agree, analysis.agree[:, k + 1])
        assert torch.allclose(judged.ratio, analysis.ratio[:, k + 1], rtol=1e-4)
    labels = torch.stack([j.label for j in training], dim=1)
    expected = [next((k + 1 for k in range(layers - 1) if labels[b, k]), layers) for b in range(len(labels))]
    assert oracle_exit_layers(analysis.label).tolist() == expected
    assert len(set(expected)) > 1 and labels.any() and not labels.all()  # the samples really differ


def test_stages_cli_writes_tables_and_plots(world, tmp_path, capsys):
    questions = read_jsonl(str(world / TEST_QUESTIONS), ("question_id",))
    extra = [{"question_id": "text-only", "text": "How many?"}, {"question_id": "gone", "image": "gone.png", "text": "Hi?"}]
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions[:5] + extra))
    out = tmp_path / "out"
    main(["--model-path", WORLD_MODEL, "--question-file", str(question_file), "--image-folder", str(world / TEST_IMAGES),
          "--output-dir", str(out), "--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "5 samples analysed, 2 skipped" in printed
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["question_id"] for s in skipped] == ["text-only", "gone"] and "gone.png" in skipped[1]["reason"]
    with open(out / "attention_by_layer.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["layer"]) for r in rows] == list(range(8))
    for row in rows:
        assert float(row["text_to_visual"]) + float(row["text_to_text"]) + float(row["text_to_system"]) == pytest.approx(1, abs=1e-4)
    with open(out / "forced_exit.csv") as handle:
        forced_rows = list(csv.DictReader(handle))
    assert [int(r["exit_layer"]) for r in forced_rows] == list(range(9))
    assert float(forced_rows[-1]["agreement"]) == 1.0 and float(forced_rows[-1]["flops_reduction"]) == 0.0
    reductions = [float(r["flops_reduction"]) for r in forced_rows]
    assert reductions == sorted(reductions, reverse=True)
    with open(out / "oracle_exit.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    for plot in ("attention_by_layer.png", "forced_exit.png", "oracle_exit_histogram.png"):
        with Image.open(out / plot) as image:
            assert image.size[0] > 500 and image.size[1] > 350


def test_stages_and_gate_probe_on_a_family_checkpoint(world, tmp_path):
    """A Qwen2.5-VL checkpoint (3-D positions) through both analysis commands: its own chat template, forced exits
    that change nothing at K = L, and labels equal to gate training's own pass on the same teacher-forced batch."""
    import csv

    from llava.analysis.gate_probe import main as gate_probe
    from llava.analysis.stages import main as stages
    from llava.tiny.families import write_tiny_family

    checkpoint = write_tiny_family(str(tmp_path / "qwen"), "qwen2.5-vl", gate_hidden_size=16)
    stages(["--model-path", checkpoint, "--question-file", str(world / TEST_QUESTIONS), "--image-folder",
            str(world / TEST_IMAGES), "--output-dir", str(tmp_path / "stages"), "--limit", "6", "--batch-size", "3"])
    with open(tmp_path / "stages" / "forced_exit.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["agreement"]) == 1.0 and float(rows[-1]["loss_ratio_median"]) == pytest.approx(1.0)
    assert any(float(row["agreement"]) < 1.0 for row in rows[:-1])  # the exits do change answers
    loaded = load_model(Checkpoint.resolve(checkpoint), device="cpu")
    model = loaded.model
    questions = read_jsonl(str(world / TEST_QUESTIONS), ("question_id",))[:3]
    with torch.no_grad(), answerer_of(loaded, str(world / TEST_IMAGES)) as answerer:
        prepared = [answerer.prepare(q) for q in questions]
        batch = teacher_forced_batch(answerer, prepared, max_new_tokens=6)
        analysis = analyse_batch(model, batch, ExitLabelRule())
        for k in range(model.config.get_text_config().num_hidden_layers - 1):
            trained = model(**batch.teacher_forced, gate_training_layer=k).exit_labels
            assert torch.equal(trained.label, analysis.label[:, k + 1])
    training = tmp_path / "training-world"
    generate(str(training), train=10, test=1, seed=12)
    gate_probe(["--model-path", checkpoint, "--data-path", str(training / "train_single_turn.json"), "--image-folder",
                str(training / "images"), "--output-dir", str(tmp_path / "probe"), "--samples", "0", "--layers", "1"])
    assert (tmp_path / "probe" / "gate_probe.csv").read_text().startswith("layer,")
