"""The Python API end to end: index folders, search by text/image, incremental re-runs."""

from __future__ import annotations

import ast
import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import make_corrupt_jpeg, make_photo

import pixseek.search
import pixseek.search.models
from pixseek.indexer.store import Store
from pixseek.search import Library, LibraryError
from pixseek.search.api import DB_NAME
from pixseek.search.cli import main

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    make_photo(folder / "red.jpg", color=RED, taken_at=datetime(2020, 5, 1))
    make_photo(folder / "green.png", color=GREEN)
    make_photo(folder / "trip" / "blue.jpg", color=BLUE, taken_at=datetime(2022, 8, 9))
    make_photo(folder / "trip" / "yellow.jpg", color=YELLOW, taken_at=datetime(2023, 1, 2))
    return folder


@pytest.fixture
def library(tmp_path: Path, photos: Path, color_model: str) -> Library:
    lib = Library.open(tmp_path / "lib", model=color_model)
    lib.index([photos], workers=0)
    yield lib
    lib.close()


def names(results) -> list[str]:
    return [Path(r.path).name for r in results]


def test_text_query_ranks_the_matching_photo_first(library: Library) -> None:
    results = library.search("a blue photo", k=4)
    assert names(results)[0] == "blue.jpg"
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert len(results) == 4


def test_k_limits_results_and_min_score_drops_weak_ones(library: Library) -> None:
    assert len(library.search("red", k=2)) == 2
    strong = library.search("red", k=4, min_score=0.9)
    assert names(strong) == ["red.jpg"]


def test_scores_run_from_0_to_1_and_depend_on_the_photo_and_query_alone(
    library: Library,
) -> None:
    everything = library.search("red", k=4)
    assert all(0 <= r.score <= 1 for r in everything)
    assert [r.score for r in everything] == sorted((r.score for r in everything), reverse=True)
    alone = library.search("red", k=1, folder=Path(everything[0].path).parent)
    assert alone[0].score == everything[0].score


def test_min_score_filters_on_the_score_shown(library: Library) -> None:
    everything = library.search("red", k=4)
    floor = (everything[0].score + everything[1].score) / 2
    assert library.search("red", k=4, min_score=floor) == everything[:1]
    for bad in (-0.1, 1.5):
        with pytest.raises(LibraryError, match="from 0 to 1"):
            library.search("red", min_score=bad)


def test_the_scales_read_a_raw_score_the_same_way_each_time() -> None:
    from pixseek.search import scores

    scale = scores.Scale(mid=0.2, width=0.05)
    assert scale(0.2) == 0.5 and scale(10.0) == 1.0 and scale(-10.0) == 0.0
    assert scale(0.25) > scale(0.21) > 0.5 > scale(0.19)
    assert scores.cosine(1.0) == 1.0 and scores.cosine(-1.0) == 0.0 and scores.cosine(0.0) == 0.5
    calibrated = scores.scorer("pixseek-lite", "pixseek-captioner")
    assert calibrated.similarity is scores.SIMILARITY["pixseek-lite"]
    assert scores.scorer(None)(0.6, None) == scores.cosine(0.6)  # a query by example alone


def test_every_shipped_offline_model_reranks_by_default_with_calibrated_scores() -> None:
    from pixseek.encoders import presets
    from pixseek.search import scores
    from pixseek.search.rerank import FUSION

    shipped = [name for name, cfg in presets().items() if cfg["backend"] == "lite"]
    assert "pixseek-lite-2" in shipped
    for name in shipped:
        pair = (name, "pixseek-captioner")
        assert pair in FUSION and pair in scores.FUSED and name in scores.SIMILARITY, name


def test_negative_text_pushes_results_away(library: Library) -> None:
    plain = library.search("yellow", k=4)
    assert names(plain)[0] == "yellow.jpg"
    pushed = library.search("yellow", negative="green", k=4)
    assert names(pushed).index("red.jpg") < names(pushed).index("green.png")


def test_text_and_example_image_combine(library: Library, photos: Path, tmp_path: Path) -> None:
    make_photo(photos / "magenta.jpg", color=(255, 0, 255))
    library.index([photos], workers=0)
    example = make_photo(tmp_path / "example.jpg", color=BLUE)
    assert names(library.search("red", image=example, k=1)) == ["magenta.jpg"]


