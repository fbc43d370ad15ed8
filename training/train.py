"""Train or fine-tune pixseek-lite on a user's captioned photos (``pixseek train``).

The frozen CNN runs once per photo: its feature maps are cached (fp16, next to the output) so
each epoch only runs the trainable parts. That is what makes training feasible on a laptop CPU.
An interrupted run resumes from ``<out>.work/last.pt``; the best epoch by validation recall is
written to ``out_path`` as an ordinary checkpoint (``LiteEncoder.load(out_path)``).

The loop itself (:func:`contrastive_step`, :func:`build_optimizer`, :func:`cosine_schedule`) knows
only "a model mapping (image features, text inputs) to two embedding batches and a
``logit_scale``", so another dual encoder (an OpenCLIP model with a frozen trunk, say) can reuse
it by supplying its own feature cache and tokenizer.
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixseek.encoders.base import EncoderError, shipped
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_checkpoint import load_model, save_checkpoint
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.encoders.registry import OFFLINE_PRESET, presets
from pixseek.encoders.torchkit import autocast_for, l2_normalise, pick_device
from pixseek.training.captions import ImageDataset, read_captions
from pixseek.training.class_names import refresh_class_words
from pixseek.training.contrastive import clip_loss
from pixseek.training.evaluate import RetrievalMetrics, retrieval_metrics

STATE_FORMAT = "pixseek-train-state/1"


# ---------------------------------------------------------------- reusable training loop parts


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.05, pretrained_lr_scale: float = 0.1
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no decay on norms, biases, positions and temperature.

    Pretrained layers (MiniLM's, the CNN's) get a smaller learning rate than the fresh heads,
    so tuning them adapts what they know rather than overwriting it.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or name.endswith(("pos", "query")) else weight_decay
        rate = lr * pretrained_lr_scale if name.startswith(("text.bert.", "backbone.")) else lr
        groups.setdefault((rate, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": p, "lr": r, "weight_decay": d} for (r, d), p in groups.items()]
    )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to zero: the usual contrastive schedule."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def contrastive_step(
    model: nn.Module,
    image_input: torch.Tensor,
    text_input: dict[str, torch.Tensor],
    image_ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> float:
    """One optimisation step of symmetric InfoNCE; returns the loss."""
    model.train()
    with autocast_for(device):
        image_emb, text_emb = model(image_input, text_input)
    loss = clip_loss(image_emb, text_emb, model.logit_scale, image_ids)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return float(loss.item())


@torch.inference_mode()
def embed_batches(
    fn: Callable[[int, int], torch.Tensor], count: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """Unit rows of ``fn(start, stop)`` over ``range(count)`` in batches (eval mode, autocast)."""
    with autocast_for(device):
        rows = [
            l2_normalise(fn(i, min(i + batch_size, count))) for i in range(0, count, batch_size)
        ]
    return np.concatenate(rows)


# ---------------------------------------------------------------- pixseek train


def split_pairs(
    pairs: Sequence[tuple[Path, list[str]]], val_fraction: float
) -> tuple[list[int], list[int]]:
    """Train and validation image indices, by a hash of the file name.

    Hashing (not a random draw) keeps an image on the same side when photos are added later,
    so validation recall stays comparable between runs.
    """
    if not 0 < val_fraction < 1:
        raise EncoderError(f"validation fraction must be between 0 and 1, not {val_fraction}")
    scores = [
        int.from_bytes(hashlib.blake2b(p.name.encode(), digest_size=8).digest(), "big") / 2**64
        for p, _ in pairs
    ]
    val = [i for i, s in enumerate(scores) if s < val_fraction]
    if not val:  # tiny collections: still validate on something
        val = [min(range(len(scores)), key=scores.__getitem__)]
    held = set(val)
    train = [i for i in range(len(pairs)) if i not in held]
    if not train:
        raise EncoderError("too few captioned images to hold some out for validation")
    return train, val


def cache_grids(
    encoder: LiteEncoder,
    paths: Sequence[Path],
    cache: Path,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    """The frozen CNN's maps of every photo, fp16 on disk; reused when resuming."""
    names = cache.with_suffix(".txt")
    listing = "\n".join(str(p) for p in paths)
    if cache.is_file() and names.is_file() and names.read_text() == listing:
        return np.load(cache, mmap_mode="r")
    loader = DataLoader(ImageDataset(paths, encoder.preprocess), batch_size=batch_size)
    out = None
    start = 0
    for batch in tqdm(loader, desc="image features", unit="batch", disable=not progress):
        grid = encoder.image_grid(batch).half().cpu().numpy()
        if out is None:
            out = np.lib.format.open_memmap(
                cache, mode="w+", dtype=np.float16, shape=(len(paths), *grid.shape[1:])
            )
        out[start : start + len(grid)] = grid
        start += len(grid)
    out.flush()
    names.write_text(listing)
    return np.load(cache, mmap_mode="r")


