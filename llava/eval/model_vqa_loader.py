"""Answer a question file with a LLaVA model: `python -m llava.eval.model_vqa_loader --model-path ... \
--question-file q.jsonl --image-folder imgs --answers-file a.jsonl [--exit-mode dynamic] [--batch-size 8]`.

LLaVA's loader, batched, chunked (`--num-chunks/--chunk-idx`) and resumable: answers are JSON lines written and
flushed one by one, and a rerun skips question ids already answered — only if it asks for the settings that made
them (`a.settings.json` beside the answers; see llava.eval.run_settings; `--overwrite` starts afresh). Each line
keeps LLaVA's fields (question_id, prompt, text, answer_id, model_id, metadata) and adds the exit layer, the
LM-prefill TFLOPs with exits and without (`tflops_full`), and the wall-clock prefill and generation time.

A question that cannot be asked (a missing or unreadable image, more `<image>` tags than images, a prompt longer
than the model's context) gets an error record (`error`) instead of an answer; a rerun asks it again. The run ends
with the count of error records and their first reasons, and fails when every question did. A malformed question
line stops the run before any model work, naming the file and line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import shortuuid
import torch
from PIL import Image
from tqdm import tqdm

from llava.arguments import positive_int
from llava.bench.timing import synchronize
from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import choose_conv_mode, get_conv_template
from llava.eval.io import EvalInputError, read_jsonl
from llava.eval.run_settings import answers_lock, check_resumable, run_settings, settings_path, write_settings
from llava.mm_utils import ImageLoadError, get_model_name_from_path, load_image, process_images, tokenizer_image_token
from llava.model.builder import (
    CheckpointError, family_checkpoint, load_pretrained_model, read_family_decoder_config, read_llava_config,
    resolve_device,
)
from llava.model.families.processing import FamilyProcessor, load_processor
from llava.model.exit_args import add_exit_arguments, exit_config_from_args
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError

logger = logging.getLogger("llava.eval")
SHOWN_ERRORS = 3  # error reasons repeated on the console at the end of a run


class QuestionError(ValueError):
    """A question that cannot be asked as given; it becomes that question's error record."""


def get_chunk(items: list, num_chunks: int, index: int) -> list:
    """LLaVA's chunking: contiguous slices of ceil(N / num_chunks)."""
    if not 0 <= index < num_chunks:
        raise ValueError(f"--chunk-idx {index} outside 0..{num_chunks - 1}")
    size = math.ceil(len(items) / num_chunks)
    return items[index * size : (index + 1) * size]


def answer_key(record: dict) -> tuple:
    """What identifies an answer: the question id, and the round for MMBench's rotated options."""
    return record["question_id"], record.get("round_id")


