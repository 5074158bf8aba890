"""Answer a question file with a LLaVA model: `python -m llava.eval.model_vqa_loader --model-path ... \
--question-file q.jsonl --image-folder imgs --answers-file a.jsonl [--exit-mode dynamic] [--batch-size 8]`.

LLaVA's loader, batched, chunked (`--num-chunks/--chunk-idx`) and resumable: answers are JSON lines written and
flushed one by one, and a rerun skips question ids already answered — only if it asks for the settings that made
them (`a.settings.json` beside the answers; see llava.eval.run_settings; `--overwrite` starts afresh). The answers
and error records are llava.eval.answering's; this module is its command line: the flags become a `RunSpec` here.

The run ends with the count of error records and their first reasons, and fails when every question did. A
malformed question line stops the run before any model work, naming the file and line.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys

from llava.arguments import positive_int
from llava.eval.answering import Answerer, Decoding, RunSpec, answer_file
from llava.eval.io import EvalInputError, read_jsonl
from llava.eval.run_settings import PROMPT_FLAGS
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.exit_args import add_exit_arguments, exit_flags
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError

logger = logging.getLogger("llava.eval")


def get_chunk(items: list, num_chunks: int, index: int) -> list:
    """LLaVA's chunking: contiguous slices of ceil(N / num_chunks)."""
    if not 0 <= index < num_chunks:
        raise ValueError(f"--chunk-idx {index} outside 0..{num_chunks - 1}")
    size = math.ceil(len(items) / num_chunks)
    return items[index * size : (index + 1) * size]


def run_spec(args: argparse.Namespace, checkpoint: Checkpoint | None = None) -> RunSpec:
    """The run these flags ask for, checked against the checkpoint's files (no weights loaded yet)."""
    checkpoint = checkpoint or Checkpoint.resolve(args.model_path, args.model_base)
    decoding = Decoding(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    prompt_flags = {flag: getattr(args, flag) for flag in PROMPT_FLAGS if hasattr(args, flag)}
    return RunSpec.build(
        checkpoint, conv_mode=args.conv_mode, decoding=decoding, device=args.device, image_folder=args.image_folder,
        batch_size=args.batch_size, prompt_flags=prompt_flags, **exit_flags(args),
    )


def answer_questions(args: argparse.Namespace, questions: list[dict]) -> None:
    """Answer `questions` (this chunk's) into --answers-file; the model loads only when some are left to answer."""
    spec = run_spec(args)
    answer_file(spec, questions, args.answers_file, lambda: Answerer(load_model(spec.checkpoint, args.device), spec),
                overwrite=args.overwrite)


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
