"""DyVTE as an lmms-eval model: `python -m lmms_eval --model dyvte --model_args pretrained=PATH,exit_mode=dynamic,...`.

One class serves every checkpoint `load_pretrained_model` loads: our LLaVA-1.5 layout (prompted with LLaVA's
conversation template) and transformers' own VLM families (their chat template). A question is asked as
`llava.eval.model_vqa_loader` asks it — the same prompt, the same batched `generate` — so a task's answers equal
the loader's for the same settings, alone or in a batch.

`--model_args`: `pretrained` (required), `model_base`, `conv_mode`, `device`, `batch_size`, and every exit flag of
our CLIs under its flag name with underscores: `exit_mode`, `exit_layer`, `exit_threshold`, `fastv_k`, `fastv_r`,
`exit_stages` (quoted, for its commas: `exit_stages="prune:fastv:2:0.5,gates:0.9"`), `exit_method` with
`visual_budget` (and `budget_rule`, `visual_tokens`). Left out, a setting comes from the checkpoint's config. Under `accelerate
launch` each process takes its rank's share of the documents on its own GPU.

Per request, the logged sample's `token_counts` holds, beside lmms-eval's token counts, the exit statistics of
its prefill: `exit_layer`, `pruned_visual_tokens`, `visual_tokens`, `visual_tokens_avg`, `tflops` and
`tflops_full` (LM prefill with the exit and in mode `none`), `vision_tflops`, and `prefill_ms` / `latency_ms` (a
batch's times shared by its samples) — or the `error` that kept it from being asked (its answer is then empty).
The results' `throughput` gains their means (`avg_exit_layer`, `avg_tflops`, ...).

`loglikelihood` (multiple-choice tasks) scores a continuation by generating it, forced token by token, after the
prompt: the exit decides on the prompt alone, as it would when answering. It returns the continuation's negative
log-likelihood, summed over its tokens, since lmms-eval picks the choice with the smallest value.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.answering import Answerer, Decoding, PreparedQuestion, QuestionError, RunSpec, exit_fields
from llava.mm_utils import ImageLoadError, tokenizer_image_token
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint
from llava.model.exit_args import EXIT_FLAGS
from llava.model.llava_processor import LlavaProcessor

logger = logging.getLogger("llava.eval.lmms")

DECODING_KWARGS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")
DEFAULT_MAX_NEW_TOKENS = 128  # LLaVA's loader's; tasks set their own
STATS = (
    "exit_layer", "pruned_visual_tokens", "visual_tokens", "visual_tokens_avg", "tflops", "tflops_full",
    "vision_tflops", "prefill_ms", "latency_ms",
)


_failed = False


def _in_lmms_eval_cli() -> bool:
    """Whether this process is lmms-eval's command line (`python -m lmms_eval`, its console script, or a worker
    of `accelerate launch -m lmms_eval`), not a program importing the model."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name.startswith("lmms_eval")) or os.path.basename(sys.argv[0]).startswith("lmms")


@atexit.register  # registered first, so it runs after every other exit handler (lmms-eval's, accelerate's)
def _exit_nonzero_after_a_failure() -> None:
    """lmms-eval's command line catches every evaluation error, logs it and exits 0; after one of ours (or a run
    in which no question could be asked) the shell gets status 1 instead."""
    if _failed and _in_lmms_eval_cli():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _mark_failed() -> None:
    global _failed
    _failed = True


def exits_nonzero_on_error(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except BaseException:
            _mark_failed()
            raise

    return wrapper


@dataclass
class ExitTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts, with the request's exit statistics (or its error) beside them."""

    exit: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **self.exit}


class ForcedContinuation(LogitsProcessor):
    """Makes `generate` emit each row's continuation, then its end-of-sequence token (the row then stops)."""

    def __init__(self, continuations: list[torch.Tensor], eos_token_id: int):
        self.continuations, self.eos_token_id, self.step = continuations, eos_token_id, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        forced = [int(c[self.step]) if self.step < len(c) else self.eos_token_id for c in self.continuations]
        rows = torch.arange(len(forced), device=scores.device)
        scores = torch.full_like(scores, float("-inf"))
        scores[rows, torch.tensor(forced, device=scores.device)] = 0.0
        self.step += 1
        return scores


