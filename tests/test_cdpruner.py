"""CDPruner (`cdpruner:T`, BASELINES.md §6 and §10.2) against its official definition re-computed here in plain
torch, batch 1 as its code runs: CLIP's towers loaded afresh by transformers from the tower's folder, the question's
77-position rows (16 in the tiny CLIP), its relevance, kernel and greedy DPP loop written as its code writes them;
the outcome against the stock decoder layers on the sequence spliced by hand from the kept tokens (fp32, 1e-5)."""

import json
import os

import pytest
import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast, CLIPVisionModelWithProjection

from llava.mm_utils import tokenizer_image_token
from llava.model.multimodal_encoder.clip_text import TextTowerNotFoundError, check_text_tower
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages import parse_stages
from llava.model.visual_exit.stages.cdpruner import CDPruner, instruction_text

from batching import attention_implementation, set_sample_dependent_gates
from test_visionzip import hand_spliced_inputs
from test_visual_exit import batch_inputs, masked_reference_logits

PATCHES = 16  # the tiny tower's 4 x 4 patches (`patch` features: no CLS)
SETTINGS = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, return_dict_in_generate=True)
QUESTIONS = [
    "What colour is it?\nAnswer the question using a single word or phrase.",
    "Describe both pictures in detail, every object, its colour and its size, left to right",  # several text rows
]
PROMPTS = [(f"USER: <image>\n{QUESTIONS[0]} ASSISTANT:", 1), (f"USER: <image> and <image>\n{QUESTIONS[1]} ASSISTANT:", 2)]


def stages(spec: str):
    return ExitRequest("stages", stages=spec).expand()


