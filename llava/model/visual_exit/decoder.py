"""The decoder loop with visual-token exit, for any model with the Llama layer interface."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from llava.compat import cache_argument, take_cache
from llava.model.visual_exit.cache import StaticExitCache, ValidKeys, VisualExitCache
from llava.model.visual_exit.config import ExitConfig
from llava.model.visual_exit.flops import DecoderGeometry, prefill_flops
from llava.model.visual_exit.gate import build_visual_gates, init_if_gate
from llava.model.visual_exit.masks import attention_mask_for, static_decode_mask
from llava.model.visual_exit.policy import ExitPolicy, ExitRecord
from llava.model.visual_exit.stages import LayerStep
from llava.model.visual_exit.tokens import PendingDrop, TokenLayout


@dataclass
class ExitStats:
    """Per sample: decoder layers that processed its visual tokens (L if they never left, 0 without any), its
    token and visual-token counts, the gates it evaluated, the visual tokens pruned after the first `prune_layer`
    layers (L: no pruning), and `layer_tokens` (B, L): the tokens that entered each layer. Its theoretical LM
    FLOPs (`prefill_flops`) are the per-layer costs of those tokens plus the gates; `flops_none` those of mode
    `none` on the same input."""

    exit_layer: torch.Tensor
    num_tokens: torch.Tensor
    num_visual_tokens: torch.Tensor
    gate_evaluations: torch.Tensor
    geometry: DecoderGeometry
    pruned_visual_tokens: torch.Tensor
    prune_layer: int
    layer_tokens: torch.Tensor
    # Set by a model that encodes the images itself (our LLaVA): the vision side's theoretical FLOPs per sample,
    # apart from the LM's (`prefill_flops`); VisionZip changes both.
    vision_flops: torch.Tensor | None = None
    # Set when a reduction before the LLM (VisionZip) shortened the input: the tokens the prompt has without it,
    # which `flops_none` then counts (mode none is the model on the whole image).
    tokens_unreduced: torch.Tensor | None = None
    # (B, L): the visual tokens that skipped each layer's update but stayed as keys (ShortV); None when none did.
    layer_frozen: torch.Tensor | None = None

    def select_rows(self, rows: torch.Tensor) -> ExitStats:
        """These statistics for the given batch rows (e.g. one per returned sequence after beam search)."""
        pick = lambda t: t[rows.to(t.device)]  # noqa: E731
        return ExitStats(
            pick(self.exit_layer), pick(self.num_tokens), pick(self.num_visual_tokens), pick(self.gate_evaluations),
            self.geometry, pick(self.pruned_visual_tokens), self.prune_layer, pick(self.layer_tokens),
            layer_frozen=None if self.layer_frozen is None else pick(self.layer_frozen),
        )

    @property
    def prefill_flops(self) -> torch.Tensor:
        """Computed on access: nothing of it runs on the prefill's hot path."""
        return prefill_flops(self.geometry, self.layer_tokens, self.gate_evaluations, self.layer_frozen)

    @property
    def flops_none(self) -> torch.Tensor:
        """Mode `none` on the same input: every layer at the full length, no gates."""
        tokens = self.num_tokens if self.tokens_unreduced is None else self.tokens_unreduced
        full = tokens[:, None].expand(-1, self.geometry.layers)
        return prefill_flops(self.geometry, full, torch.zeros_like(self.gate_evaluations))


@dataclass
class VisualExitModelOutput(BaseModelOutputWithPast):
    exit_stats: ExitStats | None = None