def unquoted(value):
    """lmms-eval keeps the quotes that protect a value's commas (`exit_stages="a,b"`)."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


class DyVTE(lmms):
    is_simple = True

    @exits_nonzero_on_error
    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        conv_mode: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it along; a fixed batch size needs none
        video_fps: float | str = 2.0,
        **exit_args,
    ) -> None:
        super().__init__()
        unknown = sorted(set(exit_args) - set(EXIT_FLAGS))
        if unknown:
            known = ", ".join(("pretrained", "model_base", "conv_mode", "device", "batch_size", "video_fps") + EXIT_FLAGS)
            raise ValueError(f"--model_args: dyvte has no {', '.join(unknown)} (it takes {known})")
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto: dyvte takes a number (a batch answers as each sample alone)")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        self.video_fps = float(video_fps)
        if self.video_fps <= 0:
            raise ValueError(f"video_fps must be positive, got {video_fps}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch`: lmms-eval shares the docs out by rank
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device) if device in (None, "cuda") else device
        checkpoint = Checkpoint.resolve(str(pretrained), model_base)
        spec = RunSpec.build(
            checkpoint, conv_mode=unquoted(conv_mode), device=device, batch_size=self.batch_size_per_gpu,
            decoding=Decoding(max_new_tokens=DEFAULT_MAX_NEW_TOKENS),
            **{name: unquoted(exit_args.get(name)) for name in EXIT_FLAGS},
        )
        self.answerer = Answerer(load_model(checkpoint, device=device), spec)
        self.model, self.tokenizer, self.exit_config = self.answerer.model, self.answerer.tokenizer, spec.exit_config
        logger.info("dyvte: %s, exit %s", checkpoint.path, self.exit_config.label)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- requests ------------------------------------------------------------------------------------------------

    @exits_nonzero_on_error
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc=f"dyvte answering ({self.exit_config.label})", disable=self.rank != 0)
        for gen_kwargs, rows in self._batches(requests):
            decoding, until = self._decoding(gen_kwargs, requests[rows[0]])
            indices, prepared = self._askable(requests, rows, results, "", self._prepare)
            if prepared:
                with torch.inference_mode():
                    records = self.answerer.answer(prepared, decoding)
                for index, record in zip(indices, records):
                    text = cut_at(record["text"], until)
                    counts = ExitTokenCounts(
                        input_tokens=record["prompt_tokens"], output_tokens=record["new_tokens"],
                        exit={key: record[key] for key in STATS},
                    )
                    results[index] = GenerationResult(text, counts)
            progress.update(len(rows))
        progress.close()
        self._report(results, "generate_until")
        return results

    @exits_nonzero_on_error
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Each result's `text` is the pair (negative log-likelihood, greedy) lmms-eval scores: a bare pair would
        reach its scoring as a string (lmms-eval 0.7.3 stringifies what is not a GenerationResult)."""
        results: list[GenerationResult | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc=f"dyvte scoring ({self.exit_config.label})", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(requests)))
            # a choice that could not be scored is never chosen
            indices, pairs = self._askable(requests, rows, results, (math.inf, False), self._prepare_with_continuation)
            if pairs:
                with torch.inference_mode():
                    scored = self._score([question for question, _ in pairs], [ids for _, ids in pairs])
                for index, result in zip(indices, scored):
                    results[index] = result
            progress.update(len(rows))
        progress.close()
        self._report(results, "loglikelihood")
        return results

    @exits_nonzero_on_error
    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("dyvte answers single-turn questions; multi-round tasks are not supported")

    # -- helpers -------------------------------------------------------------------------------------------------

    def _batches(self, requests: list[Instance]):
        """(gen_kwargs, request indices) per batch: requests in their order, grouped by their decoding settings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for rows in groups.values():
            for start in range(0, len(rows), self.batch_size):
                yield requests[rows[0]].args[1], rows[start : start + self.batch_size]

    def _askable(self, requests: list[Instance], rows, results: list, unasked, prepare_one) -> tuple[list, list]:
        """(indices, prepared) of the rows whose question can be asked; each other row's result becomes `unasked`
        with the reason in its token counts."""
        indices, prepared = [], []
        for index in rows:
            try:
                prepared.append(prepare_one(requests[index]))
                indices.append(index)
            except (ImageLoadError, QuestionError) as error:
                results[index] = GenerationResult(unasked, ExitTokenCounts(exit={"error": str(error)}))
        return indices, prepared

    def _prepare_with_continuation(self, request: Instance) -> tuple[PreparedQuestion, torch.Tensor]:
        question = self._prepare(request)
        return question, self._continuation(request, question)

    def _decoding(self, gen_kwargs: dict, request: Instance) -> tuple[Decoding, list[str]]:
        """The decoding a task's generation_kwargs ask for, and its stop strings."""
        unsupported = sorted(set(gen_kwargs) - set(DECODING_KWARGS))
        if unsupported:
            raise ValueError(f"task {request.task_name}: dyvte does not support generation_kwargs {', '.join(unsupported)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sampling = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        decoding = Decoding(
            temperature=temperature if sampling else 0.0, top_p=gen_kwargs.get("top_p") if sampling else None,
            num_beams=int(gen_kwargs.get("num_beams") or 1),
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        )
        return decoding, until

    def _prepare(self, request: Instance) -> PreparedQuestion:
        """The request's question as the loader prepares it; the image where its context has the tag, else first. A
        video comes as a folder of its frames (the doc's `fps`, else `video_fps`); a video file is a per-sample
        error (its frames must be extracted first)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        doc = self.task_dict[task][split][doc_id]
        visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
        videos = [v for v in visuals if isinstance(v, str)]
        if len(visuals) > 1 or any(not isinstance(v, (Image.Image, str)) for v in visuals):
            kinds = ", ".join(sorted({type(v).__name__ for v in visuals}))
            raise ValueError(
                f"task {task}, doc {doc_id}: {len(visuals)} visual(s) ({kinds}); dyvte takes one image or one video "
                "(a folder of frames) per question (multi-image inputs are not supported)"
            )
        record = {"question_id": f"{task}/{doc_id}", "text": context}
        if videos and not os.path.isdir(videos[0]):
            raise QuestionError(f"task {task}, doc {doc_id}: video {videos[0]!r} is not a folder of frames; extract "
                                "its frames first (dyvte decodes no video files)")
        if videos:
            record.update(video=videos[0], fps=doc.get("fps", self.video_fps) if isinstance(doc, dict) else self.video_fps)
        elif visuals:
            record["image"] = visuals[0]
        return self.answerer.prepare(record, tagged=DEFAULT_IMAGE_TOKEN in context)

    def _continuation(self, request: Instance, prepared: PreparedQuestion) -> torch.Tensor:
        """The continuation's token ids after the prompt: the prompt and continuation encoded together, less the
        prompt's ids, where those start the whole (the usual tokenizer boundary); else encoded alone."""
        context, continuation, _, doc_id, task, split = request.args
        if not isinstance(continuation, str):
            continuation = continuation(self.task_dict[task][split][doc_id])
        alone = torch.tensor(self.tokenizer(continuation, add_special_tokens=False).input_ids, dtype=torch.long)
        ids = alone
        processor = self.answerer.processor
        if isinstance(processor, LlavaProcessor):  # LLaVA's prompt is text: the continuation is encoded after it
            prompt_ids = prepared.inputs["input_ids"][0]
            has_image = bool(prepared.inputs["images"])
            prompt = processor.render(context, has_image and DEFAULT_IMAGE_TOKEN not in context)
            whole = tokenizer_image_token(prompt + continuation, self.tokenizer, return_tensors="pt")
            if len(whole) > len(prompt_ids) and torch.equal(whole[: len(prompt_ids)], prompt_ids):
                ids = whole[len(prompt_ids) :]
        eos = self.tokenizer.eos_token_id
        if len(ids) == 0 or (eos is not None and bool((ids[:-1] == eos).any())):
            raise ValueError(f"task {task}, doc {doc_id}: continuation {continuation!r} is empty or holds the end token")
        return ids

    def _score(self, prepared: list[PreparedQuestion], continuations: list[torch.Tensor]) -> list[GenerationResult]:
        """(negative log-likelihood, whether greedy decoding gives it) per continuation, by forced generation."""
        forced = ForcedContinuation(continuations, self.tokenizer.eos_token_id)
        output, total = self.answerer.generate(
            self.answerer.batch_inputs(prepared), decoding=Decoding(max_new_tokens=max(len(c) for c in continuations)),
            logits_processor=LogitsProcessorList([forced]), output_logits=True,
        )
        logits = torch.stack(output.logits, dim=1).float()  # (B, steps, V): the raw logits, before any processor
        fields = exit_fields(output.exit_stats, self.answerer.timer.prefill, total)
        results = []
        for row, continuation in enumerate(continuations):
            target = continuation.to(logits.device)
            step_logits = logits[row, : len(target)]
            nll = -step_logits.log_softmax(dim=-1).gather(-1, target[:, None]).sum()
            greedy = bool((step_logits.argmax(dim=-1) == target).all())
            counts = ExitTokenCounts(
                input_tokens=fields[row]["prompt_tokens"], output_tokens=len(target),
                exit={key: fields[row][key] for key in STATS},
            )
            results.append(GenerationResult((float(nll), greedy), counts))
        return results

    def _report(self, results: list[GenerationResult], request_type: str) -> None:
        """lmms-eval's throughput log, with the exit statistics' means; a warning for questions not asked."""
        answered = [r.token_counts.exit for r in results if "error" not in r.token_counts.exit]
        errors = [r.token_counts.exit["error"] for r in results if "error" in r.token_counts.exit]
        if errors:
            logger.warning("%s: %d of %d questions could not be asked (empty answers), e.g. %s", request_type,
                           len(errors), len(results), errors[0])
        if not answered:
            if errors:
                logger.error("%s: not one of %d questions could be asked", request_type, len(results))
                _mark_failed()
            return
        latency = sum(stats["latency_ms"] for stats in answered) / 1e3
        new_tokens = sum(r.token_counts.output_tokens or 0 for r in results)
        means = {
            key: sum(stats[key] for stats in answered) / len(answered)
            for key in STATS
            if all(stats[key] is not None for stats in answered)
        }
        means["flops_reduction"] = 1 - means["tflops"] / means["tflops_full"]
        log_metrics(latency, new_tokens, new_tokens / latency if latency > 0 else 0.0,
                    {"total_requests": len(answered), **means})


def cut_at(text: str, until: list[str]) -> str:
    """The text before the first of the task's stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
