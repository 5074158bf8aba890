"""FamilyProcessor: inputs from LLaVA conversations that each family's stock forward and generate accept (the
stock forward checks every image's visual-token count against its features), labels on the answers only,
padded batches, transformers' processor where it constructs and the fallback equal to it, clear errors."""

import pytest
import torch
from transformers.utils import is_torchvision_available

from llava.constants import IGNORE_INDEX
from llava.model.builder import load_family_model
from llava.model.families import FAMILY_MODULES
from llava.model.families.processing import load_processor
from llava.model.visual_exit import ExitRequest

from family_checkpoints import EXPECTED_TOKENS, SQUARE, WIDE, family_checkpoint, image  # noqa: F401 (a fixture)

ASK = [{"from": "human", "value": "<image>\nWhat is shown?"}]
DIALOGUE = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "And its colour?"},
    {"from": "gpt", "value": "Red."},
]
# Families whose transformers processor constructs without torchvision (no video slot).
STOCK_WITHOUT_TORCHVISION = ("llava-hf", "llava-next", "gemma3")


@pytest.fixture(scope="module")
def loaded(family_checkpoint):
    family, folder = family_checkpoint
    tokenizer, model, processor, _ = load_family_model(folder)
    return family, model, processor


def visual_count(model, inputs) -> list[int]:
    return model.visual_mask(inputs["input_ids"]).sum(dim=1).tolist()


def generation_prompt(processor) -> str:
    """What the template adds to a conversation to ask for an answer."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]

    def render(add_generation_prompt: bool) -> str:
        return processor.tokenizer.apply_chat_template(
            messages, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render(True)[len(render(False)) :]


def test_prompt_forward_and_generate_with_exit(loaded):
    family, model, processor = loaded
    inputs = processor.prompt_inputs(ASK, [image(WIDE)])
    assert visual_count(model, inputs) == [EXPECTED_TOKENS[family][0]]
    assert processor.tokenizer.decode(inputs["input_ids"][0]).endswith(generation_prompt(processor))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    out = model.generate(
        **inputs, exit_config=ExitRequest(mode="fixed", layer=1).expand(), return_dict_in_generate=True,
        max_new_tokens=3, min_new_tokens=3, do_sample=False,
    )
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert out.exit_stats.num_visual_tokens.tolist() == [EXPECTED_TOKENS[family][0]]
    assert out.exit_stats.exit_layer.tolist() == [1]


def test_left_padded_batch_of_two_sizes_equals_each_alone(loaded):
    family, model, processor = loaded
    later = [{"from": "human", "value": "Look at this one, please: <image>"}]
    samples = [processor.prompt_inputs(ASK, [image(WIDE)]), processor.prompt_inputs(later, [image(SQUARE, seed=1)])]
    batch = processor.collate(samples, padding_side="left")
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padding: every row ends in its prompt
    assert visual_count(model, batch) == list(EXPECTED_TOKENS[family])
    with torch.no_grad():
        together = model(**batch).logits[:, -1]
        alone = torch.cat([model(**sample).logits[:, -1] for sample in samples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    out = model.generate(
        **batch, exit_config=ExitRequest(mode="fixed", layer=1).expand(), return_dict_in_generate=True,
        max_new_tokens=2, min_new_tokens=2, do_sample=False,
    )
    assert out.exit_stats.num_visual_tokens.tolist() == list(EXPECTED_TOKENS[family])


def test_two_images_in_one_turn(loaded):
    """Each image gets its own run; OneVision shows each of several images as its base tile and a newline."""
    family, model, processor = loaded
    both = [{"from": "human", "value": "<image>\nand\n<image>\nDiffer?"}]
    inputs = processor.prompt_inputs(both, [image(WIDE), image(SQUARE)])
    expected = 2 * 5 if family == "llava-onevision" else sum(EXPECTED_TOKENS[family])
    with torch.no_grad():
        assert model(**inputs).exit_stats.num_visual_tokens.tolist() == [expected]


def test_labels_supervise_the_answers_only(loaded):
    family, model, processor = loaded
    tokenizer, turn_end = processor.tokenizer, FAMILY_MODULES[family].PROCESSING.turn_end
    inputs = processor.training_inputs(DIALOGUE, [image(WIDE)])
    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    assert labels.shape == ids.shape
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], ids[supervised])
    assert not (supervised & model.visual_mask(inputs["input_ids"])[0]).any()
    runs = torch.tensor_split(torch.arange(len(ids)), torch.nonzero(supervised.diff()).flatten() + 1)
    answers = [tokenizer.decode(ids[run]) for run in runs if supervised[run[0]]]
    assert [answer.strip() for answer in answers] == ["A red circle." + turn_end, "Red." + turn_end]
    with torch.no_grad():
        out = model(**inputs)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected)


def test_a_missing_visual_token_is_refused_by_the_model(loaded):
    """The guard the counts pass: the stock forward compares placeholders with the tower's features."""
    family, model, processor = loaded
    inputs = dict(processor.prompt_inputs(ASK, [image(WIDE)]))
    first_visual = int(torch.nonzero(model.visual_mask(inputs["input_ids"])[0])[0])
    keep = torch.arange(inputs["input_ids"].shape[1]) != first_visual
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            inputs[key] = inputs[key][:, keep]
    with pytest.raises(ValueError, match="features and image tokens do not match"), torch.no_grad():
        model(**inputs)


