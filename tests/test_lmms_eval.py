"""The lmms-eval model (`--model dyvte`) in process, against independent oracles: lmms-eval's own request objects,
the tiny world's trained LLaVA with fresh gates (samples exit at different layers), a tiny Qwen2.5-VL checkpoint.

Oracles: our loader's answers for generate_until; for loglikelihood, the continuation's log-probabilities from one
full forward of the stock layers with the visual keys masked after the exit layer (docs/DESIGN.md §2)."""

import json
import math
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

pytest.importorskip("lmms_eval", reason="scripts/test.sh installs lmms-eval (WITH_LMMS_EVAL=1)")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from llava.eval.lmms.model import DyVTE  # noqa: E402
from llava.eval.model_vqa_loader import answer_questions  # noqa: E402
from llava.mm_utils import load_image, process_images, tokenizer_image_token  # noqa: E402
from llava.tiny.families import write_tiny_family  # noqa: E402
from llava.world.generate import TEST_IMAGES, TEST_QUESTIONS, TEST_TRUTH, generate  # noqa: E402

from test_visual_exit import masked_reference_logits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_MODEL = os.path.join(ROOT, "checkpoints", "tiny-world-llava")
TASK = "world"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(str(out), train=2, test=12, seed=1)
    docs = [json.loads(line) for line in (out / TEST_QUESTIONS).read_text().splitlines()]
    truth = json.loads((out / TEST_TRUTH).read_text())
    for doc in docs:
        doc["answer"] = truth[doc["question_id"]]["answer"]
        doc["path"] = str(out / TEST_IMAGES / doc["image"])
    return out, docs


@pytest.fixture(scope="module")
def gated_world_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world-gated"))
    subprocess.run([sys.executable, os.path.join(ROOT, "init_weight.py"), "--model-path", WORLD_MODEL, "--output-dir",
                    out], check=True, capture_output=True, cwd=ROOT)
    return out


def plugin(pretrained, docs, **model_args):
    model = DyVTE(pretrained=pretrained, device="cpu", **model_args)
    model.task_dict = {TASK: {"test": docs}}
    return model


def loader_answers(model_path, world_dir, docs, tmp_path, max_new_tokens, **exit_args) -> list[dict]:
    """The oracle: our loader's answer records for `docs`, one question at a time."""
    exit_names = ("exit_mode", "exit_layer", "exit_threshold", "fastv_k", "fastv_r", "exit_stages", "exit_method",
                  "visual_budget", "budget_rule", "visual_tokens")
    args = Namespace(
        model_path=model_path, model_base=None, conv_mode=None, device="cpu", temperature=0.0, top_p=None,
        num_beams=1, max_new_tokens=max_new_tokens, batch_size=1, answers_file=str(tmp_path / "a.jsonl"),
        overwrite=False, image_folder=str(world_dir / TEST_IMAGES), **{name: exit_args.get(name) for name in exit_names},
    )
    answer_questions(args, [{k: doc[k] for k in ("question_id", "image", "text")} for doc in docs])
    return [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]


def image_of(doc):
    return [load_image(doc["path"])]


def generate_requests(docs, **gen_kwargs):
    gen_kwargs = {"max_new_tokens": 16, "temperature": 0, "do_sample": False, **gen_kwargs}
    return [
        Instance("generate_until", (doc["text"], dict(gen_kwargs), image_of, i, TASK, "test"), i,
                 {"task": TASK, "doc_id": i, "repeats": 1})
        for i, doc in enumerate(docs)
    ]


def choice_requests(docs, continuation=lambda doc: " " + doc["answer"]):
    return [
        Instance("loglikelihood", (doc["text"], continuation(doc), image_of, i, TASK, "test"), i,
                 {"task": TASK, "doc_id": i, "repeats": 1})
        for i, doc in enumerate(docs)
    ]


def test_the_entry_point_serves_the_model():
    assert get_model("dyvte") is DyVTE


@pytest.mark.parametrize("exit_args", [{"exit_mode": "none"}, {"exit_mode": "dynamic", "exit_threshold": 0.999},
                                       {"exit_mode": "fixed", "exit_layer": 2}, {"exit_mode": "fastv", "fastv_k": 2,
                                                                                 "fastv_r": 0.5}])