def official_masks(folder: str, tower_features: torch.Tensor, projected: torch.Tensor, question: str, count: int):
    """(B, N) index masks of one sample's B views, as CDPruner's `encode_images` computes them."""
    tokenizer = CLIPTokenizerFast.from_pretrained(folder)
    text_tower = CLIPTextModelWithProjection.from_pretrained(folder)
    with_projection = CLIPVisionModelWithProjection.from_pretrained(folder)
    question = question.replace("\nAnswer the question using a single word or phrase.", "")
    inputs = tokenizer(text=[question], return_tensors="pt")
    rows = text_tower.config.max_position_embeddings
    segments = (inputs.input_ids.shape[1] - 1) // rows + 1
    padding = rows * segments - inputs.input_ids.shape[1]
    inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, rows) for k, v in inputs.items()}
    text_embeds = text_tower(**inputs).text_embeds
    image_embeds = with_projection.visual_projection(with_projection.vision_model.post_layernorm(tower_features).float())

    image_normalized = (projected / projected.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    masks = official_dpp(kernel, count)
    return masks, segments


def official_dpp(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Its fast MAP loop on (B, N, N) kernels, as written there: (B, N) index masks."""
    B, N = kernel.shape[:2]
    cis = torch.zeros((count, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((count, B), dtype=torch.long)
    for i in range(count):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks.scatter_(1, torch.sort(select_idx.t()).values, True)
    return masks


def kept_by_definition(model, pixels, prompts, count):
    """Each image's kept projected tokens, in order, one sample at a time (and whether a question spanned rows)."""
    tower = model.get_vision_tower()
    folder, kept, offset, rows = tower.vision_tower_name, [], 0, []
    for (prompt, images), question in zip(prompts, QUESTIONS):
        views = pixels[offset : offset + images]
        offset += images
        features = tower.vision_tower(views, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = model.get_model().mm_projector(features)
        masks, segments = official_masks(folder, features, projected, question, count)
        kept += [view[mask] for view, mask in zip(projected, masks)]
        rows.append(segments)
    return kept, rows


@pytest.mark.parametrize("count", [1, 5, 11])
def test_logits_equal_the_stock_decoder_on_the_officially_kept_tokens(loaded, count):
    tokenizer, model, _, _ = loaded
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        kept, rows = kept_by_definition(model, pixels, PROMPTS, count)
        hand = hand_spliced_inputs(model, tokenizer, PROMPTS, kept)
        for spec, exit_layer in [(f"cdpruner:{count}", layers), (f"cdpruner:{count},fixed:2", 2)]:
            out = model(input_ids=ids, attention_mask=mask, images=pixels, instructions=QUESTIONS, exit_config=stages(spec))
            oracle = masked_reference_logits(model, hand, torch.full((len(PROMPTS),), exit_layer))
            compared = hand.attention_mask & (~hand.visual_mask if exit_layer < layers else True)
            assert out.logits.shape == oracle.shape
            assert (out.logits[compared] - oracle[compared]).abs().max() <= 1e-5, spec
            assert out.exit_stats.num_visual_tokens.tolist() == [count * images for _, images in PROMPTS]
            assert out.exit_stats.tokens_unreduced.tolist() == (out.exit_stats.num_tokens + (PATCHES - count) * torch.tensor([1, 2])).tolist()
    assert rows == [2, 5]  # 16-position rows of one token a byte: every question spans several


def test_every_count_keeps_the_official_tokens(loaded):
    """Each sample's relevance is normalised over all its images' views together, as its batch-1 code does."""
    tokenizer, model, _, _ = loaded
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(8)) * 3
    ids, mask = batch_inputs(tokenizer, PROMPTS, "right")
    with torch.no_grad():
        for count in range(1, PATCHES):
            kept, _ = kept_by_definition(model, pixels, PROMPTS, count)
            mm = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels, vision_stage=CDPruner(count),
                                                            instructions=QUESTIONS)
            assert (mm.inputs_embeds[mm.visual_mask] - torch.cat(kept)).abs().max() <= 1e-5, count


def test_a_kernel_of_low_rank_keeps_fewer_as_the_official_loop_does():
    """Identical tokens (a plain background) leave the kernel fewer directions than T: once they are spent, √d² of a
    negative rounding error is NaN, argmax keeps picking a NaN slot and the picks repeat — fewer tokens than T, in
    its code and here alike."""
    from llava.model.visual_exit.stages.cdpruner import conditional_dpp

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 32, generator=generator)[torch.randint(0, 6, (2, 40), generator=generator)]
    features = features + 1e-7 * torch.randn(features.shape, generator=generator)
    scores = torch.rand(2, 40, generator=generator)
    unit = features / features.norm(dim=-1, keepdim=True)
    oracle = official_dpp(scores[:, :, None] * (unit @ unit.transpose(1, 2)) * scores[:, None, :], 20)
    kept = conditional_dpp(features, scores, 20)
    assert torch.equal(kept, oracle)
    assert (kept.sum(dim=1) < 20).all()


def test_the_instruction_is_the_question_without_the_suffix_and_tags():
    assert instruction_text("<image>\nWhat is it?\nAnswer the question using a single word or phrase.") == "What is it?"
    assert instruction_text("What is <image> here?") == "What is  here?"


def test_keeping_every_token_is_mode_none(loaded):
    tokenizer, model, _, _ = loaded
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    with torch.no_grad():
        none = model.generate(ids, attention_mask=mask, images=pixels, exit_config=stages("fixed:4"), **SETTINGS)
        for count in (PATCHES, PATCHES + 7):
            every = model.generate(ids, attention_mask=mask, images=pixels, instructions=QUESTIONS,
                                   exit_config=stages(f"cdpruner:{count}"), **SETTINGS)
            assert every.sequences.tolist() == none.sequences.tolist()
            assert every.exit_stats.num_visual_tokens.tolist() == none.exit_stats.num_visual_tokens.tolist()


