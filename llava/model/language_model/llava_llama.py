"""LLaVA on a LLaMA decoder: transformers' Llama classes plus the multimodal mixins."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


class LlavaConfig(LlamaConfig):
    """A LlamaConfig carrying LLaVA's `mm_*` keys (kept as plain attributes, saved with the config)."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig
    # Original LLaVA checkpoints load the tower from `mm_vision_tower`; tower weights in their shards are unused.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

    def __init__(self, config: LlavaConfig):
        super().__init__(config)
        self.model = LlavaLlamaModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None and _needs_multimodal_inputs(input_ids, images):
            mm = self.prepare_inputs_labels_for_multimodal(input_ids, attention_mask, labels, images, image_sizes)
            input_ids, inputs_embeds, labels = None, mm.inputs_embeds, mm.labels
            attention_mask, position_ids = mm.attention_mask, mm.position_ids
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        **kwargs,
    ):
        """LLaVA's generate: prompts with `IMAGE_TOKEN_INDEX` placeholders in, only the new tokens out.

        The batch is re-padded on the left, whatever padding it came with, so batched decoding is right.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("pass input_ids (with IMAGE_TOKEN_INDEX placeholders), not inputs_embeds")
        inputs = kwargs.pop("input_ids", inputs)
        if inputs is None:
            raise ValueError("generate needs the prompt input_ids")
        mm = self.prepare_inputs_labels_for_multimodal(
            inputs, kwargs.pop("attention_mask", None), None, images, image_sizes, padding_side="left"
        )
        return super().generate(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, **kwargs)


def _needs_multimodal_inputs(input_ids: torch.LongTensor | None, images) -> bool:
    if images is not None:
        return True
    # Placeholders without images must fail clearly in preparation, not as an index error in the embedding.
    return input_ids is not None and input_ids.shape[1] > 1 and bool((input_ids == IMAGE_TOKEN_INDEX).any())


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
