"""Loading the models a library runs: its dual encoder, and the captioner that reranks and
captions.

Loading only reads: which model a library was built with is recorded by an index run
(:meth:`pixseek.search.api.Library.index`), never by loading a model to search with. Failures
of the layers below arrive as :class:`ModelError`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from pixseek.encoders import (
    DualEncoder,
    EncoderError,
    choose_default_model,
    load_encoder,
    registry,
)

from .errors import LibraryError, ModelError
from .rerank import Reranker


@dataclass(frozen=True, slots=True)
class Model:
    """A loaded dual encoder and the spec it was loaded from.

    ``notice`` is a line for the user when no model was named and the best default could not
    be used (the offline model instead of one that needs a download).
    """

    spec: str
    encoder: DualEncoder
    notice: str | None = None


def load_model(spec: str | None, device: str | None) -> Model:
    """The model ``spec`` names, or (none named) the best one this machine can use now."""
    notice = None
    if not spec:
        choice = choose_default_model()
        spec, notice = choice.spec, choice.notice
    try:
        encoder = load_encoder(spec, device=device)
    except EncoderError as exc:
        raise ModelError(str(exc)) from exc
    return Model(spec, encoder, notice)


def load_reranker(spec: str | None, device: str | None) -> Reranker:
    """The captioner ``spec`` names (default ``PIXSEEK_CAPTIONER``, else the shipped one),
    ready to rerank and caption."""
    spec = spec or os.environ.get("PIXSEEK_CAPTIONER") or None
    try:
        return Reranker(registry.load_captioner(spec, device=device))
    except EncoderError as exc:
        raise ModelError(str(exc)) from exc


class LazyReranker:
    """A library's captioner, loaded on first use.

    Where none can load (no weights, CoCa offline) searches go on in the vector search's
    order; the reason is kept for whoever asks for reranking or captions explicitly.
    """

    def __init__(self, spec: str | None, device: str | None) -> None:
        self._spec = spec
        self._device = device
        self._reranker: Reranker | None = None
        self._error: str | None = None
        self._lock = threading.Lock()  # one load, however many searches ask at once

    def get(self) -> Reranker | None:
        """The reranker, loaded now if it was not; None where it cannot load."""
        with self._lock:
            if self._reranker is None and self._error is None:
                try:
                    self._reranker = load_reranker(self._spec, self._device)
                except ModelError as exc:
                    self._error = str(exc)
            return self._reranker

    def require(self) -> Reranker:
        """The reranker, or a LibraryError saying why there is none."""
        reranker = self.get()
        if reranker is None:
            raise LibraryError(f"no captioner: {self._error}")
        return reranker
