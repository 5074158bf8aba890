"""Give the tiny world's vision tower a CLIP text side, trained as CLIP trains one, so that CDPruner (which reads
instruction embeddings from CLIP's text tower) runs on the world model: `python -m llava.world.train_text_tower`.

The world tower was pretrained on dense patch labels (`llava.world.pretrain_tower`) and has no text half. Here a
CLIP text tower (transformers' `CLIPTextModelWithProjection` inside a `CLIPModel`, the byte-level tokenizer of
`llava.tiny.clip_text`), both projections, the logit scale and the tower's `post_layernorm` learn CLIP's symmetric
contrastive loss between freshly drawn scenes (the pooled CLS state of the tower's last layer) and a text about each:
its objects left to right ("a small red circle and a large blue square"), or a question the world asks of it. The
rest of the tower stays frozen, so LLaVA's features (`mm_vision_select_layer`) and every world result are unchanged;
the folder becomes a full CLIP checkpoint, as openai's is.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch
from tqdm import tqdm
from transformers import CLIPModel, CLIPVisionModel

from llava.model.multimodal_encoder.clip_encoder import load_image_processor
from llava.tiny.clip_text import build_clip_tokenizer, full_clip
from llava.world.generate import questions_about, random_scene, render
from llava.world.pretrain_tower import take_step

ROW_POSITIONS = 77  # CLIP's own text length


def describe(shapes, rng: random.Random) -> str:
    """A caption of the scene (its objects left to right) or, half the time, one of the world's questions about it."""
    if rng.random() < 0.5:
        _, question, _ = questions_about(shapes, rng, 1)[0]
        return question
    names = [f"a {shape.size} {shape.colour} {shape.kind}" for shape in sorted(shapes, key=lambda s: s.x)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scene_pairs(rng: random.Random, image_processor, tokenizer, count: int) -> dict:
    scenes = [random_scene(rng) for _ in range(count)]
    texts = tokenizer([describe(shapes, rng) for shapes in scenes], padding=True, return_tensors="pt")
    pixels = image_processor([render(shapes) for shapes in scenes], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "input_ids": texts.input_ids, "attention_mask": texts.attention_mask}


def train(clip: CLIPModel, image_processor, tokenizer, steps: int, batch_size: int, learning_rate: float, seed: int) -> float:
    """CLIP's loss over `steps` batches; returns image-to-text top-1 retrieval over 256 unseen scenes."""
    clip.requires_grad_(False)
    trained = [clip.text_model, clip.text_projection, clip.visual_projection, clip.vision_model.post_layernorm]
    for module in trained:
        module.requires_grad_(True)
    clip.logit_scale.requires_grad_(True)
    parameters = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    rng = random.Random(f"text-tower-{seed}")
    clip.train()
    for _ in (progress := tqdm(range(steps), desc="training the world's CLIP text tower", unit="step")):
        loss = clip(**scene_pairs(rng, image_processor, tokenizer, batch_size), return_loss=True).loss
        take_step(loss, parameters, optimizer, schedule)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    clip.eval().requires_grad_(False)
    with torch.no_grad():
        logits = clip(**scene_pairs(random.Random(f"text-tower-test-{seed}"), image_processor, tokenizer, 256)).logits_per_image
    return round((logits.argmax(dim=1) == torch.arange(len(logits))).float().mean().item(), 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", default="checkpoints/tiny-world-llava/vision_tower",
                        help="the world model's CLIP tower folder; rewritten in place as a full CLIP checkpoint")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    image_processor = load_image_processor(args.tower)
    tower = CLIPVisionModel.from_pretrained(args.tower)
    tokenizer = build_clip_tokenizer(ROW_POSITIONS)
    clip = full_clip(tower, len(tokenizer), ROW_POSITIONS, args.seed)
    retrieval = train(clip, image_processor, tokenizer, args.steps, args.batch_size, args.learning_rate, args.seed)
    unchanged = {key: value for key, value in tower.state_dict().items() if not key.startswith("post_layernorm")}
    assert all(torch.equal(value, clip.vision_model.state_dict()[key]) for key, value in unchanged.items())
    clip.save_pretrained(args.tower)
    tokenizer.save_pretrained(args.tower)
    record = {key: getattr(args, key) for key in ("steps", "batch_size", "learning_rate", "seed")}
    record["image_to_text_top1_of_256"] = retrieval
    with open(os.path.join(args.tower, "text_tower_training.json"), "w") as handle:
        json.dump(record, handle, indent=1)
    print(f"text tower trained: image-to-text top-1 retrieval {retrieval:.1%} of 256 unseen scenes; {args.tower} rewritten")


if __name__ == "__main__":
    main()
