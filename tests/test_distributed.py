"""Indexing with Ray actors gives the local run's index and report, resumes by shard, reuses
vectors."""

from __future__ import annotations

import functools
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import open_clip
import pytest
import ray
from click.testing import CliRunner
from conftest import TINY_CONFIG, TINY_SPEC
from imagegen import make_corrupt_jpeg, make_photo

from pixseek.encoders import load_encoder
from pixseek.indexer import distributed
from pixseek.indexer.distributed import EmbedPool, save_shard, staging_folder
from pixseek.indexer.pipeline import Local, index_folder
from pixseek.indexer.stages import IndexReport, Rows
from pixseek.indexer.store import NewImage, Store
from pixseek.search.api import Library
from pixseek.search.cli import main

PHOTOS = 11  # plus one broken file: 12 files, 3 shards of 4
SHARD = 4


@pytest.fixture(scope="module")
def pool():
    """One local Ray and two tiny-model actors for the whole module (startup is slow); two more
    CPUs stay free for the pools that ``Library.index(ray=...)`` starts."""
    hook = functools.partial(open_clip.add_model_config, str(TINY_CONFIG))
    hook.__name__ = "add_tiny_model_config"  # Ray names setup hooks
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": hook},
    )
    with EmbedPool(TINY_SPEC, workers=2, shard_size=SHARD) as embedders:
        yield embedders
    ray.shutdown()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    for n in range(PHOTOS):
        taken = datetime(2020, 1, n + 1, 8, 30) if n % 3 == 0 else None
        make_photo(
            folder / f"sub{n % 2}" / f"p{n:02d}.jpg",
            color=(n * 20, 250 - n * 20, 90),
            taken_at=taken,
        )
    make_corrupt_jpeg(folder / "broken.jpg")
    return folder


def _rows(store: Store) -> dict[str, tuple]:
    states = store.states_under("/")
    rows = store.get_rows([s.id for s in states.values()])
    return {
        row.path: (
            row.status,
            row.error,
            row.fingerprint,
            row.width,
            row.height,
            row.taken_at,
            store.vector_of(row.id),
        )
        for row in rows.values()
    }


def _assert_same_rows(got: dict[str, tuple], want: dict[str, tuple]) -> None:
    assert got.keys() == want.keys()
    for path, (*facts, vector) in got.items():
        *want_facts, want_vector = want[path]
        assert facts == want_facts, path
        if want_vector is None:
            assert vector is None, path
        else:
            np.testing.assert_allclose(vector, want_vector, atol=1e-5, err_msg=path)


def _counts(report: IndexReport) -> dict:
    """What a run did to the library, leaving out the time and how a Ray run cut it up."""
    shards = {"seconds", "shards", "shards_resumed", "shards_discarded"}
    return {name: value for name, value in vars(report).items() if name not in shards}


@pytest.fixture
def reference(tmp_path: Path, photos: Path) -> dict[str, tuple]:
    store = Store(tmp_path / "reference.db")
    index_folder(store, Local(load_encoder(TINY_SPEC), workers=0), str(photos), progress=False)
    rows = _rows(store)
    store.close()
    return rows


def test_local_and_ray_runs_give_equal_reports_and_vectors(
    tmp_path: Path, photos: Path, pool: EmbedPool
) -> None:
    local_store, ray_store = Store(tmp_path / "local.db"), Store(tmp_path / "ray.db")
    local = Local(load_encoder(TINY_SPEC), workers=0)

    def both() -> tuple[IndexReport, IndexReport]:
        options = dict(batch_size=3, progress=False)
        return (
            index_folder(local_store, local, str(photos), **options),
            index_folder(ray_store, pool, str(photos), **options),
        )

    first, first_ray = both()
    assert _counts(first) == _counts(first_ray)
    assert (first.scanned, first.added, first.failed) == (PHOTOS + 1, PHOTOS, 1)
    assert (first.shards, first_ray.shards, first_ray.shards_resumed) == (0, 3, 0)
    _assert_same_rows(_rows(ray_store), _rows(local_store))
    assert not list(staging_folder(ray_store).iterdir())  # written shards are deleted

    before = _rows(ray_store)
    moved, renamed = photos / "sub0" / "p00.jpg", photos / "renamed.jpg"
    shutil.move(moved, renamed)
    make_photo(photos / "sub1" / "p01.jpg", color=(0, 0, 0))  # changed in place
    (photos / "sub0" / "p02.jpg").unlink()
    again, again_ray = both()
    assert _counts(again) == _counts(again_ray)
    assert (again.reused, again.updated, again.added, again.removed) == (1, 1, 0, 2)
    after = _rows(ray_store)
    _assert_same_rows(after, _rows(local_store))
    np.testing.assert_array_equal(after[str(renamed)][-1], before[str(moved)][-1])


def test_interrupted_run_merges_finished_shards_instead_of_embedding_them(
    tmp_path: Path,
    photos: Path,
    reference: dict[str, tuple],
    pool: EmbedPool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = Store(tmp_path / "library.db")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # the driver dies as the first finished shard comes in

    monkeypatch.setattr(distributed, "_merge", interrupt)
    with pytest.raises(KeyboardInterrupt):
        index_folder(store, pool, str(photos), progress=False)
    monkeypatch.undo()
    finished = list(staging_folder(store).glob("shard-*.npz"))
    assert 1 <= len(finished) <= 3 and sum(store.counts().values()) == 0

    report = index_folder(store, pool, str(photos), progress=False)
    assert report.shards_resumed == len(finished)
    assert report.shards == 3 - len(finished)  # only the unfinished files were embedded
    assert (report.added, report.failed) == (PHOTOS, 1)
    _assert_same_rows(_rows(store), reference)
    assert not list(staging_folder(store).glob("shard-*"))


def test_leftover_shard_of_other_weights_is_discarded(
    tmp_path: Path, photos: Path, reference: dict[str, tuple], pool: EmbedPool
) -> None:
    store = Store(tmp_path / "library.db")
    staging = staging_folder(store)
    staging.mkdir()
    stale = Rows([NewImage(str(photos / "sub0" / "p00.jpg"), 1, 2, error="x")], [False])
    save_shard(staging / "shard-old.npz", stale, "old", pool.dim)

    report = index_folder(store, pool, str(photos), progress=False)
    assert (report.shards_discarded, report.shards_resumed, report.added) == (1, 0, PHOTOS)
    _assert_same_rows(_rows(store), reference)


def test_library_index_with_ray_gives_the_single_process_vectors(
    tmp_path: Path, photos: Path, reference: dict[str, tuple], pool: EmbedPool
) -> None:
    with Library.open(tmp_path / "lib", model=TINY_SPEC) as library:
        report = library.index([photos], ray="local")
        assert (report.added, report.failed) == (PHOTOS, 1)
        _assert_same_rows(_rows(Store(tmp_path / "lib" / "library.db")), reference)
        assert library.search("a photo", k=3)  # the merged rows are searchable


def test_cli_index_ray_flag_and_a_folder_given_as_its_address(tmp_path: Path, photos: Path) -> None:
    runner = CliRunner()
    base = ["--library", str(tmp_path / "lib"), "index", "--model", TINY_SPEC]
    wrong = runner.invoke(main, [*base, "--ray", str(photos)])
    assert wrong.exit_code == 2 and "not a Ray address" in wrong.output

    done = runner.invoke(main, [*base, str(photos), "--ray", "--json"])
    assert done.exit_code == 3, done.output  # the folder's one broken photo
    assert json.loads(done.stdout)["added"] == PHOTOS  # stdout: Ray may warn on stderr
