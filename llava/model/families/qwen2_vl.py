"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): its own text model with 3-D M-RoPE positions (t, h, w rows, from
`get_rope_index`); each image or video is one run of `image_token_id` / `video_token_id` pads between
`<|vision_start|>` and `<|vision_end|>` text tokens."""

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from llava.model.visual_exit.decoder import VisualExitDecoderMixin
from llava.model.visual_exit.vlm import FamilyAdapter, register_family


class MultimodalRopeDecoderMixin(VisualExitDecoderMixin):
    """Positions as the M-RoPE text models take them: `[4, B, T]` (generate: a text row, then the three rotary
    rows), `[3, B, T]` (the rotary rows alone), `[B, T]` or None (text, the same on all three rows). Masks and
    windows count the text row, or the token index when only rotary rows come (as the stock text model does)."""

    def split_position_ids(self, position_ids, hidden: torch.Tensor, past_length: int):
        if position_ids is not None and position_ids.dim() == 3:
            if position_ids.shape[0] == 4:
                return position_ids[0], position_ids[1:]
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
