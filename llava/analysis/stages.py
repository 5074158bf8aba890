"""The paper's empirical findings on your own model: how attention moves between modalities layer by layer, and
from which layer the visual tokens can leave without changing the answer.

    python -m llava.analysis.stages --model-path M --question-file Q.jsonl --image-folder I --output-dir OUT
                                    [--batch-size 8] [--limit 200] [--max-new-tokens 16]

For each question with an image, the model first answers greedily (no exit); that answer is the teacher-forced
target of everything below. Per decoder layer, from the full-sequence attention maps (eager attention, one layer's
map at a time, reduced at once):
- attention mass of the text queries (the prompt after the last visual token) on visual / text / system tokens
  (system: the text before the first visual token; text: the rest), and visual queries' mass on visual tokens;
- the text queries' attention entropy over all keys, and over the keys without the visual tokens (renormalised).
Forced exits, for each K = 0..L (visual tokens processed by the first K layers): the share of answer tokens whose
argmax is unchanged and the answer-loss ratio exit / full, plus the share of samples meeting the gate-training
label rule (docs/DESIGN.md §3). The oracle exit layer of a sample is the earliest K in 1..L-1 meeting the rule
(L: none does), what a perfect gate would choose.

Writes OUT/attention_by_layer.csv, forced_exit.csv, oracle_exit.csv, skipped.jsonl and three PNGs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llava.eval.answering import Answerer, PreparedQuestion, QuestionError, RunSpec
from llava.eval.io import EvalInputError, read_jsonl
from llava.mm_utils import ImageLoadError
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.llava_processor import padded
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError
from llava.model.visual_exit import ExitRequest, exit_decoder_of
from llava.model.visual_exit.training import IGNORE_INDEX, ExitLabelRule, answer_positions, exit_labels

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger("llava.analysis")
KEY_GROUPS = ("visual", "text", "system")
ATTENTION_COLUMNS = (
    "text_to_visual", "text_to_text", "text_to_system", "visual_to_visual", "text_entropy", "text_entropy_without_visual"
)


@dataclass
class TeacherForcedBatch:
    """Prompts + greedy answers, left-padded: `teacher_forced` as the model's forward takes them with `labels` (ids,
    mask, labels and pixel inputs), `inputs` as the analysis runs them (our LLaVA class's spliced embeddings, a
    family's ids and pixel inputs); per slot of `inputs`, `valid`, `visual` and `labels` (the answer tokens only,
    LLaVA's convention)."""

    records: list[dict]
    teacher_forced: dict
    inputs: dict
    valid: torch.Tensor
    visual: torch.Tensor
    labels: torch.Tensor
    answers: list[str]


def token_groups(visual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 3, T) float masks of the key groups: visual, text (after the first visual token), system (before it)."""
    slots = torch.arange(visual.shape[1], device=visual.device)
    first_visual = torch.where(visual, slots, visual.shape[1]).amin(dim=1, keepdim=True)
    text_like = valid & ~visual
    return torch.stack([visual, text_like & (slots > first_visual), text_like & (slots < first_visual)], dim=1).float()


def text_queries(visual: torch.Tensor, valid: torch.Tensor, prompt_end: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the prompt's text after the last visual token, up to and including slot `prompt_end`."""
    slots = torch.arange(visual.shape[1], device=visual.device)
    last_visual = torch.where(visual, slots, -1).amax(dim=1, keepdim=True)
    return valid & (slots > last_visual) & (slots <= prompt_end[:, None])


def attention_masses(probabilities: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, T, G): each query's head-averaged attention mass on each key group ((B, H, T, T) probabilities)."""
    return torch.einsum("bhqk,bgk->bqg", probabilities.float(), groups) / probabilities.shape[1]


def attention_entropy(probabilities: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T): each query's head-averaged attention entropy (nats), over `keys` (B, T) renormalised if given."""
    p = probabilities.float()
    if keys is not None:
        p = p * keys[:, None, None, :]
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=-1).mean(dim=1)


