"""Chat about an image in the terminal: `python -m llava.serve.cli --model-path DIR --image-file IMG`."""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from transformers import TextStreamer

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import choose_conv_mode, get_conv_template
from llava.mm_utils import (
    ImageLoadError,
    KeywordsStoppingCriteria,
    get_model_name_from_path,
    load_image,
    process_images,
    tokenizer_image_token,
)
from llava.model.builder import CheckpointError, load_pretrained_model
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


def chat(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's saved template, else LLaVA's name rule")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--load-8bit", action="store_true")
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--debug", action="store_true", help="print prompt, output and exit layer of each turn")
    add_exit_arguments(parser)
    args = parser.parse_args(argv)

    model_name = get_model_name_from_path(args.model_path)
    image = load_image(args.image_file)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, model_name, args.load_8bit, args.load_4bit, device=args.device
    )
    conv_mode, reason = choose_conv_mode(args.conv_mode, model.config, model_name)
    logger.info("conversation template %s (%s)", conv_mode, reason)
    conv = get_conv_template(conv_mode)
    exit_config = exit_config_from_args(args, model.config)
    image_tensor = process_images([image], image_processor, model.config).to(model.device, model.dtype)
    image_sizes = [image.size]
    first_turn = True

    while True:
        try:
            question = input(f"{conv.roles[0]}: ")
        except EOFError:
            question = ""
        if not question:
            print("exit...")
            break
        print(f"{conv.roles[1]}: ", end="", flush=True)
        conv.append_message(conv.roles[0], image_prompt(question, model.config) if first_turn else question)
        conv.append_message(conv.roles[1], None)
        first_turn = False
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt").unsqueeze(0).to(model.device)
        output = model.generate(
            input_ids,
            images=image_tensor,
            image_sizes=image_sizes,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            max_new_tokens=args.max_new_tokens,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            stopping_criteria=[KeywordsStoppingCriteria([conv.stop_str], tokenizer)] if conv.stop_str else None,
            pad_token_id=tokenizer.pad_token_id,
            exit_config=exit_config,
            return_dict_in_generate=True,
        )
        answer = tokenizer.decode(output.sequences[0], skip_special_tokens=True).strip()
        conv.messages[-1][-1] = answer
        if args.debug:
            exit_layer = output.exit_stats.exit_layer.item()
            print({"prompt": prompt, "outputs": answer, "exit_layer": exit_layer}, file=sys.stderr)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
