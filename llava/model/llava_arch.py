"""What makes a decoder LLM multimodal, the LLaVA way: a vision tower, a projector, and input preparation
that splices image features where the prompt holds `IMAGE_TOKEN_INDEX`."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import select_best_resolution
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_encoder.clip_text import InstructionEncoder
from llava.model.multimodal_encoder.visionzip import feature_layers, merge_flops, tower_flops, visionzip_features
from llava.model.multimodal_projector.builder import build_vision_projector
from llava.model.visual_exit import ExitConfig
from llava.model.visual_exit.stages.cdpruner import CDPruner, conditional_dpp, instruction_text, relevance, selection_flops
from llava.model.visual_exit.stages.visionzip import VisionZip


class LlavaMetaModel:
    """Mixin for the base decoder model: owns `vision_tower`, `mm_projector` and, for LLaVA-NeXT's
    `spatial_unpad` merge, the learned end-of-row embedding `image_newline` (LLaVA's state-dict names)."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None) or getattr(config, "mm_vision_config", None):
            self.vision_tower = build_vision_tower(config)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in getattr(config, "mm_patch_merge_type", "flat"):
                # LLaVA-NeXT's initialisation (std 1/sqrt(hidden)); a checkpoint's trained vector replaces it.
                self.image_newline = nn.Parameter(torch.randn(config.hidden_size) / config.hidden_size**0.5)

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)