def test_transformers_processor_where_it_constructs(family_checkpoint):
    family, folder = family_checkpoint
    processor = load_processor(folder)
    constructs = family in STOCK_WITHOUT_TORCHVISION or is_torchvision_available()
    assert (processor.stock is not None) == constructs
    if constructs:
        assert type(processor.stock).__name__ == FAMILY_MODULES[family].PROCESSING.processor_class
        assert processor.stock.chat_template == FAMILY_MODULES[family].PROCESSING.chat_template


@pytest.mark.parametrize("family", [f for f in STOCK_WITHOUT_TORCHVISION if not FAMILY_MODULES[f].PROCESSING.expands_in_text])
def test_fallback_equals_transformers_processor(family, tmp_path):
    from llava.tiny.families import write_tiny_family

    stock = load_processor(write_tiny_family(str(tmp_path), family))
    fallback = _without_stock(stock)
    pair = [{"from": "human", "value": "<image> vs <image>"}, {"from": "gpt", "value": "Same."}]
    conversations = [(DIALOGUE, [image(WIDE)]), (pair, [image(SQUARE), image(WIDE, 2)])]
    for conversation, images in conversations:
        for build in ("prompt_inputs", "training_inputs"):
            turns = conversation[:-1] if build == "prompt_inputs" else conversation
            theirs, ours = (getattr(p, build)(turns, images) for p in (stock, fallback))
            assert set(theirs.keys()) == set(ours.keys())
            for key in theirs:
                assert torch.equal(theirs[key], ours[key]), (build, key)


def _without_stock(processor):
    """The same processor forced onto the fallback."""
    return type(processor)(
        processor.family, processor.tokenizer, processor.image_processor, processor.settings, processor.chat_template
    )


def test_bad_inputs_are_named(loaded):
    family, model, processor = loaded
    one = [image(WIDE)]
    two_tags = [{"from": "human", "value": "<image> <image>"}]
    answer_with_image = [*ASK, {"from": "gpt", "value": "<image>"}]
    cases = [
        (lambda: processor.prompt_inputs(two_tags, one), "2 <image> tag\\(s\\) but 1 image"),
        (lambda: processor.prompt_inputs(ASK, []), "1 <image> tag\\(s\\) but 0 image"),
        (lambda: processor.prompt_inputs([], []), "empty conversation"),
        (lambda: processor.prompt_inputs([{"from": "robot", "value": "hi"}], []), "unknown speaker 'robot'"),
        (lambda: processor.prompt_inputs([{"from": "human"}], []), "turn 0: expected"),
        (lambda: processor.prompt_inputs(DIALOGUE, one), "ends with a gpt turn"),
        (lambda: processor.training_inputs(ASK, one), "no gpt turn"),
        (lambda: processor.training_inputs(answer_with_image, one + one), "only human turns show images"),
        (lambda: processor.collate([processor.prompt_inputs(ASK, one)], padding_side="middle"), "padding_side"),
        (lambda: processor.collate([]), "at least one sample"),
    ]
    if processor.stock is None and processor.placeholder != "<image>":  # the fallback counts what the template wrote
        literal = [{"from": "human", "value": f"What is {processor.placeholder}?"}]
        cases.append((lambda: processor.prompt_inputs(literal, []), "wrote 1 image placeholder"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_load_processor_refuses_other_folders(llava_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not one of the VLM families"):
        load_processor(llava_checkpoint)
    with pytest.raises(ValueError, match="no config.json"):
        load_processor(str(tmp_path))


def test_a_family_that_expands_images_in_text_has_no_token_level_fallback(tmp_path):
    """Gemma 3's processor writes blank lines around each image into the text, where they merge with the
    template's: a token-level expansion would give other ids, so the fallback refuses instead."""
    from llava.tiny.families import write_tiny_family

    if "gemma3" not in FAMILY_MODULES:
        pytest.skip("no Gemma 3 here")
    processor = load_processor(write_tiny_family(str(tmp_path), "gemma3"))
    assert processor.stock is not None
    with pytest.raises(ValueError, match="writes image runs into the text"):
        _without_stock(processor).prompt_inputs(DIALOGUE[:-1], [image(WIDE)])