def _validate(
    encoder: LiteEncoder, grids: np.ndarray, val: list[int], pairs, batch_size: int
) -> RetrievalMetrics:
    model, device = encoder.model.eval(), encoder.device
    texts = [c for i in val for c in pairs[i][1]]
    owner = [k for k, i in enumerate(val) for _ in pairs[i][1]]
    image_emb = embed_batches(
        lambda a, b: model.encode_grid(torch.from_numpy(grids[val[a:b]]).to(device)),
        len(val),
        batch_size,
        device,
    )
    text_emb = embed_batches(
        lambda a, b: model.encode_text(encoder.tokenize(texts[a:b])), len(texts), 256, device
    )
    return retrieval_metrics(image_emb, text_emb, owner)


def _score(m: RetrievalMetrics) -> float:
    return m.t2i_r1 + m.t2i_r5 + m.t2i_r10


def train(
    images_dir: str | Path,
    captions_file: str | Path,
    out_path: str | Path,
    *,
    split: str | Path | None = None,
    base: str | Path | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 5e-4,
    val_fraction: float = 0.1,
    resume: bool = True,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
    config: LiteConfig | None = None,
) -> dict[str, float | int | str]:
    """Fine-tune pixseek-lite on captioned photos; the best epoch goes to ``out_path``.

    ``base`` is the checkpoint to start from (default: the newest shipped pixseek-lite); ``config``
    instead starts fresh heads on that architecture. Returns the best epoch's validation metrics.
    """
    if epochs < 1:
        raise EncoderError(f"epochs must be at least 1, not {epochs}")
    out_path = Path(out_path)
    work = out_path.with_name(out_path.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    pairs = read_captions(captions_file, images_dir, split)
    train_idx, val_idx = split_pairs(pairs, val_fraction)

    torch.manual_seed(seed)
    if base is None:
        base = shipped(presets()[OFFLINE_PRESET]["weights"])
    model = LiteModel(config) if config is not None else load_model(base)[0]
    encoder = LiteEncoder(model, pick_device(device))
    device_ = encoder.device
    grids = cache_grids(encoder, [p for p, _ in pairs], work / "grids.npy", 32, progress)

    steps_per_epoch = max(1, len(train_idx) // batch_size)
    optimizer = build_optimizer(model, lr)
    scheduler = cosine_schedule(optimizer, epochs * steps_per_epoch, max(1, steps_per_epoch // 2))
    use_scaler = device_.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler(device_.type, enabled=use_scaler)

    state_path = work / "last.pt"
    first_epoch, best, history = 0, None, []
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("format") != STATE_FORMAT or state["config"] != asdict(model.config):
            raise EncoderError(f"{state_path} belongs to a different run; delete {work} to restart")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, best, history = state["epoch"], state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
    rng = random.Random(seed)

    for epoch in range(first_epoch, epochs):
        order = list(train_idx)
        rng.seed(seed * 1000 + epoch)
        rng.shuffle(order)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress)
        for step in bar:
            batch = order[step * batch_size : (step + 1) * batch_size]
            grid = torch.from_numpy(grids[sorted(batch)]).to(device_)
            texts = [rng.choice(pairs[i][1]) for i in sorted(batch)]
            ids = torch.tensor(sorted(batch), device=device_)
            loss = contrastive_step(
                model, grid, encoder.tokenize(texts), ids, optimizer, scheduler, scaler, device_
            )
            bar.set_postfix(loss=f"{loss:.3f}")
        refresh_class_words(model)  # the text tower moved: so do the class names' embeddings
        metrics = _validate(encoder, grids, val_idx, pairs, 256)
        history.append({"epoch": epoch + 1, **metrics.to_dict()})
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: validation text->image R@1 {metrics.t2i_r1:.1f} "
                f"R@5 {metrics.t2i_r5:.1f} R@10 {metrics.t2i_r10:.1f}"
            )
        if best is None or _score(metrics) > _score(RetrievalMetrics(**best["metrics"])):
            best = {"epoch": epoch + 1, "metrics": metrics.to_dict()}
            save_checkpoint(
                model,
                out_path,
                {
                    "trained_on": str(captions_file),
                    "epoch": epoch + 1,
                    "validation": metrics.to_dict(),
                },
            )
        torch.save(
            {
                "format": STATE_FORMAT,
                "config": asdict(model.config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "torch_rng": torch.get_rng_state(),
            },
            state_path,
        )
    shutil.rmtree(work, ignore_errors=True)
    return {"best_epoch": best["epoch"], "out": str(out_path), **best["metrics"]}