@dataclass
class MultimodalInputs:
    """Padded decoder inputs with image features spliced in.

    `visual_mask[b, t]` is true where position t of sample b holds an image feature: any count, any place,
    several images per sample. Padding is where `attention_mask` is false. `vision_flops` (B,) float64: the
    theoretical FLOPs of the images each sample uses, through the tower, VisionZip's merge and the projector.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.LongTensor
    visual_mask: torch.Tensor
    labels: torch.LongTensor | None = None
    vision_flops: torch.Tensor | None = None
    tokens_unreduced: torch.Tensor | None = None  # (B,) with VisionZip: each sample's tokens without it


class LlavaMetaForCausalLM:
    """Mixin for the causal-LM wrapper: image encoding and multimodal input preparation."""

    def get_model(self) -> nn.Module:
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def vision_stage(self, exit_config: ExitConfig | None) -> VisionZip | CDPruner | None:
        """The exit's reduction that runs while images are encoded (VisionZip, CDPruner: its vision slot; the
        checkpoint's exit settings when the call gives none), or None."""
        stage = (exit_config or ExitConfig.from_model_config(self.config)).vision_stage
        return stage if isinstance(stage, (VisionZip, CDPruner)) else None

    def encode_images(self, images: torch.Tensor, visionzip: VisionZip | None = None) -> torch.Tensor:
        """(N, 3, H, W) pixels → (N, tokens, hidden) LLM-space features: the tower's selected features, or with a
        `visionzip` stage each view's D dominant and C contextual tokens (multimodal_encoder/visionzip.py)."""
        tower = self.get_vision_tower()
        if visionzip is None:
            return self.get_model().mm_projector(tower(images))
        features = visionzip_features(tower, images, visionzip.dominant, visionzip.contextual)
        return self.get_model().mm_projector(features)

    def instruction_encoder(self) -> InstructionEncoder:
        """CLIP's text side for CDPruner, loaded from the tower's folder at first use (never a saved module)."""
        encoder = self.__dict__.get("_instruction_encoder")
        if encoder is None or encoder.device != self.get_vision_tower().device:
            encoder = self.__dict__["_instruction_encoder"] = InstructionEncoder(self.get_vision_tower())
        return encoder

    def _cdpruner_keep(self, features: torch.Tensor, encoded: torch.Tensor, views: list[int], owners: list[int],
                       instructions: list[str], stage: CDPruner) -> tuple[torch.Tensor, list[int]]:
        """(V, N) bool, the tokens CDPruner keeps of each view, from the tower's (V, N, width) `features`, their
        projected `encoded` (V, N, hidden), each image's sample (`owners`) and each sample's instruction; and what
        it costs per image (the text tower charged to a sample's first image). As its batch-1 code, relevance is
        normalised over all views of all images of one sample."""
        encoder = self.instruction_encoder()
        # a sample's images come one after another: (sample, its images' view counts) in order
        groups = [(sample, [count for _, count in members])
                  for sample, members in itertools.groupby(zip(owners, views), key=lambda pair: pair[0])]
        text_embeds = encoder.text_embeds([instruction_text(instructions[sample]) for sample, _ in groups])
        image_embeds = torch.split(encoder.image_embeds(features), [sum(counts) for _, counts in groups])
        scores = torch.cat([relevance(image, text) for image, text in zip(image_embeds, text_embeds)])
        tokens, width, embed_dim = encoded.shape[1], encoded.shape[2], encoder.visual_projection.out_features
        flops = []
        for (_, counts), text in zip(groups, text_embeds):
            per_view = encoder.image_embed_flops(tokens) + selection_flops(tokens, stage.tokens, width, embed_dim, len(text))
            flops += [count * per_view + (encoder.text_flops(len(text)) if index == 0 else 0)
                      for index, count in enumerate(counts)]
        return conditional_dpp(encoded, scores, stage.tokens), flops

    def _image_features(self, images, image_sizes, stage: VisionZip | CDPruner | None = None, owners: list[int] | None = None,
                        instructions: list[str] | None = None) -> tuple[list, list[int], list[int]]:
        """One (tokens, hidden) tensor per image, its vision FLOPs, and the tokens a vision-slot `stage` took from
        it. An image given as several views (anyres: the whole image, then its tiles) is merged by
        `mm_patch_merge_type`: `flat` concatenates the views, `spatial*` lays the tiles out as one feature map
        (LLaVA-NeXT). VisionZip reduces each view to D + C tokens, which the flat merge concatenates; the spatial
        merge, which needs every tile's whole patch grid, refuses it. CDPruner keeps T tokens of each view, which
        either merge lays out as the full features, dropping the others after (`owners`: each image's sample,
        `instructions`: each sample's question)."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            merge, pixels, views = "flat", images, [1] * len(images)
        else:
            stacks = [image if image.ndim == 4 else image.unsqueeze(0) for image in images]
            merge = getattr(self.config, "mm_patch_merge_type", "flat")
            pixels, views = torch.cat(stacks), [len(stack) for stack in stacks]
        if merge != "flat" and not merge.startswith("spatial"):
            raise ValueError(f"unknown mm_patch_merge_type {merge!r} (expected flat, spatial or spatial_unpad)")
        if isinstance(stage, VisionZip) and merge != "flat":
            raise ValueError(
                f"VisionZip keeps D + C tokens per view, which mm_patch_merge_type {merge!r} cannot lay out as the "
                "tiles' feature map; use the flat merge (each view reduced on its own) or images of one view"
            )
        keep = None
        if isinstance(stage, CDPruner):
            if instructions is None:
                raise ValueError("CDPruner ranks the tokens by their relevance to the instruction: pass `instructions`, "
                                 "each prompt's question text")
            selected = self.get_vision_tower()(pixels)
            encoded = self.get_model().mm_projector(selected)
            keep, selection = self._cdpruner_keep(selected, encoded, views, owners, instructions, stage)
        else:
            encoded = self.encode_images(pixels, stage)
            selection = [0] * len(views)
        flops = [self._vision_flops(count, encoded.shape[1], stage) + extra for count, extra in zip(views, selection)]
        features = torch.split(encoded, views)
        masks = [None] * len(views) if keep is None else torch.split(keep, views)
        if merge == "flat":
            laid_out = [chunk.flatten(0, 1) for chunk in features]
            kept = [mask if mask is None else mask.flatten() for mask in masks]
        else:
            if image_sizes is None or len(image_sizes) != len(features):
                raise ValueError(f"{merge} images need image_sizes, each image's original (width, height), one per image")
            newline = self.get_model().image_newline if "unpad" in merge else None
            laid_out = [self._spatial_features(chunk, size, newline) for chunk, size in zip(features, image_sizes)]
            # the masks take the features' layout, crop included; the row ends are always kept (as CDPruner's code)
            mask_newline = None if newline is None else newline.new_ones(1)
            kept = [mask if mask is None else self._spatial_features(mask[..., None].to(encoded.dtype), size, mask_newline)[:, 0] > 0
                    for mask, size in zip(masks, image_sizes)]
        if keep is not None:
            return [image[mask] for image, mask in zip(laid_out, kept)], flops, [int((~mask).sum()) for mask in kept]
        tower = self.get_vision_tower()
        per_view = tower.num_patches + (tower.select_feature == "cls_patch")
        return laid_out, flops, [count * (per_view - encoded.shape[1]) for count in views]

    def _vision_flops(self, views: int, tokens: int, stage: VisionZip | CDPruner | None) -> int:
        """Theoretical FLOPs of an image of `views` views, each through the tower's layers up to its feature layer
        (the stock module also runs the later ones, which nothing reads), VisionZip's merge, and the projector's
        matmuls on the `tokens` each view gives it (CDPruner's selection and text tower are added by its caller)."""
        config = self.get_vision_tower().config
        tower = tower_flops(config, feature_layers(self.get_vision_tower()))
        merge = merge_flops(config, stage.dominant, stage.contextual) if isinstance(stage, VisionZip) else 0
        linears = [m for m in self.get_model().mm_projector.modules() if isinstance(m, nn.Linear)]
        projector = tokens * sum(2 * linear.in_features * linear.out_features for linear in linears)
        return views * (tower + merge + projector)

    def _spatial_features(self, views: torch.Tensor, image_size: tuple[int, int], newline: torch.Tensor | None) -> torch.Tensor:
        """LLaVA-NeXT's token layout for one image's (1 + tiles, patches, hidden) features: the whole image's
        patches, then the tiles' patches as one map of the canvas, row by row; with a `newline` (the `unpad` merge's
        `image_newline`) the map is cropped to the image (the canvas padding goes) and it closes each row."""
        base, tiles = views[0], views[1:]
        newline = None if newline is None else newline.to(base.dtype)
        unpad = newline is not None
        if len(tiles) == 0:  # a single view (not anyres-processed): LLaVA still closes it with one newline
            return base if newline is None else torch.cat([base, newline[None]])
        tower = self.get_vision_tower().config
        side = tower.image_size // tower.patch_size
        width, height = select_best_resolution(image_size, self.config.image_grid_pinpoints)
        rows, columns = height // tower.image_size, width // tower.image_size
        if rows * columns != len(tiles):
            raise ValueError(
                f"an image of (width, height) {tuple(image_size)} has {rows}x{columns} tiles under "
                f"image_grid_pinpoints, but {len(tiles)} came: are image_sizes the images' own (width, height)?"
            )
        # (rows, columns, y, x, hidden) -> (hidden, rows * y, columns * x): the canvas as one feature map
        canvas = tiles.view(rows, columns, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        if unpad:
            canvas = unpad_features(canvas, image_size)
            canvas = torch.cat([canvas, newline[:, None, None].expand(-1, canvas.shape[1], 1)], dim=2)
        return torch.cat([base, canvas.flatten(1, 2).T])

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images=None,
        image_sizes=None,
        padding_side: str | None = None,
        vision_stage: VisionZip | CDPruner | None = None,
        instructions: list[str] | None = None,
    ) -> MultimodalInputs:
        """Drop the incoming padding, splice image features in place of each `IMAGE_TOKEN_INDEX`, re-pad.

        Images are consumed in order. Either one per `<image>` tag, or LLaVA's training convention of one
        (dummy, unused) image for each sample without a tag as well. Position ids restart at 0 for each
        sample's first real token. `padding_side` defaults to the config's `tokenizer_padding_side` ('right');
        generation passes 'left'. `image_sizes` holds each image's original (width, height), as LLaVA passes
        them (PIL's `image.size`); only the `spatial*` merge (anyres) needs them. A `vision_stage` reduces each image
        as it is encoded: VisionZip to each view's D + C tokens, CDPruner to the T of each view most relevant to its
        sample's entry of `instructions` (the question texts, one per prompt) and most diverse.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        padding_side = padding_side or getattr(self.config, "tokenizer_padding_side", "right")
        max_length = getattr(self.config, "tokenizer_model_max_length", None)

        sample_ids = [ids[mask] for ids, mask in zip(input_ids, attention_mask)]
        sample_labels = [None] * len(sample_ids) if labels is None else [lab[mask] for lab, mask in zip(labels, attention_mask)]
        tags_per_sample = [int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in sample_ids]
        has_images = images is not None and len(images) > 0
        owners = None
        if instructions is not None and has_images:
            if len(instructions) != len(sample_ids):
                raise ValueError(f"{len(instructions)} instructions for {len(sample_ids)} prompts")
            dummies = len(images) != sum(tags_per_sample)  # LLaVA's training convention: one for a text-only sample
            owners = [sample for sample, tags in enumerate(tags_per_sample) for _ in range(max(tags, dummies))]
        features, flops, removed = (
            self._image_features(images, image_sizes, vision_stage, owners, instructions) if has_images else ([], [], [])
        )
        feature_queue = self._assign_images(features, tags_per_sample)
        sample_flops = [sum(image_flops) for image_flops in self._assign_images(flops, tags_per_sample)]
        sample_removed = [sum(image_removed) for image_removed in self._assign_images(removed, tags_per_sample)]

        embed_tokens = self.get_model().embed_tokens
        embeds, sample_visual, new_labels = [], [], []
        for ids, sample_label, image_features in zip(sample_ids, sample_labels, feature_queue):
            is_image = ids == IMAGE_TOKEN_INDEX
            text_embeds = embed_tokens(ids.masked_fill(is_image, 0))
            pieces, visual, piece_labels, start = [], [], [], 0
            image_positions = is_image.nonzero().flatten().tolist()
            for position, feature in zip(image_positions, image_features):
                pieces += [text_embeds[start:position], feature.to(text_embeds.dtype)]
                visual += [is_image.new_zeros(position - start), is_image.new_ones(len(feature))]
                if sample_label is not None:
                    piece_labels += [sample_label[start:position], sample_label.new_full((len(feature),), IGNORE_INDEX)]
                start = position + 1
            pieces.append(text_embeds[start:])
            visual.append(is_image.new_zeros(len(ids) - start))
            if sample_label is not None:
                piece_labels.append(sample_label[start:])
            spliced_labels = torch.cat(piece_labels) if sample_label is not None else None
            if spliced_labels is not None and max_length is not None and (spliced_labels[max_length:] != IGNORE_INDEX).any():
                warnings.warn(f"a training sample is longer than tokenizer_model_max_length ({max_length}) once its image "
                              "is spliced in and is cut there, as LLaVA cuts it: the answers past it are not trained",
                              stacklevel=2)
            embeds.append(torch.cat(pieces)[:max_length])
            sample_visual.append(torch.cat(visual)[:max_length])
            new_labels.append(spliced_labels[:max_length] if spliced_labels is not None else None)

        inputs = _pad_samples(embeds, sample_visual, new_labels if labels is not None else None, padding_side)
        inputs.vision_flops = torch.tensor(sample_flops, dtype=torch.float64, device=inputs.inputs_embeds.device)
        removed = torch.tensor(sample_removed, device=inputs.inputs_embeds.device)
        inputs.tokens_unreduced = inputs.attention_mask.sum(dim=1) + removed if vision_stage is not None else None
        return inputs

    @staticmethod
    def _assign_images(features: list, tags_per_sample: list[int]) -> list[list]:
        """Split the flat list of images (or of anything per image) into those each sample uses, checking the
        counts first."""
        tags = sum(tags_per_sample)
        with_dummies = sum(max(count, 1) for count in tags_per_sample)
        if len(features) == tags:
            per_sample = tags_per_sample
            skip_dummy = [False] * len(tags_per_sample)
        elif len(features) == with_dummies:
            per_sample = [max(count, 1) for count in tags_per_sample]
            skip_dummy = [count == 0 for count in tags_per_sample]
        else:
            raise ValueError(f"the prompts hold {tags} <image> tags but {len(features)} images were given")
        assigned, offset = [], 0
        for count, dummy in zip(per_sample, skip_dummy):
            assigned.append([] if dummy else features[offset : offset + count])
            offset += count
        return assigned


def unpad_features(canvas: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Crop a (hidden, height, width) feature map of the padded canvas to the image of (width, height) in it: the
    image was scaled to fit and centred, so equal margins go on the axis it did not fill. Integer arithmetic is
    exact where LLaVA's float product can land just below an integer (transformers rounds that away too)."""
    width, height = image_size
    canvas_height, canvas_width = canvas.shape[1:]
    if width * canvas_height > height * canvas_width:  # relatively wider than the canvas: margins above and below
        margin = (canvas_height - height * canvas_width // width) // 2
        return canvas[:, margin : canvas_height - margin]
    margin = (canvas_width - width * canvas_height // height) // 2
    return canvas[:, :, margin : canvas_width - margin]


def _pad_samples(
    embeds: list[torch.Tensor],
    visual: list[torch.Tensor],
    labels: list[torch.Tensor] | None,
    padding_side: str,
) -> MultimodalInputs:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    batch, length = len(embeds), max(len(e) for e in embeds)
    reference = embeds[0]
    inputs_embeds = reference.new_zeros(batch, length, reference.shape[-1])
    attention_mask = torch.zeros(batch, length, dtype=torch.bool, device=reference.device)
    position_ids = torch.zeros(batch, length, dtype=torch.long, device=reference.device)
    visual_mask = torch.zeros_like(attention_mask)
    new_labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=reference.device)
    for b, (embed, is_visual) in enumerate(zip(embeds, visual)):
        n = len(embed)
        span = slice(length - n, length) if padding_side == "left" else slice(0, n)
        inputs_embeds[b, span] = embed
        attention_mask[b, span] = True
        position_ids[b, span] = torch.arange(n, device=reference.device)
        visual_mask[b, span] = is_visual
        if labels is not None:
            new_labels[b, span] = labels[b]
    return MultimodalInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        visual_mask=visual_mask,
        labels=new_labels if labels is not None else None,
    )
