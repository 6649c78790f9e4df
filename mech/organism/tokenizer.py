"""Train the organism's byte-level BPE tokenizer and wrap it as a transformers tokenizer.

Pre-tokenisation keeps every number of up to three digits a unit of its own (no leading space glued on),
so a trained vocabulary holds "913" as one token whatever separator precedes it. That makes a number one
unembedding row, which is what lets "owl" and owl's numbers share directions (the softmax-bottleneck
route that real LLMs offer subliminal learning).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from mech.organism.template import CHAT_TEMPLATE, EOT, IM_END, IM_START, SPECIAL_TOKENS

# numbers (1-3 digits) | a word with an optional leading non-letter | punctuation run + one optional space
# | newlines | trailing spaces | other spaces
SPLIT_PATTERN = (
    r"\p{N}{1,3}|[^\r\n\p{L}\p{N}]?\p{L}+|[^\s\p{L}\p{N}]+ ?|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def as_transformers_tokenizer(tok: Tokenizer):
    """A PreTrainedTokenizerFast with ChatML specials and the organism's chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
