"""`LlavaProcessor`: our LLaVA class's questions as model inputs, with the interface a family's `FamilyProcessor` has
(llava.model.families.processing), so that whoever asks questions never asks which kind of model it holds:

    inputs = processor.question_inputs(text, images)      # a batch of one
    processor.prompt_length(inputs)                       # tokens the model sees, visual ones included
    batch = processor.collate([inputs, ...])              # left-padded, for generate
    processor.new_tokens(output.sequences, batch)         # the generated tokens only

It prompts as LLaVA's `model_vqa_loader` does: the conversation template, `<image>\\n` in front of the question
(with the start/end markup a checkpoint asks for), the images through `process_images`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token


class LlavaProcessor:
    """`conv_mode`: the template it prompts with; `visual_tokens`: what one image takes in the sequence."""

    def __init__(self, tokenizer, image_processor, model_config, conv_mode: str, visual_tokens: int):
        self.tokenizer, self.image_processor, self.model_config = tokenizer, image_processor, model_config
        self.conv_mode, self.visual_tokens = conv_mode, visual_tokens

    def render(self, question: str, image_first: bool) -> str:
        """The conversation's prompt for one question; `image_first` puts its image's tag in front."""
        if image_first:
            marker = DEFAULT_IMAGE_TOKEN
            if getattr(self.model_config, "mm_use_im_start_end", False):
                marker = DEFAULT_IM_START_TOKEN + marker + DEFAULT_IM_END_TOKEN
            question = f"{marker}\n{question}"
        conv = get_conv_template(self.conv_mode)
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def question_inputs(self, question: str, images: Sequence = (), tagged: bool = False, videos: Sequence = ()) -> dict:
        """input_ids (1, T) with IMAGE_TOKEN_INDEX, its images' pixels and sizes, and the question as `instructions`
        (what CDPruner ranks image tokens by). `tagged`: the question places its image's `<image>` tag itself
        (lmms-eval's convention); else the tag goes first, as LLaVA's loader puts it.
        ValueError when the tags and the images disagree, or for a video (LLaVA-1.5 takes none)."""
        if videos:
            raise ValueError("LLaVA-1.5 takes no video (the Qwen families do)")
        prompt = self.render(question, bool(images) and not tagged)
        input_ids = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt")
        tags = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if tags != len(images):
            raise ValueError(f"its prompt holds {tags} <image> tag(s) for {len(images)} image(s)")
        pixels = list(process_images(images, self.image_processor, self.model_config)) if images else []
        return {"input_ids": input_ids[None], "images": pixels, "image_sizes": [image.size for image in images],
                "instructions": [question]}

    def prompt_length(self, inputs: dict) -> int:
        ids = inputs["input_ids"]
        return ids.shape[1] + int((ids == IMAGE_TOKEN_INDEX).sum()) * (self.visual_tokens - 1)

    def collate(self, inputs: Sequence[dict], padding_side: str = "left") -> dict:
        """One batch: ids padded (left for generation), the images stacked — a list when anyres views differ."""
        ids = [sample["input_ids"][0] for sample in inputs]
        input_ids, attention_mask = padded(ids, self.tokenizer.pad_token_id, padding_side)
        pixels = [p for sample in inputs for p in sample["images"]]
        same_shape = all(p.shape == pixels[0].shape for p in pixels)
        images = (torch.stack(pixels) if same_shape else pixels) if pixels else None
        sizes = [size for sample in inputs for size in sample["image_sizes"]]
        instructions = [text for sample in inputs for text in sample["instructions"]]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "images": images, "image_sizes": sizes,
                "instructions": instructions}

    def new_tokens(self, sequences: torch.Tensor, batch: dict) -> torch.Tensor:
        """LLaVA's generate embeds the prompt and returns the new tokens only."""
        return sequences


def padded(sequences: list[torch.Tensor], pad_value: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) batch of 1-D sequences padded on `side` with `pad_value`, and its attention mask."""
    width = max(len(sequence) for sequence in sequences)
    batch = torch.full((len(sequences), width), pad_value, dtype=sequences[0].dtype)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        batch[row, columns] = sequence
        mask[row, columns] = 1
    return batch, mask
