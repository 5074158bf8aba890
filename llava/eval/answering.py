"""Answering questions, as a library: a `RunSpec` says how a run answers (the exit, the prompt template, the
decoding), an `Answerer` asks a loaded checkpoint, `answer_file` keeps the answers file resumable. The CLIs, the
lmms-eval model, the comparison and the world's evaluation build a RunSpec at their edge and share the rest.

    checkpoint = Checkpoint.resolve("checkpoints/tiny-world-llava-exit")
    spec = RunSpec.build(checkpoint, exit_mode="dynamic", exit_threshold=0.9)
    with Answerer(load_model(checkpoint), spec) as answerer:
        answer_file(answerer, questions, "answers.jsonl")

An answer keeps LLaVA's fields (question_id, prompt, text, answer_id, model_id, metadata) and adds the exit's
statistics: the exit layer, the LM-prefill TFLOPs with exits and without (`tflops_full`), the visual tokens' layer
average, and the wall-clock prefill and generation time. A question that cannot be asked (a missing or unreadable
image, more `<image>` tags than images, a prompt longer than the model's context) gets an error record (`error`)
instead; a rerun asks it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import shortuuid
import torch
from PIL import Image
from tqdm import tqdm

from llava.bench.timing import synchronize
from llava.eval.io import EvalInputError
from llava.eval.run_settings import (
    answers_lock, budget_settings, check_resumable, run_label, settings_path, write_settings,
)
from llava.mm_utils import ImageLoadError, load_image
from llava.model.builder import LoadedModel, resolve_device
from llava.model.checkpoint import Checkpoint
from llava.model.exit_args import exit_config_from_flags
from llava.model.families.processing import Video
from llava.model.visual_exit import ExitConfig, ExitRequest

logger = logging.getLogger("llava.eval")
SHOWN_ERRORS = 3  # error reasons repeated on the console at the end of a run


class QuestionError(ValueError):
    """A question that cannot be asked as given; it becomes that question's error record."""


@dataclass(frozen=True)
class Decoding:
    """How `generate` decodes: greedy unless `temperature` > 0 (LLaVA's loader's fields)."""

    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 128

    def generate_kwargs(self) -> dict:
        sampling = self.temperature > 0
        return dict(do_sample=sampling, temperature=self.temperature if sampling else None, top_p=self.top_p,
                    num_beams=self.num_beams, max_new_tokens=self.max_new_tokens)


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides a run's answers, and how it batches them. `budget`: the method, budget and rule a
    `--exit-method` run expanded from; `prompt_flags`: a benchmark's prompt options (ScienceQA, MMBench)."""

    checkpoint: Checkpoint
    exit_config: ExitConfig
    template: str
    decoding: Decoding = Decoding()
    device: str = "cpu"
    budget: dict | None = None
    prompt_flags: dict = field(default_factory=dict)
    image_folder: str = ""
    batch_size: int = 1

    @classmethod
    def build(
        cls, checkpoint: Checkpoint, *, conv_mode: str | None = None, decoding: Decoding = Decoding(),
        device: str | None = None, image_folder: str = "", batch_size: int = 1, prompt_flags: dict | None = None,
        **exit_flags,
    ) -> RunSpec:
        """The run of these settings on `checkpoint`, checked before any weights load: the exit flags (those of
        llava.model.exit_args, as keywords) on top of the checkpoint's saved exit, the template it prompts with."""
        template, reason = checkpoint.template(conv_mode)
        logger.info("conversation template %s (%s)", template, reason)
        spec = cls(checkpoint, ExitRequest("none").expand(), template, decoding, resolve_device(device).type, None,
                   dict(prompt_flags or {}), image_folder, batch_size)
        return spec.with_exit(**exit_flags)

    def with_exit(self, **exit_flags) -> RunSpec:
        """This run with another exit: the flags on top of the checkpoint's saved exit, checked against it."""
        exit_config = exit_config_from_flags(self.checkpoint.config, **exit_flags)
        self.checkpoint.check_exit(exit_config)
        return dataclasses.replace(self, exit_config=exit_config, budget=budget_settings(exit_flags))

    @property
    def label(self) -> str:
        return run_label(self.exit_config, self.budget)

    def settings(self) -> dict:
        """What an answers file records: everything that changes an answer — not the batch size (a batch answers as
        each sample alone) nor the image folder (a fixed folder only turns error records into answers)."""
        checkpoint = self.checkpoint
        settings = {
            "model_path": os.path.abspath(checkpoint.path),
            "model_base": checkpoint.model_base and os.path.abspath(checkpoint.model_base),
            "exit": self.exit_config.settings(),
            "exit_label": self.label,
            "conv_mode": self.template,
            "decoding": {"temperature": self.decoding.temperature, "top_p": self.decoding.top_p,
                         "num_beams": self.decoding.num_beams, "max_new_tokens": self.decoding.max_new_tokens},
            "device": self.device,
            **self.prompt_flags,
        }
        if self.budget is not None:
            settings["budget"] = dict(self.budget)
        return settings


