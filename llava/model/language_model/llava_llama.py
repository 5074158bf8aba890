"""LLaVA on a LLaMA decoder: transformers' Llama classes, the multimodal mixins and the visual-exit decoder loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from llava.compat import cache_argument, install_output_capture_hooks, output_cache, take_cache
from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from llava.model.visual_exit import ExitChannel, ExitConfig, ExitStats, VisualExitCache, VisualExitDecoderMixin
from llava.model.visual_exit.generation import ExitCacheGeneration, generation_cache, with_exit_stats
from llava.model.visual_exit.training import ExitLabelRule, GateTrainingOutput, gate_training_pass

logger = logging.getLogger(__name__)


class LlavaConfig(LlamaConfig):
    """A LlamaConfig carrying LLaVA's `mm_*` keys and the exit settings (plain attributes, saved with the config)."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, VisualExitDecoderMixin, LlamaModel):
    config_class = LlavaConfig


@dataclass
class LlavaCausalLMOutput(CausalLMOutputWithPast):
    """Adds the prefill's exit statistics (None on decode steps)."""

    exit_stats: ExitStats | None = None


class LlavaLlamaForCausalLM(ExitCacheGeneration, LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig
    # Original LLaVA checkpoints load the tower from `mm_vision_tower`; tower weights in their shards are unused.
    _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

    def __init__(self, config: LlavaConfig):
        # Skip LlamaForCausalLM.__init__: it would build a second, plain decoder only to replace it.
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        install_output_capture_hooks(self.model)  # before the tower's first call (see compat)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: VisualExitCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        visual_mask: torch.Tensor | None = None,
        exit_config: ExitConfig | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        gate_training_layer: int | None = None,
        exit_label_rule: ExitLabelRule | None = None,
        exit_channel: ExitChannel | None = None,
        instructions: list[str] | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutput | GateTrainingOutput:
        """LLaVA's forward. With `gate_training_layer` k it is a gate-training step instead: the loss of gate k
        against labels from the two continuations after layer k (see visual_exit.training). `instructions`: each
        prompt's question text, which CDPruner ranks the image tokens by (nothing else reads it)."""
        cache = take_cache(kwargs, cache)
        return_dict = kwargs.pop("return_dict", None)
        mm = None
        if inputs_embeds is None and _needs_multimodal_inputs(input_ids, images):
            mm = self.prepare_inputs_labels_for_multimodal(
                input_ids, attention_mask, labels, images, image_sizes,
                vision_stage=self.vision_stage(exit_config), instructions=instructions,
            )
            input_ids, inputs_embeds, labels, visual_mask = None, mm.inputs_embeds, mm.labels, mm.visual_mask
            attention_mask, position_ids = mm.attention_mask, mm.position_ids
        if gate_training_layer is not None:
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            return gate_training_pass(
                self.model, self.lm_head, inputs_embeds, attention_mask, position_ids, visual_mask, labels,
                gate_training_layer, exit_label_rule or ExitLabelRule(), reduction=exit_config,
            )
        channel = exit_channel or ExitChannel()  # generate's: kept over its steps
        earlier = channel.stats
        channel.visual_mask, channel.exit_config = visual_mask, exit_config
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            exit_channel=channel,
            **cache_argument(cache),
            **kwargs,
        )
        stats = channel.stats if channel.stats is not earlier else None  # this call's: None on a decode step
        if stats is not None and mm is not None:  # ExitStats knows the decoder only; the vision side's cost rides along
            stats.vision_flops, stats.tokens_unreduced = mm.vision_flops, mm.tokens_unreduced
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = LlavaCausalLMOutput(
            loss=loss,
            logits=logits,
            **cache_argument(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            exit_stats=stats,
        )
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return output.to_tuple()  # the stock tuple, the exit statistics last
        return output

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        images: torch.Tensor | list[torch.Tensor] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        exit_config: ExitConfig | None = None,
        instructions: list[str] | None = None,
        **kwargs,
    ):
        """LLaVA's generate: prompts with `IMAGE_TOKEN_INDEX` placeholders in, only the new tokens out.

        The batch is re-padded on the left, whatever padding it came with, so batched decoding is right. With
        `return_dict_in_generate=True` the output also carries the prefill's `exit_stats`, with the images'
        `vision_flops` per returned sequence.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("pass input_ids (with IMAGE_TOKEN_INDEX placeholders), not inputs_embeds")
        inputs = kwargs.pop("input_ids", inputs)
        if inputs is None:
            raise ValueError("generate needs the prompt input_ids")
        cache = generation_cache(self, kwargs)
        if kwargs.pop("use_cache", None) is False:
            # As LLaVA's own class: transformers' generate starts from these embeddings only with its cache.
            logger.info("generate from a LLaVA prompt's embeddings decodes with the cache (use_cache=False changes nothing)")
        mm = self.prepare_inputs_labels_for_multimodal(
            inputs, kwargs.pop("attention_mask", None), None, images, image_sizes, padding_side="left",
            vision_stage=self.vision_stage(exit_config), instructions=instructions,
        )
        channel = ExitChannel()
        output = super().generate(
            inputs_embeds=mm.inputs_embeds,
            attention_mask=mm.attention_mask,
            visual_mask=mm.visual_mask,
            exit_config=exit_config,
            exit_channel=channel,
            **cache,
            **kwargs,
        )
        output = with_exit_stats(output, channel.stats, len(inputs))
        if not isinstance(output, torch.Tensor):  # returned sequences come grouped by prompt
            per_prompt = len(output.sequences) // len(inputs)
            output.exit_stats.vision_flops = mm.vision_flops.repeat_interleave(per_prompt)
            if mm.tokens_unreduced is not None:
                output.exit_stats.tokens_unreduced = mm.tokens_unreduced.repeat_interleave(per_prompt)
        return output


def _needs_multimodal_inputs(input_ids: torch.LongTensor | None, images) -> bool:
    if images is not None:
        return True
    # Placeholders without images must fail clearly in preparation, not as an index error in the embedding.
    return input_ids is not None and input_ids.shape[1] > 1 and bool((input_ids == IMAGE_TOKEN_INDEX).any())


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
