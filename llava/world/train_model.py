"""Train the tiny world's LLaVA from scratch on CPU: the model that quickstart adds gates to.

    python -m llava.world.train_model [--data-path playground/data/tiny_world/train.json]
                                      [--out checkpoints/tiny-world-llava] [--steps 1800] [--init-from CKPT]
                                      [--tower-steps 1200] [--exit-dropout 0.5]

The model is built by `llava.tiny` (transformers' Llama decoder, CLIPVisionModel, LLaVA's mlp2x_gelu
projector) with a tokenizer learned on the world's own texts. As LLaVA starts from a pretrained, frozen CLIP, the
tower is first pretrained on dense scene labels (`llava.world.pretrain_tower`) and then frozen; with
`--tower-steps 0` it is instead trained with the rest. Projector and language model learn on LLaVA's answer-only
loss, from the same data pipeline that gate training uses (`llava.train.data`).

`--exit-dropout p`: in a share p of the steps the visual tokens leave after a random layer 1..L-1 (the exit path
of the `fixed` exit). Large LLaVAs move what they need from the image into the text tokens within their first
layers — the observation DyVTE builds on; a tiny model trained only end to end reads the image in its last layers
instead. The dropout gives the world's model the same habit, as early as each question allows; the gates still
learn, per input, when that is.

The result is written in the original LLaVA layout. `--init-from` continues from an earlier result (a fresh
warm-up and cosine schedule, the tower as it was) instead of random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint
from llava.model.visual_exit import ExitRequest
from llava.tiny.llava import TinyGeometry, build_tiny_llava, save_llava_layout
from llava.train.data import LlavaTurns, SupervisedDataset, conversation_turns, load_records
from llava.world.pretrain_tower import pretrain_tower

WORLD_GEOMETRY = TinyGeometry(
    layers=8,
    hidden=128,
    heads=4,
    kv_heads=4,
    intermediate=352,
    vision_layers=3,
    vision_hidden=64,
    vision_heads=4,
    image_size=112,
    patch_size=8,
    vocab_size=1024,
    max_positions=512,
)


def world_texts(records: list[dict]) -> list[str]:
    """Every question and answer of the training data, for the tokenizer's vocabulary."""
    return [text for record in records for pair in conversation_turns(record, has_image=True) for text in pair]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


CONV_MODE = "vicuna_v1"  # the template every prompt is trained with; saved in the config for the loaders


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.init_from:
        tokenizer, model, image_processor, _ = load_model(Checkpoint.resolve(args.init_from), device="cpu").as_tuple()
    else:
        geometry = TinyGeometry(**{**asdict(WORLD_GEOMETRY), "seed": args.seed})
        model, tokenizer, image_processor, _ = build_tiny_llava(geometry, tuple(world_texts(load_records(args.data_path))))
    tower, tower_accuracy = model.get_vision_tower(), None
    if args.tower_steps and not args.init_from:
        tower_accuracy = pretrain_tower(tower, image_processor, args.tower_steps, seed=args.seed)
    model.train().requires_grad_(True)
    tower.requires_grad_(not args.tower_steps)  # a pretrained tower stays frozen, as CLIP in LLaVA
    encoder = LlavaTurns(tokenizer, image_processor, model.config, CONV_MODE)
    dataset = SupervisedDataset(
        args.data_path, encoder, image_folder=args.image_folder, model_max_length=model.config.max_position_embeddings
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, collate_fn=encoder.collate, num_workers=args.workers,
        drop_last=True, persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, args.steps, max(1, args.steps // 20))
    )
    progress = tqdm(total=args.steps, desc="training the tiny world's LLaVA", unit="step")
    step, smoothed, started = 0, None, time.perf_counter()
    exits = random.Random(f"exit-dropout-{args.seed}")
    layers = model.config.num_hidden_layers
    while step < args.steps:
        for batch in loader:
            exit_config = None
            if exits.random() < args.exit_dropout:
                exit_config = ExitRequest("fixed", layer=exits.randint(1, layers - 1)).expand()
            loss = model(**batch, exit_config=exit_config).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            step += 1
            progress.update()
            progress.set_postfix(loss=f"{smoothed:.3f}")
            if step == args.steps:
                break
    progress.close()
    model.eval().requires_grad_(False)
    model.config.conv_mode = CONV_MODE
    os.makedirs(args.out, exist_ok=True)
    save_llava_layout(args.out, model, tokenizer, image_processor)
    report = {
        "data_path": args.data_path,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "init_from": args.init_from,
        "tower_steps": args.tower_steps,
        "tower_patch_accuracy": tower_accuracy,
        "exit_dropout": args.exit_dropout,
        "geometry": asdict(WORLD_GEOMETRY),
        "final_loss": round(smoothed, 4),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    earlier = os.path.join(args.init_from, "world_training.json") if args.init_from else None
    if earlier and os.path.isfile(earlier):  # the runs it continues, so the record stays whole
        with open(earlier) as handle:
            report["previous"] = json.load(handle)
    with open(os.path.join(args.out, "world_training.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="playground/data/tiny_world/train.json")
    parser.add_argument("--image-folder", default=None, help="default: images/ next to the data file")
    parser.add_argument("--out", default="checkpoints/tiny-world-llava")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--init-from", default=None, help="a checkpoint of this script to continue from")
    parser.add_argument("--tower-steps", type=int, default=1200, help="dense pretraining of the tower; 0: train it with the rest")
    parser.add_argument("--exit-dropout", type=float, default=0.5, help="share of steps with the visual tokens leaving early")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.image_folder = args.image_folder or os.path.join(os.path.dirname(args.data_path), "images")
    report = train(args)
    if report["tower_patch_accuracy"]:
        print(f"vision tower's patch accuracy on unseen scenes: {report['tower_patch_accuracy']}")
    print(f"trained in {report['minutes']} min, final loss {report['final_loss']}: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
