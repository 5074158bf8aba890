"""Gate training reads what inference reads: for training samples (answers of several lengths, several turns,
left- and right-padded batches) the features and logits the training pass hands gate k equal those the same gate
computes when inference (generate) runs on the sample's prompt alone, on our LLaVA class and every family, through
the data pipelines both sides really use. And a plain-torch re-computation of the reference's training-time
features (its own indexing: drop the supervised tokens from the end, mean after the image without the last
prompt token, the last prompt token) from the stock hidden states."""

from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.families import FAMILY_MODULES
from llava.model.families.processing import load_processor
from llava.model.llava_processor import LlavaProcessor
from llava.model.visual_exit import ExitRequest, enable_visual_exit, exit_decoder_of
from llava.model.visual_exit.gate import build_visual_gates, init_gate_weights
from llava.train.data import DataCollator, conversation_turns, render_prompt, tokenize_with_labels

from family_checkpoints import SQUARE, WIDE, family_checkpoint, image  # noqa: F401 (a fixture)

TOLERANCE = 1e-6
NEVER_EXIT = ExitRequest("dynamic", threshold=1.0).expand()  # every gate runs, none fires
# (question, answers): one to several answer tokens, and two turns (the gate reads the first turn's prompt).
CONVERSATIONS = [
    ("What colour is the square?", ["Red"]),
    ("Describe the picture in a few words.", ["A small red square on the left and a blue circle."]),
    ("Is there a circle?", ["Yes", "It is blue and small."]),
]


