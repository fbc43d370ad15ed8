"""The Python API: open a library, index folders, search it. The CLI and server call only this."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from platformdirs import user_data_dir
from tqdm import tqdm

from pixseek.encoders import (
    DualEncoder,
    EncoderError,
    choose_default_model,
    load_encoder,
    normalise_spec,
)
from pixseek.indexer import vectorfile
from pixseek.indexer.ann import VectorIndex
from pixseek.indexer.decode import DecodeError, decode_bytes, decode_file
from pixseek.indexer.distributed import EmbedPool
from pixseek.indexer.pipeline import Local, index_folder
from pixseek.indexer.stages import IndexReport
from pixseek.indexer.store import FAILED, OK, NewerLibraryError, Store

from .query import compose
from .rerank import DEFAULT_DEPTH, FALLBACK_FUSION, FUSION, Fusion, Reranker

DB_NAME = "library.db"


class LibraryError(RuntimeError):
    """A user-facing problem with the library (missing, wrong model, bad query)."""


def default_library_path() -> Path:
    """``PIXSEEK_LIBRARY`` if set, else a folder in the user's data directory."""
    env = os.environ.get("PIXSEEK_LIBRARY")
    return Path(env).expanduser() if env else Path(user_data_dir("pixseek")) / "library"


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One ranked image. ``score`` is the fused score when reranked, else the similarity;
    ``caption_score`` (the captioner's log-likelihood per token of the query) only if reranked."""

    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    taken_at: datetime | None
    caption: str | None = None
    similarity: float | None = None
    caption_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["taken_at"] = self.taken_at.isoformat() if self.taken_at else None
        return out


@dataclass(frozen=True, slots=True)
class LibraryInfo:
    """What ``pixseek info`` shows."""

    path: str
    images: int
    failed: int
    folders: list[str]
    model: str | None
    model_id: str | None
    index_kind: str | None
    size_bytes: int
    failures: list[tuple[str, str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _abspath(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


class Library:
    """A photo library on disk: its database, its vector index and the model it was built with.

    The model is loaded on first use, so ``info`` and ``remove`` stay instant.
    ``follow_changes = False`` keeps searching the vector index loaded last instead of
    rebuilding it after each batch another handle (:meth:`twin`) writes during an index run.
    """

    def __init__(self, path: Path, store: Store, model: str | None, device: str | None) -> None:
        self.path = path
        self.store = store
        self._spec = model
        self._device = device
        self._encoder: DualEncoder | None = None
        self._index: VectorIndex | None = None
        self._index_generation = -1
        self._reset_pending = False
        self.notice: str | None = None
        self.follow_changes = True
        self.captioner_spec: str | None = os.environ.get("PIXSEEK_CAPTIONER") or None
        self._reranker: Reranker | None = None
        self._rerank_error: str | None = None

    # opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        reindex: bool = False,
        create: bool = True,
        device: str | None = None,
        captioner: str | None = None,
    ) -> Library:
        """Open (or create) a library; refuse a model other than the one it was built with.

        ``reindex=True`` switches an existing library to ``model``, dropping its vectors.
        ``captioner`` (default ``PIXSEEK_CAPTIONER``, else the shipped one) reranks and captions.
        """
        folder = Path(path).expanduser() if path else default_library_path()
        db = folder / DB_NAME
        if not db.exists():
            if not create:
                raise LibraryError(
                    f"no library at {folder}: index a folder first (pixseek index FOLDER)"
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LibraryError(f"cannot create the library at {folder}: {exc}") from exc
        try:
            store = Store(db)
        except NewerLibraryError as exc:
            raise LibraryError(str(exc)) from None
        recorded = store.get_setting("model") or None
        wanted = normalise_spec(model) if model else None
        switching = bool(recorded and wanted and wanted != recorded)
        if switching and not reindex and sum(store.counts().values()):
            store.close()
            raise LibraryError(
                f"this library was built with the model {recorded!r}, not {wanted!r}; "
                "to re-index everything with the new model add --reindex"
            )
        library = cls(folder, store, wanted or recorded, device)
        library._reset_pending = reindex or switching
        library.captioner_spec = captioner or library.captioner_spec
        return library

    def twin(self) -> Library:
        """Another handle on this library with its own database connections but this one's
        loaded model: a server indexes through it while searches go on through this one."""
        twin = Library(self.path, Store(self.path / DB_NAME), self._spec, self._device)
        twin._encoder = self._encoder
        return twin

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the model ------------------------------------------------------------------------------
    @property
    def encoder(self) -> DualEncoder:
        """The library's model, loaded once; checked against the model id it recorded."""
        if self._encoder is None:
            spec = self._spec
            if not spec:
                choice = choose_default_model()
                spec, self.notice = choice.spec, choice.notice
            encoder = load_encoder(spec, device=self._device)
            recorded_id = self.store.get_setting("model_id")
            if recorded_id and recorded_id != encoder.model_id:
                raise LibraryError(
                    f"the weights of {spec!r} changed since this library was built "
                    f"({recorded_id} -> {encoder.model_id}); re-index with --reindex"
                )
            if not recorded_id:
                self.store.set_settings(model=spec, model_id=encoder.model_id)
            self._spec, self._encoder = spec, encoder
        return self._encoder

    @property
    def reranker(self) -> Reranker | None:
        """The captioner that reranks and captions, loaded on first use; None where it cannot
        load (no weights, CoCa offline), the reason kept for an explicit request."""
        if self._reranker is None and self._rerank_error is None:
            from pixseek.encoders.registry import load_captioner

            try:
                captioner = load_captioner(self.captioner_spec, device=self._device)
            except EncoderError as exc:
                self._rerank_error = str(exc)
                return None
            self._reranker = Reranker(captioner)
        return self._reranker

    def _captioning(self) -> Reranker:
        reranker = self.reranker
        if reranker is None:
            raise LibraryError(f"no captioner: {self._rerank_error}")
        return reranker

    def _fusion(self, rerank: bool | None) -> Fusion | None:
        """How to rerank a text query, or None for the vector search's order.

        By default (``rerank=None``) only where fusion weights were tuned for this pair of
        models; asked for explicitly, an untuned pair gets the shipped pair's weights.
        """
        if rerank is False:
            return None
        if rerank is None and all(name != self.encoder.name for name, _ in FUSION):
            return None  # nothing tuned for this model: skip loading a captioner
        if rerank is None and self.reranker is None:
            return None
        tuned = FUSION.get((self.encoder.name, self._captioning().captioner.name))
        return tuned or (FALLBACK_FUSION if rerank else None)

    # indexing -------------------------------------------------------------------------------
    def index(
        self,
        folders: Iterable[str | os.PathLike] = (),
        *,
        batch_size: int = 64,
        workers: int | None = None,
        include_hidden: bool = False,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        ray: str | None = None,
        ray_gpus: float = 0,
    ) -> IndexReport:
        """Index folders (or, with none given, every folder indexed before); incremental.

        ``on_progress(done, total)`` follows the photos to embed in the folder being indexed.
        ``ray`` spreads decoding and embedding over Ray actors: ``"local"`` starts Ray on this
        machine, ``"auto"`` or ``"HOST:PORT"`` joins a cluster (photo and library folders at
        the same paths on every node). Each actor takes ``ray_gpus`` GPUs and ``workers``
        decoding processes. The vectors are the same as without Ray, and an interrupted run
        resumes from the shards it finished.
        """
        targets = [_abspath(f) for f in folders] or self.store.folders()
        if not targets:
            raise LibraryError("no folder to index: name one (pixseek index FOLDER)")
        for target in targets:
            if not os.path.exists(target):
                raise LibraryError(f"no such folder: {target}")
        if self._reset_pending:
            # Re-indexing (or switching models): start from nothing, only once a run begins.
            self.store.clear_images()
            self.store.set_settings(model="", model_id="")
            self._reset_pending = False
        total = IndexReport()
        with contextlib.ExitStack() as stack:
            if ray:
                runner = stack.enter_context(self._embed_pool(ray, ray_gpus, workers))
            else:
                runner = Local(self.encoder, workers)
            for target in targets:
                self.store.add_folder(target)
                report = index_folder(
                    self.store,
                    runner,
                    target,
                    batch_size=batch_size,
                    include_hidden=include_hidden,
                    progress=progress,
                    on_progress=on_progress,
                )
                self.store.add_folder(target, indexed_at=datetime.now())
                total.add(report)
        self._refresh_index()
        return total

    def _embed_pool(self, address: str, gpus: float, decode_workers: int | None) -> EmbedPool:
        """Ray actors holding this library's model; refused if they load other weights."""
        here = self.encoder.model_id  # also settles which model (the default) the library uses
        try:
            pool = EmbedPool(
                self._spec,
                address=None if address == "local" else address,
                num_gpus=gpus,
                decode_workers=decode_workers or 0,
            )
        except Exception as exc:  # Ray reports a bad address or missing weights in many ways
            raise LibraryError(f"cannot start the Ray workers ({address}): {exc}") from exc
        if pool.model_id != here:
            pool.close()
            raise LibraryError(
                f"the Ray workers loaded other weights for {self._spec!r} "
                f"({pool.model_id}, here {here}): install the same model on every node"
            )
        return pool

    def remove(self, folder: str | os.PathLike) -> int:
        """Forget a folder and its images (the files themselves are untouched)."""
        gone = self.store.remove_folder(_abspath(folder))
        self._refresh_index()
        return gone

    def image_path(self, image_id: int) -> str:
        """The file of an indexed image: servers take ids from clients, never paths."""
        row = self.store.get_rows([image_id]).get(image_id)
        if row is None or row.status != OK:
            raise LibraryError(f"no indexed image with id {image_id}")
        return row.path

    def _refresh_index(self) -> VectorIndex | None:
        stale = self._index_generation != self.store.generation
        if stale and (self.follow_changes or self._index_generation < 0):
            self._index = vectorfile.current(self.store, self.path)
            self._index_generation = self.store.generation
        return self._index

    # searching ------------------------------------------------------------------------------
    def search(
        self,
        text: str | Sequence[str] | None = None,
        *,
        image: str | os.PathLike | int | bytes | None = None,
        negative: str | Sequence[str] | None = None,
        k: int = 10,
        folder: str | os.PathLike | None = None,
        taken_after: datetime | None = None,
        taken_before: datetime | None = None,
        min_score: float | None = None,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
    ) -> list[SearchResult]:
        """Images ranked for a text, an example image, or both; negatives push results away.

        ``image`` is a file, an indexed image's id, or an image file's bytes (an upload).
        A text query's top ``rerank_depth`` (default 30) are rescored by the captioner and
        reordered: by default where a captioner tuned for this model is available; False keeps
        the vector search's order; True asks for it (an error if no captioner can load). Results
        past the depth follow in vector-search order; ``min_score`` applies to the similarity.
        """
        texts = [text] if isinstance(text, str) else list(text or [])
        negatives = [negative] if isinstance(negative, str) else list(negative or [])
        texts, negatives = [t for t in texts if t.strip()], [n for n in negatives if n.strip()]
        positives: list[np.ndarray] = []
        exclude: set[int] = set()
        if texts:
            positives.extend(self.encoder.embed_texts(texts))
        if image is not None:
            vector, image_id = self._image_vector(image)
            positives.append(vector)
            if image_id is not None:
                exclude.add(image_id)
        if not positives:
            raise LibraryError("give a text query, an example image, or both")
        negative_vectors = list(self.encoder.embed_texts(negatives)) if negatives else None
        query = compose(positives, negative_vectors)
        if rerank_depth is not None and rerank_depth < 1:
            raise LibraryError("rerank_depth must be at least 1")
        fusion = self._fusion(rerank) if texts else None
        return self._ranked(
            query,
            k,
            exclude,
            folder,
            taken_after,
            taken_before,
            min_score,
            rerank_texts=texts if fusion else (),
            fusion=fusion,
            depth=rerank_depth or DEFAULT_DEPTH,
        )

    def similar(self, image: str | os.PathLike | int, **options: Any) -> list[SearchResult]:
        """Images like an example: a file on disk or an indexed image's id."""
        return self.search(image=image, **options)

    def _image_vector(
        self, image: str | os.PathLike | int | bytes
    ) -> tuple[np.ndarray, int | None]:
        """An indexed image's stored vector (no decoding), else a freshly embedded file."""
        if isinstance(image, bytes):
            try:
                decoded = decode_bytes(image)
            except DecodeError as exc:
                raise LibraryError(f"cannot read the example image: {exc}") from exc
            return self.encoder.embed_pil([decoded.image])[0], None
        if isinstance(image, int | np.integer):
            vector = self.store.vector_of(int(image))
            if vector is None:
                raise LibraryError(f"no indexed image with id {image}")
            return vector, int(image)
        path = _abspath(image)
        row = self.store.find_path(path)
        if row is not None and row.status == OK and row.vector is not None:
            return np.frombuffer(row.vector, dtype=np.float32).copy(), row.id
        if not os.path.isfile(path):
            raise LibraryError(f"no such image: {path}")
        try:
            decoded = decode_file(path)
        except (DecodeError, OSError) as exc:
            raise LibraryError(f"cannot read the example image {path}: {exc}") from exc
        return self.encoder.embed_pil([decoded.image])[0], None

    def _ranked(
        self,
        query: np.ndarray,
        k: int,
        exclude: set[int],
        folder: str | os.PathLike | None,
        taken_after: datetime | None,
        taken_before: datetime | None,
        min_score: float | None,
        *,
        rerank_texts: Sequence[str] = (),
        fusion: Fusion | None = None,
        depth: int = DEFAULT_DEPTH,
    ) -> list[SearchResult]:
        if k < 1:
            raise LibraryError("k must be at least 1")
        index = self._refresh_index()
        if index is None:
            return []
        allowed = None
        if folder or taken_after or taken_before:
            allowed = self.store.filter_ids(
                folder=_abspath(folder) if folder else None,
                taken_after=taken_after,
                taken_before=taken_before,
            )
            if not len(allowed):
                return []
        depth = depth if fusion and rerank_texts else 0
        wanted = max(k, depth)
        scores, ids = index.search(query[None, :], wanted + len(exclude), allowed_ids=allowed)
        hits = [
            (int(i), float(s))
            for s, i in zip(scores[0], ids[0], strict=True)
            if i >= 0 and int(i) not in exclude and (min_score is None or s >= min_score)
        ][:wanted]
        rows = self.store.get_rows([i for i, _ in hits])
        hits = [(i, s) for i, s in hits if i in rows]
        ranked = [(i, s, None, s) for i, s in hits]  # id, similarity, caption score, score
        if depth and hits:
            head = hits[:depth]
            rescored = self._captioning().rerank(
                rerank_texts, [rows[i].path for i, _ in head], [s for _, s in head], fusion
            )
            ranked[: len(head)] = [
                (head[r.position][0], r.similarity, r.caption_score, r.score) for r in rescored
            ]
        return [
            SearchResult(
                id=i,
                path=rows[i].path,
                score=score,
                width=rows[i].width,
                height=rows[i].height,
                taken_at=rows[i].taken_at,
                caption=rows[i].caption,
                similarity=s,
                caption_score=caption_score,
            )
            for i, s, caption_score, score in ranked[:k]
        ]

    # captions -------------------------------------------------------------------------------
    def caption(self, images: Sequence[str | os.PathLike], *, beams: int = 3) -> list[str]:
        """A caption per image file (indexed or not), by beam search."""
        try:
            return self._captioning().caption([_abspath(p) for p in images], beams)
        except DecodeError as exc:
            raise LibraryError(f"cannot read {exc}") from exc

    def add_captions(self, *, batch_size: int = 32, progress: bool = False) -> int:
        """Caption every indexed photo that has no caption yet; returns how many were written.

        A changed photo is re-indexed without its caption, so each run captions only what is
        new; a photo unreadable now is left for the next run.
        """
        reranker = self._captioning()
        todo = self.store.uncaptioned()
        written = 0
        steps = range(0, len(todo), batch_size)
        for start in tqdm(steps, desc="captions", unit="batch", disable=not progress):
            chunk = todo[start : start + batch_size]
            texts = reranker.caption([path for _, path in chunk], strict=False)
            done = [(i, text) for (i, _), text in zip(chunk, texts, strict=True) if text]
            self.store.set_captions(done)
            written += len(done)
        return written

    # facts ----------------------------------------------------------------------------------
    def info(self) -> LibraryInfo:
        counts = self.store.counts()
        index = self._refresh_index() if counts[OK] else None
        size = 0
        for entry in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):  # an index file being replaced
                size += entry.stat().st_size if entry.is_file() else 0
        return LibraryInfo(
            path=str(self.path),
            images=counts[OK],
            failed=counts[FAILED],
            folders=self.store.folders(),
            model=self.store.get_setting("model") or self._spec,
            model_id=self.store.get_setting("model_id") or None,
            index_kind=index.kind if index is not None else None,
            size_bytes=size,
            failures=self.store.failures(),
        )
