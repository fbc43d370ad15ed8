"""CPU inference engines for pixseek's models: eager torch against ONNX Runtime and torch's options.

    python bench/bench_cpu_inference.py --images ../shared/data/flickr8k/images \
        --names ../shared/data/flickr8k/dev.txt --threads 2 --rounds 3

Workloads, each on real Flickr8k dev photos and captions:

- ``lite-image``: pixseek-lite's image path as indexing runs it, uint8 pixels -> embedding
  (``LiteEncoder.embed_images``: the folded, channels-last tower in chunks, then the head);
- ``lite-text``: pixseek-lite's text path, tokens -> embedding (MiniLM and the head);
- ``rerank-images``: the captioner's image pass for 30 candidates and their mirror images (60
  images; the bulk of a rerank's cost when its cache is cold);
- ``rerank-decode``: the captioner scoring one query against those 30 candidates' two views;
- ``vit-image``: OpenCLIP ViT-B-32 (random weights, 224 px) image tower.

Variants, where they apply: ``eager`` (torch, as pixseek ran before ``encoders.ort``), ``ort``
(ONNX Runtime on a TorchScript export, ``--threads`` intra-op threads), ``ort-int8`` (ONNX
Runtime's dynamic int8 quantization of that export), ``int8`` (torch's dynamic int8
quantization of the Linear layers), ``channels-last`` (ViT only: pixseek-lite's tower already
runs channels-last), ``compile`` (``torch.compile``, timed after its compilation; off with
``--no-compile``). Every variant's output is compared with
eager's: the largest absolute difference of unit-normalised embeddings (or of the scores).

The variants of one workload take turns within each round (the machine is shared and its
speed drifts); the table gives the median rate and the median of the per-round ratios to eager.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pixseek.encoders.captioner import PixseekCaptioner
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.pixels import image_transform
from pixseek.encoders.registry import load_encoder
from pixseek.encoders.towers import InferenceTower, normalise
from pixseek.indexer.decode import decode_file
from pixseek.training.captions import read_captions

Runner = Callable[[], np.ndarray]


def unit(x: np.ndarray | torch.Tensor) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(module: nn.Module, inputs: tuple, names: list[str], path: Path) -> Path:
    dynamic = {name: {0: "batch"} for name in names}
    if len(inputs) > 1 or inputs[0].dtype == torch.long:  # token sequences: length varies too
        dynamic = {name: {0: "batch", 1: "length"} for name in names}
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            inputs,
            str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes={**dynamic, "output": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    return path


def quantized_onnx(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


def ort_variants(
    module: nn.Module, inputs: tuple, names: list[str], work: Path, threads: int, tag: str
) -> dict[str, Runner]:
    path = export(module, inputs, names, work / f"{tag}.onnx")
    feeds = {name: t.numpy() for name, t in zip(names, inputs, strict=True)}
    out: dict[str, Runner] = {}
    for label, model in (("ort", path), ("ort-int8", quantized_onnx(path))):
        session = ort_session(model, threads)
        out[label] = lambda s=session: s.run(None, feeds)[0]
    return out


def int8(module: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(module), {nn.Linear}, dtype=torch.qint8
    )


def compiled(fn: Callable[[], torch.Tensor]) -> Runner:
    with torch.inference_mode():
        fn()  # compiles (not timed), for the grad mode the timed calls run in
    return fn


class LiteImage(nn.Module):
    """pixseek-lite's image path in one module: uint8 pixels -> unnormalised embedding."""

    def __init__(self, encoder) -> None:
        super().__init__()
        tower = InferenceTower(encoder.model.frozen_blocks, torch.device("cpu"))
        self.tower = tower.module
        self.name = encoder.config.tower
        model = encoder.model
        self.tail = model.backbone[model.tower_split :]
        self.head = model.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.tower(normalise(pixels, self.name)).float()))


class LiteText(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})


class CaptionerImages(nn.Module):
    """The captioner's image pass: uint8 pixels -> memory tokens."""

    def __init__(self, captioner) -> None:
        super().__init__()
        captioner.grid(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))  # builds its tower
        self.tower = captioner._tower.module
        self.name = captioner.config.tower
        self.decoder = captioner.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decoder.memory(self.tower(normalise(pixels, self.name)).float())


