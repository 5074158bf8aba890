"""Drops decided on the device (the gates', a fixed exit's) reach the host late on a GPU: the layers after run with
the leaving tokens masked, and they are compacted once their size arrives (`PendingDrop`). On a CPU the size is
there at once, so the late path is forced here by holding the size back for a number of polls: prefill, caches and
generation must equal the compacting path's (logits 1e-5, exit statistics, ids), for any lag."""

import pytest
import torch

from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.stages.gates import GateExit
from llava.model.visual_exit.tokens import PendingDrop, TokenLayout

from batching import attention_implementation, padded_batch
from families import FAMILIES, HYBRID, TEXT, Sample, batch, exit_model, stock_model
from test_families import SIZES, sample_dependent_gates
from test_generation import PROMPTS

SPECS = ["gates:0.5", "fixed:1", "fixed:3", "gates:0.5,fixed:3"]
LAGS = [1, 2, 100]  # polls before the size arrives; 100: never within the prefill


@pytest.fixture
def lagging(monkeypatch):
    """Set `lag[0]` to hold every drop's size back for that many polls; counts the layers run on a masked layout."""
    lag, masked = [0], []
    ready = PendingDrop.ready
    mask = TokenLayout.masked

    def late_ready(self):
        self.polls = getattr(self, "polls", 0) + 1
        return self.polls > lag[0] and ready(self)

    def counted_mask(self, drop):
        masked.append(drop)
        return mask(self, drop)

    monkeypatch.setattr(PendingDrop, "ready", late_ready)
    monkeypatch.setattr(TokenLayout, "masked", counted_mask)
    return lag, masked