class AttentionRecorder:
    """Forward hooks on every layer's attention (eager: it returns the probabilities). Each layer's map is reduced
    to per-sample statistics as soon as it exists and then dropped."""

    def __init__(self, layers, visual: torch.Tensor, valid: torch.Tensor, prompt_end: torch.Tensor):
        self.groups = token_groups(visual, valid)
        self.text = text_queries(visual, valid, prompt_end).float()
        self.visual = visual.float()
        self.nonvisual = (valid & ~visual).float()
        self.per_layer: list[torch.Tensor] = []  # (B, len(ATTENTION_COLUMNS)) per layer
        self.handles = [layer.self_attn.register_forward_hook(self._record) for layer in layers]

    def _per_query_mean(self, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return (values * queries).sum(dim=1) / queries.sum(dim=1).clamp_min(1)

    def _record(self, module, args, output) -> None:
        probabilities = output[1]
        if probabilities is None:
            raise RuntimeError("attention probabilities missing: the analysis runs with eager attention")
        masses = attention_masses(probabilities, self.groups)
        columns = [self._per_query_mean(masses[..., g], self.text) for g in range(len(KEY_GROUPS))]
        columns.append(self._per_query_mean(masses[..., 0], self.visual))
        columns.append(self._per_query_mean(attention_entropy(probabilities), self.text))
        columns.append(self._per_query_mean(attention_entropy(probabilities, self.nonvisual), self.text))
        self.per_layer.append(torch.stack(columns, dim=1).cpu())

    def close(self) -> torch.Tensor:
        """(B, L, columns)."""
        for handle in self.handles:
            handle.remove()
        return torch.stack(self.per_layer, dim=1)


def teacher_forced_batch(answerer: Answerer, prepared: list[PreparedQuestion], max_new_tokens: int) -> TeacherForcedBatch:
    """Answer greedily with no exit, then build prompt + answer (through the first end of sequence) with labels."""
    model, tokenizer = answerer.model, answerer.tokenizer
    prompts = answerer.batch_inputs(prepared)
    generated = model.generate(
        **prompts, exit_config=ExitRequest("none").expand(), do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = answerer.processor.new_tokens(generated, prompts)
    family = answerer.spec.checkpoint.is_family
    rows, valid = prompts["input_ids"].cpu(), prompts["attention_mask"].bool().cpu()
    sequences, targets, types, answers = [], [], [], []
    for row, tokens in enumerate(generated.cpu()):
        ends = (tokens == tokenizer.eos_token_id).nonzero()
        answer = tokens[: int(ends[0]) + 1] if len(ends) else tokens
        prompt = rows[row, valid[row]]
        sequences.append(torch.cat([prompt, answer]))
        targets.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), answer]))
        if "mm_token_type_ids" in prompts:  # the answer is text
            types.append(torch.cat([prompts["mm_token_type_ids"][row, valid[row]].cpu(), torch.zeros_like(answer)]))
        answers.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    input_ids, attention_mask = padded(sequences, tokenizer.pad_token_id)
    labels, _ = padded(targets, IGNORE_INDEX)
    device = model.device
    teacher_forced = {**prompts, "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                      "labels": labels.to(device)}
    if types:
        teacher_forced["mm_token_type_ids"] = padded(types, 0)[0].to(device)
    if family:
        inputs = {key: value for key, value in teacher_forced.items() if key != "labels"}
        visual = model.visual_mask(inputs["input_ids"])
    else:
        mm = model.prepare_inputs_labels_for_multimodal(
            input_ids.to(device), attention_mask.to(device), labels.to(device), prompts["images"], prompts["image_sizes"]
        )
        inputs = dict(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
                      visual_mask=mm.visual_mask)
        labels, visual = mm.labels, mm.visual_mask
    return TeacherForcedBatch([p.record for p in prepared], teacher_forced, inputs, inputs["attention_mask"].bool(),
                              visual, labels.to(device), answers)


@dataclass
class BatchAnalysis:
    attention: torch.Tensor  # (B, L, columns)
    agree: torch.Tensor  # (B, L + 1): forced exit K = 0..L
    ratio: torch.Tensor
    label: torch.Tensor
    flops: torch.Tensor  # (B, L + 1) prefill FLOPs of each forced exit


def analyse_batch(model, batch: TeacherForcedBatch, rule: ExitLabelRule) -> BatchAnalysis:
    inputs = batch.inputs
    sample, position, targets = answer_positions(batch.labels)
    prompt_end = torch.zeros(len(batch.records), dtype=torch.long, device=model.device).scatter_reduce(
        0, sample, position, reduce="amin", include_self=False
    )  # the last prompt token predicts the first answer token
    layers = exit_decoder_of(model).layers
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    recorder = AttentionRecorder(layers, batch.visual, batch.valid, prompt_end)
    try:
        full = model(**inputs, exit_config=ExitRequest("none").expand())
    finally:
        attention = recorder.close()
        model.set_attn_implementation(implementation)
    full_logits = full.logits[sample, position]
    agree, ratio, label, flops = [], [], [], []
    for k in range(len(layers) + 1):
        exited = full if k == len(layers) else model(**inputs, exit_config=ExitRequest("fixed", k).expand())
        judged = exit_labels(full_logits, exited.logits[sample, position], targets, sample, len(batch.records), rule)
        agree.append(judged.agree)
        ratio.append(judged.ratio)
        label.append(judged.label)
        flops.append(exited.exit_stats.prefill_flops)
    stack = lambda values: torch.stack(values, dim=1).cpu()  # noqa: E731
    return BatchAnalysis(attention, stack(agree), stack(ratio), stack(label), stack(flops))


def oracle_exit_layers(labels: torch.Tensor) -> torch.Tensor:
    """(B,) the earliest K in 1..L-1 whose forced exit meets the label rule; L when none does. `labels` (B, L + 1)."""
    layers = labels.shape[1] - 1
    candidates = torch.arange(layers + 1).expand_as(labels)
    usable = (labels == 1) & (candidates >= 1) & (candidates <= layers - 1)
    return torch.where(usable, candidates, layers).amin(dim=1)


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def plot_attention(attention: torch.Tensor, path: str) -> None:
    """attention: (L, columns) means over samples."""
    layers = range(attention.shape[0])
    figure, (masses, entropy) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, style) in enumerate(zip(ATTENTION_COLUMNS[:4], ("o-", "s-", "^-", "d--"))):
        masses.plot(layers, attention[:, index], style, label=name.replace("_", " "))
    masses.set_xlabel("decoder layer")
    masses.set_ylabel("attention mass (head and query mean)")
    masses.set_title("Where attention goes, per layer")
    masses.set_ylim(0, 1)
    masses.legend(fontsize=8)
    masses.grid(alpha=0.3)
    entropy.plot(layers, attention[:, 4], "o-", label="text queries, all keys")
    entropy.plot(layers, attention[:, 5], "s--", label="text queries, visual keys removed")
    entropy.set_xlabel("decoder layer")
    entropy.set_ylabel("attention entropy (nats)")
    entropy.set_title("Text queries' attention entropy")
    entropy.legend(fontsize=8)
    entropy.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_forced_exit(agree: torch.Tensor, ratio: torch.Tensor, safe: torch.Tensor, rule: ExitLabelRule, path: str) -> None:
    """Per K: mean agreement, median loss ratio, share meeting the rule."""
    ks = range(len(agree))
    figure, left = plt.subplots(figsize=(7, 4.4))
    left.plot(ks, agree, "o-", label="answer-token agreement with no exit")
    left.plot(ks, safe, "s-", label="samples meeting the label rule")
    left.set_xlabel("forced exit K (visual tokens processed by the first K layers)")
    left.set_ylabel("share")
    left.set_ylim(0, 1.05)
    left.grid(alpha=0.3)
    right = left.twinx()
    right.plot(ks, ratio, "^--", color="tab:red", label="answer loss ratio exit / full (median)")
    right.axhline(rule.ratio_threshold, color="tab:red", alpha=0.3, linestyle=":")
    right.set_ylabel("loss ratio", color="tab:red")
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    left.set_title("Forced visual-token exit after K layers")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_oracle_histogram(oracle: torch.Tensor, layers: int, path: str) -> None:
    counts = Counter(oracle.tolist())
    total = max(1, len(oracle))
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    axes.bar(range(1, layers + 1), [100 * counts[k] / total for k in range(1, layers + 1)])
    axes.set_xticks(range(1, layers + 1), [str(k) for k in range(1, layers)] + [f"{layers}\n(never)"])
    axes.set_xlabel("oracle exit layer K (earliest exit meeting the label rule)")
    axes.set_ylabel("samples (%)")
    axes.set_title(f"Oracle exit layers of {len(oracle)} samples")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def analyse(args: argparse.Namespace) -> dict:
    questions = read_jsonl(args.question_file, ("question_id", "text"))[: args.limit or None]
    checkpoint = Checkpoint.resolve(args.model_path, args.model_base)
    spec = RunSpec.build(checkpoint, conv_mode=args.conv_mode, device=args.device, image_folder=args.image_folder,
                         batch_size=args.batch_size, exit_mode="none")
    rule = ExitLabelRule(args.agree_threshold, args.ratio_threshold)
    os.makedirs(args.output_dir, exist_ok=True)
    results: list[BatchAnalysis] = []
    analysed: list[tuple[dict, str]] = []
    skipped: list[dict] = []
    with Answerer(load_model(checkpoint, device=args.device), spec) as answerer, torch.inference_mode():
        for start in tqdm(range(0, len(questions), args.batch_size), desc="analysing", unit="batch"):
            prepared = []
            for record in questions[start : start + args.batch_size]:
                if not record.get("image"):
                    skipped.append({"question_id": record["question_id"], "reason": "no image"})
                    continue
                try:
                    prepared.append(answerer.prepare(record))
                except (ImageLoadError, QuestionError) as error:
                    skipped.append({"question_id": record["question_id"], "reason": str(error)})
            if prepared:
                batch = teacher_forced_batch(answerer, prepared, args.max_new_tokens)
                results.append(analyse_batch(answerer.model, batch, rule))
                analysed += list(zip(batch.records, batch.answers))
    if not results:
        raise EvalInputError(f"{args.question_file}: no question with a readable image to analyse")
    return write_results(args.output_dir, results, analysed, skipped, rule)