@dataclass
class ExitChannel:
    """The one way exit statistics leave the decoder, and the way a wrapping model's exit inputs reach it past the
    stock forwards in between (transformers' VLM classes keep no extra argument, ours hands them on alike).

    In, set by the caller for each forward: `visual_mask` (B, T), `exit_config`, the 2-D `attention_mask` (for
    models whose stock forward hands the decoder ready-made per-layer masks instead: Gemma 3), bidirectional
    `blocks` (B, T) as in `ValidKeys`, and for a gate-training step `gate_training(decoder, inputs_embeds,
    attention_mask, position_ids, visual_mask)`, which replaces the prefill. Kept over a generate: an `ExitRecord`
    (generate without a cache: the prompt's decisions, kept and replayed). Out: `stats` of the last prefill that
    decided (a replay or a decode step leaves them: generate's are its prompt's), or the gate-training step's
    `gate_output`."""

    visual_mask: torch.Tensor | None = None
    exit_config: ExitConfig | None = None
    record: ExitRecord | None = None
    attention_mask: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    gate_training: Callable | None = None
    stats: ExitStats | None = None
    gate_output: object = None


class VisualExitDecoderMixin:
    """Mix in before a `LlamaModel`-like class (`embed_tokens`, `layers`, `rotary_emb`, `norm`): replaces its
    forward with one whose prefill can drop each sample's visual tokens after any layer.

    Extra forward inputs: `visual_mask` (B, T) marks visual positions; `exit_config` overrides the config's exit
    settings for this call. Decode steps (non-empty cache) take no decisions: each layer attends to what it cached.
    """

    renumbers_positions = True  # 1-D positions, which a method may number again after a drop (M-RoPE: False)
    # Masking a token out of every later layer's keys is dropping it (what a drop decided on the device does until
    # the host learns its size); not where a layer has no keys to hide (linear attention).
    masks_as_drops = True

    def __init__(self, config):
        super().__init__(config)
        self.visual_gates_router = build_visual_gates(config)

    def _init_weights(self, module):
        """Gates a checkpoint lacks are initialised as the reference initialises them, not as the stock linears."""
        if not init_if_gate(module):
            super()._init_weights(module)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: VisualExitCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        visual_mask: torch.Tensor | None = None,
        exit_config: ExitConfig | None = None,
        **kwargs,
    ) -> VisualExitModelOutput:
        cache = take_cache(kwargs, cache)  # transformers < 5.24 passes it as past_key_values
        additions = kwargs.pop("visual_additions", None)  # a family's (DeepStack), prefill only
        channel = kwargs.pop("exit_channel", None)
        wrapped = channel is not None  # a wrapping model's call: its inputs come, and the statistics go, by channel
        if wrapped:
            visual_mask, exit_config = channel.visual_mask, channel.exit_config
        else:
            channel = ExitChannel(visual_mask, exit_config)
        if isinstance(attention_mask, dict):  # the stock forward's per-layer-type masks: the exit builds its own
            if not wrapped:
                raise ValueError("the exit builds each layer's mask from the 2-D padding mask: call the VLM, not its decoder")
            attention_mask = channel.attention_mask
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = VisualExitCache(config=self.config)
        if cache is not None and not isinstance(cache, VisualExitCache):
            raise TypeError(f"pass a VisualExitCache (layers may cache different tokens), not {type(cache).__name__}")
        if cache is not None and cache.is_prefilled:
            decode = self._decode_static if isinstance(cache, StaticExitCache) else self._decode
            hidden = decode(inputs_embeds, attention_mask, position_ids, cache, kwargs)
            return VisualExitModelOutput(last_hidden_state=hidden, **cache_argument(cache))
        if cache is not None:
            cache.hold_recurrent_layers(self.config)
        if channel.gate_training is not None:
            channel.gate_output = channel.gate_training(
                self, inputs_embeds, attention_mask, position_ids, visual_mask, additions=additions,
                blocks=channel.blocks, reduction=exit_config,
            )
            return VisualExitModelOutput(last_hidden_state=inputs_embeds)  # the wrapper returns gate_output instead
        packing = self.packing_positions(position_ids) if attention_mask is None and cache is None else None
        segments = None if packing is None else packed_segments(packing, kwargs)
        if segments is not None:
            hidden = self._packed_prefill(inputs_embeds, position_ids, segments, channel, kwargs, additions)
        else:
            hidden = self._prefill(inputs_embeds, attention_mask, position_ids, cache, channel, kwargs, additions)
        # A wrapper reads them from the channel: its stock forward rebuilds its own output from this one's fields.
        stats = None if wrapped else channel.stats
        return VisualExitModelOutput(last_hidden_state=hidden, exit_stats=stats, **cache_argument(cache))

    def _prefill(self, hidden, attention_mask, position_ids, cache, channel: ExitChannel, kwargs, additions=None):
        """The prefill with the channel's exit; its statistics go to the channel (unless it replays a record)."""
        exit_config = channel.exit_config or ExitConfig.from_model_config(self.config)
        hidden, layout = self.start_prefill(
            hidden, attention_mask, position_ids, channel.visual_mask, with_gate_features=exit_config.uses_gates,
            additions=additions, blocks=channel.blocks,
        )
        record = channel.record
        if isinstance(cache, StaticExitCache):
            cache.begin_prefill(layout.input_length)
        hidden, layout, policy = self.start_exit(hidden, layout, exit_config, cache, record)
        hidden, layout = self.run_layers(hidden, layout, range(self.config.num_hidden_layers), cache, policy, **kwargs)
        if cache is not None:
            cache.seen_tokens = layout.input_length
        if isinstance(cache, StaticExitCache):  # new tokens are numbered after each row's real ones, as the mask counts
            cache.seal(layout.input_valid.sum(dim=1))
        state = policy.state
        stats = ExitStats(
            state.exit_layer,
            layout.input_valid.sum(dim=1),
            state.num_visual,
            policy.gate_evaluations,
            DecoderGeometry.from_config(self.config),
            state.pruned_visual,
            policy.prune_layer,
            torch.stack(policy.layer_tokens, dim=1),
            layer_frozen=policy.layer_frozen,
        )
        if record is None or not record.recorded:
            channel.stats = stats
        if record is not None:
            record.recorded = True
        return self.finish_prefill(hidden, layout)

    def _packed_prefill(self, hidden, position_ids, segments, channel: ExitChannel, kwargs, additions=None):
        """Several sequences packed in a row (positions restarting, no mask and no cache, as transformers reads
        them): each becomes a row of a left-padded batch, so its exit is its own and it sees only itself; the states
        go back to their packed slots. `exit_stats` then has one row per packed sequence, in order."""
        batch, length = segments.shape
        ids = segments + torch.arange(batch, device=segments.device)[:, None] * length  # unique over the batch
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        row, first = starts.nonzero(as_tuple=True)  # (S,): one per sequence, in order
        sizes = torch.bincount(ids.flatten(), minlength=batch * length)[ids[row, first]]
        width = int(sizes.max())
        offsets = torch.arange(width, device=hidden.device) - (width - sizes)[:, None]  # left padding
        valid = offsets >= 0
        slots = (first[:, None] + offsets).clamp(min=0)  # (S, width): each one's packed slot
        rows = row[:, None].expand_as(slots)
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length)
        if additions is not None:  # the sequences keep their order, so the added rows keep theirs
            additions = replace(additions, positions=additions.positions[rows, slots] & valid)
        visual_mask, blocks = channel.visual_mask, channel.blocks
        unpacked = replace(
            channel,
            visual_mask=None if visual_mask is None else visual_mask[rows, slots] & valid,
            blocks=None if blocks is None else blocks[rows, slots].masked_fill(~valid, -1),
            record=None,
        )
        out = self._prefill(
            hidden[rows, slots] * valid[..., None], valid.long(), position_ids[..., rows, slots], None, unpacked,
            kwargs, additions,
        )
        channel.stats = unpacked.stats
        packed = hidden.new_zeros(batch, length, out.shape[-1])
        packed[rows[valid], slots[valid]] = out[valid]
        return packed

    def start_prefill(self, hidden, attention_mask, position_ids, visual_mask, with_gate_features: bool, prompt_end=None,
                      additions=None, blocks=None):
        """The input's token layout (validity, positions, RoPE, visual slots) before layer 0; `prompt_end`,
        `additions` and `blocks` as in `TokenLayout.start`."""
        batch, length = hidden.shape[:2]
        if attention_mask is not None and attention_mask.shape != (batch, length):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}: the exit builds each layer's mask from a 2-D "
                f"padding mask (B, T) = {(batch, length)}; pass that (custom 4-D masks work with the stock class)"
            )
        valid = attention_mask.bool() if attention_mask is not None else hidden.new_ones(batch, length, dtype=torch.bool)
        positions, rope_position_ids = self.split_position_ids(position_ids, hidden, 0, attention_mask)
        return hidden, TokenLayout.start(
            valid, positions, self.rotary(hidden, rope_position_ids), visual_mask, with_gate_features, prompt_end,
            additions, blocks, self.layer_rotations,
        )

    def start_exit(self, hidden, layout, exit_config: ExitConfig, cache=None, record=None):
        """(hidden, layout, policy): the exit's policy over this prefill, and the input after the reductions its
        stages make before layer 0 (positions numbered again from here on when a stage renumbers)."""
        policy = ExitPolicy(exit_config, self.config.num_hidden_layers, layout, self.visual_gates_router, record)
        if policy.renumbers:
            if not self.renumbers_positions:
                raise ValueError(
                    f"{exit_config.label}: this model's multi-row (M-RoPE) positions have no renumbering as PyramidDrop's "
                    "and SparseVLM's LLaVA code renumbers 1-D ones; add :keep to the stage (original positions)"
                )
            layout = replace(layout, renumber=partial(self.rotary, hidden))
            if cache is not None:
                cache.renumbered = True
        drop, hidden = policy.drop_before_first_layer(layout, hidden)
        if drop is not None:
            hidden, layout = layout.drop(hidden, drop)
        return hidden, layout, policy

    def run_layers(self, hidden, layout, layers: range, cache=None, policy: ExitPolicy | None = None, **kwargs):
        """Run `layers` in order; with a policy, drop what it says after each. Returns (hidden, layout).

        A drop the policy decides on the device (`ExitPolicy.decides_on_device`: the gates, a fixed exit) costs the
        host no wait: the layers after run on it masked until its size reaches the host (`PendingDrop`), then it is
        compacted; on a CPU that is at once. Other drops are compacted at once, reading their size."""
        valid_keys, masks, pending = None, {}, None
        for index in layers:
            if pending is not None:
                hidden, layout, pending = self._settle(hidden, layout, pending, policy)
            if layout.valid_keys is not valid_keys:  # masks (and a token count) per ValidKeys, until the next drop
                valid_keys, masks = layout.valid_keys, {}
                entering = valid_keys.valid.sum(dim=1)
            kind = self.layer_mask_kind(index)
            if kind not in masks:
                masks[kind] = self._mask(valid_keys, valid_keys.valid.shape[1], hidden.dtype, kind)
            mask = masks[kind]
            if policy is not None:
                policy.layer_tokens.append(entering)
            layer_input = hidden
            hidden = self.layers[index](
                hidden,
                attention_mask=mask,
                position_embeddings=layout.rotation(index),
                position_ids=layout.position_ids,
                use_cache=cache is not None,
                **cache_argument(cache),
                **kwargs,
            )
            if cache is not None:
                cache.valid_keys.append(valid_keys)
            drop = order = None
            if policy is not None:
                # FastV reads them, not recomputes (a linear-attention layer caches none)
                cached_keys = cache.prefill_keys(index) if cache is not None else None
                step = LayerStep(index, self.layers[index], layer_input, hidden, cached_keys, self)
                drop, hidden, order = policy.drop_after(step, layout)  # hidden: with the states stages rewrote
            if drop is not None and order is None:
                pending = PendingDrop(drop, layout, policy.state.active, pending)
                wait = not (policy.decides_on_device and self.masks_as_drops)
                hidden, layout, pending = self._settle(hidden, layout, pending, policy, wait)
            elif drop is not None:
                hidden, layout = layout.drop(hidden, drop, order)  # compacts any masked slots too
                pending = None
            if layout.additions is not None:  # onto what stays, after the stages decided on the layer's own output
                hidden = layout.additions.add(index, hidden, layout)
        if pending is not None and not pending.masked:  # decided after the last layer: restore reads the mask
            layout = layout.masked(pending.drop)
        return hidden, layout

    @staticmethod
    def _settle(hidden, layout, pending: PendingDrop, policy: ExitPolicy, wait: bool = False):
        """(hidden, layout, still pending): compacted by the drop once the host has its size (or at once with
        `wait`), masked by it until then."""
        if wait or pending.ready():
            dropped, sizes, active = pending.read()
            if active is not None:
                policy.state.any_active = active
            if dropped:
                return *layout.drop(hidden, pending.drop, sizes=sizes), None
            return hidden, pending.before or layout, None  # nothing left: the layout as it was before any mask
        if not pending.masked:
            pending.before = pending.before or layout
            layout, pending.masked = layout.masked(pending.drop), True
        return hidden, layout, pending

    def finish_prefill(self, hidden, layout) -> torch.Tensor:
        """Final norm, then back to the input layout (dropped positions are zeros)."""
        return layout.restore(self.norm(hidden))

    def _decode(self, hidden, attention_mask, position_ids, cache, kwargs):
        """New tokens attend, in each layer, to that layer's own cached keys; they are always real tokens."""
        new_tokens = hidden.shape[1]
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, -new_tokens:]
        position_ids, rope_position_ids = self.split_position_ids(position_ids, hidden, cache.get_seq_length(), attention_mask)
        rotations = self.rotary(hidden, rope_position_ids)
        positions = position_ids.expand(hidden.shape[0], new_tokens)
        if cache.renumbered:  # each layer numbers its new tokens after its own cached ones (the renumbering methods')
            steps = torch.arange(new_tokens, device=hidden.device)
            per_layer = cache.extend_valid_keys(lambda keys: keys.positions[:, -1:] + 1 + steps)
        else:
            per_layer = cache.extend_valid_keys(positions)
        masks: dict[tuple[int, object], torch.Tensor | None] = {}
        renumbered: dict[int, dict] = {}
        kinds = self.layer_rotations
        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            valid_keys, kind = per_layer[index], self.layer_mask_kind(index)
            if (id(valid_keys), kind) not in masks:
                masks[id(valid_keys), kind] = self._mask(valid_keys, new_tokens, hidden.dtype, kind)
            if cache.renumbered:
                positions = valid_keys.positions[:, -new_tokens:]
                if id(valid_keys) not in renumbered:
                    renumbered[id(valid_keys)] = self.rotary(hidden, positions)
                rotations = renumbered[id(valid_keys)]
            hidden = decoder_layer(
                hidden,
                attention_mask=masks[id(valid_keys), kind],
                position_embeddings=rotations[kinds[index] if kinds else None],
                position_ids=positions if cache.renumbered else position_ids,
                use_cache=True,
                **cache_argument(cache),
                **kwargs,
            )
        return self.norm(hidden)

    def _decode_static(self, hidden, attention_mask, position_ids, cache: StaticExitCache, kwargs):
        """`_decode` on a static cache, with the same shapes at every step (what a compiled step needs): each layer
        attends to its whole capacity, masked by `static_decode_mask` at the cache's step; the new tokens' positions
        are the ones `seal` laid out. The 2-D padding mask is not read (the new tokens are real, their positions
        known), so generate need not hand it over at every step."""
        new_tokens = hidden.shape[1]
        if new_tokens > 1 and cache.renumbered:
            raise NotImplementedError("a static cache decodes one token at a time after a renumbering stage")
        implementation, kinds = self.config._attn_implementation, self.layer_rotations
        steps = cache.step + torch.arange(new_tokens, device=hidden.device)
        masks, rotations = {}, {}
        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            shared, kind = cache.shared_with[index], self.layer_mask_kind(index)
            valid_keys = cache.valid_keys[shared]
            if (shared, kind) not in masks:
                masks[shared, kind] = static_decode_mask(valid_keys, cache.new_tokens, steps, implementation, hidden.dtype, kind)
            if shared not in rotations:  # one numbering per ValidKeys (they differ only after a renumbering)
                slots = valid_keys.valid.shape[1] - cache.new_tokens + steps
                positions = valid_keys.positions[:, slots]
                given = position_ids is not None and not cache.renumbered  # as `_decode`: renumbered, its own
                rope_input = self.split_position_ids(position_ids, hidden, 0)[1] if given else positions
                rotations[shared] = positions, self.rotary(hidden, rope_input)
            positions, rotation = rotations[shared]
            hidden = decoder_layer(
                hidden,
                attention_mask=masks[shared, kind],
                position_embeddings=rotation[kinds[index] if kinds else None],
                position_ids=positions,
                use_cache=True,
                **cache_argument(cache),
                **kwargs,
            )
        cache.step.add_(new_tokens)
        return self.norm(hidden)

    @property
    def layer_rotations(self) -> tuple:
        """Per layer, the key of its rotation in `rotary`'s dict; () when every layer rotates alike."""
        return ()

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """{rotation kind: (cos, sin)} for `position_ids` (what `rotary_emb` takes): one kind, None, unless the
        model rotates its layer types differently (`layer_rotations`)."""
        return {None: self.rotary_emb(hidden, position_ids)}

    def packing_positions(self, position_ids):
        """The (B, T) positions whose restarts mark packed sequences, as the stock decoder reads them (with no mask
        and no cache), or None when it reads none."""
        return position_ids

    def split_position_ids(self, position_ids, hidden: torch.Tensor, past_length: int, attention_mask=None):
        """(positions, rope input): `positions` (B or 1, T), one per token, are what masks, sliding windows and the
        layers read; the rope input is what `rotary_emb` takes. Both are `position_ids`, or the tokens' indices
        after `past_length` cached ones when None (as the stock decoders number them). Decoders with several
        position rows (M-RoPE) override this; `attention_mask` (B, past + T) is there for them."""
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + hidden.shape[1], device=hidden.device).unsqueeze(0)
        return position_ids, position_ids

    def layer_mask_kind(self, index: int):
        """What decides layer `index`'s mask besides its keys (layers of one kind share it): its window."""
        return self.attention_window(index)

    def _mask(self, valid_keys: ValidKeys, query_length: int, dtype: torch.dtype, kind):
        """The mask of a layer of `kind` (`layer_mask_kind`) over `valid_keys`, for the last `query_length` of them."""
        return attention_mask_for(valid_keys, query_length, self.config._attn_implementation, dtype, kind)

    def attention_window(self, index: int) -> int | None:
        """Layer `index`'s sliding window, in positions: the config's `sliding_window` for every layer (Mistral) or
        for those `layer_types` names sliding (Qwen2, Gemma-style alternation); None for full attention."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if window is None or (layer_types is not None and layer_types[index] != "sliding_attention"):
            return None
        return window


FLASH_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_segments(positions: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """(B, T) sequence index of each slot when several sequences are packed in a row, else None: from flash
    attention's `cu_seq_lens_q` where given (taken out of `kwargs` with its companions), else where `positions`
    restart, as transformers finds them (`find_packed_sequence_indices`)."""
    boundaries = kwargs.pop("cu_seq_lens_q", None)
    for name in FLASH_PACKING:
        kwargs.pop(name, None)
    positions = positions if positions.dim() == 2 else positions[None]
    if boundaries is not None:
        slots = torch.arange(positions.shape[-1], device=positions.device)
        return torch.bucketize(slots, boundaries[1:-1].to(slots.device), right=True)[None]
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    segments = (step != 1).cumsum(dim=-1)
    return segments if bool((segments[:, -1] > 0).any()) else None


def exit_decoder_of(model) -> VisualExitDecoderMixin:
    """The module running the exit loop inside `model`: our LLaVA's decoder or a family's language model."""
    if isinstance(model, VisualExitDecoderMixin):
        return model
    for module in model.modules():
        if isinstance(module, VisualExitDecoderMixin):
            return module
    raise TypeError(f"{type(model).__name__} has no visual-exit decoder (see llava.model.visual_exit.enable_visual_exit)")
