"""LLaVA model classes; importing this registers `llava_llama` with transformers' Auto classes."""

from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM"]
