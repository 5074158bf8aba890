"""What the calibrations of VTW (llava.analysis.vtw) and ShortV (llava.analysis.shortv) share: per question, the
first generated token's distribution under some exits against the whole model's, KL(P_x ‖ P) as both codes compute
it (`KLDivLoss(batchmean)(log_softmax(P), softmax(P_x))`, one sample at a time), averaged over the questions; and
writing the chosen exit where the checkpoint's exit settings live."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import torch
from tqdm import tqdm

from llava.eval.answering import Answerer, QuestionError, RunSpec
from llava.eval.io import EvalInputError, read_jsonl
from llava.mm_utils import ImageLoadError
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.visual_exit import ExitConfig, ExitRequest


def calibration_cli(module: str, doc: str, save_help: str, add_arguments: Callable, calibrate: Callable, argv=None):
    """(args, result) of a calibration command: the shared flags and the command's own (`add_arguments(parser)`),
    then `calibrate(args)`; an input error is one line on stderr naming the command."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--question-file", required=True, help="LLaVA question jsonl (question_id, image, text)")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--limit", type=int, default=20, help="calibration questions, the first N (both READMEs: 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--save", action="store_true", help=save_help)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return args, calibrate(args)
    except (EvalInputError, CheckpointError, ValueError) as error:
        sys.exit(f"{module}: error: {error}")


def divergence_from_full(full_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(P_x ‖ P) of each sample's next-token distribution: P from `full_logits`, P_x from `other_logits`."""
    full, other = full_logits.float().log_softmax(dim=-1), other_logits.float().log_softmax(dim=-1)
    return (other.exp() * (other - full)).sum(dim=-1)


def first_token_logits(answerer: Answerer, batch: dict, exit_config: ExitConfig) -> torch.Tensor:
    """(B, V): the logits of each prompt's first generated token (generate pads each model's way: our LLaVA class
    pads its expanded prompts on the right in a forward, on the left in generate)."""
    output = answerer.model.generate(
        **batch, exit_config=exit_config, max_new_tokens=1, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=answerer.tokenizer.pad_token_id,
    )
    return output.logits[0]


def mean_divergences(args: argparse.Namespace, checkpoint: Checkpoint, exits: dict, desc: str) -> dict:
    """`divergences` of `exits` on the first --limit questions of --question-file, the model loaded for it."""
    questions = read_jsonl(args.question_file, ("question_id", "text"))[: args.limit or None]
    spec = RunSpec.build(checkpoint, device=args.device, image_folder=args.image_folder, batch_size=args.batch_size,
                         exit_mode="none")
    with Answerer(load_model(checkpoint, device=args.device), spec) as answerer:
        return divergences(answerer, questions, exits, desc)


def divergences(answerer: Answerer, questions: list[dict], exits: dict, desc: str) -> dict:
    """{"mean": {key: mean KL(P_exit ‖ P) over the questions}, "questions": counted, "skipped": [...]} for each of
    `exits` ({key: ExitConfig}), asked in the answerer's batches."""
    totals, counted, skipped = dict.fromkeys(exits, 0.0), 0, []
    size = answerer.spec.batch_size
    with torch.inference_mode():
        for start in tqdm(range(0, len(questions), size), desc=desc, unit="batch"):
            prepared = []
            for record in questions[start : start + size]:
                try:
                    prepared.append(answerer.prepare(record))
                except (ImageLoadError, QuestionError) as error:
                    skipped.append({"question_id": record["question_id"], "reason": str(error)})
            if not prepared:
                continue
            batch = answerer.batch_inputs(prepared)
            full = first_token_logits(answerer, batch, ExitRequest("none").expand())
            for key, exit_config in exits.items():
                totals[key] += float(divergence_from_full(full, first_token_logits(answerer, batch, exit_config)).sum())
            counted += len(prepared)
    if not counted:
        raise EvalInputError(f"no calibration question could be asked ({len(skipped)} skipped)")
    return {"mean": {key: total / counted for key, total in totals.items()}, "questions": counted, "skipped": skipped}


def write_report(output_dir: str, name: str, report: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, name), "w") as handle:
        json.dump(report, handle, indent=2)


def save_default_exit(model_path: str, **request_fields) -> ExitRequest:
    """The checkpoint's saved exit with `request_fields` (ExitRequest's) on top, written to config.json where its exit
    settings live (a family's in its text config); returns it."""
    checkpoint = Checkpoint.resolve(model_path)
    request = checkpoint.exit_defaults.with_overrides(**request_fields)
    fields = argparse.Namespace()  # the config attributes ExitRequest saves, the others it saved kept
    request.save_to(fields)
    path = os.path.join(model_path, "config.json")
    with open(path) as handle:
        raw = json.load(handle)
    (raw["text_config"] if checkpoint.is_family else raw).update(vars(fields))
    with open(path, "w") as handle:
        json.dump(raw, handle, indent=2)
    return request
