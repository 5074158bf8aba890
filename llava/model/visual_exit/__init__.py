"""Dynamic visual-token exit for any decoder with the Llama layer interface.

Nothing here knows about LLaVA: a model supplies `embed_tokens`, `layers`, `rotary_emb`, `norm`, and per sample
which positions are visual. After any layer, some or all of a sample's visual tokens can leave the hidden states
and every later layer's KV cache. Which, is decided by an ordered list of stages (`stages/`: a fixed layer, the
gates, pruning ranked by a scorer in `scorers/`); one drop mechanism (`tokens.py`) carries every decision out.
"""

from llava.model.visual_exit.cache import StaticExitCache, ValidKeys, VisualExitCache
from llava.model.visual_exit.config import EXIT_MODES, ExitConfig, ExitRequest
from llava.model.visual_exit.decoder import ExitChannel, ExitStats, VisualExitDecoderMixin, VisualExitModelOutput, exit_decoder_of
from llava.model.visual_exit.flops import DecoderGeometry, prefill_flops
from llava.model.visual_exit.gate import VisualGate, gate_feature_weights, gate_features
from llava.model.visual_exit.scorers import SCORERS
from llava.model.visual_exit.stages import STAGES, parse_stages
from llava.model.visual_exit.vlm import FamilyAdapter, enable_visual_exit, register_family, visual_exit_class

__all__ = [
    "EXIT_MODES",
    "SCORERS",
    "STAGES",
    "DecoderGeometry",
    "FamilyAdapter",
    "ExitConfig",
    "ExitRequest",
    "ExitChannel",
    "ExitStats",
    "StaticExitCache",
    "ValidKeys",
    "VisualExitCache",
    "VisualExitDecoderMixin",
    "VisualExitModelOutput",
    "VisualGate",
    "enable_visual_exit",
    "exit_decoder_of",
    "gate_feature_weights",
    "gate_features",
    "parse_stages",
    "prefill_flops",
    "register_family",
    "visual_exit_class",
]
