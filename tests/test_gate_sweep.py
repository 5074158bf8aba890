"""The gate-width report: parameter counts against real modules, decision agreement against the widest run."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava.bench.prefill import PRESETS
from llava.model.visual_exit.gate import build_visual_gates
from llava.world.gate_sweep import gate_parameters, llama_parameters, main


def test_parameter_counts_equal_the_modules():
    config = LlamaConfig(hidden_size=128, num_hidden_layers=8, visual_gate_hidden_size=64)
    assert gate_parameters(128, 64, 8) == sum(p.numel() for p in build_visual_gates(config).parameters())
    geometry = PRESETS["llava-1.5-7b"]
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**geometry, vocab_size=32000, tie_word_embeddings=False))
    assert llama_parameters(geometry["hidden_size"], geometry["intermediate_size"], geometry["num_hidden_layers"],
                            geometry["num_attention_heads"], geometry["num_key_value_heads"]) == \
        sum(p.numel() for p in llama.parameters())
    # The reference's 2048-wide gates on LLaVA-1.5-7B: 537 M parameters, about 8 % of its LM.
    assert gate_parameters(4096, 2048, 32) == 537_001_984


def write_run(root, width, exits, accuracy):
    folder = root / f"width-{width}"
    folder.mkdir(parents=True)
    (folder / "merge.jsonl").write_text("".join(json.dumps({"question_id": str(i), "exit_layer": e}) + "\n"
                                                for i, e in enumerate(exits)))
    (folder / "merge.summary.json").write_text(json.dumps(
        {"accuracy": accuracy, "exit_layer": sum(exits) / len(exits), "flops_reduction": 0.4}))


def test_agreement_is_the_share_of_questions_exiting_where_the_widest_gates_exit(tmp_path):
    write_run(tmp_path / "answers", 2048, [1, 2, 3, 4], 70.0)
    write_run(tmp_path / "answers", 16, [1, 2, 4, 7], 69.0)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 8}))
    main(["--answers-root", str(tmp_path / "answers"), "--model-config", str(tmp_path / "config.json"),
          "--out", str(tmp_path / "out")])
    rows = {row["width"]: row for row in json.loads((tmp_path / "out" / "gate_widths.json").read_text())}
    assert rows[16]["decision_agreement"] == 0.5 and rows[2048]["decision_agreement"] == 1.0
    assert rows[16]["within_one_layer"] == 0.75
    assert rows[16]["share_of_llava-1.5-7b_lm"] == pytest.approx(32 * 16 * 8194 / 6_738_415_616)
    assert "| 16 |" in (tmp_path / "out" / "gate_widths.md").read_text()


def test_a_run_missing_questions_is_an_error(tmp_path):
    write_run(tmp_path, 2048, [1, 2, 3], 70.0)
    write_run(tmp_path, 64, [1, 2], 70.0)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 8}))
    with pytest.raises(ValueError, match="width 64 answered 2 of the widest run's 3 questions"):
        main(["--answers-root", str(tmp_path), "--model-config", str(tmp_path / "config.json")])
