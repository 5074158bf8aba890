"""Add freshly initialised exit gates to a LLaVA checkpoint, or to one of the other VLM families'.

    python init_weight.py --model-path /models/llava-v1.5-7b --output-dir checkpoints/llava-v1.5-7b-exit-init

Without arguments it works on the tiny world's model (checkpoints/tiny-world-llava → checkpoints/tiny-world-llava-exit-init).

The output is a full checkpoint that `load_pretrained_model` loads with gates (Xavier-uniform, as the reference
initialises them), ready for `scripts/v1_5/finetune_visual_gate.sh`. A checkpoint of one of transformers' VLM classes
(llava-hf LLaVA, Qwen2-VL, InternVL, ...) gets its gates in that class and stays in its layout, its processor files
beside it. A checkpoint that already holds gates (in its weights, or a gates-only artifact) is refused unless
`--reinit`: its gates may be trained ones.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from llava.arguments import positive_int
from llava.model.builder import load_family_model, load_model
from llava.model.checkpoint import Checkpoint, CheckpointError, gate_width_in_checkpoint
from llava.model.gates_artifact import attach_gates, read_gates_config
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError
from llava.model.visual_exit import ExitRequest, enable_visual_exit, exit_decoder_of

DEFAULT_EXIT = ExitRequest("dynamic", threshold=0.5)  # the reference's argmax


def existing_gates(model_path: str) -> str | None:
    """What gates `model_path` already holds, in words, or None; read from its files without loading the model."""
    artifact = read_gates_config(model_path)
    if artifact is not None:
        return f"a gates-only artifact (width {artifact['visual_gate_hidden_size']}, base {artifact['base_model']})"
    width = gate_width_in_checkpoint(model_path)
    return None if width is None else f"gates of width {width} in its weights"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-path", default="checkpoints/tiny-world-llava",
        help="LLaVA checkpoint (original or llava-hf layout) or one of another VLM family (Qwen2-VL, InternVL, ...)"
    )
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--output-dir", default=None, help="default: <model-path>-exit-init")
    parser.add_argument("--gate-hidden-size", type=positive_int, default=2048, help="the gates' hidden width G")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reinit", action="store_true", help="replace gates the checkpoint already has")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or args.model_path.rstrip("/") + "-exit-init"
    found = existing_gates(args.model_path)
    if found is not None and not args.reinit:
        sys.exit(f"init_weight.py: error: {args.model_path} already holds {found}; "
                 "--reinit replaces them with fresh ones")
    try:
        checkpoint = Checkpoint.resolve(args.model_path, args.model_base)
        # The checkpoint's files stay in their layout: a llava-hf one, which our LLaVA class runs, gets its gates in
        # transformers' class of that layout, as a family's does.
        in_layout = checkpoint.layout_class is not None and checkpoint.model_base is None
        if in_layout:
            tokenizer, model, processor, _ = load_family_model(checkpoint.weights, dtype="auto", device_map={"": "cpu"})
        else:
            tokenizer, model, processor, _ = load_model(checkpoint, device="cpu", dtype="auto").as_tuple()
    except (CheckpointError, VisionTowerNotFoundError) as error:
        sys.exit(f"init_weight.py: error: {error}")
    if in_layout:
        torch.manual_seed(args.seed)
        enable_visual_exit(model, args.gate_hidden_size)
    else:
        attach_gates(model, args.gate_hidden_size, args.seed)
    # A gated checkpoint exits as the reference's model does, by its gates' argmax; --exit-mode none runs it whole.
    DEFAULT_EXIT.save_to(exit_decoder_of(model).config)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    done = "replaced in" if found is not None else "added to"
    print(f"fresh gates of width {args.gate_hidden_size} {done} {args.model_path}: {os.path.abspath(output_dir)}")
    print(f"its default exit: {DEFAULT_EXIT.label} (the gates decide; --exit-mode none / EXIT_MODE=none runs without)")


if __name__ == "__main__":
    main()
