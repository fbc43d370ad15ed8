"""The pixseek command: output formats, exit codes, and messages instead of tracebacks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from imagegen import make_corrupt_jpeg, make_photo

from pixseek.search import Library, api, cli, server
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
def indexed(run, photos: Path, color_model: str):
    result = run("index", str(photos), "--model", color_model, "--workers", "0", "-q")
    assert result.exit_code == cli.INCOMPLETE, result.output  # broken.jpg
    return result


def test_index_prints_a_summary_of_the_run(indexed) -> None:
    assert "3 photos: 2 new" in indexed.output
    assert "1 failed" in indexed.output
    assert "broken.jpg: corrupt image" in indexed.output


def test_index_of_a_folder_with_failures_exits_3_and_lists_them_in_json(
    run, photos: Path, color_model: str
) -> None:
    result = run("index", str(photos), "--model", color_model, "--workers", "0", "--json")
    assert result.exit_code == 3
    report = json.loads(result.output)
    assert report["complete"] is False and report["failed"] == 1
    assert report["failures"] == [[str(photos / "broken.jpg"), report["failures"][0][1]]]
    (photos / "broken.jpg").unlink()
    again = run("index", str(photos), "--workers", "0", "--json")
    assert again.exit_code == 0 and json.loads(again.output)["complete"] is True


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
    missing_folder = run("index", str(tmp_path / "nope"), "--model", "no-such-model")
    # refused before the model loads (an unknown one would say so) and before a library exists
    assert missing_folder.exit_code == 2 and "does not exist" in missing_folder.output
    assert not (tmp_path / "lib").exists()
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


def _snapshot(library: Path) -> tuple[bytes, int]:
    db = library / "library.db"
    return db.read_bytes(), db.stat().st_mtime_ns


def test_read_commands_leave_the_library_database_untouched(
    run, indexed, photos: Path, tmp_path: Path
) -> None:
    before = _snapshot(tmp_path / "lib")
    for args in (
        ["search", "red"],
        ["search", "red", "--json", "--under", str(photos), "--no-rerank"],
        ["similar", str(photos / "red.jpg")],
        ["info"],
        ["info", "--json"],
    ):
        assert run(*args).exit_code == 0, args
        assert _snapshot(tmp_path / "lib") == before, args


def test_searching_a_library_with_no_model_yet_records_none(
    tmp_path: Path, color_model: str
) -> None:
    library = tmp_path / "new"
    Library.open(library).close()  # created, never indexed
    before = _snapshot(library)
    env = {"PIXSEEK_MODEL": color_model}
    found = CliRunner().invoke(main, ["search", "red", "--library", str(library)], env=env)
    assert found.exit_code == 0, found.output
    assert _snapshot(library) == before
    facts = json.loads(
        CliRunner().invoke(main, ["info", "--json", "--library", str(library)]).output
    )
    assert (facts["model"], facts["model_id"]) == (None, None)


def test_switching_models_with_reindex_embeds_everything_again(
    run, indexed, photos: Path, tiny_spec: str
) -> None:
    switched = run("index", str(photos), "--model", tiny_spec, "--reindex", "-q", "--json")
    assert switched.exit_code == cli.INCOMPLETE, switched.output
    assert json.loads(switched.output)["added"] == 2
    assert json.loads(run("info", "--json").output)["model"] == tiny_spec


def test_a_device_the_machine_lacks_is_a_message_not_a_traceback(
    run, photos: Path, tiny_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, words in [("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("tpu9", "unknown")]:
        result = run("--device", device, "index", str(photos), "--model", tiny_spec)
        assert result.exit_code == 1, result.output
        assert words in result.output and "Traceback" not in result.output


def test_a_huge_k_returns_every_photo(run, indexed) -> None:
    result = run("search", "red", "-k", "10000000000000", "--rerank-depth", "1000", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 2


def test_a_folder_with_a_leading_double_slash_filters(run, indexed, photos: Path) -> None:
    result = run("search", "red", "--under", f"/{photos}//", "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["path"]).name for r in json.loads(result.output)] == ["red.jpg", "blue.jpg"]


def test_library_and_device_may_follow_the_command(
    run, indexed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = []
    opened = Library.open.__func__

    def spy(cls, *args, **options):
        devices.append(options["device"])
        return opened(cls, *args, **options)

    monkeypatch.setattr(Library, "open", classmethod(spy))
    args = ["search", "red", "--device", "cpu", "--library", str(tmp_path / "lib"), "-k", "1"]
    found = CliRunner().invoke(main, ["--device", "cuda:7", "--library", "elsewhere", *args])
    assert found.exit_code == 0, found.output
    assert "red.jpg" in found.output and devices == ["cpu"]


def test_train_and_eval_load_only_when_run() -> None:
    """--help lists them with their short help; other commands never import training code."""
    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0
    lines = {line.split()[0]: line for line in listed.output.splitlines() if line.startswith("  ")}
    assert len(lines["train"].split()) > 2 and len(lines["eval"].split()) > 2
    probe = (
        "import sys\n"
        "from pixseek.search.cli import main\n"
        "for command in ('index', 'search', 'similar', 'info', 'remove', 'caption', 'serve'):\n"
        "    main([command, '--help'], standalone_mode=False)\n"
        "print(sorted(m for m in sys.modules if m.startswith('pixseek.training')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_min_score_takes_the_shown_scores_range(run, indexed) -> None:
    assert run("search", "red", "--min-score", "1.5").exit_code == 2
    shown = [float(line.split()[1]) for line in run("search", "red", "-k", "3").output.splitlines()]
    kept = run("search", "red", "-k", "3", "--min-score", str(shown[1])).output.splitlines()
    assert len(kept) == 2


def test_help_version_and_usage_errors_load_no_model_library() -> None:
    """They answer at once: importing the CLI and parsing arguments load no torch, numpy or API."""
    probe = (
        "import sys\n"
        "from pixseek.search.cli import main\n"
        "for args in (['--help'], ['--version'], ['search', '--help'], ['search'], ['bogus']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'numpy', 'pixseek.search.api', 'pixseek.encoders')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout + result.stderr


def test_the_lazy_commands_are_listed_with_their_own_short_help() -> None:
    for name, (_, short_help) in main.lazy.items():
        command = main.get_command(None, name)
        assert command.get_short_help_str(200) == short_help, name


def test_the_rerank_depth_help_names_the_api_default() -> None:
    listed = CliRunner().invoke(main, ["search", "--help"], terminal_width=200)
    assert f"(default: as tuned for the model, else {api.DEFAULT_DEPTH})" in listed.output


def test_the_cli_and_the_server_use_only_the_public_api() -> None:
    """They import only what pixseek.search.api exports, and touch nothing private of it."""
    for module in (cli, server):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("pixseek") for a in node.names), module
            elif isinstance(node, ast.ImportFrom) and (node.level or "pixseek" in node.module):
                if module is cli and (node.module == "server" or node.names[0].name == "warm"):
                    continue  # pixseek serve runs the server; warm searches ask a worker
                assert (node.level, node.module) == (1, "api"), (module, node.module)
                assert {a.name for a in node.names} <= set(api.__all__), module
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                mine = isinstance(owner, ast.Name) and owner.id == "self"
                assert mine or node.attr.startswith("__"), (module, node.attr, node.lineno)


def test_a_name_that_is_not_utf8_is_indexed_found_and_shown_escaped(
    run, tmp_path: Path, color_model: str
) -> None:
    folder = tmp_path / "camera"
    folder.mkdir()
    make_photo(folder / "blue.jpg", color=(0, 0, 255))
    make_photo(folder / "white.jpg", color=(255, 255, 255))
    odd = os.fsdecode(os.fsencode(folder) + b"/latin1_\xe9\xff.jpg")
    make_photo(odd, color=(255, 0, 0))
    shown = f"{folder}/latin1_\\xe9\\xff.jpg"

    indexed = run("index", str(folder), "--model", color_model, "--workers", "0", "--json")
    assert indexed.exit_code == 0, indexed.output
    assert json.loads(indexed.output)["added"] == 3
    found = run("search", "red", "-k", "1")
    assert found.exit_code == 0 and found.output.split()[2] == shown
    assert json.loads(run("search", "red", "-k", "1", "--json").output)[0]["path"] == shown
    assert Library.open(tmp_path / "lib").search("red", k=1)[0].path == odd  # the real name

    os.unlink(odd)
    with open(odd, "wb") as broken:
        broken.write(b"not a photo")
    again = run("index", str(folder), "--workers", "0", "-q")
    assert again.exit_code == cli.INCOMPLETE
    assert f"not indexed: {shown}: not an image" in again.output
    listed = run("info")
    assert f"not indexed: {shown}: not an image" in listed.output
    assert json.loads(run("info", "--json").output)["failures"] == [[shown, "not an image"]]
