"""Index a folder with a pool of Ray actors: one machine's GPUs, or a whole cluster.

``EmbedPool`` is a runner for ``pipeline.index_folder``: the driver (the process that owns the
library database) scans and plans as for a local run and writes rows with the same write
stage; the pool cuts the files to embed into shards and hands them to actors that each load
the model once. An actor decodes and embeds its shard with the stages' own code and saves the
rows to a shard file in the library's staging folder (temp name + rename, so a file there is
always complete); the driver writes finished shards into the store and deletes them. A run
killed at any point loses only the shards in flight: the next run writes the shard files it
finds and embeds the rest.

Workers read photos and write shards by path, so on a cluster the photo folders and the
library folder must be mounted at the same paths on every node (NFS or similar); only the
driver opens the SQLite database, and a small actor on the driver's node answers the
workers' "is this content already embedded?" look-ups, so moved files skip the model here too.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from .stages import PendingFile, Rows, Writer, decode_loader, embed
from .store import NewImage, Store

STAGING = "ray-staging"
SHARD_PREFIX = "shard-"
_NO_TIME = np.datetime64("NaT", "us")


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


def save_shard(path: Path, rows: Rows, model_id: str, dim: int) -> None:
    """Keep a shard's rows, and the weights that embedded them (a leftover from another model
    must not be written), as plain arrays (no pickle), atomically: temp file, then rename."""
    images = rows.images
    vectors = np.zeros((len(images), dim), dtype=np.float32)
    for row, im in enumerate(images):
        if im.vector is not None:
            vectors[row] = im.vector
    times = [_NO_TIME if im.taken_at is None else np.datetime64(im.taken_at, "us") for im in images]
    columns = {
        "path": np.array([im.path for im in images], dtype=str),
        "size": np.array([im.size for im in images], dtype=np.int64),
        "mtime_ns": np.array([im.mtime_ns for im in images], dtype=np.int64),
        "fingerprint": np.array([im.fingerprint or "" for im in images], dtype=str),
        "width": np.array([-1 if im.width is None else im.width for im in images], np.int64),
        "height": np.array([-1 if im.height is None else im.height for im in images], np.int64),
        "taken_at": np.array(times, dtype="datetime64[us]"),
        "error": np.array([im.error or "" for im in images], dtype=str),
        "reused": np.array(rows.reused, dtype=bool),
        "vector": vectors,
        "model_id": np.array(model_id),
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as file:
        np.savez(file, **columns)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def load_shard(path: Path) -> tuple[Rows, str]:
    """A shard file's rows and the model id that embedded them."""
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
    return Rows(images, c["reused"].tolist()), str(c["model_id"])


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
        """Decode and embed one shard with the stages' code; save its rows to ``target``.

        ``known`` is the driver's look-up actor. A cancelled run (``ray.cancel``) stops
        between batches.
        """
        ray = _ray()
        context = ray.get_runtime_context()
        encoder = self.encoder

        def lookup(fingerprints: list[str]) -> dict[str, bytes]:
            return ray.get(known.vectors_for_fingerprints.remote(fingerprints))

        batches = decode_loader(
            items, encoder.preprocess, batch_size, decode_workers, encoder.device
        )
        rows = Rows()
        for batch in embed(encoder, items, batches, lookup):
            rows.extend(batch)
            if context.is_canceled():
                raise InterruptedError("indexing run cancelled")
        save_shard(Path(target), rows, encoder.model_id, encoder.dim)
        return target


class EmbedPool:
    """Model replicas as Ray actors, started once and reused for every folder of a run: the
    runner of ``pipeline.index_folder`` that embeds ``shard_size`` files at a time per actor.

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
        shard_size: int = 1000,
    ) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be positive")
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
        self.shard_size = shard_size
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
            # Out of order for the reason the embedders are (see __init__): cancelling an
            # interrupted run's shards also cancels their queued look-ups, which left a gap in
            # a worker's sequence numbers that failed the next run's look-ups after 30 s.
            self._stores[store.db_path] = (
                ray.remote(Store)
                .options(
                    num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, False),
                    allow_out_of_order_execution=True,
                )
                .remote(store.db_path)
            )
        return self._stores[store.db_path]

    def prepare(self, store: Store) -> None:
        """Start the store's look-up actor: its process starts while the driver scans."""
        self.known_vectors(store)

    def run(self, store: Store, writer: Writer, batch_size: int) -> None:
        """Write the shard files an interrupted run left, then embed the rest shard by shard,
        two shards queued per actor so none waits while the driver writes.

        Interrupted, it cancels the shards in flight (they stop within a batch).
        """
        staging = staging_folder(store)
        staging.mkdir(exist_ok=True)
        for torn in staging.glob(".tmp-*"):  # half-written by a worker killed with its run
            torn.unlink()
        for path in sorted(staging.glob(f"{SHARD_PREFIX}*.npz")):
            if _merge(path, writer, self.model_id):
                writer.report.shards_resumed += 1
            else:  # other weights, or files since changed, written or gone
                writer.report.shards_discarded += 1
        if writer.pending:
            self._dispatch(store, writer, batch_size)

    def _dispatch(self, store: Store, writer: Writer, batch_size: int) -> None:
        """Feed shards to the actors, two queued per actor, and write each as it comes back."""
        ray = _ray()
        known = self.known_vectors(store)
        items = list(writer.pending.values())
        size = self.shard_size
        shards = iter([items[i : i + size] for i in range(0, len(items), size)])
        idle = deque(self.actors * 2)
        in_flight: dict = {}
        try:
            while True:
                while idle and (shard := next(shards, None)):
                    actor = idle.popleft()
                    target = str(staging_folder(store) / shard_name(shard))
                    ref = actor.embed_shard.remote(
                        shard, target, known, batch_size, self.decode_workers
                    )
                    in_flight[ref] = actor
                if not in_flight:
                    return
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                idle.append(in_flight.pop(ref))
                _merge(Path(ray.get(ref)), writer, self.model_id)
                writer.report.shards += 1
        finally:
            for ref in in_flight:
                ray.cancel(ref)
            # Let cancelled shards stop (within a batch) so the pool is idle for the next run.
            if in_flight:
                ray.wait(list(in_flight), num_returns=len(in_flight))

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


def _merge(path: Path, writer: Writer, model_id: str) -> int:
    """Write a shard file's rows with the write stage, then delete the file; returns how many
    rows were written.

    The write stage drops rows whose file changed since the shard was made (they are embedded
    anew); a whole shard made by other weights is dropped here. Deleting only after the commit
    means a crash in between leaves rows the next run finds unchanged.
    """
    rows, made_by = load_shard(path)
    written = writer.write(rows) if made_by == model_id else 0
    path.unlink()
    return written