@contextmanager
def gate_calls(decoder):
    """Per gate layer, the (features, logits) of every call during the block."""
    calls = {}
    hooks = [
        gate.register_forward_hook(lambda module, args, output, k=k: calls.setdefault(k, []).append((args[0], output)))
        for k, gate in enumerate(decoder.visual_gates_router)
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def inference_gates(model, inputs: dict) -> dict:
    """layer -> (features (2H,), logits (2,)) of one prompt, as generate computes them at prefill."""
    with gate_calls(exit_decoder_of(model)) as calls, torch.no_grad():
        model.generate(**inputs, exit_config=NEVER_EXIT, max_new_tokens=1, do_sample=False)
    return {k: (found[0][0][0], found[0][1][0]) for k, found in calls.items()}


def assert_training_reads_the_prompt(model, batch: dict, prompts: list[dict], rows: list[int]):
    """Training pass on `batch` vs inference on prompts[i] for batch row rows[i], at every gate layer."""
    layers = exit_decoder_of(model).config.num_hidden_layers
    expected = [inference_gates(model, prompt) for prompt in prompts]
    assert all(sorted(e) == list(range(layers - 1)) for e in expected)
    for k in range(layers - 1):
        with torch.no_grad():
            out = model(**batch, gate_training_layer=k)
        for row, gates in zip(rows, expected):
            features, logits = gates[k]
            # Relative to the features' largest entry: Gemma 3 scales its embeddings by sqrt(hidden size).
            tolerance = TOLERANCE * max(1.0, float(features.abs().max()))
            assert (out.gate_features[row] - features).abs().max() <= tolerance, (k, row)
            assert (out.gate_logits[row] - logits).abs().max() <= tolerance, (k, row)


def with_gates(model, width: int = 16, seed: int = 0):
    decoder = exit_decoder_of(model)
    decoder.config.visual_gate_hidden_size = width
    decoder.visual_gates_router = build_visual_gates(decoder.config)
    torch.manual_seed(seed)
    init_gate_weights(decoder.visual_gates_router)
    return model


def records():
    return [
        {"id": str(i), "image": "img.png", "conversations": [
            turn for j, answer in enumerate(answers)
            for turn in ({"from": "human", "value": ("<image>\n" if j == 0 else "") + (question if j == 0 else "And?")},
                         {"from": "gpt", "value": answer})]}
        for i, (question, answers) in enumerate(CONVERSATIONS)
    ]


@pytest.fixture(scope="module")
def llava(llava_checkpoint):
    tokenizer, model, processor, _ = load_pretrained_model(llava_checkpoint, device="cpu")
    return tokenizer, with_gates(model), processor


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_llava_training_features_are_the_prompts(llava, padding_side):
    """LLaVA's training tokenisation (train.data) and the loader's prompt (LlavaProcessor), template vicuna_v1."""
    tokenizer, model, processor = llava
    pictures = [Image.new("RGB", (40 + 9 * i, 30), (200, 40 * i, 20)) for i in range(len(CONVERSATIONS))]
    pixels = process_images(pictures, processor, model.config)
    items, prompts = [], []
    for record, picture, pixel in zip(records(), pictures, pixels):
        pairs = conversation_turns(record, has_image=True)
        ids, labels = tokenize_with_labels(*render_prompt(pairs, "v1"), tokenizer)
        items.append({"input_ids": ids, "labels": labels, "pixels": pixel})
        loader = LlavaProcessor(tokenizer, processor, model.config, "v1", visual_tokens=1)
        prompt = loader.render(record["conversations"][0]["value"].split("\n", 1)[1], image_first=True)
        prompt_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
        first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert ids[:first_answer] == prompt_ids.tolist()  # the prompt is the same tokens on both sides
        prompts.append({"input_ids": prompt_ids[None], "images": pixel[None], "image_sizes": [picture.size]})
    batch = DataCollator(tokenizer.pad_token_id, tuple(pixels.shape[1:]))(items)
    model.config.tokenizer_padding_side = padding_side
    try:
        assert_training_reads_the_prompt(model, batch, prompts, list(range(len(items))))
    finally:
        model.config.tokenizer_padding_side = "right"


def test_training_features_are_the_reference_definition(llava, images):
    """The reference builds them from the layer's hidden states: valid tokens, minus the last `answer_length`
    (= supervised labels); mean over the tokens after the image up to the one before the last; the last one.
    Here from the hidden states of mode none, image spliced in by our preparation (one image per sample)."""
    tokenizer, model, processor = llava
    texts = ["USER: <image>\nWhat is it? ASSISTANT: A red square.</s>", "USER: <image>\nAnd this? ASSISTANT: Blue.</s>"]
    rows = [tokenizer_image_token(text, tokenizer) for text in texts]
    answers = [len(tokenizer(" A red square.</s>", add_special_tokens=False).input_ids),
               len(tokenizer(" Blue.</s>", add_special_tokens=False).input_ids)]
    width = max(map(len, rows))
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), IGNORE_INDEX)
    for b, (row, answer) in enumerate(zip(rows, answers)):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
        labels[b, len(row) - answer : len(row)] = ids[b, len(row) - answer : len(row)]
    pictures = images[:2]
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, labels, pictures)
        states = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
                       output_hidden_states=True).hidden_states
    for k in range(model.config.num_hidden_layers - 1):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels, images=pictures, gate_training_layer=k)
        for b in range(2):
            valid = mm.attention_mask[b]
            after_image = int(mm.visual_mask[b].nonzero().max()) + 1
            answer_length = int((mm.labels[b] >= 0).sum())
            text = states[k + 1][b][valid][:-answer_length]
            reference = torch.cat([text[after_image:-1].mean(0), text[-1]])
            assert (out.gate_features[b] - reference).abs().max() <= TOLERANCE, (k, b)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_family_training_features_are_the_prompts(family_checkpoint, padding_side):  # noqa: F811
    """Each family's processor: training_inputs (its chat template, assistant turns labelled) against the
    loader's prompt (question_inputs, generation prompt), several answer lengths and two turns."""
    family, folder = family_checkpoint
    processor = load_processor(folder)  # the stock class (the loader reads llava-hf into our LLaVA class)
    model = with_gates(enable_visual_exit(FAMILY_MODULES[family].ADAPTER.model_class.from_pretrained(folder).eval(), 16))
    pictures = [image(WIDE, seed=1), image(SQUARE, seed=2), image(WIDE, seed=3)]
    samples, prompts = [], []
    for record, picture in zip(records(), pictures):
        conversation = record["conversations"]
        samples.append(processor.training_inputs(conversation, [picture]))
        inputs = dict(processor.collate([processor.question_inputs(conversation[0]["value"], [picture])]))
        labels = samples[-1]["labels"][0]
        first_answer = int((labels != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(samples[-1]["input_ids"][0, :first_answer], inputs["input_ids"][0])
        prompts.append(inputs)
    batch = dict(processor.collate(samples, padding_side=padding_side))
    assert_training_reads_the_prompt(model, batch, prompts, list(range(len(samples))))