def test_left_padded_batch_equals_each_alone(gated, loaded):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    with torch.no_grad():
        for spec in ("cdpruner:6", "cdpruner:4,gates:0.5"):
            batched = gated.generate(ids, attention_mask=mask, images=pixels, instructions=QUESTIONS,
                                     exit_config=stages(spec), **SETTINGS)
            offset = 0
            for b, (prompt, count) in enumerate(PROMPTS):
                alone = gated.generate(torch.tensor([tokenizer_image_token(prompt, tokenizer)]), instructions=QUESTIONS[b : b + 1],
                                       images=pixels[offset : offset + count], exit_config=stages(spec), **SETTINGS)
                offset += count
                assert batched.sequences[b].tolist() == alone.sequences[0].tolist(), (spec, prompt)
                for field in ("exit_layer", "num_visual_tokens", "prefill_flops", "vision_flops"):
                    assert getattr(batched.exit_stats, field)[b] == getattr(alone.exit_stats, field)[0], (spec, field)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decode_equals_full_recompute(gated, loaded, attn):
    tokenizer = loaded[0]
    set_sample_dependent_gates(gated)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(6))
    ids = tokenizer_image_token(PROMPTS[0][0], tokenizer)
    with attention_implementation(gated, attn), torch.no_grad():
        for spec in ("cdpruner:5", "cdpruner:5,gates:0.5"):
            out = gated.generate(torch.tensor([ids]), images=pixels, instructions=QUESTIONS[:1], exit_config=stages(spec), **SETTINGS)
            fixed = stages(f"cdpruner:5,fixed:{out.exit_stats.exit_layer.item()}")
            recompute = []
            for _ in range(4):
                logits = gated(input_ids=torch.tensor([ids + recompute]), images=pixels, use_cache=False,
                               instructions=QUESTIONS[:1], exit_config=fixed).logits
                recompute.append(int(logits[0, -1].argmax()))
            assert out.sequences[0].tolist() == recompute, spec


def is_subsequence(rows: torch.Tensor, of: torch.Tensor) -> bool:
    position = 0
    for row in rows:
        while position < len(of) and not torch.equal(of[position], row):
            position += 1
        if position == len(of):
            return False
        position += 1
    return True


def test_anyres_masks_follow_the_layout_and_keep_the_row_ends(tmp_path):
    from llava.model.builder import load_pretrained_model
    from llava.tiny.llava import TinyGeometry, write_tiny_checkpoint

    tokenizer, model, processor, _ = load_pretrained_model(
        write_tiny_checkpoint(str(tmp_path), "llava", TinyGeometry(), anyres=True), device="cpu")
    views = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(7))  # the whole image and 1 x 2 tiles
    ids, mask = batch_inputs(tokenizer, [("USER: <image>\nWhich is red? ASSISTANT:", 1)])
    with torch.no_grad():
        full = model.prepare_inputs_labels_for_multimodal(ids, mask, None, [views], [(112, 56)])
        for count in (3, PATCHES):
            pruned = model.prepare_inputs_labels_for_multimodal(ids, mask, None, [views], [(112, 56)],
                                                                vision_stage=CDPruner(count), instructions=["Which is red?"])
            every = full.inputs_embeds[full.visual_mask]
            kept = pruned.inputs_embeds[pruned.visual_mask]
            assert is_subsequence(kept, every)  # each kept token one of the full layout's, in its order
            newline = model.get_model().image_newline
            rows = int((every == newline).all(dim=-1).sum())
            assert int((kept == newline).all(dim=-1).sum()) == rows  # every row end stays
            assert len(kept) == 3 * count + rows if count < PATCHES else len(kept) == len(every)


def test_the_spec_and_the_budgets():
    assert parse_stages("cdpruner:64") == (CDPruner(64),)
    for rule in ("paper", "equal"):
        for tokens in (192, 128, 64):
            assert CDPruner.at_budget(Budget(tokens, rule, layers=32, visual=576)) == f"cdpruner:{tokens}"
    with pytest.raises(ValueError, match="0 lies outside"):
        parse_stages("cdpruner:0")


