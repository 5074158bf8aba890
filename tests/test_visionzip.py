"""VisionZip (`visionzip:D:C`, /work/shared/BASELINES.md §4) against oracles independent of its merge code: the
selection and merge from the definition in plain loops on the stock tower run eagerly with its full attention maps,
and the stock decoder layers on a sequence spliced by hand from those tokens (fp32, 1e-5)."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token
from llava.model.multimodal_encoder.visionzip import visionzip_features
from llava.model.visual_exit import DecoderGeometry, ExitConfig, ExitRequest, prefill_flops
from llava.model.visual_exit.stages.visionzip import VisionZip

from batching import attention_implementation, set_sample_dependent_gates
from test_visual_exit import PROMPTS, batch_inputs, greedy_recompute, images_for, masked_reference_logits

TOKENS = 17  # the tiny tower's CLS + 4 x 4 patches
SETTINGS = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)


def stages(spec: str) -> ExitConfig:
    return ExitRequest("stages", stages=spec).expand()


def visionzip_by_definition(tower, images, dominant, contextual):
    """Each view's D dominant and C contextual tokens, in loops over tokens, from the stock tower run eagerly: its
    attention map and hidden states of the feature layer, and the keys that layer's k_proj computed."""
    layer_count = tower.config.num_hidden_layers
    index = tower.select_layer % (layer_count + 1)  # hidden state `index` is the output of layer index - 1
    keys = []
    hook = tower.vision_tower.encoder.layers[index - 1].self_attn.k_proj.register_forward_hook(
        lambda module, args, output: keys.append(output)
    )
    try:
        with attention_implementation(tower.vision_tower, "eager"), torch.no_grad():
            out = tower.vision_tower(images, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
    states, attention, heads = out.hidden_states[index], out.attentions[index - 1], tower.config.num_attention_heads
    views = []
    for v in range(len(images)):
        tokens = states.shape[1]
        cls_score = [float(sum(attention[v, h, 0, j] for h in range(heads))) for j in range(tokens)]
        patches = sorted(range(1, tokens), key=lambda j: cls_score[j], reverse=True)[: dominant - 1]
        kept = [0] + sorted(patches)
        rest = [j for j in range(tokens) if j not in kept]
        metric = keys[0][v].view(tokens, heads, -1).mean(dim=1)
        unit = {j: metric[j] / metric[j].norm() for j in rest}
        count = min(contextual, len(rest))
        targets = [rest[i * (len(rest) // count)] for i in range(count)] if count else []
        members = {target: [] for target in targets}
        for j in [j for j in rest if j not in targets] if targets else []:  # C = 0: the rest is dropped
            best = targets[0]
            for target in targets[1:]:
                if float(unit[j] @ unit[target]) > float(unit[j] @ unit[best]):
                    best = target
            members[best].append(j)
        merged = [states[v, t] + (sum(states[v, j] for j in group) / len(group) if group else 0)
                  for t, group in members.items()]
        views.append(torch.stack([states[v, j] for j in kept] + merged))
    return torch.stack(views)


def hand_spliced_inputs(model, tokenizer, prompts, image_features):
    """Right-padded decoder inputs built by hand: each prompt's text embeddings with the next image's (tokens, hidden)
    features in place of each `<image>`, positions 0.. per sample."""
    embed, rows, visual, queue = model.get_model().embed_tokens, [], [], iter(image_features)
    for prompt, _ in prompts:
        pieces, flags = [], []
        for token in tokenizer_image_token(prompt, tokenizer):
            piece = next(queue) if token == IMAGE_TOKEN_INDEX else embed(torch.tensor([token]))
            pieces.append(piece)
            flags += [token == IMAGE_TOKEN_INDEX] * len(piece)
        rows.append(torch.cat(pieces))
        visual.append(torch.tensor(flags))
    length, batch = max(map(len, rows)), len(rows)
    inputs = SimpleNamespace(
        inputs_embeds=torch.zeros(batch, length, rows[0].shape[1]),
        attention_mask=torch.zeros(batch, length, dtype=torch.bool),
        position_ids=torch.zeros(batch, length, dtype=torch.long),
        visual_mask=torch.zeros(batch, length, dtype=torch.bool),
    )
    for b, (row, flags) in enumerate(zip(rows, visual)):
        inputs.inputs_embeds[b, : len(row)], inputs.visual_mask[b, : len(row)] = row, flags
        inputs.attention_mask[b, : len(row)], inputs.position_ids[b, : len(row)] = True, torch.arange(len(row))
    return inputs


@pytest.mark.parametrize("select_layer", [-2, -1])
@pytest.mark.parametrize("dominant, contextual", [(5, 3), (6, 5), (1, 4), (3, 0), (15, 4), (2, 15)])
def test_selection_and_merge_equal_the_definition(loaded, images, select_layer, dominant, contextual):
    tower = loaded[1].get_vision_tower()
    tower.select_layer = select_layer
    try:
        with torch.no_grad():
            ours = visionzip_features(tower, images, dominant, contextual)
        oracle = visionzip_by_definition(tower, images, dominant, contextual)
    finally:
        tower.select_layer = -2
    assert ours.shape == (len(images), min(dominant + contextual, TOKENS), tower.hidden_size)
    assert (ours - oracle).abs().max() <= 1e-5


def test_the_tower_keeps_its_attention_kernel(loaded, images):
    """Only the CLS row is computed: no layer of the tower returns (so materialises) an attention map."""
    tower = loaded[1].get_vision_tower()
    maps = []
    hooks = [
        layer.self_attn.register_forward_hook(lambda module, args, output: maps.append(output[1]))
        for layer in tower.vision_tower.encoder.layers
    ]
    try:
        with torch.no_grad():
            visionzip_features(tower, images, 5, 3)
    finally:
        for hook in hooks:
            hook.remove()
    assert tower.config._attn_implementation == "sdpa"
    assert len(maps) == tower.config.num_hidden_layers and all(m is None for m in maps)


def test_logits_equal_the_stock_decoder_on_the_hand_merged_sequence(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    pixels = images_for(images, PROMPTS)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        tokens = model.get_model().mm_projector(visionzip_by_definition(model.get_vision_tower(), pixels, 5, 3))
        hand = hand_spliced_inputs(model, tokenizer, PROMPTS, list(tokens))
        has_image = torch.tensor([count > 0 for _, count in PROMPTS])
        for spec, exit_layer in [("visionzip:5:3", layers), ("visionzip:5:3,fixed:2", 2)]:
            out = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=stages(spec))
            oracle = masked_reference_logits(model, hand, torch.full((len(PROMPTS),), exit_layer))
            compared = hand.attention_mask & (~hand.visual_mask if exit_layer < layers else True)
            assert out.logits.shape == oracle.shape
            assert (out.logits[compared] - oracle[compared]).abs().max() <= 1e-5, spec
            assert out.exit_stats.num_visual_tokens.tolist() == [8 * count for _, count in PROMPTS]
            assert out.exit_stats.exit_layer.tolist() == torch.where(has_image, exit_layer, 0).tolist()


def test_keeping_every_token(loaded, images):
    """D >= N is the stock `cls_patch` features (CLS is kept, also for a `patch` checkpoint), and so mode none of
    such a checkpoint; D + C >= N keeps every token, the rest after the dominant ones."""
    tokenizer, model, _, _ = loaded
    tower = model.get_vision_tower()
    with torch.no_grad():
        every = tower.vision_tower(images, output_hidden_states=True).hidden_states[-2]
        for dominant in (TOKENS, TOKENS + 3):
            assert torch.equal(visionzip_features(tower, images, dominant, 4), every)
        for dominant, contextual in [(6, 11), (6, 30), (1, TOKENS)]:
            kept = visionzip_features(tower, images, dominant, contextual)
            assert kept.shape == every.shape
            for view, full in zip(kept, every):
                matches = (view[:, None] == full[None]).all(dim=-1)  # (kept, original): one original each
                assert matches.sum(dim=1).tolist() == [1] * TOKENS and matches.any(dim=0).all()
        ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
        pixels = images_for(images, PROMPTS)
        zipped = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=stages(f"visionzip:{TOKENS}:2"))
        tower.select_feature = "cls_patch"
        try:
            stock = model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=ExitRequest("none").expand())
        finally:
            tower.select_feature = "patch"
    assert zipped.logits.shape == stock.logits.shape
    assert (zipped.logits - stock.logits).abs().max() <= 1e-5
    assert zipped.exit_stats.num_visual_tokens.tolist() == stock.exit_stats.num_visual_tokens.tolist()


@pytest.mark.parametrize("spec", ["visionzip:5:3", "visionzip:4:2,gates:0.5"])
def test_left_padded_batch_equals_each_alone(gated, loaded, images, spec):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        batched = gated.generate(ids, attention_mask=mask, images=pixels, exit_config=stages(spec), **SETTINGS)
        offset = 0
        for b, (prompt, count) in enumerate(PROMPTS):
            alone = gated.generate(
                torch.tensor([tokenizer_image_token(prompt, tokenizer)]),
                images=pixels[offset : offset + count] if count else None, exit_config=stages(spec), **SETTINGS,
            )
            offset += count
            assert batched.sequences[b].tolist() == alone.sequences[0].tolist(), prompt
            for field in ("exit_layer", "num_tokens", "num_visual_tokens", "prefill_flops", "vision_flops"):
                assert getattr(batched.exit_stats, field)[b] == getattr(alone.exit_stats, field)[0], (prompt, field)
    stage = ExitRequest("stages", stages=spec).expand().vision_stage
    per_image = stage.dominant + stage.contextual
    assert batched.exit_stats.num_visual_tokens.tolist() == [per_image * count for _, count in PROMPTS]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decode_equals_full_recompute(gated, loaded, images, attn):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    offset = 0
    with attention_implementation(gated, attn), torch.no_grad():
        for prompt, count in PROMPTS:
            pixels = images_for(images, PROMPTS)[offset : offset + count] if count else None
            offset += count
            ids = tokenizer_image_token(prompt, tokenizer)
            for spec in ("visionzip:5:3", "visionzip:5:3,gates:0.5"):
                out = gated.generate(torch.tensor([ids]), images=pixels, exit_config=stages(spec), **SETTINGS)
                fixed = stages(f"visionzip:5:3,fixed:{out.exit_stats.exit_layer.item()}")
                assert out.sequences[0].tolist() == greedy_recompute(gated, ids, pixels, fixed, 4), (prompt, spec)


def counted_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def test_flops_follow_the_shorter_sequence_and_the_vision_side_is_reported(loaded, images):
    tokenizer, model, _, _ = loaded
    tower, projector = model.get_vision_tower().vision_tower, model.get_model().mm_projector
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS)
    with torch.no_grad():
        zipped, none = (
            model.generate(ids, attention_mask=mask, images=pixels, exit_config=config, **SETTINGS)
            for config in (stages("visionzip:5:3"), ExitRequest("none").expand())
        )
        # Oracle: torch's own count of the stock modules' matmuls, one view through the embedding and the layers
        # up to the feature layer (the first of two), run eagerly so that the attention shows as matmuls.
        def one_view_to_the_feature_layer():
            return tower.encoder.layers[0](tower.pre_layrnorm(tower.embeddings(pixels[:1])), None)

        with attention_implementation(tower, "eager"):
            view_tower = counted_flops(one_view_to_the_feature_layer)
        projected = {n: counted_flops(lambda: projector(torch.zeros(1, n, projector[0].in_features))) for n in (8, 16)}
    counts = torch.tensor([count for _, count in PROMPTS])
    rest, targets, hidden, head_dim = TOKENS - 5, 3, 32, 16  # R = 12: targets 0, 4, 8; 9 tokens join them
    merge = 2 * (rest - targets) * targets * head_dim + (rest - targets + 2 * targets) * hidden
    assert zipped.exit_stats.vision_flops.tolist() == (counts * (view_tower + merge + projected[8])).tolist()
    assert none.exit_stats.vision_flops.tolist() == (counts * (view_tower + projected[16])).tolist()
    text = none.exit_stats.num_tokens - none.exit_stats.num_visual_tokens
    assert zipped.exit_stats.num_tokens.tolist() == (text + 8 * counts).tolist()
    geometry = DecoderGeometry.from_config(model.config)
    full_length = zipped.exit_stats.num_tokens[:, None].expand(-1, geometry.layers)
    expected = prefill_flops(geometry, full_length, torch.zeros_like(counts))
    assert torch.equal(zipped.exit_stats.prefill_flops, expected)
    assert (zipped.exit_stats.prefill_flops[counts > 0] < none.exit_stats.prefill_flops[counts > 0]).all()


def test_anyres_views_are_reduced_one_by_one_under_the_flat_merge(loaded, images):
    tokenizer, model, _, _ = loaded
    views = torch.cat([images, torch.randn(1, *images.shape[1:], generator=torch.Generator().manual_seed(2))])
    stacks = [views[:3], views[3:]]  # an image of three views (whole image and two tiles), one of one
    prompts = [("USER: <image> and <image>? ASSISTANT:", 2)]
    ids, mask = batch_inputs(tokenizer, prompts)
    with torch.no_grad():
        mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, stacks, vision_stage=VisionZip(5, 3))
        per_view = model.get_model().mm_projector(visionzip_by_definition(model.get_vision_tower(), views, 5, 3))
    assert mm.visual_mask.sum().item() == 4 * 8
    assert (mm.inputs_embeds[mm.visual_mask] - per_view.flatten(0, 1)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "spec, message",
    [
        ("visionzip:0:3", r"visionzip:D:C\): 0 lies outside \[1, inf\]"),
        ("visionzip:5:-1", r"-1 lies outside \[0, inf\]"),
        ("visionzip:5", "expected visionzip:D:C"),
        ("visionzip:a:3", "'a' is not an integer"),
        ("visionzip:5:3:1", "expected visionzip:D:C"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        stages(spec)


def test_what_visionzip_cannot_run_on_is_refused(loaded, images):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    with pytest.raises(ValueError, match="at most one visionzip stage .* got visionzip:5:3, visionzip:4:2"):
        model.generate(ids, images=images[:1], exit_config=stages("visionzip:5:3,gates:0.5,visionzip:4:2"), **SETTINGS)
    model.config.mm_patch_merge_type = "spatial"
    try:
        with pytest.raises(ValueError, match=r"D \+ C tokens per view, which mm_patch_merge_type 'spatial' cannot"):
            model(input_ids=ids, images=[images], image_sizes=[(56, 56)], exit_config=stages("visionzip:5:3"))
    finally:
        del model.config.mm_patch_merge_type
    tower = model.get_vision_tower()
    tower.select_layer = 0
    try:
        with pytest.raises(ValueError, match="mm_vision_select_layer 0 selects the embeddings"):
            model(input_ids=ids, attention_mask=mask, images=images[:1], exit_config=stages("visionzip:5:3"))
    finally:
        tower.select_layer = -2
