"""LLaVA model classes; importing this registers `llava_llama` with transformers' Auto classes, and transformers'
own VLM families with the visual exit (llava.model.families)."""

from llava.model import families  # noqa: F401 (registers the family adapters)
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM"]
