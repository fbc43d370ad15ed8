"""The ``pixseek`` command: a thin click layer over pixseek.search.api.

Exit codes: 0 ok, 1 a user error (a message, no traceback), 2 bad usage (click's own),
3 an ``index`` run that finished but could not index every file it saw (listed in its
output, its ``--json`` ``failures`` and ``scan_errors``, and in ``pixseek info``).
File names are shown ``printable``: bytes that are not UTF-8 as ``\\xNN``.
The API (torch, the models, the database) is imported inside the commands that use it, so
``--help``, ``--version`` and usage errors answer without loading any of it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import warm

if TYPE_CHECKING:
    from .api import Library, Model


def printable(path: str | os.PathLike[str]) -> str:
    """A file name as the API shows it (imported on first use, as the rest of the API)."""
    from .api import printable as shown

    return shown(path)


DATE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]
INCOMPLETE = 3  # exit code of an index run that could not index every file it saw


class LazyGroup(click.Group):
    """Subcommands imported only when run (click's documented pattern): ``pixseek train`` and
    ``pixseek eval`` live in pixseek.training, which searching and indexing never import.
    ``--help`` lists them by the short help given here, since importing them loads torch."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy  # command name -> ("module:attribute", short help)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, _, attribute = self.lazy[name][0].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = [
            (name, self.lazy[name][1] if name in self.lazy else cmd.get_short_help_str(limit))
            for name in names
            if name in self.lazy or not (cmd := self.commands[name]).hidden
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def user_errors(func: Callable) -> Callable:
    """Turn the API's user-facing errors into click errors: a message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            from .api import LibraryError  # here, not before: a warm search imports no API

            if isinstance(exc, LibraryError):
                raise click.ClickException(str(exc)) from None
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted; what was indexed so far is kept.", err=True)
            sys.exit(130)

    return wrapper


@dataclass
class Settings:
    """What the options shared by every command say (``ctx.obj``)."""

    library: Path | None = None
    device: str | None = None


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Options before a command's name are parsed first, so the one after it wins."""
    if value is not None:
        setattr(ctx.ensure_object(Settings), param.name, value)


def library_option(**attrs: Any) -> Callable:
    """``--library``, taken before or after a command's name (the one after wins)."""
    return click.option(
        "--library",
        type=click.Path(file_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember,
        help="Library folder (default: PIXSEEK_LIBRARY, else in your user data folder). "
        "Given before and after the command's name, the one after wins.",
        **attrs,
    )


def device_option(**attrs: Any) -> Callable:
    """``--device``, taken before or after a command's name (the one after wins)."""
    return click.option(
        "--device",
        expose_value=False,
        callback=_remember,
        help="torch device for the model, e.g. cpu or cuda (default: auto).",
        **attrs,
    )


def _open(ctx: click.Context, **kwargs: Any) -> Library:
    from .api import Library

    settings = ctx.ensure_object(Settings)
    library = Library.open(settings.library, device=settings.device, **kwargs)
    ctx.call_on_close(library.close)
    return library


def _notice(model: Model) -> None:
    if model.notice:
        click.echo(model.notice, err=True)


@click.group(
    cls=LazyGroup,
    lazy={
        "train": (
            "pixseek.training.cli:train_command",
            "Fine-tune pixseek-lite on captioned photos, keeping the epoch with the best recall.",
        ),
        "eval": (
            "pixseek.training.cli:eval_command",
            "Recall@1/5/10 and median rank of text->image and image->text retrieval.",
        ),
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@library_option(envvar="PIXSEEK_LIBRARY")
@device_option()
@click.version_option(package_name="pixseek")
def main() -> None:
    """Search your photos by describing them, or by showing a similar one."""


def _ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a folder where an address belongs: ``--ray ~/Photos`` reads the folder as one."""
    if value is None or value in ("local", "auto") or re.fullmatch(r"(ray://)?[\w.-]+:\d+", value):
        return value
    raise click.BadParameter(
        f"{value!r} is not a Ray address ('local', 'auto' or HOST:PORT); "
        "put the folders before --ray, or write --ray=local"
    )


@main.command()
@library_option()
@device_option()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--model", help="Model preset, openclip:ARCH@TAG, or a checkpoint file.")
@click.option(
    "--reindex",
    is_flag=True,
    help="Drop all vectors and embed everything again (no --model: with the newest model of "
    "the library's line).",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--workers", type=click.IntRange(0, 64), help="Decoding processes (default: auto).")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option(
    "--captions", is_flag=True, help="Also caption photos that have no caption yet (slower)."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    callback=_ray_address,
    help="Embed on Ray actors: alone (or 'local') starts Ray here; 'auto' or HOST:PORT joins "
    "a cluster. Give it after the folders.",
)
@click.option(
    "--ray-gpus", default=0.0, type=click.FloatRange(0), help="GPUs per Ray actor (with --ray)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@click.pass_context
@user_errors
def index(
    ctx: click.Context,
    folders: tuple[Path, ...],
    model: str | None,
    reindex: bool,
    batch_size: int,
    workers: int | None,
    include_hidden: bool,
    captions: bool,
    ray_address: str | None,
    ray_gpus: float,
    quiet: bool,
    as_json: bool,
) -> None:
    """Index FOLDERS (or re-scan every folder indexed before). Only new and changed photos
    are embedded; deleted ones are dropped. Safe to interrupt and run again."""
    library = _open(ctx, model=model, reindex=reindex, repair=True)
    for line in library.notices:
        click.echo(line, err=True)
    with library.writing():  # a second run is refused before any model loads
        if library.model is None:  # the default model: chosen (and announced) before the bars
            _notice(library.load_model())
        report = library.index(
            folders,
            batch_size=batch_size,
            workers=workers,
            include_hidden=include_hidden,
            progress=not quiet and not as_json,
            ray=ray_address,
            ray_gpus=ray_gpus,
        )
        captioned = library.add_captions(progress=not quiet and not as_json) if captions else None
    if as_json:
        extra = {} if captioned is None else {"captioned": captioned}
        click.echo(json.dumps({**report.to_dict(), **extra}, indent=2))
        ctx.exit(0 if report.complete else INCOMPLETE)
    rate = report.embedded / report.seconds if report.seconds else 0.0
    click.echo(
        f"{report.scanned} photos: {report.added} new, {report.updated} changed, "
        f"{report.reused} moved or copied, {report.unchanged} unchanged, "
        f"{report.removed} removed, {report.failed} failed, {report.skipped} skipped "
        f"({report.seconds:.1f} s, {rate:.1f} photos/s)."
    )
    if captioned is not None:
        click.echo(f"Captioned {captioned} photos.")
    for path, reason in report.scan_errors[:10]:
        click.echo(f"could not read {printable(path)}: {reason}", err=True)
    for path, reason in report.failures[:10]:
        click.echo(f"not indexed: {printable(path)}: {reason}", err=True)
    if not report.complete:
        click.echo("See every file not indexed with: pixseek info", err=True)
        ctx.exit(INCOMPLETE)


def _filters(func: Callable) -> Callable:
    """Options shared by every ranked query."""
    options = [
        click.option("-k", "--top", "k", default=10, show_default=True, type=click.IntRange(1)),
        click.option(
            "--under",
            "folder",
            type=click.Path(path_type=Path),
            help="Only photos inside this folder.",
        ),
        click.option(
            "--after", type=click.DateTime(DATE_FORMATS), help="Taken on or after this date."
        ),
        click.option(
            "--before", type=click.DateTime(DATE_FORMATS), help="Taken on or before this date."
        ),
        click.option(
            "--min-score",
            type=click.FloatRange(0, 1),
            help="Only results scoring at least this: the score shown, from 0 to 1.",
        ),
        click.option(
            "--rerank/--no-rerank",
            default=None,
            help="Rescore the top results of a text query with the captioner "
            "(default: on where a captioner tuned for the model is available).",
        ),
        click.option(
            "--rerank-depth",
            type=click.IntRange(1, 1000),
            help="How many top results to rerank (default: as tuned for the model, else 30).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print results as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _end_of_day(value: datetime | None) -> datetime | None:
    """A bare date as --before means the whole of that day."""
    if value is not None and value.time() == datetime.min.time():
        return value + timedelta(days=1) - timedelta(microseconds=1)
    return value


def _print_results(results: list[dict[str, Any]], as_json: bool) -> None:
    """Results as ``SearchResult.to_dict`` gives them: the worker's and this process's alike."""
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    if not results:
        click.echo("No matching photos.", err=True)
    for rank, result in enumerate(results, 1):
        line = f"{rank:3d}  {result['score']:4.2f}  {result['path']}"
        click.echo(line + (f"  {result['caption']}" if result["caption"] else ""))


def _absolute(path: Path | None) -> str | None:
    return os.path.abspath(path.expanduser()) if path is not None else None


def _query(
    ctx: click.Context,
    *,
    k: int,
    folder: Path | None,
    after: datetime | None,
    before: datetime | None,
    min_score: float | None,
    as_json: bool,
    image: Path | None = None,
    **query: Any,
) -> None:
    """A search, answered by the library's warm worker where one runs (``pixseek.search.warm``;
    none with ``--device``), else in this process."""
    before = _end_of_day(before)
    query.update(k=k, min_score=min_score, image=_absolute(image), folder=_absolute(folder))
    settings = ctx.ensure_object(Settings)
    if settings.device is None:
        dates = {"taken_after": after, "taken_before": before}
        request = {**query, **{k: d.isoformat() if d else None for k, d in dates.items()}}
        answer = warm.ask(settings.library, request)
        if answer is not None:
            if "error" in answer:
                raise click.ClickException(answer["error"])
            _print_results(answer["results"], as_json)
            return
    library = _open(ctx, readonly=True)
    results = library.search(**query, taken_after=after, taken_before=before)
    _print_results([r.to_dict() for r in results], as_json)


@main.command()
@library_option()
@device_option()
@click.argument("query")
@click.option(
    "--image",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also like this example photo.",
)
@click.option("--not", "negative", multiple=True, help="Push away from this (repeatable).")
@_filters
@click.pass_context
@user_errors
def search(
    ctx: click.Context, query: str, image: Path | None, negative: tuple[str, ...], **options: Any
) -> None:
    """Find photos matching a description, e.g. "two dogs playing in the snow"."""
    if not query.strip():
        raise click.UsageError("the query is empty")
    _query(ctx, text=query, image=image, negative=list(negative), **options)


@main.command()
@library_option()
@device_option()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--not", "negative", multiple=True, help="Push away from this (repeatable).")
@_filters
@click.pass_context
@user_errors
def similar(ctx: click.Context, image: Path, negative: tuple[str, ...], **options: Any) -> None:
    """Find photos that look like IMAGE (any image file, indexed or not)."""
    _query(ctx, image=image, negative=list(negative), **options)


@main.command()
@device_option()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--captioner",
    envvar="PIXSEEK_CAPTIONER",
    help="pixseek-captioner (default, offline), coca-vit-b-32, coca-vit-l-14, "
    "coca:ARCH@TAG, or a checkpoint file (or set PIXSEEK_CAPTIONER).",
)
@click.option("--beams", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
@user_errors
def caption(
    ctx: click.Context, images: tuple[Path, ...], captioner: str | None, beams: int, as_json: bool
) -> None:
    """Describe each of IMAGES in a sentence (no library needed)."""
    from .api import caption_images

    paths = [os.path.abspath(p.expanduser()) for p in images]
    device = ctx.ensure_object(Settings).device
    texts = caption_images(paths, captioner=captioner, device=device, beams=beams)
    if as_json:
        rows = [{"path": printable(p), "caption": t} for p, t in zip(paths, texts, strict=True)]
        click.echo(json.dumps(rows, indent=2))
        return
    for path, text in zip(paths, texts, strict=True):
        click.echo(f"{printable(path)}: {text}")


@main.command()
@library_option()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
@user_errors
def info(ctx: click.Context, as_json: bool) -> None:
    """What the library holds: photos, failures, model, index, size on disk."""
    facts = _open(ctx, readonly=True).info()
    queries = warm.status(facts.path)
    if as_json:
        click.echo(json.dumps({**facts.to_dict(), "queries": queries}, indent=2))
        return
    click.echo(f"Library:  {printable(facts.path)}")
    click.echo(f"Photos:   {facts.images} indexed, {facts.failed} failed, {facts.skipped} skipped")
    click.echo(f"Folders:  {', '.join(map(printable, facts.folders)) or '-'}")
    click.echo(f"Model:    {facts.model or '-'} ({facts.model_id or 'not loaded yet'})")
    if facts.newer_model:
        click.echo(
            f"Newer:    {facts.newer_model} exists; `pixseek index --reindex` moves this "
            "library to it"
        )
    click.echo(f"Index:    {facts.index_kind or '-'}")
    click.echo(f"On disk:  {facts.size_bytes / 1e6:.1f} MB")
    click.echo(f"Queries:  {queries}")
    for path, reason in facts.failures:
        click.echo(f"  not indexed: {printable(path)}: {reason}")


@main.command()
@library_option()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the count as JSON.")
@click.pass_context
@user_errors
def remove(ctx: click.Context, folder: Path, as_json: bool) -> None:
    """Forget FOLDER and the photos in it (your files are not touched)."""
    gone = _open(ctx, create=False).remove(folder)
    if as_json:
        click.echo(json.dumps({"removed": gone}))
    else:
        click.echo(f"Forgot {gone} photos under {printable(folder)}.")


@main.command()
@library_option()
@device_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    envvar="PIXSEEK_TOKEN",
    help="Required on every request; needed to listen beyond loopback (or set PIXSEEK_TOKEN).",
)
@click.option(
    "--folder",
    "folders",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder the page may index, besides the library's own (repeatable).",
)
@click.pass_context
@user_errors
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    token: str | None,
    folders: tuple[Path, ...],
) -> None:
    """Serve the search page and its HTTP API (http://127.0.0.1:8000/; docs at /docs)."""
    from .server import serve as run_server  # FastAPI loads only for this command

    settings = ctx.ensure_object(Settings)
    run_server(
        settings.library,
        host=host,
        port=port,
        token=token,
        folders=folders,
        device=settings.device,
    )


if __name__ == "__main__":
    main()
