"""Gemma 3 (`Gemma3ForConditionalGeneration`): each image is `\\n\\n<start_of_image>`, a fixed number of soft tokens
(the only ones the model fills), `<end_of_image>\\n\\n`. Three things a visual-token method must follow:

- Image blocks attend both ways: with `token_type_ids` (1 on the soft tokens) the stock model lets each image's
  soft tokens see one another, later ones included, in every layer (causal OR same block; a sliding window still
  bounds the past). The stock mask compares slot indices; here each token carries its block id through every drop
  (`ValidKeys.blocks`), so the tokens of an image that stay keep seeing each other however they were compacted,
  and a decoded token (no `token_type_ids` at decode, as in the stock generate) is plain causal text.
- Sliding and global layers alternate (`layer_types`); windows are measured in original positions, as everywhere
  in the exit (masks.py), which is what the stock model with the gone keys masked does.
- The two layer types rotate with different RoPE bases: one rotation per kind (`layer_rotations`).
The stock forward builds its per-type 4-D masks before the text model; the exit ignores them and builds its own
from the 2-D padding mask and the blocks, which the VLM forward hands it (ExitChannel).
"""

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from llava.model.families.processing import FamilyProcessing, content_jinja
from llava.model.visual_exit.decoder import VisualExitDecoderMixin
from llava.model.visual_exit.vlm import FamilyAdapter, register_family


class LayerTypeRopeDecoderMixin(VisualExitDecoderMixin):
    """The exit decoder for a text model with one rotary embedding per layer type (Gemma 3's local and global)."""

    def __init__(self, config):
        super().__init__(config)
        if config.use_bidirectional_attention:
            raise ValueError("use_bidirectional_attention: the text model attends both ways everywhere, which the "
                             "visual exit (a causal decoder's) does not build; use the stock class")

    @property
    def layer_rotations(self) -> tuple:
        return tuple(self.config.layer_types[: self.config.num_hidden_layers])

    def rotary(self, hidden, position_ids) -> dict:
        return {kind: self.rotary_emb(hidden, position_ids, kind) for kind in set(self.layer_rotations)}


def image_blocks(forward_kwargs: dict) -> torch.Tensor | None:
    """Each image's soft tokens as one block, as the stock forward groups them (only when given token_type_ids)."""
    token_type_ids = forward_kwargs.get("token_type_ids")
    return None if token_type_ids is None else get_block_sequence_ids_for_mask(token_type_ids, token_type_ids.device)


ADAPTER = register_family(
    FamilyAdapter(Gemma3ForConditionalGeneration, decoder_mixin=LayerTypeRopeDecoderMixin, attention_blocks=image_blocks)
)


def tiny_config(text: dict, tokens: dict) -> Gemma3Config:
    """A 56-pixel SigLIP tower of 4x4 patches pooled to 4 soft tokens (Gemma 3: 64x64 to 256), global attention
    every second layer (Gemma 3: every sixth) and an 8-token window, so that windows cut into short prompts."""
    layers = text["num_hidden_layers"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    return Gemma3Config(
        text_config={
            **text, "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 8,
            "layer_types": ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(layers)],
        },
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
        },
        mm_tokens_per_image=4,
        image_token_index=tokens["image"],
        boi_token_index=tokens["boi"],
        eoi_token_index=tokens["eoi"],
    )


def tiny_image_processor(config) -> Gemma3ImageProcessorPil:
    size = config.vision_config.image_size
    return Gemma3ImageProcessorPil(size={"height": size, "width": size})


def image_run(count: int, placeholder_id: int, tokenizer) -> list[int]:
    """The tokens of what Gemma 3's processor writes for the `<start_of_image>` the template wrote: a blank line,
    that token, the soft tokens, `<end_of_image>`, a blank line (in the text, where the blank lines may merge with
    the template's: `expands_in_text`)."""
    blank = tokenizer.encode("\n\n", add_special_tokens=False)
    return [*blank, placeholder_id, *[tokenizer.image_token_id] * count, tokenizer.eoi_token_id, *blank]


# Gemma's turns; a system message opens the first user turn (Gemma has no system role).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0].content if messages and messages[0].role == 'system' else none -%}"
    "{%- for message in messages if message.role != 'system' -%}"
    "{{ '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' }}"
    "{%- if loop.first and system -%}{{ system if system is string else system[0].text }}{{ '\\n\\n' }}{%- endif -%}"
    + content_jinja("<start_of_image>")
    + "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

PROCESSING = FamilyProcessing(
    processor_class="Gemma3Processor",
    chat_template=CHAT_TEMPLATE,
    turn_end="<end_of_turn>",
    placeholder=("boi_token", "<start_of_image>"),
    named_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    chat_tokens=("<start_of_turn>", "<end_of_turn>"),
    config_tokens={"image": "<image_soft_token>", "boi": "<start_of_image>", "eoi": "<end_of_image>"},
    settings_for=lambda config: {"image_seq_length": config.mm_tokens_per_image},
    tiny_image_processor=tiny_image_processor,
    token_counts=lambda image_inputs, settings, image_processor: [settings["image_seq_length"]] * len(image_inputs["pixel_values"]),
    image_run=image_run,
    expands_in_text=True,
)
