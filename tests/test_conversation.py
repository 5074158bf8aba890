"""Byte-exact prompt checks for llava.conversation against LLAVA_FORMATS.md section 2."""

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
    get_conv_template,
)

QUESTION = "<image>\nWhat is shown?"

SINGLE_TURN_PROMPTS = {
    "vicuna_v1": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT:"
    ),
    "llava_v1": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown? ASSISTANT:"
    ),
    "plain": "<image>\nWhat is shown?\n",
    "llava_llama_2": (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language.\n"
        "<</SYS>>\n\n<image>\nWhat is shown? [/INST]"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is shown? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\n"
    ),
    "llava_v0": (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: <image>\nWhat is shown?###Assistant:"
    ),
}


def one_turn(mode: str, *turns) -> str:
    conv = get_conv_template(mode)
    for role, text in zip(conv.roles * 2, turns):
        conv.append_message(role, text)
    return conv.get_prompt()


@pytest.mark.parametrize("mode", sorted(SINGLE_TURN_PROMPTS))
def test_single_turn_prompt(mode):
    assert one_turn(mode, QUESTION, None) == SINGLE_TURN_PROMPTS[mode]


@pytest.mark.parametrize("alias,target", [("v1", "vicuna_v1"), ("mistral_direct", "chatml_direct"), ("v0_plain", "plain")])
def test_aliases_render_identically(alias, target):
    assert one_turn(alias, QUESTION, None) == SINGLE_TURN_PROMPTS[target]


def test_multi_turn_vicuna_v1():
    assert one_turn("vicuna_v1", QUESTION, "A cat.", "Why?", None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>"
        "USER: Why? ASSISTANT:"
    )


def test_multi_turn_llava_v0_and_llama_2():
    assert one_turn("llava_v0", "Hi", "Hello.", "Bye", None).endswith(
        "###Human: Hi###Assistant: Hello.###Human: Bye###Assistant:"
    )
    assert one_turn("mistral_instruct", "Hi", "Hello.", "Bye", None) == "[INST] Hi [/INST] Hello. </s>[INST] Bye [/INST]"
    assert one_turn("llava_llama_2", "Hi", "Hello.", "Bye", None).endswith(
        "Hi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )


def test_mpt_template():
    assert one_turn("mpt", "Hi", None) == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant gives "
        "helpful and honest answers.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    )


def test_plain_llama_2_system_wrapped():
    prompt = one_turn("llama_2", "Hi", None)
    assert prompt.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer")
    assert "while being safe.  Your answers" in prompt
    assert prompt.endswith("please don't share false information.\n<</SYS>>\n\nHi [/INST]")


@pytest.mark.parametrize(
    "mode,stop",
    [
        ("vicuna_v1", "</s>"),
        ("llava_v1", "</s>"),
        ("v1_mmtag", "</s>"),
        ("llava_v0", "###"),
        ("v0", "###"),
        ("plain", "\n"),
        ("llava_llama_2", "<s>"),
        ("mistral_instruct", ""),
        ("chatml_direct", "<|im_end|>"),
        ("mpt", "<|im_end|>"),
    ],
)
def test_stop_str(mode, stop):
    assert get_conv_template(mode).stop_str == stop


def test_registry_keys_and_default():
    assert set(conv_templates) == {
        "default", "v0", "v1", "vicuna_v1", "llama_2", "mistral_instruct", "chatml_direct", "mistral_direct",
        "plain", "v0_plain", "llava_v0", "v0_mmtag", "llava_v1", "v1_mmtag", "llava_llama_2", "mpt",
    }
    assert default_conversation is conv_templates["vicuna_v1"]
    assert conv_templates["default"] is conv_templates["v0"]
    versions = {k: c.version for k, c in conv_templates.items()}
    assert versions["plain"] == versions["llava_v0"] == versions["v0"] == "Unknown"
    assert versions["llava_v1"] == "v1" and versions["mpt"] == versions["chatml_direct"] == "mpt"
    assert versions["v0_mmtag"] == "v0_mmtag" and versions["v1_mmtag"] == "v1_mmtag"


def test_v0_has_example_exchange():
    v0, llava_v0 = get_conv_template("v0"), get_conv_template("llava_v0")
    assert v0.offset == 2 and len(v0.messages) == 2 and [r for r, _ in v0.messages] == ["Human", "Assistant"]
    assert llava_v0.offset == 0 and llava_v0.messages == []
    v0.append_message("Human", "Hi")
    v0.append_message("Assistant", None)
    prompt = v0.get_prompt()
    assert prompt.startswith(v0.system + "###Human: ")
    assert prompt.count("###Human: ") == 2 and prompt.endswith("###Human: Hi###Assistant:")


def test_mmtag_system_text():
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant is able to understand "
        "the visual content that the user provides, and assist the user with a variety of tasks using natural "
        "language.The visual content will be provided with the following format: <Image>visual content</Image>."
    )
    assert conv_templates["v0_mmtag"].system == expected
    assert conv_templates["v1_mmtag"].system == expected
    assert conv_templates["v1_mmtag"].sep_style is SeparatorStyle.TWO


def test_copy_isolation():
    template = conv_templates["vicuna_v1"]
    before = template.dict()
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "Hi")
    conv2 = conv.copy()
    conv2.append_message("ASSISTANT", "Hello.")
    conv2.messages[0][1] = "changed"
    assert template.dict() == before and template.messages == []
    assert conv.messages == [["USER", "Hi"]]
    v0 = get_conv_template("v0")
    v0.messages[0][1] = "changed"
    assert conv_templates["v0"].messages[0][1] != "changed"


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown conv mode 'foo'; known: .*vicuna_v1") as err:
        get_conv_template("foo")
    assert "\n" not in str(err.value)


def test_plain_filled_assistant_turn_raises():
    with pytest.raises(ValueError):
        one_turn("plain", QUESTION, "A cat.")


def test_dict_view():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("look <image>", "IMG", "Pad"))
    assert conv.dict() == {
        "system": conv.system,
        "roles": ("USER", "ASSISTANT"),
        "messages": [["USER", "look <image>"]],
        "offset": 0,
        "sep": " ",
        "sep2": "</s>",
    }


def test_tuple_message_marker_moved_to_front():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("What is shown? <image>", "IMG", "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == SINGLE_TURN_PROMPTS["llava_v1"]


def test_tuple_message_mmtag():
    conv = get_conv_template("v0_mmtag")
    conv.append_message("Human", ("<image>\nWhat is shown?", "IMG", "Default"))
    conv.append_message("Assistant", None)
    assert conv.get_prompt() == (
        conv.system + "###Human: <Image><image></Image>###Assistant: Received.###Human: What is shown?###Assistant:"
    )


def test_llama_2_requires_user_first():
    conv = Conversation(system="", roles=("USER", "ASSISTANT"), sep_style=SeparatorStyle.LLAMA_2, sep="", sep2="</s>")
    conv.append_message("ASSISTANT", "Hi")
    with pytest.raises(ValueError):
        conv.get_prompt()
