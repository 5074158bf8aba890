"""Visual-token exit inside transformers' own VLM classes (llava-hf, LLaVA-NeXT, OneVision, Qwen2-VL, ...).

`enable_visual_exit(model)` gives a loaded model the exit decoder loop: its language model's class becomes a
subclass with `VisualExitDecoderMixin` in front (its own decoder layers, rotary and norm, unmodified), gates
`visual_gates_router.{i}` sit beside its layers, and the model's class becomes a subclass whose `forward` and
`generate` take `exit_config` and report `exit_stats`. The stock forward in between still embeds, encodes the
images and builds the positions (M-RoPE included); the visual tokens are found by the model's own token ids.

What differs per family is one `FamilyAdapter`, registered by the family's own small file (llava/model/families).
The exit classes keep the stock class names, so a saved checkpoint names the stock architecture (stock
transformers loads it, ignoring the gates) and `visual_exit_class(Stock).from_pretrained` loads it with its gates.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from safetensors import safe_open

from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.decoder import ExitChannel, VisualExitDecoderMixin
from llava.model.visual_exit.policy import ExitRecord
from llava.model.visual_exit.gate import build_visual_gates, init_gate_weights
from llava.model.visual_exit.generation import ExitCacheGeneration, generation_cache, with_exit_stats
from llava.model.visual_exit.training import ExitLabelRule, gate_training_pass


@dataclass(frozen=True)
class FamilyAdapter:
    """What the exit needs to know of one VLM class: where its language model is, which config attributes hold
    the ids of its visual tokens (every placeholder the model fills with vision features), the decoder mixin
    (another one only where positions differ, e.g. M-RoPE), and `attention_blocks(forward kwargs)`: the (B, T)
    ids of the blocks whose tokens the stock model lets attend to each other both ways (-1 elsewhere), or None."""

    model_class: type
    visual_token_attributes: tuple[str, ...] = ("image_token_id",)
    decoder_mixin: type = VisualExitDecoderMixin
    decoder_path: str = "model.language_model"
    attention_blocks: Callable[[dict], torch.Tensor | None] | None = None

    def visual_token_ids(self, config) -> list[int]:
        ids = [getattr(config, name, None) for name in self.visual_token_attributes]
        return [token for token in ids if token is not None]

    def decoder(self, model) -> torch.nn.Module:
        module = model
        for name in self.decoder_path.split("."):
            module = getattr(module, name)
        return module


FAMILIES: dict[type, FamilyAdapter] = {}
_EXIT_CLASSES: dict[type, type] = {}


def register_family(adapter: FamilyAdapter) -> FamilyAdapter:
    FAMILIES[adapter.model_class] = adapter
    return adapter


def family_of(model_class: type) -> FamilyAdapter:
    for cls in model_class.__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    known = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
    raise TypeError(f"visual exit does not know {model_class.__name__}; it runs on: {known}")


def _subclass(base: type, mixin: type, **attributes) -> type:
    """`mixin` in front of `base`, under `base`'s name (what save_pretrained writes as the architecture)."""
    key = (base, mixin)
    if key not in _EXIT_CLASSES:
        _EXIT_CLASSES[key] = type(base.__name__, (mixin, base), {"__module__": base.__module__, **attributes})
    return _EXIT_CLASSES[key]


def visual_exit_class(model_class: type) -> type:
    """The exit variant of a registered VLM class; `.from_pretrained` loads a checkpoint with its gates."""
    if issubclass(model_class, VisualExitVLMMixin):
        return model_class
    family = family_of(model_class)

    def forward(self, *args, **kwargs):
        return VisualExitVLMMixin.forward(self, *args, **kwargs)

    # generate() checks its keyword arguments against forward's signature: the stock one plus the exit's.
    stock = inspect.signature(model_class.forward)
    exit_parameters = inspect.signature(VisualExitVLMMixin.forward).parameters
    extra = [exit_parameters[name] for name in ("exit_config", "gate_training_layer", "exit_label_rule")]
    extra += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("visual_mask", "exit_channel")]
    parameters = list(stock.parameters.values())
    forward.__signature__ = stock.replace(parameters=parameters[:-1] + extra + parameters[-1:])
    forward.__doc__ = VisualExitVLMMixin.forward.__doc__
    # Some families' save-time renaming of the language model's keys is not undone for the gates at load time
    # (Qwen2-VL writes `model.visual_gates_router.*`, then reads `model.visual*` as its vision tower's): the exit
    # class reads them by their own suffix instead (from_pretrained), so the load report leaves them out.
    ignore = [r"visual_gates_router\."]
    return _subclass(
        model_class, VisualExitVLMMixin, visual_exit_family=family, forward=forward,
        _keys_to_ignore_on_load_unexpected=(model_class._keys_to_ignore_on_load_unexpected or []) + ignore,
        _keys_to_ignore_on_load_missing=(model_class._keys_to_ignore_on_load_missing or []) + ignore,
    )


def enable_visual_exit(model, gate_hidden_size: int | None = None):
    """The same `model` object, with the exit decoder loop, and gates of width `gate_hidden_size` (freshly
    initialised) or of the width its config names (loaded from the folder it came from, if they are there)."""
    model.__class__ = visual_exit_class(type(model))
    decoder = model.visual_exit_family.decoder(model)
    if gate_hidden_size is not None:
        decoder.config.visual_gate_hidden_size = gate_hidden_size
        decoder.visual_gates_router = None
    _install_decoder(model)
    if gate_hidden_size is None and decoder.visual_gates_router is not None:
        _load_saved_gates(model, decoder)
    return model