class CaptionerScore(nn.Module):
    """Teacher-forced decoder: memory and one query's tokens -> log-probabilities per token."""

    def __init__(self, decoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logp = self.decoder(memory, inputs).float().log_softmax(-1)
        picked = logp.gather(-1, targets.expand(len(logp), -1)[..., None]).squeeze(-1)
        return picked.mean(-1)


def workloads(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Runner]]:
    threads = args.threads
    pairs = read_captions(args.captions, args.images, args.names)[: args.batch]
    photos = [decode_file(str(path)).image for path, _ in pairs]
    texts = [captions[0] for _, captions in pairs]
    pixels = torch.from_numpy(
        np.stack([image_transform()(p) for p in photos])
    )  # (B, 3, 224, 224) uint8
    out: dict[str, dict[str, Runner]] = {}

    encoder = LiteEncoder.load(None, "cpu")  # torch: the eager baseline
    image = LiteImage(encoder).eval()
    out["lite-image"] = {
        "eager": lambda: encoder.embed_images(pixels),
        **ort_variants(image, (pixels,), ["pixels"], work, threads, "lite-image"),
    }
    quantised_head = int8(encoder.model.image_head)
    out["lite-image"]["int8"] = lambda: unit(
        quantised_head(
            encoder.model.backbone[encoder.model.tower_split :](encoder.image_grid(pixels))
        )
    )

    tokens = encoder.tokenize(texts)
    text = LiteText(encoder.model).eval()
    quantised_text = LiteText(int8(encoder.model)).eval()
    out["lite-text"] = {
        "eager": lambda: encoder.embed_texts(texts),
        **ort_variants(
            text,
            (tokens["input_ids"], tokens["attention_mask"]),
            ["input_ids", "attention_mask"],
            work,
            threads,
            "lite-text",
        ),
        "int8": lambda: unit(quantised_text(tokens["input_ids"], tokens["attention_mask"])),
    }

    captioner = PixseekCaptioner.load(None, "cpu")
    candidates = pixels[: args.candidates]
    views = torch.cat([candidates, candidates.flip(-1)])  # each photo and its mirror image
    images = CaptionerImages(captioner).eval()
    out["rerank-images"] = {
        "eager": lambda: captioner.encode_images(views),
        **ort_variants(images, (views,), ["pixels"], work, threads, "rerank-images"),
    }
    memory = torch.from_numpy(captioner.encode_images(views))
    query = captioner.tokenize("a dog running through the grass")[None]
    score = CaptionerScore(captioner.model).eval()
    quantised_score = CaptionerScore(int8(captioner.model)).eval()
    out["rerank-decode"] = {
        "eager": lambda: captioner.score(memory, "a dog running through the grass"),
        **ort_variants(score, (memory, query), ["memory", "tokens"], work, threads, "rerank"),
        "int8": lambda: quantised_score(memory, query),
    }

    vit = load_encoder("openclip:ViT-B-32", device="cpu")
    vit_pixels = torch.stack([vit.preprocess(p) for p in photos])
    visual = vit.model.visual.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # as rclip exports: the fast path won't trace
    vit_ort = ort_variants(visual, (vit_pixels,), ["pixels"], work, threads, "vit")
    torch.backends.mha.set_fastpath_enabled(True)
    visual_int8 = int8(visual)
    visual_cl = copy.deepcopy(visual).to(memory_format=torch.channels_last)
    cl_pixels = vit_pixels.contiguous(memory_format=torch.channels_last)
    out["vit-image"] = {
        "eager": lambda: visual(vit_pixels),
        **vit_ort,
        "int8": lambda: visual_int8(vit_pixels),
        "channels-last": lambda: visual_cl(cl_pixels),
    }
    if args.compile:
        for name, fn in (("lite-image", image), ("vit-image", visual)):
            compiled_module = torch.compile(fn)
            sample = pixels if name == "lite-image" else vit_pixels
            try:
                out[name]["compile"] = compiled(lambda m=compiled_module, s=sample: m(s))
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                print(f"torch.compile failed for {name}: {type(exc).__name__}: {exc}")
    return out


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    return np.asarray(x, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--names", type=Path, required=True)
    parser.add_argument("--captions", type=Path, help="default: captions.tsv beside --names")
    parser.add_argument("--batch", type=int, default=32, help="photos (and captions) a pass")
    parser.add_argument("--candidates", type=int, default=30, help="rerank depth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    args.captions = args.captions or args.names.parent / "captions.tsv"
    torch.set_num_threads(args.threads)
    os.environ["PIXSEEK_ONNX"] = "0"  # "eager" is torch; this script builds its own sessions

    with tempfile.TemporaryDirectory() as work:
        suites = workloads(args, Path(work))
    with torch.inference_mode():
        references = {name: to_numpy(runs["eager"]()) for name, runs in suites.items()}
        rates: dict[tuple[str, str], list[float]] = {}
        ratios: dict[tuple[str, str], list[float]] = {}
        diffs: dict[tuple[str, str], float] = {}
        for name, runs in suites.items():
            items = {"lite-text": args.batch, "rerank-decode": 2 * args.candidates}
            count = items.get(name, 2 * args.candidates if name == "rerank-images" else args.batch)
            for variant, run in runs.items():
                result = to_numpy(run())  # warm-up, and the output to compare
                reference = references[name]
                if result.ndim == 2 and result.shape[1] > 1 and name != "rerank-images":
                    result, reference = unit(result), unit(reference)
                diffs[name, variant] = float(np.abs(result - reference).max())
            for _ in range(args.rounds):
                round_rates = {}
                for variant, run in runs.items():
                    started = time.perf_counter()
                    run()
                    round_rates[variant] = count / (time.perf_counter() - started)
                    rates.setdefault((name, variant), []).append(round_rates[variant])
                for variant, rate in round_rates.items():
                    ratios.setdefault((name, variant), []).append(rate / round_rates["eager"])
            print(f"{name} done", flush=True)

    med = statistics.median
    print("\n| workload | variant | items/s (median) | / eager (median of rounds) | max abs diff |")
    print("|---|---|---:|---:|---:|")
    for (name, variant), values in rates.items():
        print(
            f"| {name} | {variant} | {med(values):.1f} | {med(ratios[name, variant]):.2f}x | "
            f"{diffs[name, variant]:.1e} |"
        )


if __name__ == "__main__":
    main()
