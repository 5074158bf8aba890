"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): its own text model with 3-D M-RoPE positions (t, h, w rows, from
`get_rope_index`); each image or video is one run of `image_token_id` / `video_token_id` pads between
`<|vision_start|>` and `<|vision_end|>` text tokens."""

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from llava.model.families.processing import FamilyProcessing, content_jinja
from llava.model.visual_exit.decoder import VisualExitDecoderMixin
from llava.model.visual_exit.vlm import FamilyAdapter, register_family


class MultimodalRopeDecoderMixin(VisualExitDecoderMixin):
    """Positions as the M-RoPE text models take them: `[4, B, T]` (generate: a text row, then the three rotary
    rows), `[3, B, T]` (the rotary rows alone), `[B, T]` or None (text, the same on all three rows). Masks, windows
    and the random scorer read the text row; with the rotary rows alone, each token's count of real tokens before
    it, so a left-padded sample numbers its tokens as it does alone. Three rotary rows have no renumbering after a
    drop (PyramidDrop's and SparseVLM's rule for 1-D positions): those methods run here with `:keep`."""

    renumbers_positions = False

    def packing_positions(self, position_ids):
        """Packed sequences only with a text row in front (`[4, B, T]`), as the stock text model reads them."""
        return position_ids[0] if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4 else None

    def split_position_ids(self, position_ids, hidden: torch.Tensor, past_length: int, attention_mask=None):
        if position_ids is not None and position_ids.dim() == 3:
            if position_ids.shape[0] == 4:
                return position_ids[0], position_ids[1:]
            if attention_mask is not None:
                counted = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
                return counted[:, -hidden.shape[1] :], position_ids
            positions, _ = super().split_position_ids(None, hidden, past_length)
            return positions, position_ids
        positions, _ = super().split_position_ids(position_ids, hidden, past_length)
        return positions, positions[None].expand(3, *positions.shape)


ADAPTER = register_family(
    FamilyAdapter(
        Qwen2VLForConditionalGeneration,
        visual_token_attributes=("image_token_id", "video_token_id"),
        decoder_mixin=MultimodalRopeDecoderMixin,
    )
)


def text_config(text: dict, tokens: dict) -> dict:
    """The Qwen text config: M-RoPE sections sum to head_dim / 2."""
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}
    return {**text, "rope_parameters": rope}


def tiny_config(text: dict, tokens: dict) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=text_config(text, tokens),
        vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": text["hidden_size"], "num_heads": 2, "patch_size": 14,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "mlp_ratio": 2,
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def chatml_template(image_markup: str, default_system: str | None = None, video_markup: str | None = None) -> str:
    """ChatML, the conversation format of Qwen and the families built on it: each message is
    `<|im_start|>role\n...<|im_end|>\n`, the generation prompt `<|im_start|>assistant\n`; `default_system` is put
    first when the conversation brings no system message."""
    system = ""
    if default_system:
        opening = "<|im_start|>system\n" + default_system + "<|im_end|>\n"
        system = "{%- if not messages or messages[0].role != 'system' -%}{{ " + repr(opening) + " }}{%- endif -%}"
    return (
        system
        + "{%- for message in messages -%}{{ '<|im_start|>' + message.role + '\\n' }}"
        + content_jinja(image_markup, video_markup=video_markup)
        + "{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def tiny_image_processor(config) -> Qwen2VLImageProcessorPil:
    """Images of 1 to 16 visual tokens (pixels are rounded to whole merged patches)."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        min_pixels=unit * unit, max_pixels=16 * unit * unit, patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size,
    )


def image_token_counts(image_inputs, settings: dict, image_processor) -> list[int]:
    """One visual token per merge x merge patches of each (t, h, w) grid."""
    merge = image_processor.merge_size
    return [t * h * w // merge**2 for t, h, w in image_inputs["image_grid_thw"].tolist()]


VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VIDEO_MARKUP = VISION_START + "<|video_pad|>" + VISION_END  # what the templates write for a video


def video_patches(frames: list, image_processor) -> tuple[torch.Tensor, list[int]]:
    """(pixel_values_videos (t·h·w, C·T·p·p), its grid [t, h, w]) of pre-extracted frames, laid out as Qwen's video
    processor lays them out: frames padded to whole temporal groups of T by repeating the last, each group's
    patches in the image order (merge blocks row-major), its T frames side by side in each patch. Each frame is
    resized and normalised by the image processor (its pixel bounds, not the video processor's, which needs
    torchvision)."""
    if not frames:
        raise ValueError("a video without frames")
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"a video's frames differ in size: {sizes}")
    temporal, patch = image_processor.temporal_patch_size, image_processor.patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % temporal)
    encoded = [image_processor([frame], return_tensors="pt") for frame in frames]
    _, height, width = encoded[0]["image_grid_thw"][0].tolist()
    # The image processor repeats each frame T times in its patches; keep one copy, then put T frames together.
    single = [e["pixel_values"].view(height * width, -1, temporal, patch, patch)[:, :, 0] for e in encoded]
    groups = [torch.stack(single[i : i + temporal], dim=2).flatten(1) for i in range(0, len(single), temporal)]
    return torch.cat(groups), [len(groups), height, width]


def video_inputs(video, image_processor, tokenizer) -> tuple[str, dict]:
    """Qwen2-VL: one run of video pads for the whole video, `t·h·w / merge²` of them."""
    pixels, (t, h, w) = video_patches(video.frames, image_processor)
    pads = tokenizer.video_token * (t * h * w // image_processor.merge_size**2)
    return VISION_START + pads + VISION_END, {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]])}


def mm_token_type_ids(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """What Qwen's processor returns beside input_ids (and get_rope_index needs): 1 on image pads, 2 on video
    pads, 0 on text."""
    image = input_ids == tokenizer.convert_tokens_to_ids(getattr(tokenizer, "image_token", "<|image_pad|>"))
    video = input_ids == tokenizer.convert_tokens_to_ids(getattr(tokenizer, "video_token", "<|video_pad|>"))
    return image.long() + 2 * video.long()


PROCESSING = FamilyProcessing(
    processor_class="Qwen2VLProcessor",
    chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant.", VIDEO_MARKUP),
    turn_end="<|im_end|>",
    placeholder=("image_token", "<|image_pad|>"),
    named_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    chat_tokens=("<|vision_start|>", "<|vision_end|>", *CHATML_TOKENS),
    config_tokens={
        "image": "<|image_pad|>", "video": "<|video_pad|>",
        "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
    },
    settings_for=lambda config: {},
    tiny_image_processor=tiny_image_processor,
    token_counts=image_token_counts,
    token_type_ids=mm_token_type_ids,
    video_markup=VIDEO_MARKUP,
    video_inputs=video_inputs,
)
