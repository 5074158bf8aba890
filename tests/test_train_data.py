"""LLaVA's training data pipeline: prompts, answer-only labels, validation of bad records, modality grouping."""

import json

import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.model.families.processing import load_processor
from llava.tiny.families import write_tiny_family
from llava.train.data import (
    DataCollator, DataError, FamilyTurns, LlavaTurns, SupervisedDataset, render_prompt, tokenize_with_labels,
)
from llava.train.sampler import modality_length_grouped_indices


def supervised_text(tokenizer, ids, labels):
    kept = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    return tokenizer.decode(kept)


def test_vicuna_labels_supervise_answers_and_their_closing_separator(loaded):
    tokenizer = loaded[0]
    pairs = [("<image>\nWhat is it?", "A red square."), ("And the size?", "Small.")]
    prompt, spans = render_prompt(pairs, "v1")
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT: A red square."
        "</s>USER: And the size? ASSISTANT: Small.</s>"
    )
    ids, labels = tokenize_with_labels(prompt, spans, tokenizer)
    assert ids == tokenizer_image_token(prompt, tokenizer)
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX and labels[0] == IGNORE_INDEX
    assert supervised_text(tokenizer, ids, labels).replace(" ", "") == "Ared square.</s>Small.</s>".replace(" ", "")
    eos = tokenizer.eos_token_id
    assert [label for label in labels if label == eos] == [eos, eos]


@pytest.mark.parametrize("answer", ["2", "Red", "A red square."])
def test_vicuna_labels_equal_llavas_preprocess_v1(loaded, answer):
    """LLaVA's own masking rule (LLAVA_FORMATS.md §preprocess_v1), re-computed: per round, the instruction is
    the tokens of the text up to " ASSISTANT: " minus 2 (its BOS and the trailing lone "▁"), so a lone "▁" that
    starts the answer ("2", "Red" here) is supervised, as the generation prompt ends before it."""
    tokenizer = loaded[0]
    prompt, spans = render_prompt([("<image>\nWhat is it?", answer)], "v1")
    ids, labels = tokenize_with_labels(prompt, spans, tokenizer)
    rounds = prompt.split("</s>")
    expected = list(ids)
    expected[0] = IGNORE_INDEX
    cur = 1
    for rou in rounds:
        if not rou:
            break
        instruction, _ = rou.split(" ASSISTANT: ")
        round_len = len(tokenizer_image_token(rou, tokenizer))
        instruction_len = len(tokenizer_image_token(instruction + " ASSISTANT: ", tokenizer)) - 2
        expected[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    expected[cur:] = [IGNORE_INDEX] * (len(expected) - cur)
    assert labels == expected
    generation = tokenizer_image_token(prompt[: prompt.index(" " + answer)], tokenizer)
    first = next(position for position, label in enumerate(labels) if label != IGNORE_INDEX)
    assert ids[:first] == generation


@pytest.mark.parametrize("version, closing", [("llava_llama_2", "</s>"), ("chatml_direct", "<|im_end|>"), ("plain", "\n")])
def test_other_templates_supervise_the_answer(loaded, version, closing):
    tokenizer = loaded[0]
    prompt, spans = render_prompt([("<image>\nDescribe.", "A cat")], version)
    (start, end), = spans
    assert prompt[start:end].lstrip(" ").startswith("A cat") and prompt[start:end].endswith(closing)
    ids, labels = tokenize_with_labels(prompt, spans, tokenizer)
    assert ids == tokenizer_image_token(prompt, tokenizer)
    assert "cat" in supervised_text(tokenizer, ids, labels) and "Describe" not in supervised_text(tokenizer, ids, labels)


def write_dataset(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records) if name.endswith(".json") else "\n".join(map(json.dumps, records)))
    return str(path)


def image_record(folder, identifier, answer="red"):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(folder / f"{identifier}.png")
    return {"id": identifier, "image": f"{identifier}.png",
            "conversations": [{"from": "human", "value": "Colour?\n<image>"}, {"from": "gpt", "value": answer}]}


def test_bad_records_are_skipped_and_counted(loaded, tmp_path, caplog):
    tokenizer, model, processor, _ = loaded
    records = [
        image_record(tmp_path, "good"),
        {"id": "missing", "image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hello"}]},
        {"id": "roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "late"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    dataset = SupervisedDataset(
        write_dataset(tmp_path, records), LlavaTurns(tokenizer, processor, model.config), image_folder=str(tmp_path), model_max_length=256
    )
    assert len(dataset) == 2
    assert dict(dataset.skipped) == {
        "missing image": 1, "no answer": 1, "roles do not alternate human/gpt": 1, "answer cut off by model_max_length": 1,
    }
    assert "skipped 4 of 6 samples" in caplog.text and "e.g. missing" in caplog.text
    assert dataset.modality_lengths[0] > 0 > dataset.modality_lengths[1]


def truncate(path):
    """Keep the PNG header (PIL opens it) but cut the pixel data (loading it fails)."""
    Image.effect_noise((30, 20), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:100])


def test_unreadable_images_are_skipped_or_replaced_and_counted(loaded, tmp_path):
    tokenizer, model, processor, _ = loaded
    records = [image_record(tmp_path, name) for name in ("garbage", "truncated", "fine")]
    (tmp_path / "garbage.png").write_bytes(b"not a png")  # found by its header when the dataset is built
    truncate(tmp_path / "truncated.png")  # found only when its pixels are read
    dataset = SupervisedDataset(write_dataset(tmp_path, records), LlavaTurns(tokenizer, processor, model.config), image_folder=str(tmp_path))
    assert dict(dataset.skipped) == {"unreadable image": 1} and len(dataset) == 2
    item = dataset[0]
    assert dataset.unreadable_images == 1 and item["input_ids"] == dataset.samples[1].text.input_ids


