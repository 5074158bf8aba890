"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`): Qwen3-VL's images and interleaved M-RoPE (no DeepStack) on a hybrid
decoder, three layers in four Gated DeltaNet (linear attention), every fourth full attention with an output gate and
partial RoPE.

A linear layer has no keys to hide: its recurrence and its causal convolution run over whatever sequence it is
given. So leaving or pruning visual tokens here is removal, not masking: the layers after the exit run on the
shortened sequence, their recurrent state is that of the tokens that stay, and the first text tokens after the image
convolve what came before it. The exit already works that way (it drops tokens from the sequence); a linear layer
gets the 2-D padding mask of the current, compacted layout (padding enters as zeros, as in the stock model) and no
mask at decode, and the cache holds transformers' own linear-attention layers for them (conv and recurrent states).
Methods that rank by attention or keys (FastV, PyramidDrop, SparseVLM, DART) need a full-attention layer where they
rank and refuse a linear one; the exit, the gates and random pruning run after any layer.
"""

import dataclasses

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from llava.model.families import qwen2_vl, qwen3_vl
from llava.model.families.qwen2_vl import MultimodalRopeDecoderMixin
from llava.model.visual_exit.vlm import register_family

RECURRENT = "linear attention"  # the mask kind of a linear layer


class HybridLinearDecoderMixin(MultimodalRopeDecoderMixin):
    """The M-RoPE exit decoder for a text model whose `layer_types` mix linear and full attention."""

    masks_as_drops = False  # a zeroed token still steps a linear layer's recurrence: drops are compacted at once

    def layer_mask_kind(self, index: int):
        return RECURRENT if self.config.layer_types[index] == "linear_attention" else super().layer_mask_kind(index)

    def _mask(self, valid_keys, query_length, dtype, kind):
        if kind != RECURRENT:
            return super()._mask(valid_keys, query_length, dtype, kind)
        # As the stock text model: the padding mask of the tokens run now, none for single-token steps.
        if query_length == 1 or not valid_keys.padded:
            return None
        return valid_keys.valid[:, -query_length:].long()


ADAPTER = register_family(
    dataclasses.replace(
        qwen2_vl.ADAPTER, model_class=Qwen3_5ForConditionalGeneration, decoder_mixin=HybridLinearDecoderMixin
    )
)


def tiny_config(text: dict, tokens: dict) -> Qwen3_5Config:
    """Linear, full, linear, full (Qwen3.5: three linear layers per full one); half of each head rotated, in
    interleaved M-RoPE sections that sum to the rotated half."""
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rotated_pairs = head_dim // 4
    sections = [rotated_pairs - 2 * (rotated_pairs // 3), rotated_pairs // 3, rotated_pairs // 3]
    layers = text["num_hidden_layers"]
    return Qwen3_5Config(
        text_config={
            **text, "head_dim": head_dim,
            "layer_types": ["full_attention" if (i + 1) % 2 == 0 else "linear_attention" for i in range(layers)],
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
            "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4,
            "rope_parameters": {
                "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "mrope_section": sections, "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
            "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 16,
        },
        image_token_id=tokens["image"],
        video_token_id=tokens["video"],
        vision_start_token_id=tokens["vision_start"],
        vision_end_token_id=tokens["vision_end"],
    )


# Qwen3-VL's processor, tokens and template; transformers loads every Qwen3.5 checkpoint's tokenizer as its
# byte-level Qwen3.5 class, so a tiny one is byte-level too.
PROCESSING = dataclasses.replace(qwen3_vl.PROCESSING, byte_level_tokenizer=True)
