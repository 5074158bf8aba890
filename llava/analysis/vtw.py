"""VTW's choice of its withdrawal layer ("findk", Lin et al., AAAI 2025), for any checkpoint the loader reads.

    python -m llava.analysis.vtw --model-path M --question-file Q.jsonl --image-folder DIR [--limit 20]
        [--eta 0.003] [--first 5] [--save]

Per question, the first generated token's distribution with every visual token withdrawn at the input of layer d
(our `fixed:d`: layers 0 … d−1 see the image), P_d, against the whole model's, P: KL(P_d ‖ P), as its code computes
it (`KLDivLoss(batchmean)(log_softmax(P), softmax(P_d))`, one sample at a time), for d = --first … L − 1 (its code:
5 … 31), averaged over the questions. K is the first d whose mean is at most η (its code: 0.003 for LLaVA-1.5-7B,
0.0005 for 13B, 0.0001 for LLaVA-1.6-vicuna-7B; its README calibrates on 20 ScienceQA questions). Prints the curve,
writes `vtw.json` to --output-dir; `--save` makes `fixed:K` the checkpoint's default exit (config.json), which the
loader, the eval scripts and lmms-eval then run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from tqdm import tqdm

from llava.eval.answering import Answerer, QuestionError, RunSpec
from llava.eval.io import EvalInputError, read_jsonl
from llava.mm_utils import ImageLoadError
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.visual_exit import ExitConfig, ExitRequest

FIRST_LAYER = 5  # its code starts the search at layer 5
DEFAULT_ETA = 0.003  # its threshold for LLaVA-1.5-7B (and any model it has no own value for)


def withdrawal_divergence(full_logits: torch.Tensor, withdrawn_logits: torch.Tensor) -> torch.Tensor:
    """(B,) KL(P_d ‖ P) of each sample's next-token distribution: P from `full_logits`, P_d from `withdrawn_logits`."""
    full, withdrawn = full_logits.float().log_softmax(dim=-1), withdrawn_logits.float().log_softmax(dim=-1)
    return (withdrawn.exp() * (withdrawn - full)).sum(dim=-1)


def first_layer_within(mean_divergence: dict[int, float], eta: float) -> int | None:
    """The first withdrawal layer (in increasing order) whose mean divergence is at most `eta`, None if none is."""
    return next((layer for layer in sorted(mean_divergence) if mean_divergence[layer] <= eta), None)


def first_token_logits(answerer: Answerer, batch: dict, exit_config: ExitConfig) -> torch.Tensor:
    """(B, V): the logits of each prompt's first generated token (generate pads each model's way: our LLaVA class
    pads its expanded prompts on the right in a forward, on the left in generate)."""
    output = answerer.model.generate(
        **batch, exit_config=exit_config, max_new_tokens=1, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=answerer.tokenizer.pad_token_id,
    )
    return output.logits[0]


def calibrate(args: argparse.Namespace) -> dict:
    questions = read_jsonl(args.question_file, ("question_id", "text"))[: args.limit or None]
    checkpoint = Checkpoint.resolve(args.model_path)
    layers = checkpoint.config.num_hidden_layers
    if not 0 < args.first < layers:
        raise ValueError(f"--first {args.first}: the search runs from it to layer {layers - 1} of this {layers}-layer model")
    spec = RunSpec.build(checkpoint, device=args.device, image_folder=args.image_folder, batch_size=args.batch_size,
                         exit_mode="none")
    candidates = range(args.first, layers)
    totals, counted, skipped = dict.fromkeys(candidates, 0.0), 0, []
    with Answerer(load_model(checkpoint, device=args.device), spec) as answerer, torch.inference_mode():
        for start in tqdm(range(0, len(questions), args.batch_size), desc="VTW calibration", unit="batch"):
            prepared = []
            for record in questions[start : start + args.batch_size]:
                try:
                    prepared.append(answerer.prepare(record))
                except (ImageLoadError, QuestionError) as error:
                    skipped.append({"question_id": record["question_id"], "reason": str(error)})
            if not prepared:
                continue
            batch = answerer.batch_inputs(prepared)
            full = first_token_logits(answerer, batch, ExitRequest("none").expand())
            for layer in candidates:
                withdrawn = first_token_logits(answerer, batch, ExitRequest("fixed", layer).expand())
                totals[layer] += float(withdrawal_divergence(full, withdrawn).sum())
            counted += len(prepared)
    if not counted:
        raise EvalInputError(f"{args.question_file}: no question could be asked ({len(skipped)} skipped)")
    mean = {layer: total / counted for layer, total in totals.items()}
    chosen = first_layer_within(mean, args.eta)
    result = {"model": checkpoint.path, "questions": counted, "skipped": skipped, "eta": args.eta,
              "mean_kl": {str(layer): value for layer, value in mean.items()}, "layer": chosen}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "vtw.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return result


def save_default_exit(model_path: str, layer: int) -> None:
    """`fixed:layer` as the checkpoint's saved exit: in config.json where its exit settings live (a family's in its
    text config)."""
    checkpoint = Checkpoint.resolve(model_path)
    fields = argparse.Namespace()  # the config attributes ExitConfig saves, the others it saved kept
    checkpoint.exit_defaults.with_overrides(mode="fixed", layer=layer).save_to(fields)
    path = os.path.join(model_path, "config.json")
    with open(path) as handle:
        raw = json.load(handle)
    (raw["text_config"] if checkpoint.is_family else raw).update(vars(fields))
    with open(path, "w") as handle:
        json.dump(raw, handle, indent=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--question-file", required=True, help="LLaVA question jsonl (question_id, image, text)")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--limit", type=int, default=20, help="calibration questions, the first N (its README: 20)")
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA, help="KL threshold η")
    parser.add_argument("--first", type=int, default=FIRST_LAYER, help="the first withdrawal layer tried")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--save", action="store_true", help="make fixed:K the checkpoint's default exit (config.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        result = calibrate(args)
    except (EvalInputError, CheckpointError, ValueError) as error:
        sys.exit(f"llava.analysis.vtw: error: {error}")
    print("| withdrawn at layer d | mean KL(P_d ‖ P) |\n|---|---|")
    for layer, value in result["mean_kl"].items():
        print(f"| {layer} | {value:.6g} |")
    if result["layer"] is None:
        sys.exit(f"llava.analysis.vtw: no layer from {args.first} keeps the mean KL within η = {args.eta} "
                 f"({result['questions']} questions); raise --eta or lower --first")
    print(f"K = {result['layer']}: the first layer within η = {args.eta} ({result['questions']} questions)")
    if args.save:
        save_default_exit(args.model_path, result["layer"])
        print(f"saved: {args.model_path}/config.json now runs fixed:{result['layer']} by default")


if __name__ == "__main__":
    main()
