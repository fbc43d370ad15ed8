"""Index a folder with a pool of Ray actors: one machine's GPUs, or a whole cluster.

The driver (the process that owns the library database) scans and plans exactly like the
single-process pipeline, cuts the files to embed into shards, and hands shards to actors that
each load the model once. An actor decodes and embeds its shard with the pipeline's own code
and writes the rows to a shard file in the library's staging folder (temp name + rename, so a
file there is always complete); the driver merges finished shards into the store and deletes
them. A run killed at any point loses only the shards in flight: the next run merges the shard
files it finds and embeds the rest.

Workers read photos and write shards by path, so on a cluster the photo folders and the
library folder must be mounted at the same paths on every node (NFS or similar); only the
driver opens the SQLite database, and a small actor on the driver's node answers the
workers' "is this content already embedded?" look-ups, so moved files skip the model here too.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .pipeline import IndexReport, PendingFile, embed_items, survey
from .store import NewImage, Store

STAGING = "ray-staging"
SHARD_PREFIX = "shard-"
_NO_TIME = np.datetime64("NaT", "us")


@dataclass
class RayIndexReport(IndexReport):
    """An IndexReport plus what the shards did, to show that a resumed run skipped work."""

    shards: int = 0  # shards embedded in this run
    shards_resumed: int = 0  # complete shard files left by an interrupted run, merged as they were
    shards_discarded: int = 0  # left by a run with other weights, or whose files all changed


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(
            "indexing with Ray needs the cluster extra: pip install 'pixseek[cluster]'"
        ) from exc
    return ray


def staging_folder(store: Store) -> Path:
    """Where workers leave finished shards: inside the library, next to its database."""
    return store.db_path.parent / STAGING


def shard_name(items: Sequence[PendingFile]) -> str:
    """A name fixed by the shard's files and their versions, so reruns never collide."""
    digest = hashlib.blake2b(digest_size=12)
    for item in items:
        entry = item.entry
        line = f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\n"
        digest.update(line.encode("utf-8", "surrogatepass"))
    return f"{SHARD_PREFIX}{digest.hexdigest()}.npz"


@dataclass
class Shard:
    """A shard's rows on their way to the store, which of them reused a stored vector, and
    the weights that embedded them (a leftover from another model must not be merged)."""

    images: list[NewImage]
    reused: list[bool]
    model_id: str

    def write(self, path: Path, dim: int) -> None:
        """Store as plain arrays (no pickle), atomically: temp file, then rename."""
        images = self.images
        vectors = np.zeros((len(images), dim), dtype=np.float32)
        for row, im in enumerate(images):
            if im.vector is not None:
                vectors[row] = im.vector
        times = [
            _NO_TIME if im.taken_at is None else np.datetime64(im.taken_at, "us") for im in images
        ]
        columns = {
            "path": np.array([im.path for im in images], dtype=str),
            "size": np.array([im.size for im in images], dtype=np.int64),
            "mtime_ns": np.array([im.mtime_ns for im in images], dtype=np.int64),
            "fingerprint": np.array([im.fingerprint or "" for im in images], dtype=str),
            "width": np.array([-1 if im.width is None else im.width for im in images], np.int64),
            "height": np.array([-1 if im.height is None else im.height for im in images], np.int64),
            "taken_at": np.array(times, dtype="datetime64[us]"),
            "error": np.array([im.error or "" for im in images], dtype=str),
            "reused": np.array(self.reused, dtype=bool),
            "vector": vectors,
            "model_id": np.array(self.model_id),
        }
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        with open(tmp, "wb") as file:
            np.savez(file, **columns)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> Shard:
        with np.load(path, allow_pickle=False) as data:
            c = {key: data[key] for key in data.files}
        images = []
        for row in range(len(c["path"])):
            error = str(c["error"][row]) or None
            taken = c["taken_at"][row]
            images.append(
                NewImage(
                    str(c["path"][row]),
                    int(c["size"][row]),
                    int(c["mtime_ns"][row]),
                    fingerprint=str(c["fingerprint"][row]) or None,
                    width=None if c["width"][row] < 0 else int(c["width"][row]),
                    height=None if c["height"][row] < 0 else int(c["height"][row]),
                    taken_at=None if np.isnat(taken) else taken.astype(datetime),
                    error=error,
                    vector=None if error else c["vector"][row],
                )
            )
        return cls(images, c["reused"].tolist(), str(c["model_id"]))