def test_all_images_unreadable_is_one_error_naming_the_file(loaded, tmp_path):
    tokenizer, model, processor, _ = loaded
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    records = [image_record(garbage, str(i)) for i in range(3)]
    for i in range(3):
        (garbage / f"{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"garbage/data.json: no usable sample among 3: 3 × unreadable image \(e.g. 0\)$"):
        SupervisedDataset(write_dataset(garbage, records), LlavaTurns(tokenizer, processor, model.config), image_folder=str(garbage))
    # Headers that read but data that does not: the error comes at the first draw, never a RecursionError.
    records = [image_record(tmp_path, str(i)) for i in range(3)]
    for i in range(3):
        truncate(tmp_path / f"{i}.png")
    dataset = SupervisedDataset(write_dataset(tmp_path, records), LlavaTurns(tokenizer, processor, model.config), image_folder=str(tmp_path))
    with pytest.raises(DataError, match=r"data.json: no usable sample among 3: 3 × unreadable image data"):
        dataset[1]
    assert dataset.unreadable_images == 3


@pytest.mark.parametrize("name, content, where", [
    ("data.json", '[\n  {"id": 1},\n  {"id": 2,,}\n]', "data.json:3: invalid JSON"),
    ("data.jsonl", '{"id": 1}\n{"id": \n', "data.jsonl:2: invalid JSON"),
    ("data.json", '{"id": 1}', "expected a JSON list"),
])
def test_malformed_json_names_file_and_line(loaded, tmp_path, name, content, where):
    tokenizer, model, processor, _ = loaded
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=where):
        SupervisedDataset(str(tmp_path / name), LlavaTurns(tokenizer, processor, model.config))


def test_collator_pads_right_and_gives_text_samples_a_zero_image(loaded, tmp_path):
    tokenizer, model, processor, _ = loaded
    records = [image_record(tmp_path, "a"), {"id": "t", "conversations": [{"from": "human", "value": "Hi there you"}, {"from": "gpt", "value": "Hello"}]}]
    dataset = SupervisedDataset(write_dataset(tmp_path, records, "data.jsonl"), LlavaTurns(tokenizer, processor, model.config), image_folder=str(tmp_path))
    batch = DataCollator(tokenizer.pad_token_id, (3, 56, 56))([dataset[0], dataset[1]])
    lengths = [len(dataset.samples[i].text.input_ids) for i in range(2)]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["images"].shape == (2, 3, 56, 56) and batch["images"][1].abs().sum() == 0
    assert batch["instructions"] == ["<image>\nColour?", "Hi there you"]  # each first question, for CDPruner
    with torch.no_grad():
        out = model(**batch)  # the model takes the batch as it is (dummy image for the text sample)
    assert torch.isfinite(out.logits).all()


def test_modality_grouping_keeps_batches_pure():
    lengths = [5, -3, 7, -2, 9, 4, -8, 6, -1, 2, 3, -4]
    order = modality_length_grouped_indices(lengths, megabatch_size=2, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    full_batches = [order[i : i + 2] for i in range(0, len(order) - 2, 2)]
    for batch in full_batches:
        signs = {lengths[i] > 0 for i in batch}
        assert len(signs) == 1


def test_one_dataset_class_serves_a_family_through_its_processor(loaded, tmp_path, caplog):
    """The family encoder: the checkpoint's own template labels the answers, a sample longer than model_max_length
    (known only once its image is encoded) is counted and the next one used, and a dataset of nothing but such
    samples is one error naming the file. `<image>` without an image is refused for every encoder."""
    tokenizer, model, processor, _ = loaded
    family = FamilyTurns(load_processor(write_tiny_family(str(tmp_path / "qwen"), "qwen2-vl")))
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi " * 40}, {"from": "gpt", "value": "Hello"}]}
    tagged = {"id": "tag", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}]}
    records = [image_record(tmp_path, "a"), text_only, tagged]
    for encoder in (LlavaTurns(tokenizer, processor, model.config), family):
        dataset = SupervisedDataset(write_dataset(tmp_path, records), encoder, image_folder=str(tmp_path))
        assert dict(dataset.skipped) == {"<image> tag without an image": 1} and len(dataset) == 2
    short = dataset[0]["input_ids"].shape[1]  # the image sample, in the family's template
    dataset = SupervisedDataset(write_dataset(tmp_path, records), family, str(tmp_path), model_max_length=short)
    item = dataset[1]  # the long text-only sample: skipped for the image one after it
    assert dataset.too_long == 1 and "exceeds model_max_length" in caplog.text
    assert item["input_ids"].shape[1] == short and (item["labels"] != IGNORE_INDEX).any()
    batch = family.collate([dataset[0], dataset[0]])
    assert batch["input_ids"].shape == (2, short) and batch["labels"].shape == (2, short)
    long_only = SupervisedDataset(write_dataset(tmp_path, [text_only], "long.json"), family, model_max_length=short)
    with pytest.raises(DataError, match=r"long.json: no usable sample among 1: 1 × longer than model_max_length"):
        long_only[0]
