"""The pixseek command: output formats, exit codes, and messages instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from imagegen import make_corrupt_jpeg, make_photo

from pixseek.search.cli import main


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    make_photo(folder / "red.jpg", color=(255, 0, 0))
    make_photo(folder / "blue.jpg", color=(0, 0, 255))
    make_corrupt_jpeg(folder / "broken.jpg")
    return folder


@pytest.fixture
def run(tmp_path: Path):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, ["--library", str(tmp_path / "lib"), *args])

    return invoke


@pytest.fixture
def indexed(run, photos: Path, color_model: str):
    result = run("index", str(photos), "--model", color_model, "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    return result


def test_index_prints_a_summary_of_the_run(indexed) -> None:
    assert "3 photos: 2 new" in indexed.output
    assert "1 failed" in indexed.output


def test_search_prints_rank_score_and_path(run, indexed, photos: Path) -> None:
    result = run("search", "something red", "-k", "2")
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0].split()
    assert first[0] == "1" and float(first[1]) > 0.5 and first[2] == str(photos / "red.jpg")


def test_read_commands_speak_json(run, indexed, photos: Path) -> None:
    found = json.loads(run("search", "blue", "--json").output)
    assert found[0]["path"] == str(photos / "blue.jpg") and "score" in found[0]
    alike = json.loads(run("similar", str(photos / "red.jpg"), "--json").output)
    assert [r["path"] for r in alike] == [str(photos / "blue.jpg")]
    facts = json.loads(run("info", "--json").output)
    assert facts["images"] == 2 and facts["failed"] == 1 and facts["model"] == "test:color"
    assert facts["failures"][0][0] == str(photos / "broken.jpg")


def test_info_shows_model_index_and_failures(run, indexed) -> None:
    result = run("info")
    assert result.exit_code == 0
    assert "2 indexed, 1 failed" in result.output and "Index:" in result.output
    assert "broken.jpg" in result.output


def test_remove_forgets_the_folder(run, indexed, photos: Path) -> None:
    assert json.loads(run("remove", str(photos), "--json").output) == {"removed": 3}
    assert json.loads(run("info", "--json").output)["images"] == 0


def test_user_errors_exit_1_with_a_message_and_no_traceback(run, tmp_path: Path) -> None:
    missing_library = run("search", "dogs")
    assert missing_library.exit_code == 1
    assert "no library" in missing_library.output and "Traceback" not in missing_library.output
    missing_folder = run("index", str(tmp_path / "nope"), "--model", "openclip:pixseek-tiny-vit")
    assert missing_folder.exit_code == 1 and "no such folder" in missing_folder.output
    bad_model = run("index", str(tmp_path), "--model", "no-such-model")
    assert bad_model.exit_code == 1 and "unknown model" in bad_model.output


def test_model_switch_without_reindex_is_refused(run, indexed, photos: Path) -> None:
    result = run("index", str(photos), "--model", "openclip:pixseek-tiny-vit")
    assert result.exit_code == 1 and "--reindex" in result.output


def test_bad_usage_exits_2(run, indexed) -> None:
    assert run("search").exit_code == 2
    assert run("search", "x", "-k", "0").exit_code == 2
    assert run("search", "x", "--after", "yesterday").exit_code == 2
    assert run("search", "  ").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_before_a_bare_date_includes_that_whole_day(run, tmp_path: Path, color_model) -> None:
    from datetime import datetime

    folder = tmp_path / "dated"
    folder.mkdir()
    make_photo(folder / "evening.jpg", taken_at=datetime(2021, 3, 4, 20, 0, 0))
    assert run("index", str(folder), "--model", color_model, "--workers", "0", "-q").exit_code == 0
    found = json.loads(run("search", "x", "--before", "2021-03-04", "--json").output)
    assert [Path(r["path"]).name for r in found] == ["evening.jpg"]
    assert json.loads(run("search", "x", "--before", "2021-03-03", "--json").output) == []


def test_library_may_follow_the_command_and_then_wins(tmp_path: Path, color_model: str) -> None:
    photos = tmp_path / "photos"
    make_photo(photos / "red.jpg", color=(230, 20, 20))
    here, other = tmp_path / "here", tmp_path / "other"
    runner = CliRunner()
    indexed = runner.invoke(
        main, ["index", str(photos), "--library", str(here), "-q", "--model", color_model]
    )
    assert indexed.exit_code == 0, indexed.output
    found = runner.invoke(main, ["--library", str(other), "search", "red", "--library", str(here)])
    assert found.exit_code == 0, found.output
    assert "red.jpg" in found.output
    facts = runner.invoke(main, ["info", "--json", "--library", str(here)])
    assert json.loads(facts.output)["images"] == 1
    assert not other.exists()