class _ShardSink:
    """Stands in for the Store inside a worker: look-ups go to the driver, rows to a Shard.

    ``pipeline.embed_items`` asks for known fingerprints right before writing each batch, so the
    fingerprints found by the last look-up are exactly the rows that reused a vector.
    """

    def __init__(self, known, model_id: str) -> None:
        self._known = known
        self._last: set[str] = set()
        self.shard = Shard([], [], model_id)

    def vectors_for_fingerprints(self, fingerprints: Iterable[str]) -> dict[str, bytes]:
        # Called once per batch: the moment to honour a cancelled run (ray.cancel).
        if _ray().get_runtime_context().is_canceled():
            raise InterruptedError("indexing run cancelled")
        found = _ray().get(self._known.vectors_for_fingerprints.remote(list(fingerprints)))
        self._last = set(found)
        return found

    def write_batch(self, images: Sequence[NewImage], dim: int) -> None:
        self.shard.images.extend(images)
        self.shard.reused.extend(im.fingerprint in self._last for im in images)


class _Embedder:
    """A Ray actor holding one model replica (and, on a GPU node, one GPU) for its lifetime."""

    def __init__(self, model_spec: str, device: str) -> None:
        from pixseek.encoders import load_encoder

        self.encoder = load_encoder(model_spec, device=device)

    def describe(self) -> tuple[int, str]:
        return self.encoder.dim, self.encoder.model_id

    def embed_shard(
        self, items: list[PendingFile], target: str, known, batch_size: int, decode_workers: int
    ) -> str:
        """Decode and embed one shard with the single-process pipeline's code; write its file."""
        sink = _ShardSink(known, self.encoder.model_id)
        embed_items(
            sink,
            self.encoder,
            items,
            IndexReport(),
            batch_size=batch_size,
            workers=decode_workers,
            progress=False,
            on_progress=None,
        )
        sink.shard.write(Path(target), self.encoder.dim)
        return target


class EmbedPool:
    """Model replicas as Ray actors, started once and reused for every folder of a run.

    ``address=None`` starts a local Ray instance with ``local_cpus`` CPUs (default: all);
    ``"auto"`` or ``"HOST:PORT"`` joins a running cluster; a Ray already initialised in this
    process is used as it is. Each of ``workers`` actors (default: as many as the cluster's
    free CPUs, or GPUs when ``num_gpus`` > 0, hold) reserves ``num_cpus`` CPUs and ``num_gpus``
    GPUs for its lifetime; ``decode_workers`` extra processes per actor decode photos, which
    a GPU actor needs to keep its GPU busy. Ray sets OMP_NUM_THREADS to ``num_cpus``, so the
    model's threads stay within the actor's share.
    """

    def __init__(
        self,
        model_spec: str,
        *,
        address: str | None = None,
        workers: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        decode_workers: int = 0,
        local_cpus: int | None = None,
    ) -> None:
        ray = _ray()
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(
                address=address,
                num_cpus=local_cpus if address is None else None,
                include_dashboard=False,
                configure_logging=False,
            )
        if workers is None:
            capacity = ray.available_resources()  # actors that cannot start would hang
            fits = capacity.get("GPU", 0) / num_gpus if num_gpus else capacity["CPU"] / num_cpus
            workers = max(1, int(fits))
        self.model_spec = model_spec
        self.decode_workers = decode_workers
        self._stores: dict[Path, object] = {}  # db path -> its look-up actor
        # Shards are independent, so their order on an actor does not matter. In order, an actor
        # waits for each sequence number: a queued shard cancelled by an interrupted run could
        # leave a gap that stalled the next run's shards for 30 s and then failed them
        # (ActorUnavailableError "Timed out waiting for seq_no", seen on a loaded machine).
        actor = ray.remote(_Embedder).options(
            num_cpus=num_cpus, num_gpus=num_gpus, allow_out_of_order_execution=True
        )
        device = "cuda" if num_gpus else "cpu"
        self.actors = [actor.remote(model_spec, device) for _ in range(workers)]
        try:
            described = set(ray.get([a.describe.remote() for a in self.actors]))
        except BaseException:
            self.close()
            raise
        if len(described) != 1:
            self.close()
            raise RuntimeError(
                f"the workers loaded different weights for {model_spec!r} ({sorted(described)}): "
                "install the same model on every node"
            )
        ((self.dim, self.model_id),) = described

    def known_vectors(self, store: Store):
        """An actor answering the workers' "already embedded?" from the store's database.

        It runs on the driver's node, the only one that may open the database.
        """
        if store.db_path not in self._stores:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            ray = _ray()
            here = ray.get_runtime_context().get_node_id()
            self._stores[store.db_path] = (
                ray.remote(Store)
                .options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, False)
                )
                .remote(store.db_path)
            )
        return self._stores[store.db_path]

    def close(self) -> None:
        """Stop the actors, and Ray itself if this pool started it."""
        ray = _ray()
        for actor in (*self.actors, *self._stores.values()):
            ray.kill(actor)
        self.actors, self._stores = [], {}
        if self._started_ray:
            ray.shutdown()

    def __enter__(self) -> EmbedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _merge(
    store: Store,
    path: Path,
    pending: dict[str, PendingFile],
    pool: EmbedPool,
    report: RayIndexReport,
) -> int:
    """Write a shard file's rows still wanted by this run into the store, then delete it.

    Rows whose file changed since the shard was made are dropped (they are embedded anew), and
    so is a whole shard made by other weights. Returns how many rows were merged. Deleting
    only after the commit means a crash in between leaves rows the next run finds unchanged.
    """
    shard = Shard.read(path)
    if shard.model_id != pool.model_id:
        path.unlink()
        return 0
    keep = []
    for im, was_reused in zip(shard.images, shard.reused, strict=True):
        item = pending.get(im.path)
        if item is None or (item.entry.size, item.entry.mtime_ns) != (im.size, im.mtime_ns):
            continue
        del pending[im.path]
        keep.append(im)
        if im.error:
            report.failed += 1
        elif was_reused:
            report.reused += 1
        elif item.is_new:
            report.added += 1
        else:
            report.updated += 1
    store.write_batch(keep, pool.dim)
    path.unlink()
    return len(keep)


