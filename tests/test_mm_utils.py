import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    load_image,
    process_images,
    tokenizer_image_token,
)
from llava.tiny.tokenizer import build_tokenizer

VICUNA_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nPlease describe this image in detail. "
    "ASSISTANT:"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_vicuna_prompt_string():
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\nPlease describe this image in detail.")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == VICUNA_PROMPT


def test_tokenizer_image_token_follows_llava_convention(tokenizer):
    ids = tokenizer_image_token(VICUNA_PROMPT, tokenizer)
    before, after = VICUNA_PROMPT.split("<image>")
    # Oracle: each piece tokenised on its own (each with BOS), one BOS kept at the front, -200 in between.
    expected = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids[1:]
    assert ids == expected
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    # The piece after the image starts with a lone "▁" and then the newline, as with LLaMA's tokenizer.
    position = ids.index(IMAGE_TOKEN_INDEX)
    assert tokenizer.convert_ids_to_tokens(ids[position + 1 : position + 3]) == ["▁", "\n"]
    assert tokenizer.decode(ids[:position], skip_special_tokens=True) + "<image>" + tokenizer.decode(
        ids[position + 1 :], skip_special_tokens=True
    ).lstrip(" ") == VICUNA_PROMPT.replace("<image> ", "<image>")


def test_tokenizer_image_token_several_images_and_tensors(tokenizer):
    ids = tokenizer_image_token("<image><image> two", tokenizer, return_tensors="pt")
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids[:3].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]
    with pytest.raises(ValueError, match="Unsupported tensor type"):
        tokenizer_image_token("x", tokenizer, return_tensors="np")


def test_expand2square_centres_on_background():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = np.asarray(expand2square(image, (122, 116, 104)))
    assert square.shape == (40, 40, 3)
    assert (square[:10] == (122, 116, 104)).all() and (square[30:] == (122, 116, 104)).all()
    assert (square[10:30] == (255, 0, 0)).all()
    assert expand2square(image.resize((8, 8)), (0, 0, 0)).size == (8, 8)


def test_process_images_pad_and_default(loaded):
    _, model, processor, _ = loaded
    wide = Image.new("RGB", (112, 56), (255, 255, 255))
    padded = process_images([wide, wide], processor, model.config)
    assert padded.shape == (2, 3, 56, 56)
    # Pad mode: top and bottom quarters are the mean colour, i.e. ~0 after normalisation.
    assert padded[0, :, :10].abs().max() < 0.02
    assert padded[0, :, 20:36].min() > 1.5  # white, normalised
    model.config.image_aspect_ratio = "square"
    try:
        cropped = process_images([wide], processor, model.config)
    finally:
        model.config.image_aspect_ratio = "pad"
    assert cropped.shape == (1, 3, 56, 56) and cropped.min() > 1.5  # centre crop: all white


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="corrupt.jpg: cannot read image"):
        load_image(corrupt)
    grey = tmp_path / "grey.png"
    Image.new("L", (4, 4), 7).save(grey)
    assert load_image(grey).mode == "RGB"


def test_model_name_from_path():
    assert get_model_name_from_path("/ckpts/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert get_model_name_from_path("out/llava-lora/checkpoint-500") == "llava-lora_checkpoint-500"
    assert get_model_name_from_path("liuhaotian/llava-v1.5-13b") == "llava-v1.5-13b"


def test_keywords_stopping_criteria(tokenizer):
    criteria = KeywordsStoppingCriteria(["###"], tokenizer)
    done = tokenizer("an answer ###", add_special_tokens=False).input_ids
    running = tokenizer("an answer that", add_special_tokens=False).input_ids
    width = max(len(done), len(running))
    batch = torch.tensor([[0] * (width - len(row)) + row for row in (done, running)])
    assert criteria(batch, None).tolist() == [True, False]
