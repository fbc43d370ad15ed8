"""The SQLite store: batches of new and changed files in one transaction each."""

from datetime import datetime
from pathlib import Path

import numpy as np

from pixseek.indexer.store import FAILED, OK, SKIPPED, NewImage, Store

DIM = 4


def _vector(value: float) -> np.ndarray:
    return np.full(DIM, value, dtype=np.float32)


def test_write_batch_inserts_new_paths_and_replaces_known_ones_in_place(tmp_path: Path) -> None:
    store = Store(tmp_path / "library.db")
    taken = datetime(2024, 5, 1, 12, 30)
    store.write_batch(
        [
            NewImage("/p/a.jpg", 10, 1, "fa", 640, 480, taken, vector=_vector(1)),
            NewImage("/p/b.jpg", 20, 2, error="cannot decode: truncated"),
        ],
        DIM,
    )
    before = store.states_under("/p")
    generation = store.generation

    store.write_batch(
        [
            NewImage("/p/a.jpg", 11, 3, "fa2", 480, 640, None, vector=_vector(2)),  # changed
            NewImage("/p/c.jpg", 30, 4, "fc", 100, 100, None, vector=_vector(3)),
            NewImage("/p/c.jpg", 31, 5, "fc2", 200, 200, None, vector=_vector(4)),  # last wins
        ],
        DIM,
    )
    after = store.states_under("/p")
    assert sorted(after) == ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"]
    assert after["/p/a.jpg"].id == before["/p/a.jpg"].id  # replaced, not re-added
    assert (after["/p/a.jpg"].size, after["/p/a.jpg"].mtime_ns) == (11, 3)
    assert after["/p/b.jpg"] == before["/p/b.jpg"]
    rows = store.get_rows([state.id for state in after.values()])
    a, b, c = (rows[after[p].id] for p in ("/p/a.jpg", "/p/b.jpg", "/p/c.jpg"))
    assert (a.status, a.fingerprint, a.width, a.height, a.taken_at) == (OK, "fa2", 480, 640, None)
    assert (b.status, b.error, b.vector) == (FAILED, "cannot decode: truncated", None)
    assert (c.size, c.fingerprint, c.width) == (31, "fc2", 200)
    np.testing.assert_array_equal(store.vector_of(a.id), _vector(2))
    np.testing.assert_array_equal(store.vector_of(c.id), _vector(4))
    assert store.generation == generation + 1
    assert store.counts() == {OK: 2, FAILED: 1, SKIPPED: 0}
    store.close()
