"""transformers' own VLM classes under visual exit: one small adapter file per family, each registering itself
with `llava.model.visual_exit.vlm` (which knows no family) and saying how to build a tiny random one. A family whose
class the installed transformers lacks (LLaVA-OneVision-1.5 before 5.25) is left out."""

from llava.model.families import (
    gemma3, internvl, llava_hf, llava_next, llava_onevision, llava_onevision1_5, qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl,
    qwen3_vl_moe,
)

FAMILY_MODULES = {
    name: module
    for name, module in {
        "llava-hf": llava_hf,
        "llava-next": llava_next,
        "llava-onevision": llava_onevision,
        "llava-onevision-1.5": llava_onevision1_5,
        "qwen2-vl": qwen2_vl,
        "qwen2.5-vl": qwen2_5_vl,
        "qwen3-vl": qwen3_vl,
        "qwen3-vl-moe": qwen3_vl_moe,
        "qwen3.5": qwen3_5,
        "internvl": internvl,
        "gemma3": gemma3,
    }.items()
    if module.ADAPTER is not None
}

__all__ = ["FAMILY_MODULES"]
