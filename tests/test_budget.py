"""One visual budget for every method: the stage specs it maps to reach that layer-average of visual tokens, at
LLaVA-1.5-7B's geometry (the papers' settings) and, measured from `exit_stats.layer_tokens`, on the tiny model."""

import argparse
import math

import pytest
import torch

from llava.model.exit_args import exit_config_from_args, visual_tokens_per_image
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.stages import method_stages

from test_fastv import run
from test_visual_exit import PROMPTS, batch_inputs, images_for


@pytest.mark.parametrize("rule", ["paper", "equal"])
@pytest.mark.parametrize("budget, fastv_kept, pdrop_ratio, visionzip", [
    (192, 166, 0.56, (162, 30)), (128, 98, 0.42, (108, 20)), (64, 30, 0.19, (54, 10)),
])
def test_llava_7b_settings_where_the_rules_agree(budget, fastv_kept, pdrop_ratio, visionzip, rule):
    """FastV's kept count (SparseVLM's equivalent-token rule), PyramidDrop's λ on [2, 8, 16] (its authors' advice
    for these budgets) and VisionZip's published dominant + contextual splits, under both rules."""
    _, _, k, ratio = method_stages("fastv", budget, 32, 576, rule).split(":")
    assert int(k) == 2 and round(576 * (1 - float(ratio))) == fastv_kept
    _, layers, lam = method_stages("pdrop", budget, 32, 576, rule).split(":")
    assert layers == "2-8-16" and abs(float(lam) - pdrop_ratio) < 0.01
    counts = [576] * 2 + [math.floor(576 * float(lam))] * 6 + [math.floor(576 * float(lam) ** 2)] * 8
    counts += [math.floor(576 * float(lam) ** 3)] * 16
    assert abs(sum(counts) / 32 - budget) < 1
    assert method_stages("visionzip", budget, 32, 576, rule) == f"visionzip:{visionzip[0]}:{visionzip[1]}"


@pytest.mark.parametrize("budget, sparsevlm, dart", [
    (192, "300-200-110", 192), (128, "303-110-36", 128), (96, "238-48-26", 96), (64, "66-30-17", 64),
])
def test_llava_7b_paper_settings_are_the_published_ones(budget, sparsevlm, dart):
    """SparseVLM v1.5's score.py counts and DART's M = T (BASELINES.md §10.5)."""
    assert method_stages("sparsevlm", budget, 32, 576, "paper") == f"sparsevlm:2-6-15:{sparsevlm}"
    assert method_stages("dart", budget, 32, 576, "paper") == f"dart:2:{dart}"


