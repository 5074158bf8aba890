"""Chat about an image in the terminal: `python -m llava.serve.cli --model-path DIR --image-file IMG`, on our LLaVA
checkpoints (LLaVA's template) and on every family checkpoint the loader reads (its own chat template)."""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from transformers import TextStreamer

from llava.arguments import positive_int
from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.mm_utils import ImageLoadError, KeywordsStoppingCriteria, load_image, process_images, tokenizer_image_token
from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.exit_args import add_exit_arguments, exit_config_from_args
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError

logger = logging.getLogger("llava.serve.cli")


def image_prompt(question: str, model_config) -> str:
    marker = DEFAULT_IMAGE_TOKEN
    if getattr(model_config, "mm_use_im_start_end", False):
        marker = DEFAULT_IM_START_TOKEN + marker + DEFAULT_IM_END_TOKEN
    return f"{marker}\n{question}"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        chat(argv)
    except (ImageLoadError, CheckpointError, VisionTowerNotFoundError, ValueError) as error:
        sys.exit(f"llava.serve.cli: error: {error}")


class LlavaSession:
    """A chat with our LLaVA class: LLaVA's conversation template, the image as its `<image>` tag's pixels."""

    def __init__(self, loaded, conv_mode: str, image):
        self.tokenizer, self.model, self.conv = loaded.tokenizer, loaded.model, get_conv_template(conv_mode)
        self.roles, self.stop_str = self.conv.roles, self.conv.stop_str
        self.pixels = process_images([image], loaded.image_processor, self.model.config).to(self.model.device, self.model.dtype)
        self.image_sizes = [image.size]

    def inputs(self, question: str) -> tuple[dict, str]:
        """generate's inputs for the next answer, and the prompt they hold."""
        first = not self.conv.messages
        self.conv.append_message(self.roles[0], image_prompt(question, self.model.config) if first else question)
        self.conv.append_message(self.roles[1], None)
        prompt = self.conv.get_prompt()
        ids = tokenizer_image_token(prompt, self.tokenizer, return_tensors="pt").unsqueeze(0).to(self.model.device)
        return {"input_ids": ids, "images": self.pixels, "image_sizes": self.image_sizes}, prompt

    def answered(self, answer: str) -> None:
        self.conv.messages[-1][-1] = answer


class FamilySession:
    """A chat with one of transformers' VLM classes: the checkpoint's own chat template, through its processor."""

    roles = ("USER", "ASSISTANT")

    def __init__(self, loaded, image):
        self.model, self.processor, self.image = loaded.model, loaded.image_processor, image
        self.stop_str = self.processor.family.turn_end
        self.conversation: list[dict] = []

    def inputs(self, question: str) -> tuple[dict, str]:
        first = not self.conversation
        self.conversation.append({"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question}" if first else question})
        inputs = self.processor.prompt_inputs(self.conversation, [self.image])
        inputs = {k: v.to(self.model.device, self.model.dtype) if v.is_floating_point() else v.to(self.model.device)
                  for k, v in inputs.items()}
        return inputs, self.processor.tokenizer.decode(inputs["input_ids"][0])

    def answered(self, answer: str) -> None:
        self.conversation.append({"from": "gpt", "value": answer})


def chat(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's saved template, else LLaVA's name rule")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--debug", action="store_true", help="print prompt, output and exit layer of each turn")
    add_exit_arguments(parser)
    args = parser.parse_args(argv)

    image = load_image(args.image_file)
    checkpoint = Checkpoint.resolve(args.model_path, args.model_base)
    exit_config = exit_config_from_args(args, checkpoint.config)
    checkpoint.check_exit(exit_config)
    template, reason = checkpoint.template(args.conv_mode)
    logger.info("conversation template %s (%s)", template, reason)
    loaded = load_model(checkpoint, device=args.device, load_8bit=args.load_8bit, load_4bit=args.load_4bit)
    session = FamilySession(loaded, image) if checkpoint.is_family else LlavaSession(loaded, template, image)
    tokenizer, model, processor = loaded.tokenizer, loaded.model, loaded.processor(template)

    while True:
        try:
            question = input(f"{session.roles[0]}: ")
        except EOFError:
            question = ""
        if not question:
            print("exit...")
            break
        print(f"{session.roles[1]}: ", end="", flush=True)
        inputs, prompt = session.inputs(question)
        output = model.generate(
            **inputs,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            stopping_criteria=[KeywordsStoppingCriteria([session.stop_str], tokenizer)] if session.stop_str else None,
            pad_token_id=tokenizer.pad_token_id,
            exit_config=exit_config,
            return_dict_in_generate=True,
        )
        answer = tokenizer.decode(processor.new_tokens(output.sequences, inputs)[0], skip_special_tokens=True).strip()
        session.answered(answer)
        if args.debug:
            exit_layer = output.exit_stats.exit_layer.item()
            print({"prompt": prompt, "outputs": answer, "exit_layer": exit_layer}, file=sys.stderr)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
