"""The gate trainer: HF Trainer whose step trains the gate of one sampled layer, logs per-layer gate accuracy and
the real exit ratio, and checkpoints only the gates."""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer

from llava.model.gates_artifact import load_gates, save_gates
from llava.model.visual_exit import ExitConfig, exit_decoder_of
from llava.model.visual_exit.training import ExitLabelRule
from llava.train.sampler import ModalityLengthGroupedSampler

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A training option cannot be used; the message names the option and why."""


class ExitLayerSampler:
    """Which gate a step trains: uniformly over layers `low`..`high` (default: every layer but the last).

    Uses torch's global generator, which the Trainer seeds and restores on resume."""

    def __init__(self, num_layers: int, spec: str = "uniform"):
        last = num_layers - 2
        if spec == "uniform":
            self.low, self.high = 0, last
        else:
            try:
                self.low, self.high = (int(part) for part in spec.split("-"))
            except ValueError:
                raise ConfigError(f"--exit_layer_sampler {spec!r}: expected 'uniform' or a range like '4-20'") from None
        if not 0 <= self.low <= self.high <= last:
            raise ConfigError(f"--exit_layer_sampler {spec!r}: the range must lie within 0-{last} (low <= high)")

    def sample(self) -> int:
        return int(torch.randint(self.low, self.high + 1, ()).item())


class GateTrainer(Trainer):
    def __init__(self, *args, layer_sampler: ExitLayerSampler, label_rule: ExitLabelRule, base_model: str,
                 input_reduction: ExitConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_sampler, self.label_rule, self.base_model = layer_sampler, label_rule, base_model
        self.input_reduction = input_reduction  # the reduction before the LLM the gates learn after, if any
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean: let the Trainer scale it
        # Per layer, since the last log: samples judged, gate predictions right, exits labelled safe, exits predicted.
        self._counts = torch.zeros(exit_decoder_of(self.model).config.num_hidden_layers, 4)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        layer = self.layer_sampler.sample()
        outputs = model(
            **inputs, gate_training_layer=layer, exit_label_rule=self.label_rule, exit_config=self.input_reduction
        )
        judged = outputs.exit_labels
        usable = judged.usable
        predicted = outputs.gate_logits.detach().argmax(dim=-1)
        self._counts[layer] += torch.stack(
            [usable.sum(), (usable & (predicted == judged.label)).sum(), (usable & (judged.label == 1)).sum(),
             (usable & (predicted == 1)).sum()]
        ).float().cpu()
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds, since the last log and over all processes: gate accuracy and label/predicted exit ratio per layer,
        and overall. Every process logs the training loss (a collective), so the counts are summed here too."""
        if "loss" in logs:
            counts = self.accelerator.reduce(self._counts.to(self.args.device), reduction="sum").cpu()
            total = counts.sum(dim=0)
            if total[0] > 0:
                logs["gate_accuracy"] = round((total[1] / total[0]).item(), 4)
                logs["exit_ratio"] = round((total[2] / total[0]).item(), 4)
            for layer, (judged, right, safe, predicted) in enumerate(counts.tolist()):
                if judged > 0:
                    logs[f"gate_accuracy/layer_{layer}"] = round(right / judged, 4)
                    logs[f"exit_ratio/layer_{layer}"] = round(safe / judged, 4)
                    logs[f"predicted_exit_ratio/layer_{layer}"] = round(predicted / judged, 4)
            self._counts.zero_()
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(dataset)
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            self.args.train_batch_size,
            self.args.world_size * self.args.gradient_accumulation_steps,
            self.args.seed,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoints and the final save hold the gates only (plus what the Trainer adds to resume). Under DeepSpeed
        the Trainer calls this on every process; only the main one writes."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        reduction = None if self.input_reduction is None else self.input_reduction.request.stages
        save_gates(model, output_dir, self.base_model, state_dict, input_reduction=reduction)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        logger.info("gates saved to %s", output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_gates(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)
