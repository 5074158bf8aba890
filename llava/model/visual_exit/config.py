"""Exit settings. An `ExitRequest` is how an exit is asked for — a preset mode and its fields, or a stage list — as
the CLIs take it, a checkpoint's config saves it and an answers file records it; `expand` turns it, at the edge,
into the `ExitConfig` the models run: its stages, in order."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

from llava.model.visual_exit.stages import FixedExit, GateExit, Prune, Stage, parse_stages

EXIT_MODES = ("none", "fixed", "dynamic", "fastv", "dynamic+fastv", "stages")
FLAG_NAMES = {
    "layer": "exit-layer", "threshold": "exit-threshold", "fastv_k": "fastv-k", "fastv_r": "fastv-r", "stages": "exit-stages",
}


def _saved(config, name: str, default):
    """A config attribute, `default` only when it is absent or None (a saved 0.0 stays 0.0)."""
    value = getattr(config, name, None)
    return default if value is None else value


@dataclass(frozen=True)
class ExitConfig:
    """The stages of an exit, in the order given: at most one reduction before the LLM (`vision_stage`, e.g.
    VisionZip), which the model that encodes the images runs, and the stages the decoder runs after its layers
    (`decoder_stages`). `request` is what it was expanded from, which names and records it. Built by
    `ExitRequest.expand`."""

    stages: tuple[Stage, ...]
    request: ExitRequest

    @classmethod
    def from_model_config(cls, config) -> ExitConfig:
        """The exit a checkpoint's config saves (none when it saves none)."""
        return ExitRequest.from_model_config(config).expand()

    @property
    def decoder_stages(self) -> tuple[Stage, ...]:
        return tuple(stage for stage in self.stages if not stage.before_llm)

    @property
    def vision_stage(self) -> Stage | None:
        return next((stage for stage in self.stages if stage.before_llm), None)

    @property
    def uses_gates(self) -> bool:
        return any(isinstance(stage, GateExit) for stage in self.stages)

    def check_model(self, num_layers: int, has_gates: bool) -> None:
        """Raise ValueError when a stage cannot run on a model of `num_layers` layers (with gates or not)."""
        for stage in self.stages:
            stage.check(num_layers, has_gates)

    @property
    def label(self) -> str:
        return self.request.label

    def settings(self) -> dict:
        return self.request.settings()


