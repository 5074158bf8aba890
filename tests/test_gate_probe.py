"""`python -m llava.analysis.gate_probe`: its AUC against the pairwise definition, the probe on data whose
separability is known, and the CLI's labels and features against gate training's own pass."""

import csv
import json
import math

import pytest
import torch
from PIL import Image

from llava.analysis.gate_probe import fit_probe, main, roc_auc
from llava.model.builder import load_pretrained_model
from llava.model.visual_exit import exit_decoder_of
from llava.model.visual_exit.training import ExitLabelRule
from llava.train.data import DataCollator, LlavaTurns, SupervisedDataset


def pairwise_auc(scores: list[float], labels: list[int]) -> float:
    pairs = [(p, n) for p, lp in zip(scores, labels) if lp for n, ln in zip(scores, labels) if not ln]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right_ties_half():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=generator).double()  # many ties
    labels = torch.randint(0, 2, (60,), generator=generator)
    assert roc_auc(scores, labels) == pytest.approx(pairwise_auc(scores.tolist(), labels.tolist()))
    assert math.isnan(roc_auc(scores, torch.ones(60)))  # one class only


def test_probe_separates_what_is_separable_and_not_noise():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3000, 10, generator=generator)
    separable = fit_probe(features, (features[:, 3] > 0.8).long(), train=2000)
    assert separable["auc"] > 0.99 and separable["heldout_accuracy"] > 0.97
    assert separable["majority_accuracy"] == pytest.approx((features[2000:, 3] <= 0.8).double().mean().item())
    noise = fit_probe(features, torch.randint(0, 2, (3000,), generator=generator), train=2000)
    assert abs(noise["auc"] - 0.5) < 0.06


@pytest.fixture(scope="module")
def probe_setup(llava_checkpoint, tmp_path_factory):
    from init_weight import main as init_weight

    folder = tmp_path_factory.mktemp("probe")
    records = []
    for i, rgb in enumerate([(220, 20, 20), (20, 200, 20), (20, 20, 220), (200, 200, 20)] * 4):
        Image.new("RGB", (30 + i, 30), rgb).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"Colour {i}."}]})
    (folder / "data.json").write_text(json.dumps(records))
    checkpoint = str(folder / "init")
    init_weight(["--model-path", llava_checkpoint, "--output-dir", checkpoint, "--gate-hidden-size", "8"])
    return checkpoint, folder


def test_cli_reads_the_gates_inputs_and_training_labels(probe_setup, tmp_path, capsys):
    checkpoint, data = probe_setup
    # A ratio threshold inside the spread of the tiny model's ratios, so both labels occur.
    rule = ExitLabelRule(0.0, 1.0)
    main(["--model-path", checkpoint, "--data-path", str(data / "data.json"), "--image-folder", str(data),
          "--output-dir", str(tmp_path), "--layers", "0,1", "--samples", "0", "--held-out", "0.5",
          "--agree-threshold", "0", "--ratio-threshold", "1.0", "--batch-size", "5"])
    rows = list(csv.DictReader(open(tmp_path / "gate_probe.csv")))
    assert [row["layer"] for row in rows] == ["0", "1"] and all(row["samples"] == "16" for row in rows)
    assert "| gate layer |" in capsys.readouterr().out

    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, device="cpu")
    dataset = SupervisedDataset(str(data / "data.json"), LlavaTurns(tokenizer, processor, model.config), image_folder=str(data))
    crop = processor.crop_size
    batch = DataCollator(tokenizer.pad_token_id, (3, crop["height"], crop["width"]))([dataset[i] for i in range(16)])
    for row in rows:
        layer = int(row["layer"])
        with torch.no_grad():
            out = model(**batch, gate_training_layer=layer, exit_label_rule=rule)
        # the features handed out are the gate's own input
        gate = exit_decoder_of(model).visual_gates_router[layer]
        torch.testing.assert_close(gate(out.gate_features), out.gate_logits)
        assert 0 < float(row["safe_share"]) < 1  # both labels occur: the comparison can tell them apart
        assert float(row["safe_share"]) == pytest.approx(out.exit_labels.label.float().mean().item())


def test_layers_outside_the_gates_are_one_line_errors(probe_setup, tmp_path):
    checkpoint, data = probe_setup
    with pytest.raises(SystemExit, match="gates sit after layers"):
        main(["--model-path", checkpoint, "--data-path", str(data / "data.json"), "--image-folder", str(data),
              "--output-dir", str(tmp_path), "--layers", "0,99"])
