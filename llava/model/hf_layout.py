"""Translation between the llava-hf layout (transformers' `LlavaForConditionalGeneration`, and
`LlavaNextForConditionalGeneration` for LLaVA-NeXT's anyres) and ours.

Configs: llava-hf nests `text_config`/`vision_config`; ours is a LlamaConfig with LLaVA's `mm_*` keys, the CLIP
config kept as `mm_vision_config` because the tower weights live in the checkpoint. Weights: the key maps below.
LLaVA lists `image_grid_pinpoints` as (width, height), transformers as (height, width).
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaNextConfig as HFLlavaNextConfig

from llava.model.language_model.llava_llama import LlavaConfig

# Checkpoint file names (as llava-hf on the Hub has them and as transformers writes them) → our module names.
HF_CHECKPOINT_TO_LLAVA = {
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^multi_modal_projector\.linear_1\.": "model.mm_projector.0.",
    r"^multi_modal_projector\.linear_2\.": "model.mm_projector.2.",
    r"^vision_tower\.": "model.vision_tower.vision_tower.",
    r"^image_newline$": "model.image_newline",
}

# Our module names → transformers' in-memory `Llava(Next)ForConditionalGeneration` names (same transformers version).
LLAVA_TO_HF_MODULES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),
    ("model.image_newline", "model.image_newline"),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)

_SELECT_FEATURE = {"default": "patch", "full": "cls_patch"}
HF_ARCHITECTURES = {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"}


def is_hf_layout(config_dict: dict) -> bool:
    """llava-hf configs name transformers' class (or, without architectures, nest a text config under a llava
    model_type); original LLaVA ones do neither. Both say model_type "llava", so it cannot tell them apart; and
    other VLMs nest a text config too (Qwen3-VL, Gemma 3), so a text config alone says nothing."""
    architectures = config_dict.get("architectures") or []
    if architectures:
        return bool(HF_ARCHITECTURES & set(architectures))
    return "text_config" in config_dict and config_dict.get("model_type") in ("llava", "llava_next")


def _transposed(pinpoints: list) -> list[list[int]]:
    """(width, height) pinpoints as (height, width) and back."""
    return [[second, first] for first, second in pinpoints]


def llava_config_from_hf(config_dict: dict) -> LlavaConfig:
    """Our config for a llava-hf checkpoint's config.json contents (LLaVA-1.5 or LLaVA-NeXT)."""
    is_next = config_dict.get("model_type") == "llava_next"
    hf_class = HFLlavaNextConfig if is_next else HFLlavaConfig
    hf = hf_class(**{k: v for k, v in config_dict.items() if k != "model_type"})
    if hf.projector_hidden_act != "gelu" or not hf.multimodal_projector_bias:
        raise ValueError(
            f"unsupported llava-hf projector (act={hf.projector_hidden_act}, bias={hf.multimodal_projector_bias}): "
            "only LLaVA-1.5's mlp2x_gelu is mapped"
        )
    if not isinstance(hf.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer {hf.vision_feature_layer} (several layers) is not supported")
    text = hf.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    vision = hf.vision_config.to_dict()
    images = {"image_aspect_ratio": "pad"}
    if is_next:  # transformers' LLaVA-NeXT always merges the tiles spatial_unpad (with image_newline)
        images = {
            "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad",
            "image_grid_pinpoints": _transposed(hf.image_grid_pinpoints),
        }
    return LlavaConfig(
        **text,
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_config=vision,
        mm_hidden_size=vision["hidden_size"],
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf.vision_feature_layer,
        mm_vision_select_feature=_SELECT_FEATURE[hf.vision_feature_select_strategy],
        **images,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_token_index=hf.image_token_index,
    )


def hf_config_from_llava(
    config: LlavaConfig, vision_config: CLIPVisionConfig, image_token_index: int, image_seq_length: int
) -> HFLlavaConfig | HFLlavaNextConfig:
    """transformers' LlavaConfig for our LLaVA-1.5 config, its LlavaNextConfig for an anyres one with the
    `spatial_unpad` merge (mlp2x_gelu projector only)."""
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(f"llava-hf has no {config.mm_projector_type!r} projector; only mlp2x_gelu maps")
    strategy = {v: k for k, v in _SELECT_FEATURE.items()}[config.mm_vision_select_feature]
    text = {k: v for k, v in config.to_dict().items() if not k.startswith(("mm_", "image_", "tokenizer_"))}
    for key in ("model_type", "architectures", "transformers_version", "dtype"):
        text.pop(key, None)
    anyres = getattr(config, "image_aspect_ratio", None) == "anyres"
    if anyres and getattr(config, "mm_patch_merge_type", "flat") != "spatial_unpad":
        raise ValueError(f"llava-hf's LLaVA-NeXT merges anyres tiles spatial_unpad, not {config.mm_patch_merge_type!r}")
    hf_class, extra = HFLlavaConfig, {}
    if anyres:
        hf_class, extra = HFLlavaNextConfig, {"image_grid_pinpoints": _transposed(config.image_grid_pinpoints)}
    return hf_class(
        **extra,
        text_config=LlamaConfig(**text),
        vision_config=vision_config,
        image_token_index=image_token_index,
        image_seq_length=image_seq_length,
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )


def llava_state_dict_to_hf_modules(state_dict: dict) -> dict:
    """Rename our state dict to transformers' in-memory LlavaForConditionalGeneration names."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, theirs in LLAVA_TO_HF_MODULES:
            if key.startswith(ours):
                renamed[theirs + key[len(ours) :]] = value
                break
        else:
            raise KeyError(f"no llava-hf name for {key}")
    return renamed
