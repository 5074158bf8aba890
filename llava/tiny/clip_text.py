"""A CLIP text side beside a vision tower: the tower's folder becomes a full CLIP checkpoint (CLIPModel's weights,
`CLIPConfig`, a byte-level `CLIPTokenizerFast`), laid out as openai/clip-vit-large-patch14-336 is, which LLaVA's
tower loads its vision half from and CDPruner its text half. Random here; the tiny world trains its own
(`llava.world.train_text_tower`)."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizerFast, CLIPVisionConfig, CLIPVisionModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llava.model.multimodal_encoder.clip_encoder import one_half_of_clip
from llava.model.multimodal_encoder.clip_text import TextTowerNotFoundError, check_text_tower

TEXT_POSITIONS = 16  # a short row for tests (CLIP's is 77), so that a test question spans several rows


def build_clip_tokenizer(positions: int = TEXT_POSITIONS) -> CLIPTokenizerFast:
    """Every byte as a token, inside a word and ending one (`</w>`), no merges; the two special tokens last, so the
    end-of-text id is the largest, as in CLIP's own vocabulary (its legacy pooling takes the largest id's state)."""
    symbols = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(symbols + [symbol + "</w>" for symbol in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizerFast(vocab=vocab, merges=[], model_max_length=positions)


def full_clip(vision_model: CLIPVisionModel, vocab_size: int, positions: int, seed: int = 0) -> CLIPModel:
    """A CLIPModel whose vision half is `vision_model`, with a random text half as wide, two layers deep, and both
    projections to the vision width."""
    vision = vision_model.config
    text = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=2, num_attention_heads=vision.num_attention_heads, max_position_embeddings=positions,
        # openai's CLIP configs keep the ids from before transformers' eos fix: pooling at the largest id
        bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=vision.hidden_size,
    )
    vision = CLIPVisionConfig(**{**vision.to_dict(), "projection_dim": vision.hidden_size})
    torch.manual_seed(seed)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=vision.hidden_size))
    clip.vision_model.load_state_dict(vision_model.state_dict())
    return clip


def save_full_clip(folder: str, vision_model: CLIPVisionModel, seed: int = 0, text_from: str | None = None) -> None:
    """Write `vision_model` with a text tower and both projections as one CLIP checkpoint in `folder`: the text half of
    the full CLIP folder `text_from` when it is one (a model trained on keeps its tower's text side), else random."""
    try:
        check_text_tower(text_from)
    except TextTowerNotFoundError:
        tokenizer = build_clip_tokenizer()
        clip = full_clip(vision_model, len(tokenizer), TEXT_POSITIONS, seed + 1)
    else:
        tokenizer = CLIPTokenizerFast.from_pretrained(text_from)
        with one_half_of_clip():
            clip = CLIPModel.from_pretrained(text_from)
        clip.vision_model.load_state_dict(vision_model.state_dict())
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
