"""Exit settings: saved in the model config, overridable per call and from the CLIs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

EXIT_MODES = ("none", "fixed", "dynamic")


@dataclass(frozen=True)
class ExitConfig:
    """`none`: the stock model. `fixed`: the first `layer` decoder layers process the visual tokens (0 drops them
    before layer 0). `dynamic`: the gates decide; exit after layer i when P(exit) > `threshold`."""

    mode: str = "none"
    layer: int | None = None
    threshold: float = 0.5

    def __post_init__(self):
        if self.mode not in EXIT_MODES:
            raise ValueError(f"unknown exit mode {self.mode!r}; known: {', '.join(EXIT_MODES)}")
        if self.mode == "fixed" and (self.layer is None or self.layer < 0):
            raise ValueError(f"exit mode 'fixed' needs an exit layer >= 0, got {self.layer}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit threshold must lie in [0, 1], got {self.threshold}")

    @classmethod
    def from_model_config(cls, config) -> ExitConfig:
        return cls(
            mode=getattr(config, "exit_mode", None) or "none",
            layer=getattr(config, "exit_layer", None),
            threshold=getattr(config, "exit_threshold", None) or 0.5,
        )

    def with_overrides(self, mode: str | None = None, layer: int | None = None, threshold: float | None = None):
        """This config with the given (non-None) fields replaced, e.g. from CLI flags."""
        changes = {"mode": mode, "layer": layer, "threshold": threshold}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def save_to(self, config) -> None:
        config.exit_mode, config.exit_layer, config.exit_threshold = self.mode, self.layer, self.threshold