def test_answers_equal_the_loaders_alone_and_in_batches(gated_world_model, world, tmp_path, exit_args):
    out, docs = world
    loader = loader_answers(gated_world_model, out, docs, tmp_path, max_new_tokens=16, **exit_args)
    for batch_size in (1, 4):
        results = plugin(gated_world_model, docs, batch_size=batch_size, **exit_args).generate_until(generate_requests(docs))
        assert [r.text for r in results] == [record["text"] for record in loader]
        for result, record in zip(results, loader):
            stats = result.token_counts.to_dict()
            assert stats["exit_layer"] == record["exit_layer"]
            assert stats["tflops"] == pytest.approx(record["tflops"], rel=1e-12)
            assert stats["input_tokens"] == record["prompt_tokens"] and stats["output_tokens"] == record["new_tokens"]
    if exit_args["exit_mode"] == "dynamic":
        assert len({record["exit_layer"] for record in loader}) > 2  # the batches mixed samples exiting apart


def mixed_lengths(doc):
    """The answer, or for every other question the answer and more words: rows of a batch end apart."""
    return " " + doc["answer"] + (" is what I see" if int(doc["question_id"][-1]) % 2 else "")


def oracle_scores(model, docs, exit_layer: int):
    """(NLL, greedy) of each doc's continuation from one full forward with visual keys masked from `exit_layer`."""
    scores = []
    for doc in docs:
        prompt = model.answerer.processor.render(doc["text"], image_first=True)
        context = tokenizer_image_token(prompt, model.tokenizer, return_tensors="pt")
        whole = tokenizer_image_token(prompt + mixed_lengths(doc), model.tokenizer, return_tensors="pt")
        assert torch.equal(whole[: len(context)], context)
        pixels = process_images(image_of(doc), model.answerer.loaded.image_processor, model.model.config)
        mm = model.model.prepare_inputs_labels_for_multimodal(whole[None], torch.ones(1, len(whole)), None, pixels, None)
        logits = masked_reference_logits(model.model, mm, torch.tensor([exit_layer]))[0]
        visual = mm.inputs_embeds.shape[1] - len(whole)  # the tag's one id became this many more tokens
        predicting = logits[len(context) + visual - 1 : len(whole) + visual - 1]
        target = whole[len(context) :]
        nll = -predicting.log_softmax(-1).gather(-1, target[:, None]).sum().detach()
        scores.append((float(nll), bool((predicting.argmax(-1) == target).all())))
    return scores


@pytest.mark.parametrize("exit_args,exit_layer", [({"exit_mode": "none"}, 8), ({"exit_mode": "fixed", "exit_layer": 3}, 3)])
def test_loglikelihood_equals_the_masked_oracle(gated_world_model, world, exit_args, exit_layer):
    _, docs = world
    model = plugin(gated_world_model, docs, batch_size=4, conv_mode="vicuna_v1", **exit_args)
    results = model.loglikelihood(choice_requests(docs, mixed_lengths))
    expected = oracle_scores(model, docs, exit_layer)
    assert any(greedy for _, greedy in expected) and not all(greedy for _, greedy in expected)
    assert [r.text[1] for r in results] == [greedy for _, greedy in expected]
    assert [r.text[0] for r in results] == pytest.approx([nll for nll, _ in expected], abs=1e-4)
    assert all(r.token_counts.to_dict()["exit_layer"] == exit_layer for r in results)


def test_loglikelihood_in_batches_equals_alone_with_per_sample_exits(gated_world_model, world):
    _, docs = world
    requests = choice_requests(docs, lambda doc: " " + doc["answer"] + " and more words")  # continuations differ
    alone = plugin(gated_world_model, docs, exit_mode="dynamic", exit_threshold=0.999).loglikelihood(requests)
    batched = plugin(gated_world_model, docs, batch_size=5, exit_mode="dynamic", exit_threshold=0.999).loglikelihood(requests)
    assert [r.text[0] for r in batched] == pytest.approx([r.text[0] for r in alone], abs=1e-4)
    exits = [r.token_counts.exit["exit_layer"] for r in alone]
    assert [r.token_counts.exit["exit_layer"] for r in batched] == exits and len(set(exits)) > 2