@dataclass
class PreparedQuestion:
    """A question record and the processor's inputs for it (a batch of one)."""

    record: dict
    inputs: dict


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


class Answerer:
    """Asks `loaded` questions as `spec` says, batch by batch; a context manager (it hooks the model's forward to
    time prefills, and unhooks on leaving)."""

    def __init__(self, loaded: LoadedModel, spec: RunSpec):
        self.loaded, self.spec = loaded, spec
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.processor = loaded.processor(spec.template)
        self.model.eval()
        self.timer = PrefillTimer(self.model, self.model.device)

    def __enter__(self) -> Answerer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.timer.remove()  # a caller running many settings on one model must not gather one hook per run

    def with_spec(self, spec: RunSpec) -> Answerer:
        """This answerer under another run's settings (on the same loaded model), sharing its timer."""
        other = object.__new__(Answerer)
        other.__dict__.update(self.__dict__, spec=spec)
        if spec.template != self.spec.template:
            other.processor = self.loaded.processor(spec.template)
        return other

    def prepare(self, record: dict, tagged: bool = False) -> PreparedQuestion:
        """`record["image"]`: a file name under the spec's image folder, or an image already decoded (MMBench's
        base64, lmms-eval's); `record["video"]`: its pre-extracted frames (see `question_video`). `tagged`: the text
        places its image's `<image>` tag itself. QuestionError (or ImageLoadError) when it cannot be asked."""
        image = question_image(record)
        images = []
        if image:
            if isinstance(image, str):
                images = [load_image(os.path.join(self.spec.image_folder, image))]
            else:
                images = [image.convert("RGB")]
        stage = self.spec.exit_config.vision_stage
        if stage is not None and stage.before_processor:  # the downsampling control's smaller image
            images = [stage.apply(picture) for picture in images]
        video = question_video(record, self.spec.image_folder)
        try:
            inputs = self.processor.question_inputs(record["text"], images, tagged, videos=[video] if video else [])
        except ValueError as error:
            raise QuestionError(f"question {record['question_id']}: {error}") from None
        length, context = self.processor.prompt_length(inputs), self.loaded.context_len
        if length > context:
            raise QuestionError(f"question {record['question_id']}: its prompt takes {length} tokens, the model's context {context}")
        return PreparedQuestion(record, inputs)

    def batch_inputs(self, prepared: list[PreparedQuestion]) -> dict:
        """One left-padded batch on the model's device (floating tensors in its dtype)."""
        batch = self.processor.collate([p.inputs for p in prepared], padding_side="left")
        return {key: to_model(value, self.model) for key, value in batch.items()}

    def generate(self, batch: dict, exit_config: ExitConfig | None = None, decoding: Decoding | None = None,
                 **generate_kwargs) -> tuple:
        """(`generate`'s dict output, its wall time in seconds) for a batch of `batch_inputs`; the timer holds
        the prefill's."""
        decoding = decoding or self.spec.decoding
        kwargs = {**decoding.generate_kwargs(), "pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs}
        self.timer.start()
        output = self.model.generate(**batch, exit_config=exit_config or self.spec.exit_config, use_cache=True,
                                     return_dict_in_generate=True, **kwargs)
        synchronize(self.model.device)
        return output, time.perf_counter() - self.timer.started

    def answer(self, prepared: list[PreparedQuestion], decoding: Decoding | None = None) -> list[dict]:
        """One answer record per question of one batch."""
        batch = self.batch_inputs(prepared)
        output, total = self.generate(batch, decoding=decoding)
        new_tokens = self.processor.new_tokens(output.sequences, batch)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        generated = generated_lengths(new_tokens, self.tokenizer.eos_token_id)
        fields = exit_fields(output.exit_stats, self.timer.prefill, total)
        return [
            {
                "question_id": question.record["question_id"],
                "prompt": question.record.get("prompt", question.record["text"]),
                "text": texts[row].strip(),
                "answer_id": shortuuid.uuid(),
                "model_id": self.spec.checkpoint.name,
                "metadata": {},
                **fields[row],
                "new_tokens": generated[row],
                **question.record.get("extra", {}),
            }
            for row, question in enumerate(prepared)
        ]

    def answer_all(self, records: list[dict]) -> Iterator[list[dict]]:
        """The answer or error records of each batch of `records`, in their order, with a progress bar."""
        progress = tqdm(total=len(records), desc=f"answering ({self.spec.exit_config.label})", unit="q")
        for start in range(0, len(records), self.spec.batch_size):
            batch = records[start : start + self.spec.batch_size]
            prepared, done = [], []
            for record in batch:
                try:
                    prepared.append(self.prepare(record))
                except (ImageLoadError, QuestionError) as error:
                    done.append(error_record(record, error, self.spec.checkpoint.name))
            if prepared:
                with torch.inference_mode():
                    done += self.answer(prepared)
            order = {answer_key(record): index for index, record in enumerate(batch)}
            yield sorted(done, key=lambda r: order[answer_key(r)])
            progress.update(len(batch))
        progress.close()


def to_model(value, model):
    """A batch value on the model's device, floating tensors (one or a list) in its dtype."""
    if isinstance(value, list):
        return [to_model(item, model) for item in value]
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)