def test_what_cdpruner_cannot_run_on_is_refused(loaded, tmp_path):
    tokenizer, model, _, _ = loaded
    ids, mask = batch_inputs(tokenizer, PROMPTS[:1])
    pixels = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="pass `instructions`"):
        model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=stages("cdpruner:4"))
    model.get_vision_tower().vision_tower.save_pretrained(tmp_path)  # a vision-only CLIP folder
    with pytest.raises(TextTowerNotFoundError, match="vision-only CLIP config; CDPruner needs the full CLIP"):
        check_text_tower(str(tmp_path))
    with pytest.raises(TextTowerNotFoundError, match="is not a local folder"):
        check_text_tower(str(tmp_path / "missing"))


def test_the_loader_ranks_by_each_question_batched_as_alone(llava_checkpoint, loaded, tmp_path):
    """`--exit-method cdpruner` through the evaluation loader: each record's answer is generate's on its own
    question (the suffix gone), batched or one by one, and its settings name the method and T."""
    from PIL import Image

    from llava.eval.model_vqa_loader import main as loader
    from llava.mm_utils import process_images
    from llava.model.llava_processor import LlavaProcessor

    tokenizer, model, image_processor, _ = loaded
    suffix = "\nAnswer the question using a single word or phrase."
    questions = []
    for i in range(4):
        Image.new("RGB", (56, 56), (60 * i, 200 - 40 * i, 90)).save(tmp_path / f"{i}.png")
        questions.append({"question_id": f"q{i}", "image": f"{i}.png", "text": f"Which colour is thing {i}?{suffix}"})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = {}
    for batch in ("1", "4"):
        out = tmp_path / f"answers{batch}.jsonl"
        loader(["--model-path", llava_checkpoint, "--question-file", str(tmp_path / "q.jsonl"), "--image-folder",
                str(tmp_path), "--answers-file", str(out), "--temperature", "0", "--max_new_tokens", "3", "--device",
                "cpu", "--conv-mode", "vicuna_v1", "--batch-size", batch, "--exit-method", "cdpruner", "--visual-budget", "5", "--budget-rule", "equal"])
        answers[batch] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["text"] for a in answers["1"]] == [a["text"] for a in answers["4"]]
    assert {a["visual_tokens_avg"] for a in answers["4"]} == {5.0}
    for question, answer in zip(questions, answers["4"]):
        prompt = LlavaProcessor(tokenizer, image_processor, model.config, "vicuna_v1", PATCHES).render(question["text"], True)
        pixels = process_images([Image.open(tmp_path / question["image"]).convert("RGB")], image_processor, model.config)
        ids = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
        with torch.no_grad():
            direct = model.generate(ids, images=pixels, instructions=[question["text"].replace(suffix, "")],
                                    exit_config=stages("cdpruner:5"), do_sample=False, max_new_tokens=3, pad_token_id=0)
        assert answer["text"] == tokenizer.decode(direct[0], skip_special_tokens=True).strip(), question["question_id"]


def test_the_worlds_text_tower_command_makes_a_full_clip_and_leaves_llavas_features(llava_checkpoint, tmp_path):
    import shutil

    from transformers import CLIPVisionModel

    from llava.world.train_text_tower import main as train_text_tower

    folder = tmp_path / "tower"
    shutil.copytree(os.path.join(llava_checkpoint, "vision_tower"), folder)
    before = CLIPVisionModel.from_pretrained(folder).state_dict()
    train_text_tower(["--tower", str(folder), "--steps", "2", "--batch-size", "4"])
    check_text_tower(str(folder))
    after = CLIPVisionModel.from_pretrained(folder).state_dict()
    changed = sorted(key for key in before if not torch.equal(before[key], after[key]))
    assert changed == ["post_layernorm.bias", "post_layernorm.weight"]  # CLIP's head trains; what LLaVA reads does not
    record = json.loads((folder / "text_tower_training.json").read_text())
    assert record["steps"] == 2 and 0 <= record["image_to_text_top1_of_256"] <= 1
    assert CLIPTokenizerFast.from_pretrained(folder).model_max_length == 77
