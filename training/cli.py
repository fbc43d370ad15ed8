"""`pixseek train` and `pixseek eval`: fit pixseek-lite to your captioned photos and measure recall.

Both are plain click commands; the main ``pixseek`` group registers them with ``add_command``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixseek.encoders.base import EncoderError
from pixseek.encoders.registry import load_encoder
from pixseek.training.captions import CaptionFileError, read_captions

_EXPECTED = (EncoderError, CaptionFileError, ValueError, OSError)

_images = click.option(
    "--images",
    "images",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder holding the captioned photos.",
)
_captions = click.option(
    "--captions",
    "captions",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Caption file: 'image<TAB>caption' rows (a header line is optional).",
)
_split = click.option(
    "--split",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Only the images this file lists, one file name per line.",
)
_device = click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: best).")


def _percent(value: float) -> str:
    return f"{value:5.1f}"


@click.command("train")
@_images
@_captions
@_split
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("pixseek-lite-custom.pt"),
    show_default=True,
    help="Where the trained checkpoint goes (use it with --model).",
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Checkpoint to start from (default: the shipped pixseek-lite-2).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=5e-4,
    show_default=True,
    help="Learning rate of the heads (MiniLM's layers get a tenth).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.1,
    show_default=True,
    help="Share of photos held out to measure recall.",
)
@click.option(
    "--resume/--restart",
    default=True,
    show_default=True,
    help="Continue an interrupted run writing the same --out.",
)
@_device
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def train_command(
    images,
    captions,
    split,
    out,
    base,
    epochs,
    batch_size,
    lr,
    val_fraction,
    resume,
    device,
    as_json,
    quiet,
) -> None:
    """Fine-tune pixseek-lite on captioned photos, keeping the epoch with the best recall."""
    from pixseek.training.train import train

    try:
        result = train(
            images,
            captions,
            out,
            split=split,
            base=base,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            val_fraction=val_fraction,
            resume=resume,
            device=device,
            progress=not quiet,
        )
    except _EXPECTED as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"saved {result['out']} (epoch {result['best_epoch']}): validation text->image "
        f"R@1 {result['t2i_r1']:.1f}  R@5 {result['t2i_r5']:.1f}  R@10 {result['t2i_r10']:.1f}"
    )


@click.command("eval")
@_images
@_captions
@_split
@click.option(
    "--model",
    "model",
    default="pixseek-lite",
    show_default=True,
    help="A model name (pixseek-lite, vit-b-32, openclip:ARCH@TAG) or a checkpoint "
    "written by `pixseek train`.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@_device
@click.option(
    "--rerank",
    is_flag=True,
    help="Also text->image recall with the captioner reranking the top results.",
)
@click.option(
    "--rerank-depth",
    type=click.IntRange(min=1),
    default=None,
    help="How many top results to rerank (default: the search default).",
)
@click.option(
    "--captioner",
    envvar="PIXSEEK_CAPTIONER",
    default=None,
    help="Captioner for --rerank (default: the shipped pixseek-captioner).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_command(
    images,
    captions,
    split,
    model,
    batch_size,
    device,
    rerank,
    rerank_depth,
    captioner,
    as_json,
    quiet,
) -> None:
    """Recall@1/5/10 and median rank of text->image and image->text retrieval."""
    from pixseek.training.evaluate import evaluate_encoder

    reranked: dict = {}
    try:
        pairs = read_captions(captions, images, split)
        encoder = load_encoder(model, device=device)
        metrics = evaluate_encoder(encoder, pairs, batch_size, progress=not quiet)
        if rerank:
            reranked = _rerank_recall(
                encoder, pairs, captioner, rerank_depth, batch_size, device, not quiet
            )
    except _EXPECTED as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        extra = {"reranked": reranked} if rerank else {}
        click.echo(json.dumps({"model": encoder.model_id, **metrics.to_dict(), **extra}, indent=2))
        return
    m = metrics
    click.echo(f"{encoder.model_id}: {m.images} images, {m.texts} captions")
    click.echo("direction      R@1    R@5   R@10  median rank")
    for label, r1, r5, r10, med in (
        ("text->image", m.t2i_r1, m.t2i_r5, m.t2i_r10, m.t2i_median_rank),
        ("image->text", m.i2t_r1, m.i2t_r5, m.i2t_r10, m.i2t_median_rank),
    ):
        click.echo(f"{label:12} {_percent(r1)}  {_percent(r5)}  {_percent(r10)}  {med:11g}")
    if rerank:
        r = reranked
        click.echo(
            f"{'reranked':12} {_percent(r['t2i_r1'])}  {_percent(r['t2i_r5'])}  "
            f"{_percent(r['t2i_r10'])}  (text->image; top {r['depth']} rescored by "
            f"{r['captioner']}: {r['similarity']:g} x similarity + {r['caption']:g} x "
            "caption log-likelihood)"
        )


def _rerank_recall(encoder, pairs, spec, depth, batch_size, device, progress) -> dict:
    """Text->image recall with search's reranking: same captioner, fusion weights and depth."""
    from pixseek.encoders.registry import load_captioner
    from pixseek.search.rerank import FALLBACK_FUSION, FUSION
    from pixseek.training.evaluate import rerank_recall

    captioner = load_captioner(spec, device=device)
    fusion = FUSION.get((encoder.name, captioner.name), FALLBACK_FUSION)
    depth = depth or fusion.depth
    recall = rerank_recall(encoder, captioner, pairs, fusion, depth, batch_size, progress)
    return {
        **recall,
        "depth": depth,
        "captioner": captioner.model_id,
        "similarity": fusion.similarity,
        "caption": fusion.caption,
    }