def write_results(out: str, results: list[BatchAnalysis], analysed, skipped: list[dict], rule: ExitLabelRule) -> dict:
    attention = torch.cat([r.attention for r in results]).mean(dim=0)
    agree, ratio, label, flops = (torch.cat([getattr(r, name) for r in results]) for name in ("agree", "ratio", "label", "flops"))
    layers = attention.shape[0]
    reduction = 1 - flops.sum(dim=0) / flops[:, layers].sum()
    mean_agree, median_ratio, safe = agree.mean(dim=0), ratio.median(dim=0).values, label.float().mean(dim=0)
    oracle = oracle_exit_layers(label)
    write_csv(os.path.join(out, "attention_by_layer.csv"), ["layer", *ATTENTION_COLUMNS],
              [[layer, *(round(v, 6) for v in attention[layer].tolist())] for layer in range(layers)])
    write_csv(os.path.join(out, "forced_exit.csv"), ["exit_layer", "agreement", "loss_ratio_median", "safe_share", "flops_reduction"],
              [[k, round(float(mean_agree[k]), 6), round(float(median_ratio[k]), 6), round(float(safe[k]), 6),
                round(float(reduction[k]), 6)] for k in range(layers + 1)])
    write_csv(os.path.join(out, "oracle_exit.csv"), ["question_id", "oracle_exit_layer", "answer"],
              [[record["question_id"], int(k), answer] for (record, answer), k in zip(analysed, oracle)])
    with open(os.path.join(out, "skipped.jsonl"), "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in skipped)
    plot_attention(attention, os.path.join(out, "attention_by_layer.png"))
    plot_forced_exit(mean_agree, median_ratio, safe, rule, os.path.join(out, "forced_exit.png"))
    plot_oracle_histogram(oracle, layers, os.path.join(out, "oracle_exit_histogram.png"))
    return {
        "samples": len(analysed), "skipped": len(skipped), "layers": layers, "attention": attention,
        "agreement": mean_agree, "loss_ratio": median_ratio, "safe": safe, "flops_reduction": reduction, "oracle": oracle,
    }


def summary_table(summary: dict) -> str:
    lines = ["| layer | text→visual | text→text | text→system | visual→visual | entropy | entropy w/o visual |",
             "|---|---|---|---|---|---|---|"]
    for layer, row in enumerate(summary["attention"].tolist()):
        lines.append(f"| {layer} | " + " | ".join(f"{value:.3f}" for value in row) + " |")
    lines += ["", "| forced exit K | agreement | loss ratio (median) | meets rule | FLOPs reduction |", "|---|---|---|---|---|"]
    for k in range(summary["layers"] + 1):
        lines.append(f"| {k} | {summary['agreement'][k]:.3f} | {summary['loss_ratio'][k]:.3f} | {summary['safe'][k]:.3f} "
                     f"| {100 * summary['flops_reduction'][k]:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--question-file", required=True, help="LLaVA question jsonl (question_id, image, text)")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's saved template, else LLaVA's name rule")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="analyse the first N questions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--agree-threshold", type=float, default=ExitLabelRule.agree_threshold)
    parser.add_argument("--ratio-threshold", type=float, default=ExitLabelRule.ratio_threshold)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        summary = analyse(args)
    except (EvalInputError, CheckpointError, VisionTowerNotFoundError, ValueError) as error:
        sys.exit(f"llava.analysis.stages: error: {error}")
    print(summary_table(summary))
    print(f"{summary['samples']} samples analysed, {summary['skipped']} skipped; "
          f"CSV and PNG files in {os.path.abspath(args.output_dir)}")


if __name__ == "__main__":
    main()