def index_folder_ray(
    store: Store,
    pool: EmbedPool,
    folder: str,
    *,
    shard_size: int = 1000,
    batch_size: int = 64,
    include_hidden: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> RayIndexReport:
    """Bring the store up to date with one folder using the pool's actors; safe to interrupt.

    Like ``pipeline.index_folder`` (same plan, same vectors, same report), but files are
    embedded ``shard_size`` at a time by the pool's actors, two shards queued per actor so
    none waits while the driver merges. ``on_progress(done, total)`` hears of every merged
    shard. Interrupted, it cancels the shards in flight (they stop within a batch).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    started = time.perf_counter()
    known = pool.known_vectors(store)  # its process starts while we scan
    report = RayIndexReport()
    todo, vanished_ids = survey(store, folder, report, include_hidden, progress)
    staging = staging_folder(store)
    staging.mkdir(exist_ok=True)
    for torn in staging.glob(".tmp-*"):  # half-written by a worker killed with its run
        torn.unlink()
    pending = {item.entry.path: item for item in todo}
    done = 0
    with tqdm(total=len(todo), desc="Indexing", unit=" img", disable=not progress) as bar:

        def tick(merged: int) -> None:
            nonlocal done
            done += merged
            bar.update(merged)
            if on_progress:
                on_progress(done, len(todo))

        for path in sorted(staging.glob(f"{SHARD_PREFIX}*.npz")):
            if merged := _merge(store, path, pending, pool, report):
                report.shards_resumed += 1
                tick(merged)
            else:  # other weights, or files since changed, merged or gone
                report.shards_discarded += 1
        if pending:
            _dispatch(store, pool, known, pending, report, tick, shard_size, batch_size)
    report.removed = store.delete_ids(vanished_ids)
    report.seconds = time.perf_counter() - started
    return report


def _dispatch(
    store: Store,
    pool: EmbedPool,
    known,
    pending: dict[str, PendingFile],
    report: RayIndexReport,
    tick: Callable[[int], None],
    shard_size: int,
    batch_size: int,
) -> None:
    """Feed shards to the actors, two queued per actor, and merge each as it comes back."""
    ray = _ray()
    items = list(pending.values())
    shards = iter([items[i : i + shard_size] for i in range(0, len(items), shard_size)])
    idle = deque(pool.actors * 2)
    in_flight: dict = {}
    try:
        while True:
            while idle and (shard := next(shards, None)):
                actor = idle.popleft()
                target = str(staging_folder(store) / shard_name(shard))
                ref = actor.embed_shard.remote(
                    shard, target, known, batch_size, pool.decode_workers
                )
                in_flight[ref] = actor
            if not in_flight:
                return
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            idle.append(in_flight.pop(ref))
            tick(_merge(store, Path(ray.get(ref)), pending, pool, report))
            report.shards += 1
    finally:
        for ref in in_flight:
            ray.cancel(ref)
        # Let cancelled shards stop (within a batch) so the pool is idle for the next run.
        if in_flight:
            ray.wait(list(in_flight), num_returns=len(in_flight))