@dataclass(frozen=True)
class ExitRequest:
    """`none`: the stock model. `fixed`: the first `layer` decoder layers process the visual tokens (0 drops them
    before layer 0). `dynamic`: the gates decide; exit after layer i when P(exit) > `threshold`. `fastv` (the
    FastV baseline): after the first `fastv_k` layers keep the top (1 - `fastv_r`) share of each sample's visual
    tokens, ranked by the last prompt token's head-averaged attention in layer `fastv_k` (1-based); `fastv_r` = 1
    drops them all, an exit after `fastv_k`. `dynamic+fastv`: FastV's pruning, and the gates may still take out
    what is left. `stages`: any list of stages (`stages`, e.g. "prune:random:2:0.5,gates:0.9"; llava.model.
    visual_exit.stages); each other mode is a preset of them (`expand`)."""

    mode: str = "none"
    layer: int | None = None
    threshold: float = 0.5
    fastv_k: int | None = None
    fastv_r: float | None = None
    stages: str | None = None

    def __post_init__(self):
        for name in ("layer", "fastv_k"):  # layer counts: 3.0 is 3, 2.5 is no layer at all
            value = getattr(self, name)
            if value is not None:
                whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
                if not whole:
                    raise ValueError(f"--{FLAG_NAMES[name]} counts layers: a whole number, got {value!r}")
                object.__setattr__(self, name, int(value))
        if self.mode not in EXIT_MODES:
            raise ValueError(f"unknown exit mode {self.mode!r}; known: {', '.join(EXIT_MODES)}")
        if self.mode == "fixed" and (self.layer is None or self.layer < 0):
            raise ValueError(f"exit mode 'fixed' needs an exit layer >= 0, got {self.layer}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"exit threshold must lie in [0, 1], got {self.threshold}")
        if self.uses_fastv:
            if self.fastv_k is None or self.fastv_k < 1:
                raise ValueError(f"exit mode {self.mode!r} needs --fastv-k >= 1 (it ranks by that layer's attention), got {self.fastv_k}")
            if self.fastv_r is None or not 0.0 <= self.fastv_r <= 1.0:
                raise ValueError(f"exit mode {self.mode!r} needs a pruning ratio --fastv-r in [0, 1], got {self.fastv_r}")
        if self.mode == "stages" and not self.stages:
            raise ValueError("exit mode 'stages' needs a stage list, e.g. --exit-stages prune:fastv:2:0.5,gates:0.9")
        self.expand()  # a malformed stage list fails here, not in the middle of a run

    @cached_property
    def _expanded(self) -> ExitConfig:
        if self.mode == "stages":
            parts = [part.strip() for part in self.stages.split(",")]
            stages = parse_stages(self.stages)
            found = [part for part, stage in zip(parts, stages) if stage.before_llm]
            if len(found) > 1:
                names = sorted({part.split(":")[0] for part in found})
                what = f"{names[0]} stage" if len(names) == 1 else "reduction before the LLM"
                raise ValueError(f"an exit holds at most one {what} (an image is reduced once, before the LLM), got "
                                 f"{', '.join(found)}")
        elif self.mode == "fixed":
            stages = (FixedExit(self.layer),)
        else:  # dynamic+fastv is gates:τ,prune:fastv:K:R: after layer K a sample whose gate fires exits unpruned.
            gates = (GateExit(self.threshold),) if self.mode in ("dynamic", "dynamic+fastv") else ()
            stages = gates + ((Prune("fastv", self.fastv_k, self.fastv_r),) if self.uses_fastv else ())
        return ExitConfig(stages, self)

    def expand(self) -> ExitConfig:
        """The stages this request runs (parsed once per request: the prefill's callers ask several times)."""
        return self._expanded

    @property
    def uses_fastv(self) -> bool:
        return self.mode in ("fastv", "dynamic+fastv")

    @classmethod
    def from_model_config(cls, config) -> ExitRequest:
        return cls(
            mode=getattr(config, "exit_mode", None) or "none",
            layer=getattr(config, "exit_layer", None),
            threshold=_saved(config, "exit_threshold", 0.5),
            fastv_k=getattr(config, "exit_fastv_k", None),
            fastv_r=getattr(config, "exit_fastv_r", None),
            stages=getattr(config, "exit_stages", None),
        )

    @property
    def used_fields(self) -> tuple[str, ...]:
        """The fields this mode reads; the others are carried along but mean nothing to it."""
        if self.mode == "stages":
            return ("stages",)
        return (
            (("layer",) if self.mode == "fixed" else ())
            + (("threshold",) if self.mode in ("dynamic", "dynamic+fastv") else ())
            + (("fastv_k", "fastv_r") if self.uses_fastv else ())
        )

    def settings(self) -> dict:
        """The mode and the fields it reads: what an answers file records as the exit that produced it."""
        return {"mode": self.mode, **{name: getattr(self, name) for name in self.used_fields}}

    @property
    def label(self) -> str:
        """A folder-friendly name of these settings, e.g. `none`, `fixed-4`, `dynamic-0.9`, `fastv-2-0.5`,
        `dynamic+fastv-0.99-2-0.5` (the run names the quickstart's report reads); a stage list reads
        `prune-fastv-2-0.5+gates-0.9`."""
        if self.mode == "stages":
            return self.stages.replace(" ", "").replace(":", "-").replace(",", "+")
        return "-".join([self.mode] + [f"{getattr(self, name):g}" for name in self.used_fields])

    def with_overrides(
        self,
        mode: str | None = None,
        layer: int | None = None,
        threshold: float | None = None,
        fastv_k: int | None = None,
        fastv_r: float | None = None,
        stages: str | None = None,
    ) -> ExitRequest:
        """This request with the given (non-None) fields replaced, e.g. from CLI flags."""
        changes = {
            "mode": mode, "layer": layer, "threshold": threshold, "fastv_k": fastv_k, "fastv_r": fastv_r, "stages": stages,
        }
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def check_overrides_used(self, **given) -> None:
        """Refuse settings the user gave explicitly (non-None) that this mode would silently ignore."""
        unused = [name for name, value in given.items() if value is not None and name not in self.used_fields]
        if unused:
            flags = ", ".join("--" + FLAG_NAMES[name] for name in unused)
            raise ValueError(f"exit mode {self.mode!r} does not use {flags}")

    def save_to(self, config) -> None:
        config.exit_mode, config.exit_layer, config.exit_threshold = self.mode, self.layer, self.threshold
        config.exit_fastv_k, config.exit_fastv_r, config.exit_stages = self.fastv_k, self.fastv_r, self.stages