def run(model, ids, mask, images, spec, **kwargs):
    config = ExitRequest("stages", stages=spec).expand()
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, images=images, exit_config=config)
        generated = model.generate(ids, attention_mask=mask, images=images, exit_config=config, max_new_tokens=4,
                                   min_new_tokens=4, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                                   **kwargs)
    return prefill, generated


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("lag", LAGS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_late_drop_computes_what_an_immediate_one_does(loaded, images, random_gates, lagging, spec, lag, cache):
    lag_setting, masked = lagging
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with attention_implementation(random_gates, "eager"):
        prefill, generated = run(random_gates, ids, mask, images, spec, **kwargs)
        lag_setting[0] = lag
        late_prefill, late_generated = run(random_gates, ids, mask, images, spec, **kwargs)
    assert masked, "the late path never ran"
    valid = late_prefill.logits.abs().sum(-1) > 0  # restored slots: real tokens (dropped ones are zeros in both)
    assert torch.equal(valid, prefill.logits.abs().sum(-1) > 0)
    assert (late_prefill.logits - prefill.logits)[valid].abs().max() <= 1e-5
    for name in ("exit_layer", "layer_tokens", "gate_evaluations", "prefill_flops"):
        assert getattr(late_prefill.exit_stats, name).tolist() == getattr(prefill.exit_stats, name).tolist(), name
    assert torch.equal(late_generated.sequences, generated.sequences)
    for a, b in zip(late_generated.logits, generated.logits):
        assert (a - b).abs().max() <= 1e-5


def test_the_gates_read_nothing_back_per_layer(loaded, images, random_gates, monkeypatch):
    """Inside the gate stage no tensor reaches the host (no tolist, item or truth value): its decision is read only
    by the decoder, through its PendingDrop, once per gated layer."""
    inside, reads, polls = [False], [], []
    for name in ("tolist", "item", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (
            reads.append(_n) if inside[0] else None) or _o(self, *a))
    after_layer = GateExit.after_layer

    def watched(self, *args):
        inside[0] = True
        try:
            return after_layer(self, *args)
        finally:
            inside[0] = False

    read = PendingDrop.read
    monkeypatch.setattr(GateExit, "after_layer", watched)
    monkeypatch.setattr(PendingDrop, "read", lambda self: polls.append(1) or read(self))
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    with torch.no_grad():
        out = random_gates(input_ids=ids, attention_mask=mask, images=images,
                           exit_config=ExitRequest("stages", stages="gates:0.5").expand())
    assert reads == []
    assert len(polls) == random_gates.config.num_hidden_layers - 1  # the gate after the last layer never runs
    assert out.exit_stats.exit_layer.tolist()[:2] == [1, 4]  # and they did decide


def test_the_summary_a_gpu_sends_is_what_the_compaction_reads(loaded, images, random_gates):
    """The (4,) summary that travels to the host on a GPU: anything dropped, the longest and shortest sample after the
    drop (what `TokenLayout.drop` would read itself), any sample still active."""
    ids, mask = padded_batch(loaded[0], [prompt for prompt, _ in PROMPTS])
    with torch.no_grad():
        mm = random_gates.prepare_inputs_labels_for_multimodal(ids, mask, None, images, None, padding_side="left")
    decoder = random_gates.get_model()
    _, layout = decoder.start_prefill(mm.inputs_embeds, mm.attention_mask, mm.position_ids, mm.visual_mask, False)
    drop = layout.visual & torch.tensor([True, False, False])[:, None]  # the first sample's image leaves
    active = torch.tensor([False, True, False])
    dropped, longest, shortest, any_active = PendingDrop.summarize(drop, layout, active).tolist()
    _, compacted = layout.drop(mm.inputs_embeds, drop)
    counts = compacted.valid_keys.valid.sum(dim=1)
    assert (dropped, longest, shortest, any_active) == (1, counts.max().item(), counts.min().item(), 1)
    assert compacted.valid_keys.valid.shape[1] == longest
    nothing = PendingDrop.summarize(torch.zeros_like(drop), layout, torch.zeros_like(active)).tolist()
    assert nothing[0] == 0 and nothing[3] == 0


@pytest.fixture(scope="module", params=[name for name in FAMILIES if name not in HYBRID])
def family(request):
    stock = stock_model(request.param)
    model = exit_model(stock)
    return request.param, stock, model


def test_a_late_drop_on_every_family(family, lagging):
    """M-RoPE positions, Gemma 3's bidirectional image blocks and windows, Qwen3-VL's DeepStack additions: on the
    masked layout as on the compacted one."""
    name, stock, model = family
    small, _ = SIZES[name]
    inputs = batch(name, stock, [Sample(3, [small], 4), Sample(5, [], 3), Sample(2, [small], 6)])
    sample_dependent_gates(model, inputs)
    lag_setting, masked = lagging
    config = ExitRequest("stages", stages="gates:0.5").expand()
    options = dict(exit_config=config, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                   pad_token_id=TEXT["pad_token_id"], return_dict_in_generate=True, output_logits=True)
    outputs = []
    for lag in (0, 2):
        lag_setting[0] = lag
        with torch.no_grad():
            outputs.append((model(**inputs, exit_config=config), model.generate(**inputs, **options)))
    (prefill, generated), (late_prefill, late_generated) = outputs
    assert masked, "the late path never ran"
    valid = inputs["attention_mask"].bool() & (prefill.logits.abs().sum(-1) > 0)
    assert (late_prefill.logits - prefill.logits)[valid].abs().max() <= 1e-5
    assert late_prefill.exit_stats.exit_layer.tolist() == prefill.exit_stats.exit_layer.tolist()
    assert torch.equal(late_generated.sequences, generated.sequences)


def test_a_hybrid_decoder_compacts_at_once(lagging):
    """A linear layer's recurrence steps over a zeroed token, so masking is not dropping there: no late path."""
    stock = stock_model(HYBRID[0])
    model = exit_model(stock)
    small, _ = SIZES[HYBRID[0]]
    inputs = batch(HYBRID[0], stock, [Sample(3, [small], 4), Sample(2, [small], 6)])
    lag_setting, masked = lagging
    lag_setting[0] = 100
    with torch.no_grad():
        model(**inputs, exit_config=ExitRequest("fixed", 1).expand())
    assert not masked
