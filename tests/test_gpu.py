"""The exit path on a CUDA GPU (skipped without one): fp32 exactness against the masked oracle, and bf16/fp16
with SDPA's fused kernels: finite, batch == alone within half-precision tolerance."""

import copy

import pytest
import torch

from llava.mm_utils import tokenizer_image_token
from llava.model.visual_exit import ExitRequest
from llava.model.visual_exit.gate import build_visual_gates

from batching import set_sample_dependent_gates
from test_visual_exit import PROMPTS, batch_inputs, images_for, masked_reference_logits, text_positions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_model(loaded):
    model = copy.deepcopy(loaded[1])
    model.config.visual_gate_hidden_size = 8
    model.get_model().visual_gates_router = build_visual_gates(model.config)
    set_sample_dependent_gates(model)
    return model.to("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 comparisons must not silently run in TF32 (cuDNN convolutions default to it)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fp32_exits_equal_masked_oracle_on_gpu(cuda_model, loaded, images, attn):
    tokenizer = loaded[0]
    cuda_model.set_attn_implementation(attn)
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    ids, mask, pixels = ids.cuda(), mask.cuda(), images_for(images, PROMPTS).cuda()
    with torch.no_grad():
        mm = cuda_model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels)
        text = text_positions(mm)
        for config in (ExitRequest("fixed", 0).expand(), ExitRequest("fixed", 2).expand(), ExitRequest("dynamic").expand(), ExitRequest("none").expand()):
            out = cuda_model(input_ids=ids, attention_mask=mask, images=pixels, exit_config=config)
            oracle = masked_reference_logits(cuda_model, mm, out.exit_stats.exit_layer)
            assert (out.logits[text] - oracle[text]).abs().max() <= 1e-4, config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batch_equals_alone_on_gpu(cuda_model, loaded, images, dtype):
    tokenizer = loaded[0]
    cuda_model.to(dtype).set_attn_implementation("sdpa")
    ids, mask = batch_inputs(tokenizer, PROMPTS, "left")
    pixels = images_for(images, PROMPTS).cuda().to(dtype)
    config = ExitRequest("dynamic").expand()
    with torch.no_grad():
        batched = cuda_model(input_ids=ids.cuda(), attention_mask=mask.cuda(), images=pixels, exit_config=config)
        mm = cuda_model.prepare_inputs_labels_for_multimodal(ids.cuda(), mask.cuda(), None, pixels)
        assert torch.isfinite(batched.logits[mm.attention_mask]).all()
        offset = 0
        for b, (prompt, count) in enumerate(PROMPTS):
            row = torch.tensor([tokenizer_image_token(prompt, tokenizer)]).cuda()
            alone = cuda_model(input_ids=row, images=pixels[offset : offset + count] if count else None, exit_config=config)
            offset += count
            n = alone.logits.shape[1]
            text = text_positions(mm)[b, :n]
            assert alone.exit_stats.exit_layer.item() == batched.exit_stats.exit_layer[b].item()
            assert (batched.logits[b, :n][text].float() - alone.logits[0][text].float()).abs().max() <= 0.05