def _install_decoder(model) -> None:
    family = model.visual_exit_family
    decoder = family.decoder(model)
    if not isinstance(decoder, VisualExitDecoderMixin):
        decoder.__class__ = _subclass(type(decoder), family.decoder_mixin)
    if getattr(decoder, "visual_gates_router", None) is None:
        gates = build_visual_gates(decoder.config)
        if gates is not None:
            init_gate_weights(gates)
            reference = decoder.embed_tokens.weight
            gates = gates.to(device=reference.device, dtype=reference.dtype)
        decoder.visual_gates_router = gates


def _load_saved_gates(model, decoder) -> None:
    """Gate weights from the safetensors of the folder `model` was loaded from, which the stock class skipped.
    Checkpoints may store a family's keys under older names, so the gates are found by their own suffix."""
    folder = getattr(model, "name_or_path", "")
    if not os.path.isdir(folder):
        return
    marker = "visual_gates_router."
    weights = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), framework="pt") as handle:
                weights.update({k.split(marker, 1)[1]: handle.get_tensor(k) for k in handle.keys() if marker in k})
    if weights:
        decoder.visual_gates_router.load_state_dict(weights)


class VisualExitVLMMixin(ExitCacheGeneration):
    """In front of a transformers VLM class (see `visual_exit_class`): forward and generate with the exit."""

    visual_exit_family: FamilyAdapter

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _install_decoder(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on output_loading_info
        decoder = model.visual_exit_family.decoder(model)
        if decoder.visual_gates_router is not None:
            _load_saved_gates(model, decoder)
        return loaded

    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) the positions the model fills with vision features: by their ids or, from embeddings alone, where
        they equal a visual token's embedding (as the stock forward finds its placeholders)."""
        tokens = self.visual_exit_family.visual_token_ids(self.config)
        if input_ids is not None:  # compared with Python ints: no id tensor is built and copied at every decode step
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token in tokens:
                mask |= input_ids == token
            return mask
        table = self.get_input_embeddings()
        mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for token in tokens:
            mask |= (inputs_embeds == table(torch.tensor(token, device=inputs_embeds.device))).all(dim=-1)
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        *args,
        exit_config: ExitConfig | None = None,
        gate_training_layer: int | None = None,
        exit_label_rule: ExitLabelRule | None = None,
        **kwargs,
    ):
        """The stock forward; its output also carries `exit_stats` (None on decode steps). With
        `gate_training_layer` k it is a gate-training step instead (visual_exit.training), which returns a
        GateTrainingOutput with the loss of gate k. The visual tokens are found by their ids, or in `inputs_embeds`
        by their embeddings, or given as `visual_mask` (B, T)."""
        vision_stage = None if exit_config is None else exit_config.vision_stage
        if vision_stage is not None and not vision_stage.before_processor:  # a smaller image was already given
            raise ValueError(f"{vision_stage.usage} needs our LLaVA class: transformers' VLM classes encode "
                             "images in their own forward")
        refuse_custom_masks(kwargs.get("attention_mask"))
        visual_mask = kwargs.pop("visual_mask", None)
        if visual_mask is None and (input_ids is not None or kwargs.get("inputs_embeds") is not None):
            visual_mask = self.visual_mask(input_ids, kwargs.get("inputs_embeds"))
        blocks_of = self.visual_exit_family.attention_blocks
        channel = kwargs.pop("exit_channel", None) or ExitChannel()  # generate's: kept over its steps
        earlier = channel.stats
        channel.visual_mask, channel.exit_config = visual_mask, exit_config
        channel.attention_mask = kwargs.get("attention_mask")
        channel.blocks = None if blocks_of is None else blocks_of(kwargs)
        channel.gate_training = None
        if gate_training_layer is not None:
            labels = kwargs.pop("labels")
            channel.gate_training = partial(
                _gate_training, lm_head=self.lm_head, labels=labels, layer=gate_training_layer,
                rule=exit_label_rule or ExitLabelRule(),
            )
            kwargs["logits_to_keep"] = 1
        return_dict = kwargs.pop("return_dict", None)
        output = super().forward(input_ids, *args, exit_channel=channel, return_dict=True, **kwargs)
        if channel.gate_output is not None:
            return channel.gate_output
        # An attribute (the stock output class has no field for it), this call's only: None on a decode step.
        output.exit_stats = channel.stats if channel.stats is not earlier else None
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return output.to_tuple()  # the stock tuple
        return output

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, exit_config: ExitConfig | None = None, **kwargs):
        """The stock generate with a VisualExitCache; with `return_dict_in_generate=True` the output also carries
        the prefill's `exit_stats`, one row per returned sequence."""
        inputs = kwargs.pop("input_ids", inputs)
        cache = generation_cache(self, kwargs)
        batch = len(inputs) if inputs is not None else len(kwargs["inputs_embeds"])
        channel = ExitChannel()
        if kwargs.get("use_cache") is False:  # each step recomputes prompt + answer, with the prompt's decisions
            channel.record = ExitRecord()
            output = super().generate(inputs, exit_config=exit_config, exit_channel=channel, **kwargs)
            return with_exit_stats(output, channel.stats, batch)
        output = super().generate(inputs, exit_config=exit_config, exit_channel=channel, **cache, **kwargs)
        return with_exit_stats(output, channel.stats, batch)


def refuse_custom_masks(attention_mask) -> None:
    """A 4-D (custom) attention mask, refused before the stock code reads it."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: the exit builds each layer's mask from a 2-D "
            "padding mask (B, T); pass that (custom 4-D masks work with the stock class)"
        )


def _gate_training(decoder, inputs_embeds, attention_mask, position_ids, visual_mask, additions=None, blocks=None,
                   reduction=None, *, lm_head, labels, layer, rule):
    return gate_training_pass(
        decoder, lm_head, inputs_embeds, attention_mask, position_ids, visual_mask, labels, layer, rule, additions,
        blocks, reduction,
    )
