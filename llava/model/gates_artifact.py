"""Gates on their own: attach fresh gates to a model, and save/load the small gates-only artifact
(`visual_gates.safetensors` + `visual_gates.json` naming the base checkpoint they belong to)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from llava.model.visual_exit.decoder import exit_decoder_of
from llava.model.visual_exit.gate import build_visual_gates, init_gate_weights

GATES_WEIGHTS = "visual_gates.safetensors"
GATES_CONFIG = "visual_gates.json"
GATES_PREFIX = "model.visual_gates_router."


def attach_gates(model, gate_hidden_size: int, seed: int = 0) -> None:
    """Give `model` freshly initialised gates of width `gate_hidden_size`, in its dtype and on its device."""
    decoder = exit_decoder_of(model)
    decoder.config.visual_gate_hidden_size = gate_hidden_size
    torch.manual_seed(seed)
    gates = build_visual_gates(decoder.config)
    init_gate_weights(gates)
    decoder.visual_gates_router = gates.to(device=model.device, dtype=model.dtype)


def gate_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gates of a model's state dict under the artifact's names (`model.visual_gates_router.*`, our LLaVA's),
    wherever the model keeps them (a family's are inside its language model)."""
    marker = GATES_PREFIX.removeprefix("model.")
    return {GATES_PREFIX + name.split(marker, 1)[1]: tensor for name, tensor in state_dict.items() if marker in name}


def save_gates(model, output_dir: str, base_model: str, state_dict: dict | None = None,
               input_reduction: str | None = None) -> None:
    """Write the gates-only artifact; `base_model` is the checkpoint whose LLM the gates were trained for,
    `input_reduction` the stage spec of the reduction before the LLM they were trained after (None: none)."""
    os.makedirs(output_dir, exist_ok=True)
    gates = gate_state_dict(state_dict if state_dict is not None else model.state_dict())
    if not gates:
        raise ValueError("the model has no gates to save")
    save_file({k: v.detach().contiguous().cpu() for k, v in gates.items()}, os.path.join(output_dir, GATES_WEIGHTS))
    config = exit_decoder_of(model).config
    info = {
        "base_model": base_model,
        "visual_gate_hidden_size": config.visual_gate_hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        **({"input_reduction": input_reduction} if input_reduction else {}),
    }
    with open(os.path.join(output_dir, GATES_CONFIG), "w") as handle:
        json.dump(info, handle, indent=2)


def read_gates_config(path: str) -> dict | None:
    """The artifact's description, or None when `path` holds no gates-only artifact."""
    config_path = os.path.join(path, GATES_CONFIG)
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as handle:
        return json.load(handle)


def load_gates(model, path: str) -> None:
    """Load the artifact's gate weights into `model`, which must already have gates of the same shape."""
    weights = load_file(os.path.join(path, GATES_WEIGHTS), device=str(model.device))
    gates = exit_decoder_of(model).visual_gates_router
    if gates is None:
        raise ValueError(f"{path}: the model has no gates to load these weights into")
    gates.load_state_dict({k[len(GATES_PREFIX) :]: v for k, v in weights.items()}, strict=True)
