"""transformers' own VLM classes under visual exit: one small adapter file per family, each registering itself
with `llava.model.visual_exit.vlm` (which knows no family) and saying how to build a tiny random one."""

from llava.model.families import internvl, llava_hf, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl, qwen3_vl

FAMILY_MODULES = {
    "llava-hf": llava_hf,
    "llava-next": llava_next,
    "llava-onevision": llava_onevision,
    "qwen2-vl": qwen2_vl,
    "qwen2.5-vl": qwen2_5_vl,
    "qwen3-vl": qwen3_vl,
    "internvl": internvl,
}

__all__ = ["FAMILY_MODULES"]
