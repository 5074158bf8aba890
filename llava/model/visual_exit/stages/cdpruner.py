"""`cdpruner:T` (CDPruner, arXiv 2506.10967): per image view, the T visual tokens a conditional DPP picks, after the
projector and before the LLM, from the projected features' similarity and each token's relevance to the
instruction; the rest never enter the LLM.

The official selection (Theia-4869/CDPruner, `llava_arch.py` `encode_images`), batched (its loader runs batch 1):
- similarity S: cosine of the projector outputs, fp32;
- relevance r_i = mean over the instruction's text embeddings of −cos(image embedding i, text embedding) (the minus
  is theirs), min-max normalised over all views of all images of one sample (its batch-1 tensor):
  (r − min + 1e-6) / (max − min);
- kernel L = diag(r)·S·diag(r); greedy fast MAP inference (Chen et al. 2018) for T steps: pick j = argmax d² (the
  first on ties; d² starts as L's diagonal), e = (L_j − Σ c_t,j·c_t) / √d²_j, d² −= e², d²_j = −inf;
- the picked tokens keep their order.
T ≥ a view's tokens keeps them all. The image and text embeddings come from CLIP's two towers
(`llava.model.multimodal_encoder.clip_text`), so only our LLaVA class on a full CLIP checkpoint runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.model.visual_exit.budget import Budget
from llava.model.visual_exit.stages.base import Stage, spec_number

# The benchmark instruction its loader removes from the question before the text tower reads it.
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


def instruction_text(question: str) -> str:
    """What the text tower reads of a question: without `<image>` tags and the short-answer suffix."""
    return question.replace("<image>\n", "").replace("<image>", "").replace(ANSWER_SUFFIX, "")


def relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(V, N, E) one image's view embeddings, (M, E) its instruction's → (V, N) fp32, min-max over all V·N."""
    image_unit = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_unit = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
    score = (-(image_unit.float() @ text_unit.T)).mean(dim=-1)
    return (score - score.min() + 1e-6) / (score.max() - score.min())


def conditional_dpp(features: torch.Tensor, relevance_scores: torch.Tensor, count: int) -> torch.Tensor:
    """(V, N, D) projected features, (V, N) relevance → (V, N) bool, the min(count, N) tokens each view keeps."""
    views, tokens, _ = features.shape
    count = min(count, tokens)
    unit = features / features.norm(dim=-1, keepdim=True)
    unit = unit.float()
    kernel = relevance_scores[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance_scores[:, None, :]  # (V, N, N)
    rows = torch.arange(views, device=features.device)
    directions = kernel.new_zeros(count, views, tokens)  # c_t, (T, V, N)
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d², (V, N)
    kept = torch.zeros(views, tokens, dtype=torch.bool, device=features.device)
    for step in range(count):
        picked = gains.argmax(dim=-1)
        kept[rows, picked] = True
        projected = torch.einsum("tv,tvn->vn", directions[:step, rows, picked], directions[:step])
        direction = (kernel[rows, picked] - projected) / gains[rows, picked].sqrt()[:, None]
        directions[step] = direction
        gains = gains - direction.square()
        gains[rows, picked] = float("-inf")
    return kept


def selection_flops(tokens: int, kept: int, width: int, embed_dim: int, text_rows: int) -> int:
    """What the selection adds to one view of `tokens` projected features of `width`, counted as the LM's (2 x
    multiply-adds): the similarity (2N²D) and the kernel (2N²), the relevance to `text_rows` text embeddings of
    `embed_dim` (2NME), and the DPP's projections onto the directions found so far (Σ_t 2tN, with 3N a step)."""
    kept = min(kept, tokens)
    return 2 * tokens * tokens * (width + 1) + 2 * tokens * text_rows * embed_dim + kept * (kept - 1) * tokens + 3 * kept * tokens


@dataclass(frozen=True)
class CDPruner(Stage):
    tokens: int
    usage = "cdpruner:T"
    before_llm = True
    reduces_input = True
    reads_instruction = True

    @classmethod
    def parse(cls, args: list[str]) -> CDPruner:
        return cls(spec_number(args[0], int, 1))

    @classmethod
    def at_budget(cls, budget: Budget) -> str:
        """Both rules: T = the budget, per view (its scripts' 64, 128, 192 are `visual_token_num` itself)."""
        return f"cdpruner:{max(1, round(budget.target))}"
