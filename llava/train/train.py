"""Train the exit gates of a LLaVA checkpoint, everything else frozen (docs/DESIGN.md §3).

    deepspeed llava/train/train.py --deepspeed scripts/zero2.json --model_name_or_path CKPT --version v1 \
        --data_path DATA.json --image_folder IMAGES --output_dir OUT ...

LLaVA's argument names, plus the gate options of `GateArguments`. Writes the gates-only artifact to OUT
(`visual_gates.safetensors`, loadable with `load_pretrained_model(OUT)` or `load_model(Checkpoint.resolve(OUT))`), and a full checkpoint too with
`--save_full_model True`. `--resume_from_checkpoint True` continues from the latest OUT/checkpoint-*.
Input errors (data, checkpoint, options) end the run with one line on stderr, from the main process only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint

from llava.model.builder import load_model
from llava.model.checkpoint import Checkpoint, CheckpointError
from llava.model.gates_artifact import attach_gates, read_gates_config
from llava.model.multimodal_encoder.clip_encoder import VisionTowerNotFoundError
from llava.model.visual_exit import ExitConfig, ExitRequest, exit_decoder_of
from llava.model.visual_exit.training import ExitLabelRule
from llava.model.families.processing import FamilyProcessor
from llava.train.data import DataError, FamilyTurns, LlavaTurns, SupervisedDataset
from llava.train.trainer import ConfigError, ExitLayerSampler, GateTrainer

INPUT_ERRORS = (CheckpointError, ConfigError, DataError, VisionTowerNotFoundError)
REPLICA_GRACE_S = 30  # how long a non-main process waits for the main one to report a shared input error

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLaVA checkpoint, e.g. the output of init_weight.py"})
    model_base: str | None = field(default=None)
    version: str = field(default="v1", metadata={"help": "conversation template (v1 = vicuna_v1)"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA conversation JSON (list) or JSON lines"})
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str | None = field(default=None, metadata={"help": "default: the checkpoint's ('pad')"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts; images are always lazy"})
    is_multimodal: bool = field(default=True, metadata={"help": "accepted for LLaVA scripts"})


@dataclass
class GateArguments:
    gate_hidden_size: int = field(default=2048, metadata={"help": "width of gates added when the model has none"})
    gate_agree_threshold: float = field(default=0.99, metadata={"help": "label 1 needs answer agreement above this"})
    gate_ratio_threshold: float = field(default=1.03, metadata={"help": "... and loss ratio exit/full below this"})
    exit_layer_sampler: str = field(default="uniform", metadata={"help": "'uniform' or a layer range like '4-20'"})
    save_full_model: bool = field(default=False, metadata={"help": "also save a full checkpoint with the gates"})
    input_reduction: str | None = field(default=None, metadata={
        "help": "a reduction before the LLM (e.g. divprune:0.222, visionzip:108:20, cdpruner:128, downsample:11) the gates learn "
        "after: they decide the exit of what it keeps, and the artifact runs SPEC,gates:τ by default"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "token ids per sample (longer: truncated)"})
    group_by_modality_length: bool = field(default=False)
    remove_unused_columns: bool = field(default=False)
    report_to: str = field(default="none", metadata={"help": "'wandb' to log there too"})
    # LLaVA's scripts pass these transformers 4.x names; 5.x calls them warmup_steps (< 1: a ratio), eval_strategy.
    warmup_ratio: float | None = field(default=None, metadata={"help": "alias of warmup_steps < 1"})
    evaluation_strategy: str | None = field(default=None, metadata={"help": "alias of eval_strategy"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        super().__post_init__()


def build_model(checkpoint: Checkpoint, gate_args: GateArguments, training_args: TrainingArguments):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    tokenizer, model, image_processor, _ = load_model(checkpoint, device="cpu", dtype=dtype).as_tuple()
    if exit_decoder_of(model).visual_gates_router is None:
        attach_gates(model, gate_args.gate_hidden_size, training_args.seed)
    model.requires_grad_(False)
    exit_decoder_of(model).visual_gates_router.requires_grad_(True)
    model.config.use_cache = False
    return tokenizer, model, image_processor


def input_reduction(spec: str | None, checkpoint: Checkpoint) -> ExitConfig | None:
    """`--input_reduction SPEC` as the exit the gates train after: reductions before the LLM only."""
    if spec is None:
        return None
    try:
        reduction = ExitRequest("stages", stages=spec).expand()
        checkpoint.check_exit(reduction)
    except ValueError as error:
        raise ConfigError(f"--input_reduction {spec}: {error}") from None
    others = [type(stage).__name__ for stage in reduction.stages if not stage.reduces_input]
    if others:
        raise ConfigError(f"--input_reduction {spec}: only reductions before the LLM (visionzip, divprune, cdpruner, downsample); "
                          f"{', '.join(others)} acts inside the decoder, where the gates decide")
    return reduction


def training_data(
    data_path: str, image_folder: str | None, tokenizer, image_processor, model_config, conv_version: str = "v1",
    model_max_length: int = 2048, image_aspect_ratio: str | None = None,
):
    """(dataset, collator): LLaVA's prompts (`conv_version`) for our LLaVA class; a family checkpoint's own chat
    template and processor for transformers' VLM classes (where the version means nothing)."""
    if isinstance(image_processor, FamilyProcessor):
        encoder = FamilyTurns(image_processor)
    else:
        if image_aspect_ratio:
            model_config.image_aspect_ratio = image_aspect_ratio
        encoder = LlavaTurns(tokenizer, image_processor, model_config, conv_version)
    return SupervisedDataset(data_path, encoder, image_folder, model_max_length), encoder.collate


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint folder `--resume_from_checkpoint` names. `True` means the latest `checkpoint-*` in
    `output_dir`, as in the HF Trainer; with none there it is an error (as in the Trainer), not a fresh start, so a
    mistyped OUTPUT_DIR never silently trains from scratch."""
    if value is None or value.lower() in ("", "false"):
        return None
    if value.lower() == "true":
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is None:
            raise ConfigError(f"--resume_from_checkpoint True: no checkpoint-* folder in {output_dir} to resume from")
        return latest
    if not os.path.isfile(os.path.join(value, TRAINER_STATE_NAME)):
        raise ConfigError(f"--resume_from_checkpoint {value}: not a checkpoint folder (no {TRAINER_STATE_NAME})")
    return value


def train(argv: list[str] | None = None) -> GateTrainer:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, GateArguments, TrainingArguments))
    model_args, data_args, gate_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Replicas log at --log_level_replica (HF's option, default warning).
    logging.basicConfig(level=logging.INFO if training_args.should_log else training_args.get_process_log_level())
    if not training_args.should_log:
        # A replica's progress bars (weight loading) would run into the main process's lines on the shared stderr.
        transformers.utils.logging.disable_progress_bar()
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if training_args.ddp_find_unused_parameters is None:
        # A step trains one gate (its sampled layer's): under DDP the others have no gradient that step.
        training_args.ddp_find_unused_parameters = True
    artifact = read_gates_config(model_args.model_name_or_path)  # training on from a gates artifact: keep its base
    # Training on from an artifact trained after a reduction goes on after it, unless another is named.
    reduction_spec = gate_args.input_reduction or (artifact or {}).get("input_reduction")
    checkpoint = Checkpoint.resolve(model_args.model_name_or_path, model_args.model_base)
    reduction = input_reduction(reduction_spec, checkpoint)
    tokenizer, model, image_processor = build_model(checkpoint, gate_args, training_args)
    layer_sampler = ExitLayerSampler(exit_decoder_of(model).config.num_hidden_layers, gate_args.exit_layer_sampler)
    dataset, collator = training_data(
        data_args.data_path, data_args.image_folder, tokenizer, image_processor, model.config, model_args.version,
        training_args.model_max_length, data_args.image_aspect_ratio,
    )
    trainer = GateTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        layer_sampler=layer_sampler,
        label_rule=ExitLabelRule(gate_args.gate_agree_threshold, gate_args.gate_ratio_threshold),
        base_model=artifact["base_model"] if artifact else os.path.abspath(model_args.model_name_or_path),
        input_reduction=reduction,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if gate_args.save_full_model and training_args.should_save:
        full = os.path.join(training_args.output_dir, "full_model")
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(full)
        tokenizer.save_pretrained(full)
        image_processor.save_pretrained(full)
    if dataset.skipped or dataset.unreadable_images:
        logger.warning(
            "data: %d samples skipped (%s), %d unreadable images replaced",
            sum(dataset.skipped.values()), dict(dataset.skipped), dataset.unreadable_images,
        )
    return trainer


def main(argv: list[str] | None = None) -> None:
    """The CLI: an input error is one line on stderr, not a traceback repeated by every process."""
    try:
        train(argv)
        # Every process leaves the group before exiting: a process that exits while another still talks to it
        # through gloo ends in std::terminate (seen under load on 2 cores), failing a run that finished.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except INPUT_ERRORS as error:
        if int(os.environ.get("RANK", "0")) == 0:
            sys.exit(f"train.py: error: {error}")
        # Every process meets the same input; the launcher ends this one as soon as the main one has reported it.
        time.sleep(REPLICA_GRACE_S)
        sys.exit(1)


if __name__ == "__main__":
    main()