def test_similar_excludes_the_example_itself(library: Library, photos: Path) -> None:
    results = library.similar(photos / "trip" / "yellow.jpg", k=3)
    assert "yellow.jpg" not in names(results)
    assert names(results)[0] in {"red.jpg", "green.png"}  # yellow's nearest neighbours
    by_id = library.similar(results[0].id, k=1)
    assert names(by_id) != names(results[:1])


def test_similar_accepts_an_image_that_is_not_indexed(library: Library, tmp_path: Path) -> None:
    outside = make_photo(tmp_path / "outside.png", color=GREEN)
    assert names(library.similar(outside, k=1)) == ["green.png"]


def test_filters_by_folder_and_capture_date(library: Library, photos: Path) -> None:
    assert set(names(library.search("red", k=10, folder=photos / "trip"))) == {
        "blue.jpg",
        "yellow.jpg",
    }
    dated = library.search("red", k=10, taken_after=datetime(2021, 1, 1))
    assert set(names(dated)) == {"blue.jpg", "yellow.jpg"}
    window = library.search(
        "red", k=10, taken_after=datetime(2022, 1, 1), taken_before=datetime(2022, 12, 31)
    )
    assert names(window) == ["blue.jpg"]
    assert library.search("red", folder=photos / "nowhere") == []


def test_results_carry_size_date_and_path(library: Library, photos: Path) -> None:
    top = library.search("red", k=1)[0]
    assert top.path == str(photos / "red.jpg")
    assert (top.width, top.height) == (64, 48)
    assert top.taken_at == datetime(2020, 5, 1)
    assert top.to_dict()["taken_at"] == "2020-05-01T00:00:00"


def test_rerun_embeds_only_new_changed_and_moved_files(library: Library, photos: Path) -> None:
    make_photo(photos / "new.jpg", color=(10, 200, 10))  # added
    make_photo(photos / "green.png", color=(0, 0, 128))  # changed in place
    os.utime(photos / "green.png", ns=(1, 1))
    shutil.move(photos / "trip" / "yellow.jpg", photos / "moved-yellow.jpg")  # moved
    (photos / "red.jpg").unlink()  # deleted
    report = library.index([photos], workers=0)
    assert (report.added, report.updated, report.reused, report.removed) == (1, 1, 1, 2)
    assert report.unchanged == 1  # trip/blue.jpg
    assert library.info().images == 4
    assert names(library.search("yellow", k=1)) == ["moved-yellow.jpg"]
    assert "red.jpg" not in names(library.search("red", k=10))
    again = library.index(workers=0)  # no folder given: every folder indexed before
    assert (again.embedded, again.reused, again.unchanged) == (0, 0, 4)


def test_an_index_run_with_nothing_changed_loads_no_model(
    library: Library, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []
    real = pixseek.search.models.load_model
    monkeypatch.setattr(pixseek.search.models, "load_model", lambda *a: loads.append(a) or real(*a))
    with Library.open(tmp_path / "lib") as reopened:
        assert reopened.index([photos], workers=0).unchanged == 4
        assert loads == []
        make_photo(photos / "new.jpg", color=(10, 200, 10))
        assert reopened.index([photos], workers=0).added == 1
        assert len(loads) == 1


def test_broken_files_are_recorded_with_a_reason_not_retried(
    library: Library, photos: Path
) -> None:
    make_corrupt_jpeg(photos / "broken.jpg")
    (photos / "notes.txt").write_text("not a photo, not even scanned")
    report = library.index([photos], workers=0)
    assert report.failed == 1
    facts = library.info()
    assert facts.failed == 1 and facts.images == 4
    assert facts.failures[0][0].endswith("broken.jpg") and facts.failures[0][1]
    assert library.index([photos], workers=0).failed == 0  # unchanged: not decoded again


def test_decoding_in_worker_processes_gives_the_same_vectors(
    tmp_path: Path, photos: Path, color_model: str
) -> None:
    """Worker processes and decoding in turn with the model store identical vectors."""
    stored, scores = [], []
    for workers, batch_size in ((0, 64), (2, 2)):
        with Library.open(tmp_path / f"lib{workers}", model=color_model) as lib:
            assert lib.index([photos], workers=workers, batch_size=batch_size).added == 4
            store = Store(lib.path / DB_NAME)  # what was written, read beneath the API
            ids, vectors = next(store.iter_vectors())
            rows = store.get_rows([int(i) for i in ids])
            store.close()
            paths = [rows[int(i)].path for i in ids]
            stored.append(dict(zip(paths, vectors.tolist(), strict=True)))
            scores.append({Path(r.path).name: r.score for r in lib.search("green", k=4)})
    assert stored[0] == stored[1]
    a, b = scores
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[n] for n in a], [b[n] for n in a], rtol=1e-6)


