"""Small tokenizers built offline.

`build_tokenizer`: LLaMA-style, BPE over SentencePiece-style pieces with byte fallback. Ids follow LLaMA: `<unk>` 0,
`<s>` 1, `</s>` 2, then the 256 byte tokens, then learned pieces. BOS is added to every encoding and pad is `<unk>`,
as in LLaVA's tokenizer; `<image>` is an added special token (llava-hf style).
`build_byte_level_tokenizer`: Qwen-style, byte-level BPE over Qwen's pre-tokenizing pattern, no BOS, `<|endoftext|>`
for end, padding and unknown; what transformers' Qwen3.5 tokenizer class (which it imposes on every Qwen3.5
checkpoint) reads correctly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import conv_templates

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{value:02X}>" for value in range(256)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)


def default_corpus() -> list[str]:
    """The templates' own strings, so LLaVA prompts tokenise into a few pieces."""
    texts = {conv.system for conv in conv_templates.values()}
    texts |= {role for conv in conv_templates.values() for role in conv.roles}
    texts.add("Answer the question using a single word or phrase. What is shown in the image? Yes No")
    return sorted(text for text in texts if text)


def build_byte_level_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX

    end = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        default_corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[end], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=end, unk_token=end, pad_token=end, padding_side="right",
        model_max_length=model_max_length,
    )


def build_tokenizer(
    texts: Iterable[str] = (), vocab_size: int = 1024, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    corpus = default_corpus() + list(texts)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = _pre_tokenizer()
    learner.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=max(vocab_size - len(BYTE_TOKENS), len(SPECIAL_TOKENS) + 1),
            special_tokens=SPECIAL_TOKENS,
            show_progress=False,
        ),
    )
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in learned["merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="right",
        model_max_length=model_max_length,
    )
    wrapped.add_tokens([DEFAULT_IMAGE_TOKEN], special_tokens=True)
    return wrapped
