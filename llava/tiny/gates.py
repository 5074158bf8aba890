"""The benches' gate rig: gates that exit after a known layer on any input, so a dynamic exit can be timed without
trained gates."""

from __future__ import annotations

import torch


def rig_gates(decoder) -> None:
    """P(exit) = 0.5 after every layer but layer L/2, where it is > 0.5: tau = 0.5 exits after L/2 layers."""
    for gate in decoder.visual_gates_router:
        torch.nn.init.zeros_(gate.w2.weight)
    firing = decoder.visual_gates_router[dynamic_exit_layer(decoder.config) - 1]
    with torch.no_grad():  # GELU(a) + GELU(-a) > 0 for any a != 0: the exit logit wins
        firing.w1.weight[1] = -firing.w1.weight[0]
        firing.w2.weight[1, :2] = 1.0


def dynamic_exit_layer(config) -> int:
    return max(1, config.num_hidden_layers // 2)
