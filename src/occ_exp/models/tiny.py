"""The tiny scale: a Qwen2-architecture causal LM built from a config in code, and a
byte-level tokenizer (one token per character) built locally with `tokenizers` in Qwen2's format
and saved as a normal Hugging Face tokenizer, so everything downstream (generate, save_pretrained,
vLLM) treats it like any checkpoint.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import Qwen2Config
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from occ_exp.config import TinyArch

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
# One token for the answer marker keeps the chain short; everything else is one byte.
MULTI_CHAR_TOKENS = ["\\boxed{"]


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer with no merges (one token per byte) in Qwen2's own format, so
    `AutoTokenizer.from_pretrained` (and vLLM) rebuild exactly this tokenizer from the saved
    folder of a `model_type: qwen2` checkpoint."""
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS.values():
        vocab[tok] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], bos_token=None, **SPECIAL_TOKENS)
    tok.add_tokens(MULTI_CHAR_TOKENS)
    tok.padding_side = "left"
    return tok


def tiny_config(arch: TinyArch, tokenizer, num_mtp_layers: int) -> Qwen2Config:
    vocab = len(tokenizer)
    vocab = (vocab + 7) // 8 * 8  # round up: friendlier matmul shapes
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_nextn_predict_layers=num_mtp_layers,
        initializer_range=0.02,
        use_cache=True,
    )