def test_remove_forgets_a_folder(library: Library, photos: Path) -> None:
    assert library.remove(photos / "trip") == 2
    assert set(names(library.search("blue", k=10))) == {"red.jpg", "green.png"}


def test_a_missing_or_stale_index_file_is_rebuilt(library: Library, tmp_path: Path) -> None:
    for f in (tmp_path / "lib").glob("vectors-*"):
        f.unlink()
    with Library.open(tmp_path / "lib") as reopened:
        assert names(reopened.search("blue", k=1)) == ["blue.jpg"]
        assert reopened.info().index_kind


def test_another_model_is_refused_unless_reindexing(
    library: Library, tmp_path: Path, tiny_spec: str, photos: Path
) -> None:
    with pytest.raises(LibraryError, match="--reindex"):
        Library.open(tmp_path / "lib", model=tiny_spec)
    with Library.open(tmp_path / "lib", model=tiny_spec, reindex=True) as switched:
        report = switched.index([photos], workers=0)
        assert report.added == 4
        assert switched.info().model == tiny_spec
        assert switched.info().model_id.startswith("pixseek-tiny-vit/random@")


def test_a_library_of_an_older_model_keeps_it_hears_of_the_newer_and_reindex_moves_it(
    tmp_path: Path, photos: Path
) -> None:
    with Library.open(tmp_path / "old", model="pixseek-lite") as old:
        old.index([photos], workers=0)
        assert old.info().newer_model == "pixseek-lite-2"
    shown = CliRunner().invoke(main, ["--library", str(tmp_path / "old"), "info"])
    assert shown.exit_code == 0 and "Newer:    pixseek-lite-2 exists" in shown.output
    with Library.open(tmp_path / "old") as reopened:
        assert reopened.load_model().encoder.name == "pixseek-lite"
        assert names(reopened.search("a photo", k=4))
    with Library.open(tmp_path / "old", reindex=True) as moved:
        assert moved.index([photos], workers=0).added == 4
        facts = moved.info()
        assert facts.model == "pixseek-lite-2" and facts.newer_model is None
        assert facts.model_id.startswith("pixseek-lite-2@")


def test_reopening_uses_the_recorded_model(library: Library, tmp_path: Path) -> None:
    with Library.open(tmp_path / "lib") as reopened:
        assert reopened.load_model().encoder.model_id == "color@1"


def test_missing_library_and_empty_queries_are_user_errors(library: Library, tmp_path) -> None:
    with pytest.raises(LibraryError, match="no library"):
        Library.open(tmp_path / "elsewhere", create=False)
    with pytest.raises(LibraryError):
        library.search("   ")
    with pytest.raises(LibraryError, match="no such image"):
        library.similar(tmp_path / "missing.jpg")
    with pytest.raises(LibraryError, match="no such folder"):
        library.index([tmp_path / "missing"])


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


def _changes_environment(node: ast.AST) -> bool:
    """``os.environ[...] = / del``, ``os.environ.setdefault/update/pop/...``, ``os.putenv``."""
    if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del):
        return _is_environ(node.value)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in ("putenv", "unsetenv"):
            return True
        writes = ("setdefault", "update", "pop", "popitem", "clear")
        return node.func.attr in writes and _is_environ(node.func.value)
    return False


def test_no_module_of_search_or_indexer_changes_the_environment() -> None:
    """Importing or calling pixseek leaves the process environment as the caller set it."""
    root = Path(pixseek.search.__file__).parents[1]
    for module in [*(root / "search").rglob("*.py"), *(root / "indexer").rglob("*.py")]:
        for node in ast.walk(ast.parse(module.read_text())):
            assert not _changes_environment(node), f"{module}:{node.lineno}"


def test_loading_the_model_writes_nothing_an_index_run_records_it(
    tmp_path: Path, photos: Path, color_model: str
) -> None:
    with Library.open(tmp_path / "lib", model=color_model) as library:
        assert library.load_model().encoder.model_id == "color@1"
        assert library.info().model_id is None  # not recorded by loading
        library.index([photos], workers=0)
        assert library.info().model_id == "color@1"