def test_family_checkpoint_answers_equal_the_loaders(world, tmp_path):
    out, docs = world
    checkpoint = write_tiny_family(str(tmp_path / "qwen"), "qwen2.5-vl", gate_hidden_size=16)
    loader = loader_answers(checkpoint, out, docs[:5], tmp_path, max_new_tokens=6, exit_mode="fixed", exit_layer=1)
    model = plugin(checkpoint, docs[:5], batch_size=3, exit_mode="fixed", exit_layer=1)
    results = model.generate_until(generate_requests(docs[:5], max_new_tokens=6))
    assert [r.text for r in results] == [record["text"] for record in loader]
    assert [r.token_counts.exit["exit_layer"] for r in results] == [1] * 5
    scores = model.loglikelihood(choice_requests(docs[:5]))
    assert all(math.isfinite(r.text[0]) and r.text[0] > 0 for r in scores)


def test_what_it_does_not_take_is_a_clear_error(gated_world_model, world, tmp_path):
    _, docs = world
    with pytest.raises(ValueError, match="dyvte has no exit_layers"):
        DyVTE(pretrained=gated_world_model, device="cpu", exit_layers=2)
    with pytest.raises(ValueError, match="exit mode 'none' does not use --exit-layer"):
        DyVTE(pretrained=gated_world_model, device="cpu", exit_mode="none", exit_layer=2)
    quoted = DyVTE(pretrained=gated_world_model, device="cpu", exit_stages='"prune:fastv:2:0.5,gates:0.9"')
    assert quoted.exit_config.request.mode == "stages" and quoted.exit_config.request.stages == "prune:fastv:2:0.5,gates:0.9"
    model = plugin(gated_world_model, docs)
    with pytest.raises(ValueError, match="does not support generation_kwargs stop"):
        model.generate_until(generate_requests(docs[:1], stop=["x"]))
    two = [Instance("generate_until", ("q", {}, lambda doc: image_of(doc) * 2, 0, TASK, "test"), 0,
                    {"task": TASK, "doc_id": 0, "repeats": 1})]
    with pytest.raises(ValueError, match="world, doc 0: 2 visual.*one image or one video"):
        model.generate_until(two)
    with pytest.raises(NotImplementedError, match="single-turn"):
        model.generate_until_multi_round([])


def test_a_question_that_cannot_be_asked_is_an_error_record(gated_world_model, world, tmp_path):
    _, docs = world
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    model = plugin(gated_world_model, docs[:3])

    def image_or_broken(doc):
        return [load_image(broken)] if doc is docs[1] else image_of(doc)

    requests = [Instance("generate_until", (doc["text"], {"max_new_tokens": 8}, image_or_broken, i, TASK, "test"), i,
                         {"task": TASK, "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs[:3])]
    results = model.generate_until(requests)  # the task's doc_to_visual could not read it
    assert results[1].text == "" and "broken.png" in results[1].token_counts.exit["error"]
    overlong = [dict(doc, text="many words " * 2000) if i == 1 else doc for i, doc in enumerate(docs[:3])]
    model.task_dict = {TASK: {"test": overlong}}
    results = model.generate_until(generate_requests(overlong, max_new_tokens=8))
    assert results[1].text == "" and "prompt takes" in results[1].token_counts.to_dict()["error"]
    assert results[0].text and results[2].text and "exit_layer" in results[2].token_counts.to_dict()
    scores = model.loglikelihood(choice_requests(overlong))
    assert scores[1].text == (math.inf, False) and "prompt takes" in scores[1].token_counts.exit["error"]


def test_a_video_file_or_a_video_for_llava_is_an_error_record(gated_world_model, world, tmp_path):
    """A video file (not its frames) and a video for our LLaVA-1.5 class (which takes none) are per-sample errors;
    the other questions of the batch are answered."""
    _, docs = world
    (tmp_path / "clip").mkdir()
    image_of(docs[0])[0].save(tmp_path / "clip" / "000.png")
    model = plugin(gated_world_model, docs[:3])
    visuals = {0: [str(tmp_path / "clip.mp4")], 1: [str(tmp_path / "clip")]}
    requests = [Instance("generate_until", (doc["text"], {"max_new_tokens": 8}, lambda d, i=i: visuals.get(i, image_of(d)),
                                            i, TASK, "test"), i, {"task": TASK, "doc_id": i, "repeats": 1})
                for i, doc in enumerate(docs[:3])]
    results = model.generate_until(requests)
    assert "is not a folder of frames" in results[0].token_counts.exit["error"]
    assert "LLaVA-1.5 takes no video" in results[1].token_counts.exit["error"]
    assert results[2].text and "exit_layer" in results[2].token_counts.to_dict()