def resume_answers(path: str) -> tuple[set, list[str], bool]:
    """(keys answered in `path`, the lines to keep, whether the file needs rewriting to them) for a resume.

    Dropped: a last line cut off by a killed run, and error records, whose questions are asked again. A last line
    that lost only its newline is kept and gets one, so the next answer does not run into it."""
    if not os.path.isfile(path):
        return set(), [], False
    with open(path) as handle:
        content = handle.read()
    done, kept = set(), []
    for line in content.splitlines():
        try:
            record = json.loads(line)
            key = answer_key(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if "error" not in record:
            done.add(key)
            kept.append(line + "\n")
    return done, kept, "".join(kept) != content


@dataclass
class PreparedQuestion:
    """A LLaVA prompt (`prompt`, its `input_ids` with IMAGE_TOKEN_INDEX, `pixels`, `image_size`), or a family
    checkpoint's processor inputs for it (`model_inputs`, a batch of one)."""

    record: dict
    input_ids: torch.Tensor | None
    pixels: torch.Tensor | None
    image_size: tuple[int, int] | None
    model_inputs: dict | None = None
    prompt: str | None = None


class PrefillTimer:
    """Wall time from `start()` to the end of the model's first forward call (the prefill) of a generate."""

    def __init__(self, model, device: torch.device):
        self.device, self.started, self.prefill = device, 0.0, None
        self.hook = model.register_forward_hook(self._after_forward)

    def remove(self) -> None:
        self.hook.remove()

    def start(self) -> None:
        synchronize(self.device)
        self.prefill, self.started = None, time.perf_counter()

    def _after_forward(self, module, args, output) -> None:
        if self.prefill is None:
            synchronize(self.device)
            self.prefill = time.perf_counter() - self.started


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def question_prompt(question: str, conv_mode: str, model_config, has_image: bool) -> str:
    """The conversation's prompt for one question; with an image, its `<image>` tag goes first."""
    if has_image:
        marker = DEFAULT_IMAGE_TOKEN
        if getattr(model_config, "mm_use_im_start_end", False):
            marker = DEFAULT_IM_START_TOKEN + marker + DEFAULT_IM_END_TOKEN
        question = f"{marker}\n{question}"
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def question_image(record: dict):
    """The record's image (a file name under --image-folder, or a decoded image), None without one; a question
    whose text is no string or whose image is neither is a QuestionError."""
    if not isinstance(record.get("text"), str):
        raise QuestionError(f"question {record.get('question_id')}: its 'text' is {type(record.get('text')).__name__}, not a string")
    image = record.get("image")
    if image is not None and not isinstance(image, (str, Image.Image)):
        raise QuestionError(
            f"question {record.get('question_id')}: its 'image' is {type(image).__name__} {image!r:.40}, not a file name"
        )
    return image


def prepare(
    record: dict, args, tokenizer, image_processor, model_config, limits: tuple[int, int] | None = None,
    tagged: bool = False,
) -> PreparedQuestion:
    """`record["image"]`: a path under --image-folder, or an image already decoded (MMBench's base64).
    `limits`: the model's context length and the visual tokens one image takes there (None: not checked).
    `tagged`: the question's text places its image's `<image>` tag itself (lmms-eval's convention)."""
    pixels = size = None
    image = question_image(record)
    if image:
        image = load_image(os.path.join(args.image_folder, image)) if isinstance(image, str) else image.convert("RGB")
        pixels, size = process_images([image], image_processor, model_config)[0], image.size
    prompt = question_prompt(record["text"], args.conv_mode, model_config, pixels is not None and not tagged)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    tags, images = int((input_ids == IMAGE_TOKEN_INDEX).sum()), int(pixels is not None)
    if tags != images:
        raise QuestionError(f"question {record['question_id']}: its prompt holds {tags} <image> tag(s) for {images} image(s)")
    context, visual_tokens = limits or (None, 1)
    length = len(input_ids) + tags * (visual_tokens - 1)
    if context is not None and length > context:
        raise QuestionError(f"question {record['question_id']}: its prompt takes {length} tokens, the model's context {context}")
    return PreparedQuestion(record, input_ids, pixels, size, prompt=prompt)


def prepare_for_family(record: dict, args, processor, context: int) -> PreparedQuestion:
    """The question as one human turn for a family checkpoint's processor (its own chat template)."""
    image = question_image(record)
    images = []
    if image:
        images = [load_image(os.path.join(args.image_folder, image)) if isinstance(image, str) else image.convert("RGB")]
    text = record["text"]
    if images and DEFAULT_IMAGE_TOKEN not in text:
        text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
    try:
        inputs = processor.prompt_inputs([{"from": "human", "value": text}], images)
    except ValueError as error:
        raise QuestionError(f"question {record['question_id']}: {error}") from None
    length = inputs["input_ids"].shape[1]
    if length > context:
        raise QuestionError(f"question {record['question_id']}: its prompt takes {length} tokens, the model's context {context}")
    return PreparedQuestion(record, None, None, None, model_inputs=inputs)


def left_padded(sequences: list[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) batch of 1-D sequences padded on the left with `pad_value`, and its attention mask."""
    width = max(len(sequence) for sequence in sequences)
    batch = torch.full((len(sequences), width), pad_value, dtype=sequences[0].dtype)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, width - len(sequence) :] = sequence
        mask[row, width - len(sequence) :] = 1
    return batch, mask


def generate_inputs(model, tokenizer, prepared: list[PreparedQuestion], processor) -> dict:
    """One left-padded batch: a family processor's collated inputs, or LLaVA's ids, mask, images and sizes."""
    if prepared[0].model_inputs is not None:
        inputs = processor.collate([p.model_inputs for p in prepared], padding_side="left")
        return {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device) for k, v in inputs.items()}
    input_ids, attention_mask = left_padded([p.input_ids for p in prepared], tokenizer.pad_token_id)
    pixels = [p.pixels.to(model.device, model.dtype) for p in prepared if p.pixels is not None]
    # anyres images differ in their number of views: a list then, which the model takes as well
    same_shape = all(p.shape == pixels[0].shape for p in pixels)
    images = (torch.stack(pixels) if same_shape else pixels) if pixels else None
    image_sizes = [p.image_size for p in prepared if p.image_size is not None]
    return {
        "input_ids": input_ids.to(model.device), "attention_mask": attention_mask.to(model.device), "images": images,
        "image_sizes": image_sizes,
    }


def timed_generate(model, inputs: dict, timer: PrefillTimer, **generate_kwargs) -> tuple:
    """(`generate`'s dict output, its wall time in seconds); the timer holds the prefill's."""
    timer.start()
    output = model.generate(**inputs, use_cache=True, return_dict_in_generate=True, **generate_kwargs)
    synchronize(model.device)
    return output, time.perf_counter() - timer.started


def exit_fields(stats, prefill_s: float, total_s: float) -> list[dict]:
    """Per sample of a batch: its prefill's exit statistics and its share of the batch's wall times."""
    # Equivalent visual tokens: the layer average of those entering each layer, the visual budgets' currency.
    text_tokens = stats.num_tokens - stats.num_visual_tokens
    visual_average = (stats.layer_tokens - text_tokens[:, None]).double().mean(dim=1).tolist()
    tflops = (stats.prefill_flops.double() / 1e12).tolist()  # computed on access: once for the batch
    tflops_full = (stats.flops_none.double() / 1e12).tolist()
    # The vision tower's and projector's share, apart (VisionZip changes it; None for family models).
    vision = None if stats.vision_flops is None else (stats.vision_flops.double() / 1e12).tolist()
    exit_layers, pruned = stats.exit_layer.tolist(), stats.pruned_visual_tokens.tolist()
    visual, prompt = stats.num_visual_tokens.tolist(), stats.num_tokens.tolist()
    batch = len(exit_layers)
    return [
        {
            "exit_layer": exit_layers[row],
            "pruned_visual_tokens": pruned[row],
            "tflops": tflops[row],
            "tflops_full": tflops_full[row],
            "vision_tflops": None if vision is None else vision[row],
            "visual_tokens": visual[row],
            "visual_tokens_avg": visual_average[row],
            "prompt_tokens": prompt[row],
            # A batch is timed as a whole: each sample gets its share.
            "prefill_ms": prefill_s * 1e3 / batch,
            "latency_ms": total_s * 1e3 / batch,
            "batch_size": batch,
        }
        for row in range(batch)
    ]


def answer_batch(
    model, tokenizer, prepared: list[PreparedQuestion], args, exit_config, timer: PrefillTimer, processor=None
) -> list[dict]:
    inputs = generate_inputs(model, tokenizer, prepared, processor)
    output, total = timed_generate(
        model, inputs, timer,
        exit_config=exit_config,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    # LLaVA's generate returns the new tokens only, transformers' own classes the prompt too.
    new_tokens = output.sequences if prepared[0].model_inputs is None else output.sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    generated = generated_lengths(new_tokens, tokenizer.eos_token_id)
    fields = exit_fields(output.exit_stats, timer.prefill, total)
    return [
        {
            "question_id": question.record["question_id"],
            "prompt": question.record.get("prompt", question.record["text"]),
            "text": texts[row].strip(),
            "answer_id": shortuuid.uuid(),
            "model_id": args.model_name,
            "metadata": {},
            **fields[row],
            "new_tokens": generated[row],
            **question.record.get("extra", {}),
        }
        for row, question in enumerate(prepared)
    ]


def generated_lengths(new_tokens: torch.Tensor, eos_token_id: int | None) -> list[int]:
    """Tokens each row generated: up to and with its first end token (the rest is padding)."""
    if eos_token_id is None:
        return [new_tokens.shape[1]] * len(new_tokens)
    ended = (new_tokens == eos_token_id).int()
    first = torch.where(ended.any(dim=1), ended.argmax(dim=1) + 1, new_tokens.shape[1])
    return first.tolist()


def error_record(record: dict, error: Exception, model_name: str) -> dict:
    return {
        "question_id": record["question_id"],
        "prompt": record.get("prompt", record.get("text", "")),
        "text": "",
        "answer_id": shortuuid.uuid(),
        "model_id": model_name,
        "metadata": {},
        "error": str(error),
        **record.get("extra", {}),
    }


def resolve_run(args: argparse.Namespace) -> tuple:
    """(exit config, settings) of this run, from the checkpoint's config alone (no weights loaded yet)."""
    args.device_type = resolve_device(args.device).type
    config = read_family_decoder_config(args.model_path)
    if config is not None:
        args.conv_mode, reason = family_template(args)
    else:
        config, _, _ = read_llava_config(args.model_path)
        args.conv_mode, reason = choose_conv_mode(args.conv_mode, config, get_model_name_from_path(args.model_path))
    exit_config = exit_config_from_args(args, config)
    exit_config.check_model(config.num_hidden_layers, bool(getattr(config, "visual_gate_hidden_size", None)))
    logger.info("conversation template %s (%s)", args.conv_mode, reason)
    return exit_config, run_settings(args, exit_config, args.conv_mode)


def family_template(args: argparse.Namespace) -> tuple[str, str]:
    """A family checkpoint prompts with its own chat template; the settings name it by a digest of its text, so
    answers made under another template are not resumed."""
    if args.conv_mode is not None:
        raise ValueError(f"--conv-mode {args.conv_mode}: {args.model_path} prompts with its own chat template")
    template = load_processor(family_checkpoint(args.model_path)).chat_template
    return f"chat_template:{hashlib.sha256(template.encode()).hexdigest()[:12]}", "the checkpoint's own chat template"


def answer_questions(args: argparse.Namespace, questions: list[dict], loaded: tuple | None = None) -> None:
    """Answer `questions` (this chunk's) into --answers-file, skipping those already answered there. `loaded`:
    what `load_pretrained_model` returned for --model-path, for callers running many settings on one model."""
    exit_config, settings = resolve_run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
    with answers_lock(args.answers_file):
        if args.overwrite:
            for path in (args.answers_file, settings_path(args.answers_file)):
                if os.path.isfile(path):
                    os.remove(path)
        done, kept, tidy = resume_answers(args.answers_file)
        check_resumable(args.answers_file, settings, has_answers=bool(done))
        if tidy:
            with open(args.answers_file, "w") as handle:
                handle.writelines(kept)
        write_settings(args.answers_file, settings)
        todo = [q for q in questions if answer_key(q) not in done]
        if not questions:
            open(args.answers_file, "a").close()
            logger.info("%s: no questions in this chunk; wrote an empty answers file", args.answers_file)
        elif not todo:
            logger.info("%s: all %d questions already answered with these settings", args.answers_file, len(questions))
        else:
            errors = answer_into(args, todo, exit_config, loaded)
            report_errors(args.answers_file, errors, len(todo))


def answer_into(args: argparse.Namespace, todo: list[dict], exit_config, loaded: tuple | None = None) -> list[str]:
    """Load the model (unless given), append an answer or error record per question; the error records' reasons."""
    args.model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, context_len = loaded or load_pretrained_model(
        args.model_path, args.model_base, args.model_name, device=args.device
    )
    model.eval()
    timer = PrefillTimer(model, model.device)
    try:
        return answer_batches(args, todo, exit_config, (tokenizer, model, image_processor, context_len), timer)
    finally:
        timer.remove()  # a caller running many settings on one model must not gather one hook per run


def prepare_question(record: dict, args: argparse.Namespace, loaded: tuple) -> PreparedQuestion:
    """One question as the loaded model takes it: LLaVA's template and image processing, or a family's processor."""
    tokenizer, model, processor, context_len = loaded
    if isinstance(processor, FamilyProcessor):
        return prepare_for_family(record, args, processor, context_len)
    return prepare(record, args, tokenizer, processor, model.config, (context_len, model.get_vision_tower().num_patches))


def answer_batches(args: argparse.Namespace, todo: list[dict], exit_config, loaded: tuple, timer: PrefillTimer) -> list[str]:
    """Answer `todo` batch by batch into --answers-file; the error records' reasons."""
    tokenizer, model, image_processor, _ = loaded
    errors = []
    with open(args.answers_file, "a") as out, torch.inference_mode():
        progress = tqdm(total=len(todo), desc=f"answering ({exit_config.label})", unit="q")
        for batch in batches(todo, args.batch_size):
            prepared, records = [], []
            for record in batch:
                try:
                    prepared.append(prepare_question(record, args, loaded))
                except (ImageLoadError, QuestionError) as error:
                    records.append(error_record(record, error, args.model_name))
                    errors.append(str(error))
            if prepared:
                records += answer_batch(model, tokenizer, prepared, args, exit_config, timer, image_processor)
            order = {answer_key(q): i for i, q in enumerate(batch)}
            for record in sorted(records, key=lambda r: order[answer_key(r)]):
                out.write(json.dumps(record) + "\n")
            out.flush()
            progress.update(len(batch))
        progress.close()
    return errors


def report_errors(answers_file: str, errors: list[str], asked: int) -> None:
    """Say how many questions failed and why (the first few); fail the run when none got an answer."""
    if not errors:
        logger.info("%s: %d questions answered", answers_file, asked)
        return
    shown = "".join(f"\n  {reason}" for reason in errors[:SHOWN_ERRORS])
    more = f"\n  ... and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
    message = f"{answers_file}: {len(errors)} of {asked} questions are error records (a rerun asks them again):{shown}{more}"
    if len(errors) == asked:
        raise EvalInputError(f"every question failed. {message}")
    logger.warning("%s", message)


# What the loader's flags give when a command that answers questions takes fewer of them (llava.analysis.compare).
LOADER_DEFAULTS = dict(
    answers_file="answer.jsonl", num_chunks=1, chunk_idx=0, temperature=0.0, top_p=None, num_beams=1,
    max_new_tokens=128, overwrite=False, limit=None, exit_mode=None, exit_layer=None, exit_threshold=None, fastv_k=None,
    fastv_r=None, exit_stages=None, exit_method=None, visual_budget=None, budget_rule=None, visual_tokens=None,
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, its questions and how to batch them: what every command that answers questions takes."""
    parser.add_argument("--model-path", type=str, required=True)
    parser.add_argument("--model-base", type=str, default=None)
    parser.add_argument("--image-folder", type=str, default="")
    parser.add_argument("--question-file", type=str, default="tables/question.jsonl")
    parser.add_argument("--conv-mode", type=str, default=None, help="default: the checkpoint's saved template, else LLaVA's name rule")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """LLaVA's loader arguments (with its defaults), ours and the exit flags; shared by every loader."""
    add_model_arguments(parser)
    parser.add_argument("--answers-file", type=str, default="answer.jsonl")
    parser.add_argument("--num-chunks", type=positive_int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=positive_int, default=1)
    parser.add_argument("--max_new_tokens", type=positive_int, default=128)
    parser.add_argument("--overwrite", action="store_true", help="discard the answers file's answers and start afresh")
    parser.add_argument("--limit", type=positive_int, default=None, help="the first N questions of the file only")
    add_exit_arguments(parser)


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def run_loader(args: argparse.Namespace, read_questions, name: str) -> None:
    """Read (and check) the questions, take this chunk, answer; known input errors end with one line. SIGTERM stops
    it as Ctrl-C does: between answers, the file closed on whole lines and its lock released, so a rerun resumes."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _stop)
    try:
        questions = get_chunk(read_questions(args)[: args.limit], args.num_chunks, args.chunk_idx)
        answer_questions(args, questions)
    except (EvalInputError, CheckpointError, VisionTowerNotFoundError, ValueError) as error:
        sys.exit(f"{name}: error: {error}")
    except KeyboardInterrupt:
        sys.exit(f"{name}: stopped; the answers written so far stay in {args.answers_file}, and a rerun resumes them")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_loader_arguments(parser)
    args = parser.parse_args(argv)
    run_loader(args, lambda a: read_jsonl(a.question_file, ("question_id", "text")), "model_vqa_loader")


if __name__ == "__main__":
    main()
