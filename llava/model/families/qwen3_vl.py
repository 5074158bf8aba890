"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): Qwen2-VL's layout of image runs and 3-row positions, with two
changes a visual-token method must follow.

- DeepStack: the stock text model adds, after each of its first layers i, the vision tower's features of block
  `deepstack_visual_indexes[i]` onto the visual tokens' hidden states. Here they become the decoder's
  `VisualAdditions`: each visual token still in the sequence gets its own rows wherever it now stands, a token
  that left gets none, and an exit before such a layer skips its additions. A stage deciding after layer i reads
  the layer's own output, as each method's definition reads its layer (DART's duplicates, SparseVLM's clusters);
  the additions then go onto the tokens that stay, a merged token taking its cluster centre's.
- Interleaved M-RoPE: the rotary frequencies take t, h, w in turn (T H W T H W … T) instead of three chunks; the
  text model's own rotary embedding does this from the three position rows, which the exit passes on unchanged.
Attention has per-head q/k norms before RoPE, which the scorers that project queries or keys again apply too.
"""

import dataclasses

import torch

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from llava.model.families import qwen2_vl
from llava.model.families.qwen2_vl import MultimodalRopeDecoderMixin, chatml_template
from llava.model.visual_exit.tokens import VisualAdditions
from llava.model.visual_exit.vlm import register_family


class DeepStackDecoderMixin(MultimodalRopeDecoderMixin):
    """The M-RoPE decoder, taking the stock text model's DeepStack arguments as its visual additions."""

    def forward(self, *args, visual_pos_masks=None, deepstack_visual_embeds=None, **kwargs):
        if deepstack_visual_embeds is not None:
            kwargs["visual_additions"] = VisualAdditions(visual_pos_masks, tuple(deepstack_visual_embeds))
        return super().forward(*args, **kwargs)


ADAPTER = register_family(
    dataclasses.replace(
        qwen2_vl.ADAPTER, model_class=Qwen3VLForConditionalGeneration, decoder_mixin=DeepStackDecoderMixin
    )
)


def tiny_config(text: dict, tokens: dict) -> Qwen3VLConfig:
    """Two vision blocks, each feeding DeepStack: additions after decoder layers 0 and 1."""
    text_config = qwen2_vl.text_config(text, tokens)
    text_config["head_dim"] = text["hidden_size"] // text["num_attention_heads"]
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


def video_inputs(video, image_processor, tokenizer) -> tuple[str, dict]:
    """Each temporal group as its own run, after its timestamp as text: `<t seconds>`, t the mean time of the
    group's first and last frame (frames i at i / fps, the last repeated to fill the group), as Qwen3-VL's
    processor writes them."""
    pixels, (t, h, w) = qwen2_vl.video_patches(video.frames, image_processor)
    temporal = image_processor.temporal_patch_size
    times = [min(i, len(video.frames) - 1) / video.fps for i in range(t * temporal)]
    frame = qwen2_vl.VISION_START + tokenizer.video_token * (h * w // image_processor.merge_size**2) + qwen2_vl.VISION_END
    text = "".join(f"<{(times[g * temporal] + times[(g + 1) * temporal - 1]) / 2:.1f} seconds>" + frame for g in range(t))
    return text, {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]])}


# Qwen2-VL's tokens and image processor (patch 16, from the vision config); Qwen3-VL's template has no default
# system message.
PROCESSING = dataclasses.replace(
    qwen2_vl.PROCESSING,
    processor_class="Qwen3VLProcessor",
    chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>", video_markup=qwen2_vl.VIDEO_MARKUP),
    video_inputs=video_inputs,
)
