"""Write a LLaVA-1.5 checkpoint in the llava-hf layout, for the tools that load transformers' own class (lmms-eval's
`llava_hf` model, `LlavaForConditionalGeneration.from_pretrained`):
`python -m llava.model.export_hf --model-path checkpoints/tiny-world-llava --out checkpoints/tiny-world-llava-hf`.

The folder holds transformers' `LlavaForConditionalGeneration` with the same weights (`hf_layout`'s key map), the
tokenizer, the tower's image processor and a `LlavaProcessor` config (patch size, feature strategy, the class token
the tower adds), so `AutoProcessor` expands each `<image>` to the model's visual tokens, and a chat template that
writes LLaVA-1.5's `vicuna_v1` prompt, system line included (what lmms-eval's `llava_hf` applies when the tokenizer
has one). LLaVA tokenizes the text after each `<image>` on its own (`tokenizer_image_token`), so it starts with a
word-start marker that a tokenizer reading the whole string would not put there; the template writes a space after
each `<image>` for it, and the processor then gives LLaVA's token ids exactly. Exit gates have no place in the stock
class: a gated checkpoint is refused (export the model it was trained on).
"""

from __future__ import annotations

import argparse
import os

from transformers import LlavaConfig, LlavaProcessor

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import conv_templates
from llava.model.builder import load_pretrained_model
from llava.model.families.llava_hf import processor_settings
from llava.model.families.processing import content_jinja
from llava.tiny.llava import save_hf_layout


def vicuna_chat_template() -> str:
    """LLaVA-1.5's `vicuna_v1` conversation as a chat template: "SYSTEM USER: Q ASSISTANT: A</s>USER: ..." (a system
    message replaces the default line), content as a string or as image and text parts ("<image>\nQ"), each
    `<image>` followed by the space LLaVA's tokenization amounts to (see the module's doc)."""
    conversation = conv_templates["vicuna_v1"]
    user, assistant = conversation.roles
    content = (
        f"{{%- filter replace({DEFAULT_IMAGE_TOKEN!r}, {DEFAULT_IMAGE_TOKEN + ' '!r}) -%}}"
        + content_jinja(DEFAULT_IMAGE_TOKEN, "\n") + "{%- endfilter -%}"
    )
    return (
        "{%- if messages and messages[0].role == 'system' -%}{%- set turns = messages[1:] -%}"
        f"{{{{ messages[0].content + {conversation.sep!r} }}}}"
        f"{{%- else -%}}{{%- set turns = messages -%}}{{{{ {conversation.system + conversation.sep!r} }}}}{{%- endif -%}}"
        "{%- for message in turns -%}"
        f"{{%- if message.role == 'user' -%}}{{{{ '{user}: ' }}}}" + content + f"{{{{ {conversation.sep!r} }}}}"
        f"{{%- else -%}}{{{{ '{assistant}: ' }}}}" + content + f"{{{{ {conversation.sep2!r} }}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ '{assistant}:' }}}}{{%- endif -%}}"
    )


def export_hf(model_path: str, out: str) -> str:
    """`out`, holding `model_path` in the llava-hf layout; ValueError naming the checkpoint when it cannot be."""
    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device="cpu")
    if getattr(model.get_model(), "visual_gates_router", None) is not None:
        raise ValueError(f"{model_path}: has exit gates, which transformers' LlavaForConditionalGeneration does not "
                         "hold; export the checkpoint the gates were trained on")
    if getattr(model.config, "image_aspect_ratio", "pad") not in ("pad", "square"):
        raise ValueError(f"{model_path}: image_aspect_ratio {model.config.image_aspect_ratio!r}: only LLaVA-1.5's "
                         "single-tile checkpoints are exported here")
    tower = model.get_vision_tower().vision_tower
    os.makedirs(out, exist_ok=True)
    save_hf_layout(out, model, tokenizer, image_processor, tower.config)
    tokenizer.chat_template = vicuna_chat_template()  # lmms-eval's llava_hf reads the tokenizer's
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
        **processor_settings(LlavaConfig.from_pretrained(out)),
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="a LLaVA-1.5 checkpoint (original LLaVA layout)")
    parser.add_argument("--out", required=True, help="the llava-hf folder to write")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_path, "config.json")):
        parser.error(f"--model-path {args.model_path}: no checkpoint there (no config.json)")
    try:
        print(export_hf(args.model_path, args.out))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