def question_image(record: dict):
    """The record's image (a file name, or a decoded image), None without one; a question whose text is no string
    or whose image is neither is a QuestionError."""
    if not isinstance(record.get("text"), str):
        raise QuestionError(f"question {record.get('question_id')}: its 'text' is {type(record.get('text')).__name__}, not a string")
    image = record.get("image")
    if image is not None and not isinstance(image, (str, Image.Image)):
        raise QuestionError(
            f"question {record.get('question_id')}: its 'image' is {type(image).__name__} {image!r:.40}, not a file name"
        )
    return image


def question_video(record: dict, folder: str | None) -> Video | None:
    """The record's video, None without one: `record["video"]` names a folder of frames (their files in name
    order) or lists frame files, under `folder` (if any); `record["fps"]` (default 2) is the rate they were sampled
    at."""
    entry = record.get("video")
    if entry is None:
        return None
    folder = folder or ""
    question = record.get("question_id")
    if isinstance(entry, str) and os.path.isdir(os.path.join(folder, entry)):
        entry = [os.path.join(entry, name) for name in sorted(os.listdir(os.path.join(folder, entry)))]
    if not isinstance(entry, list) or not entry or not all(isinstance(name, str) for name in entry):
        raise QuestionError(f"question {question}: its 'video' {entry!r:.60} is neither a folder of frames nor a list of frame files")
    fps = record.get("fps", 2.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise QuestionError(f"question {question}: its 'fps' {fps!r} is not a positive number")
    return Video([load_image(os.path.join(folder, name)) for name in entry], float(fps))


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


def answer_file(spec: RunSpec, questions: list[dict], answers_file: str, answerer, overwrite: bool = False) -> None:
    """Answer `questions` into `answers_file` with `spec`'s settings, skipping those already answered there (only
    if the file's settings are the same; `overwrite` starts afresh). `answerer`: an Answerer of the loaded
    checkpoint, or a function that makes one when there is work to do (the model loads only then, and the
    answerer is closed after)."""
    settings = spec.settings()
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with answers_lock(answers_file):
        if overwrite:
            for path in (answers_file, settings_path(answers_file)):
                if os.path.isfile(path):
                    os.remove(path)
        done, kept, tidy = resume_answers(answers_file)
        check_resumable(answers_file, settings, has_answers=bool(done))
        if tidy:
            with open(answers_file, "w") as handle:
                handle.writelines(kept)
        write_settings(answers_file, settings)
        todo = [q for q in questions if answer_key(q) not in done]
        if not questions:
            open(answers_file, "a").close()
            logger.info("%s: no questions in this chunk; wrote an empty answers file", answers_file)
            return
        if not todo:
            logger.info("%s: all %d questions already answered with these settings", answers_file, len(questions))
            return
        made = not isinstance(answerer, Answerer)
        answerer = answerer() if made else answerer
        errors = []
        try:
            with open(answers_file, "a") as out:
                for records in answerer.with_spec(spec).answer_all(todo):
                    errors += [record["error"] for record in records if "error" in record]
                    out.writelines(json.dumps(record) + "\n" for record in records)
                    out.flush()
        finally:
            if made:
                answerer.close()
        report_errors(answers_file, errors, len(todo))


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