def test_llava_7b_equal_settings_average_the_budget_with_recycled_tokens():
    """Under `equal`, SparseVLM's counts are solved with its merged tokens counted (⌊(⌊0.3·n_drop⌋+1)/10⌋ + 1 after
    each pruning layer): the schedule re-counted here by hand averages the budget within a token; DART's M from the
    average of M + 4 kept after layer 2."""
    for budget in (192, 128, 64):
        counts = [int(c) for c in method_stages("sparsevlm", budget, 32, 576, "equal").split(":")[2].split("-")]
        current, entering = 576, [576] * 3
        for layer, count in zip((2, 6, 15), counts):
            kept = min(count, current - 1)
            dropped = current - kept
            current = kept + ((int(0.3 * dropped) + 1) // 10 + 1 if dropped else 0)
            entering += [current] * ({2: 4, 6: 9, 15: 16}[layer])
        assert len(entering) == 32 and abs(sum(entering) / 32 - budget) <= 1, (budget, counts)
    assert method_stages("dart", 128, 32, 576, "equal") == "dart:2:88"  # (2·576 + 30·(88 + 4)) / 32 = 122.25


def test_paper_budgets_are_carried_to_another_model():
    """On 196 tokens and 8 layers, the papers' 64-token setting keeps the same share of the image at the same depth."""
    assert method_stages("sparsevlm", 64, 8, 196, "paper") == "sparsevlm:1-2-4:22-10-6"  # 66·196/576 = 22.5 → 22
    assert method_stages("visionzip", 64, 8, 196, "paper") == "visionzip:19:3"  # 64·196/576 = 21.8 → 22, split 54 : 10
    with pytest.raises(ValueError, match=r"sparsevlm at 100 tokens \(paper rule, 34 of this model's 196\): SparseVLM published"):
        method_stages("sparsevlm", 100, 8, 196, "paper")


def test_out_of_reach_budgets_are_refused():
    with pytest.raises(ValueError, match="outside"):
        method_stages("fastv", 600, 32, 576)
    with pytest.raises(ValueError, match=r"fastv at 20 tokens \(paper rule, 20 of this model.s 576\): its first 2 layers, which see every token, alone average 36.0: it reaches \[36.0, 576\]"):
        method_stages("fastv", 20, 32, 576)
    with pytest.raises(ValueError, match="unknown method"):
        method_stages("fancy", 64, 32, 576)


def visual_average(stats) -> torch.Tensor:
    """Per sample, the layer average of the visual tokens that entered each layer (text never leaves)."""
    text = stats.num_tokens - stats.num_visual_tokens
    return (stats.layer_tokens - text[:, None]).double().mean(dim=1)


@pytest.mark.parametrize("method", ["fastv", "random", "pdrop", "fixed", "dart", "visionzip", "sparsevlm", "divprune"])
def test_measured_average_meets_the_budget_on_the_tiny_model(loaded, images, method):
    tokenizer, model, _, _ = loaded
    n, layers = visual_tokens_per_image(model.config), model.config.num_hidden_layers
    prompts = PROMPTS[:1]
    ids, mask = batch_inputs(tokenizer, prompts)
    # SparseVLM's first pruning layer still sees every token, so its reach on 4 layers starts higher.
    budgets = {"sparsevlm": (n * 3 / 4, n * 5 / 8), "fixed": (n / 2, n / 4)}.get(method, (n / 2, n / 4 + 2))
    for budget in budgets:
        stats = run(model, ids, mask, images_for(images, prompts), ExitRequest("stages", stages=method_stages(method, budget, layers, n, "equal")).expand()).exit_stats
        # The finest step of each setting: a layer for an exit, 8 tokens per pivot round for DART (over the layers
        # after K), a token for the others; the average lands within one step of the budget.
        step = {"fixed": 0.0, "dart": 8 * (layers - 1) / layers}.get(method, 1.0)
        assert abs(float(visual_average(stats)[0]) - budget) <= step, (method, budget)


def test_fixed_meets_a_budget_exactly_or_names_the_nearest():
    """An exit after K of 32 layers averages K × 18 of 576 tokens: 64 is none of them (it ran 72 as "64")."""
    assert method_stages("fixed", 72, 32, 576) == "fixed:4"
    with pytest.raises(ValueError) as refused:
        method_stages("fixed", 64, 32, 576)
    assert str(refused.value) == ("fixed at 64 tokens (paper rule, 64 of this model's 576): an exit after K layers "
                                  "averages K × 18; the nearest are 54 (K = 3) and 72 (K = 4): ask for one, or --exit-layer K")


def test_visual_tokens_must_be_the_checkpoints(loaded):
    _, model, _, _ = loaded
    n = visual_tokens_per_image(model.config)
    flags = dict(exit_mode=None, exit_layer=None, exit_threshold=None, fastv_k=None, fastv_r=None, exit_stages=None,
                 exit_method="fastv", visual_budget=8.0, budget_rule="equal")
    for given, message in ((n + 4, f"this checkpoint's images take {n} visual tokens each"), (0, "at least one")):
        with pytest.raises(ValueError, match=message):
            exit_config_from_args(argparse.Namespace(**flags, visual_tokens=given), model.config)
    assert exit_config_from_args(argparse.Namespace(**flags, visual_tokens=n), model.config).request.mode == "stages"


def test_cli_flags_map_a_budget_and_refuse_mixtures(loaded):
    _, model, _, _ = loaded
    flags = dict(exit_mode=None, exit_layer=None, exit_threshold=None, fastv_k=None, fastv_r=None, exit_stages=None,
                 exit_method="pdrop", visual_budget=8.0, visual_tokens=None, budget_rule="equal")
    config = exit_config_from_args(argparse.Namespace(**flags), model.config)
    assert config.request.mode == "stages"
    assert config.request.stages == method_stages("pdrop", 8.0, 4, visual_tokens_per_image(model.config), "equal")
    paper = exit_config_from_args(argparse.Namespace(**{**flags, "budget_rule": None, "visual_budget": 192.0}), model.config)
    assert paper.request.stages == method_stages("pdrop", 192.0, 4, visual_tokens_per_image(model.config), "paper")  # the default
    with pytest.raises(ValueError, match="go together"):
        exit_config_from_args(argparse.Namespace(**{**flags, "exit_method": None, "visual_budget": None}), model.config)
    with pytest.raises(ValueError, match="go together"):
        exit_config_from_args(argparse.Namespace(**{**flags, "exit_mode": "fastv"}), model.config)
    with pytest.raises(ValueError, match="go together"):
        exit_config_from_args(argparse.Namespace(**{**flags, "visual_budget": None}), model.config)
