"""pixseek beside rclip and clip-retrieval: the same photos, the same model, the same weights.

    python bench/bench_peers.py --images ../shared/data/flickr8k/images \
        --names ../shared/data/flickr8k/dev.txt --limit 200 --full-limit 40 \
        --rclip /work/cache/peers/venv-rclip --clip-retrieval /work/cache/peers/venv-clipret \
        --work /work/cache/peers/bench --rounds 2

Each tool is its own install (``--rclip`` and ``--clip-retrieval`` are virtual environments
with ``rclip`` and ``clip-retrieval`` from PyPI), run through its own command line in a fresh
process, the way a user runs it. Per run: wall time, CPU-seconds (user + system, the process
and its children, from ``os.wait4``) and peak resident memory (GNU time's maximum RSS).
Tools take turns within each round (the order rotates), so the machine's drift hits them
alike; the table reports medians over rounds.

**One model for all three.** rclip 3.3.0 runs OpenCLIP ViT-B-32-256 (ViT-B/32 at 256 px), so
all three run that architecture, with the same random weights (open_clip, seed 0; no
pretrained weights can be downloaded here), each through its own loading code:

- pixseek: ``--model openclip:ViT-B-32-256@WEIGHTS`` (open_clip reads the checkpoint file).
  Before the rounds it loads the model and its captioner once, untimed: on a CPU that exports
  them to ONNX Runtime, into a cache folder under ``--work``, as pixseek does on a user's
  first load (and as rclip's model is exported before it runs).
- rclip: its loader looks for ``visual.onnx``, ``textual.onnx`` and the tokenizer vocabulary in
  ``RCLIP_DATADIR`` before downloading; they are exported there the way rclip's
  ``scripts/convert_model.py`` exports its model (TorchScript exporter, opset 18, a dynamic
  batch axis, the MHA fast path off). Its four licence files are placeholders. No patching.
- clip-retrieval: ``clip-retrieval inference --clip_model open_clip:ViT-B-32-256/WEIGHTS``
  (``all_clip.load_clip`` hands the path after the slash to open_clip as the checkpoint). Its
  query command, ``clip-retrieval filter``, hard-codes OpenAI's ``clip.load("ViT-B/32")``, so
  a thin wrapper (``CLIP_RETRIEVAL_WRAPPER`` below) runs its CLI with ``clip.load`` and
  ``clip.tokenize`` pointed at the same open_clip model and its tokenizer.

**Rows.** Indexing a folder of 224 px photos and one of full-size photos (``--full-side``:
dev photos scaled up, as a stand-in for camera photos: this machine holds no larger ones);
indexing again with nothing changed; one text query in a fresh process (cold) and the same
query again right after (warm, where a tool keeps something running between commands; the
same as cold otherwise). What each tool's commands are:

- pixseek: ``pixseek index FOLDER --model ...``; ``pixseek search QUERY`` (its defaults).
- rclip: ``rclip -f -t 10 QUERY`` in the folder indexes the folder, then answers (rclip
  indexes on every query unless ``--no-indexing``); the query rows use ``--no-indexing``.
- clip-retrieval: ``clip-retrieval inference`` (embeddings) then ``clip-retrieval index``
  (the FAISS index); it has no incremental mode, so indexing again runs both again.
  ``clip-retrieval filter QUERY`` is its command-line query (it also copies the hits into a
  folder).

**Ceilings.** The model alone on ready batches of 32 (the faster of two passes, after a
warm-up batch), each in a fresh process: ViT-B-32-256 in torch (as clip-retrieval runs it)
and in ONNX Runtime on rclip's export (as rclip runs it, through rclip's own session loader,
and as pixseek runs its own export on a CPU), and pixseek-lite's image tower (pixseek's own
default model, indexed too for its row). Each tool's indexing rate is reported as a share of
the ceiling of the engine it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ARCH = "ViT-B-32-256"
RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where rclip 3.3.0 looks for its model
RCLIP_LEGAL_FILES = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
QUERY = "a dog running through the grass"
BATCH = 32

CLIP_RETRIEVAL_WRAPPER = '''\
"""clip-retrieval's own CLI, OpenAI's clip.load (which its filter command calls) pointed at
the benchmark's open_clip checkpoint."""
import os
import sys

import clip
import open_clip

ARCH = os.environ["PEERS_ARCH"]


def load(name, device="cpu", jit=False, **kwargs):
    model, _, preprocess = open_clip.create_model_and_transforms(
        ARCH, pretrained=os.environ["PEERS_WEIGHTS"], device=device
    )
    return model.eval(), preprocess


_tokenizer = open_clip.get_tokenizer(ARCH)  # the same BPE vocabulary, 77 tokens
clip.load = load
clip.tokenize = lambda texts, *args, **kwargs: _tokenizer(texts)

from clip_retrieval.cli import main  # noqa: E402

sys.argv[0] = "clip-retrieval"
main()
'''

RCLIP_EXPORT = """\
import sys

import open_clip
import torch

weights, arch, out = sys.argv[1:]
model = open_clip.create_model(arch, pretrained=weights).eval()


class Visual(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, inputs):
        return self.visual(inputs)


class Textual(torch.nn.Module):
    def __init__(self, clip_model):
        super().__init__()
        self.clip_model = clip_model

    def forward(self, inputs):
        return self.clip_model.encode_text(inputs)


size = model.visual.image_size[0]
torch.backends.mha.set_fastpath_enabled(False)
for wrapper, dummy, name in (
    (Visual(model.visual), torch.randn(1, 3, size, size), "visual.onnx"),
    (Textual(model), torch.zeros(1, 77, dtype=torch.long), "textual.onnx"),
):
    torch.onnx.export(
        wrapper.eval(), (dummy,), f"{out}/{name}", input_names=["input"],
        output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=18, dynamo=False,
    )
"""

# Model-only ceilings: each prints images/s, the faster of two passes over one ready batch.
CEILING_COMMON = """
import time
def rate(run, batch):
    run(batch[:4])
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        run(batch)
        best = max(best, len(batch) / (time.perf_counter() - started))
    print(best)
"""
CEILING_TORCH = (
    CEILING_COMMON
    + """
import sys, torch, open_clip
torch.set_num_threads({threads})
model = open_clip.create_model("{arch}", pretrained="{weights}").eval()
size = model.visual.image_size[0]
with torch.inference_mode():
    rate(model.encode_image, torch.randn({batch}, 3, size, size))
"""
)
CEILING_ORT = (
    CEILING_COMMON
    + """
import os, numpy as np
from rclip.model_download import load_visual_query_session
session = load_visual_query_session()  # rclip's own session options (all the CPUs it may use)
batch = np.random.randn({batch}, 3, 256, 256).astype("float32")
rate(lambda b: session.run(None, {{"input": b}}), batch)
"""
)
CEILING_LITE = (
    CEILING_COMMON
    + """
import torch
from pixseek.encoders.registry import load_encoder
torch.set_num_threads({threads})
encoder = load_encoder("pixseek-lite", device="cpu")
rate(encoder.embed_images, torch.randint(0, 256, ({batch}, 3, 224, 224), dtype=torch.uint8))
"""
)


@dataclass
class Run:
    wall: float
    cpu: float
    peak_mb: float


def measure(command: list[str], *, env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run a command to its end: wall time, CPU-seconds of its process tree, peak RSS.

    The peak comes from GNU time, which forks the command from its own small process: a child
    that Python starts directly inherits this (larger) process's peak RSS into its own
    ``ru_maxrss`` at exec, which made small tools look as big as the benchmark.
    """
    with tempfile.TemporaryFile() as out, tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M", "-o", peak.name, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            tail = out.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{tail}")
        peak_kb = int(peak.read().split()[-1])
    return Run(wall, usage.ru_utime + usage.ru_stime, peak_kb / 1024)


def output_of(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


class Tool:
    """One tool's commands; ``fresh`` forgets everything it indexed."""

    name: str
    engine: str  # whose ceiling applies

    def __init__(self, work: Path) -> None:
        self.work = work / self.name
        self.state = self.work / "state"

    def fresh(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)

    def prepare(self) -> None:
        """One-time set-up before any timed run (rclip's model is exported before it runs)."""

    def index(self, folder: Path) -> Run:
        raise NotImplementedError

    def query(self, folder: Path) -> Run:
        raise NotImplementedError


class Pixseek(Tool):
    name = "pixseek"
    engine = "onnxruntime"

    def __init__(self, work: Path, model: str) -> None:
        super().__init__(work)
        self.model = model

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pixseek", "--library", str(self.state), *args]

    @property
    def env(self) -> dict[str, str]:
        return {"PIXSEEK_CACHE": str(self.work / "cache")}

    def fresh(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)  # pixseek makes its library folder

    def prepare(self) -> None:
        """Load the model and the captioner once, untimed: on a CPU that exports them to ONNX
        Runtime in pixseek's cache, as rclip's model is exported before it runs."""
        load = (
            "from pixseek.encoders import load_captioner, load_encoder; "
            f"load_encoder({self.model!r}, device='cpu'); load_captioner(None, device='cpu')"
        )
        measure([sys.executable, "-c", load], env=self.env)

    def index(self, folder: Path) -> Run:
        command = self._cli("index", str(folder), "--model", self.model, "--quiet")
        return measure(command, env=self.env)

    def query(self, folder: Path) -> Run:
        return measure(self._cli("search", QUERY), env=self.env)


class PixseekLite(Pixseek):
    name = "pixseek (pixseek-lite)"
    engine = "lite"


class Rclip(Tool):
    name = "rclip"
    engine = "onnxruntime"

    def __init__(self, work: Path, venv: Path, models: Path) -> None:
        super().__init__(work)
        self.bin = venv / "bin" / "rclip"
        self.models = models

    def fresh(self) -> None:
        super().fresh()
        for entry in self.models.iterdir():  # the exported model, as rclip's downloader lays it
            (self.state / entry.name).symlink_to(entry)

    def _run(self, folder: Path, *flags: str) -> Run:
        env = {"RCLIP_DATADIR": str(self.state)}
        return measure([str(self.bin), "-f", "-t", "10", *flags, QUERY], env=env, cwd=folder)

    def index(self, folder: Path) -> Run:
        return self._run(folder)

    def query(self, folder: Path) -> Run:
        return self._run(folder, "--no-indexing")


class ClipRetrieval(Tool):
    name = "clip-retrieval"
    engine = "torch"

    def __init__(self, work: Path, venv: Path, weights: Path) -> None:
        super().__init__(work)
        self.cli = venv / "bin" / "clip-retrieval"
        self.python = venv / "bin" / "python"
        self.wrapper = work / "clip_retrieval_wrapper.py"
        self.wrapper.write_text(CLIP_RETRIEVAL_WRAPPER)
        self.weights = weights
        self.env = {"PEERS_WEIGHTS": str(weights), "PEERS_ARCH": ARCH, "WANDB_MODE": "disabled"}

    def _cli(self, *args: str) -> Run:
        return measure([str(self.cli), *args], env=self.env)

    def index(self, folder: Path) -> Run:
        embeddings, index = self.state / "embeddings", self.state / "index"
        for path in (embeddings, index):
            shutil.rmtree(path, ignore_errors=True)
        inference = self._cli(
            "inference",
            f"--input_dataset={folder}",
            f"--output_folder={embeddings}",
            f"--clip_model=open_clip:{ARCH}/{self.weights}",
            f"--batch_size={BATCH}",
            "--num_prepro_workers=2",
            "--enable_text=False",
            "--enable_metadata=False",
        )
        build = self._cli("index", f"--embeddings_folder={embeddings}", f"--index_folder={index}")
        return Run(
            inference.wall + build.wall,
            inference.cpu + build.cpu,
            max(inference.peak_mb, build.peak_mb),
        )

    def query(self, folder: Path) -> Run:
        hits = self.state / "hits"
        shutil.rmtree(hits, ignore_errors=True)
        return measure(
            [
                str(self.python),
                str(self.wrapper),
                "filter",
                f"--query={QUERY}",
                f"--output_folder={hits}",
                f"--indice_folder={self.state / 'index'}",
                "--num_results=10",
            ],
            env=self.env,
        )


def prepare_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """The 224 px photos as they are, and the same photos scaled up to full size."""
    from PIL import Image

    names = args.names.read_text().split() if args.names else sorted(os.listdir(args.images))
    small, full = args.work / "photos-224", args.work / f"photos-{args.full_side}"
    for folder, count in ((small, args.limit), (full, args.full_limit)):
        if folder.is_dir() and len(os.listdir(folder)) == count:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in names[:count]:
            if folder is small:
                shutil.copy(args.images / name, folder / name)
                continue
            with Image.open(args.images / name) as image:
                side = args.full_side
                image.convert("RGB").resize((side, side * 3 // 4), Image.Resampling.BICUBIC).save(
                    folder / name, quality=90
                )
    return small, full


def prepare_models(args: argparse.Namespace) -> tuple[Path, Path]:
    """The shared random weights, and rclip's ONNX export of them with its tokenizer."""
    import open_clip
    import torch

    weights = args.work / f"{ARCH}-random.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(ARCH).state_dict(), weights)
    models = args.work / "rclip-models"
    onnx_dir = models / RCLIP_MODEL_DIR
    if not (onnx_dir / "textual.onnx").is_file():
        onnx_dir.mkdir(parents=True, exist_ok=True)
        script = args.work / "rclip_export.py"
        script.write_text(RCLIP_EXPORT)
        output_of([sys.executable, str(script), str(weights), ARCH, str(onnx_dir)])
        vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        (models / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(vocab, models / "tokenizer" / vocab.name)
        for name in RCLIP_LEGAL_FILES:
            (models / name).write_text("benchmark stand-in: random weights, not rclip's model\n")
    return weights, models


def ceilings(args: argparse.Namespace, weights: Path, models: Path) -> dict[str, list[float]]:
    """Model-only images/s per engine, each in a fresh process, interleaved over rounds."""
    fill = {"threads": args.threads, "arch": ARCH, "weights": weights, "batch": args.ceiling_batch}
    rclip_python = str(args.rclip / "bin" / "python")
    engines = {
        "torch": ([sys.executable, "-c", CEILING_TORCH.format(**fill)], {}),
        "onnxruntime": (
            [rclip_python, "-c", CEILING_ORT.format(**fill)],
            {"RCLIP_DATADIR": str(models)},
        ),
        "lite": ([sys.executable, "-c", CEILING_LITE.format(**fill)], {}),
    }
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, (command, env) in engines.items():
            rates[name].append(float(output_of(command, env).split()[-1]))
            print(f"ceiling {name}: {rates[name][-1]:.2f} images/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--names", type=Path, help="a file of photo names to take, in order")
    parser.add_argument("--limit", type=int, default=200, help="224 px photos")
    parser.add_argument("--full-limit", type=int, default=40, help="full-size photos")
    parser.add_argument("--full-side", type=int, default=2048, help="full-size photos' width")
    parser.add_argument("--rclip", type=Path, required=True, help="venv with rclip")
    parser.add_argument("--clip-retrieval", type=Path, required=True, help="venv with it")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ceiling-batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--tools", help="a comma-separated subset, e.g. pixseek,rclip")
    parser.add_argument(
        "--rows", choices=("all", "224", "full"), default="all", help="which folders to index"
    )
    parser.add_argument("--no-ceilings", dest="ceilings", action="store_false")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    small, full = prepare_folders(args)
    weights, models = prepare_models(args)
    tools: list[Tool] = [
        Pixseek(args.work, f"openclip:{ARCH}@{weights}"),
        Rclip(args.work, args.rclip, models),
        ClipRetrieval(args.work, args.clip_retrieval, weights),
        PixseekLite(args.work, "pixseek-lite"),
    ]
    if args.tools:
        tools = [t for t in tools if t.name.split()[-1].strip("()") in args.tools.split(",")]
    rows: dict[tuple[str, str], list[Run]] = {}
    ceiling = ceilings(args, weights, models) if args.ceilings else {}
    for tool in tools:
        tool.prepare()
    for round_ in range(args.rounds):
        order = tools[round_ % len(tools) :] + tools[: round_ % len(tools)]
        for tool in order if args.rows != "full" else ():  # index, index again, query it
            tool.fresh()
            for work, call in (
                ("index 224", lambda tool=tool: tool.index(small)),
                ("index again 224", lambda tool=tool: tool.index(small)),
                ("query cold", lambda tool=tool: tool.query(small)),
                ("query warm", lambda tool=tool: tool.query(small)),
            ):
                rows.setdefault((tool.name, work), []).append(call())
                print(f"round {round_ + 1}: {tool.name} {work} {rows[tool.name, work][-1]}")
        for tool in order if args.rows != "224" else ():
            tool.fresh()
            rows.setdefault((tool.name, "index full"), []).append(tool.index(full))
            print(f"round {round_ + 1}: {tool.name} index full {rows[tool.name, 'index full'][-1]}")
    report(args, rows, ceiling, {"224": args.limit, "full": args.full_limit})


def report(
    args: argparse.Namespace,
    rows: dict[tuple[str, str], list[Run]],
    ceiling: dict[str, list[float]],
    counts: dict[str, int],
) -> None:
    med = statistics.median
    print("\nceilings (model only, images/s):")
    for name, rates in ceiling.items():
        print(f"  {name}: {med(rates):.2f} (runs {', '.join(f'{r:.2f}' for r in rates)})")
    print("\n| tool | work | wall s | CPU-s | peak MB | images/s | share of ceiling |")
    print("|---|---|---:|---:|---:|---:|---:|")
    engines = {"pixseek": "torch", "rclip": "onnxruntime", "clip-retrieval": "torch"}
    for (tool, work), runs in rows.items():
        wall, cpu, peak = (med(getattr(r, f) for r in runs) for f in ("wall", "cpu", "peak_mb"))
        rate = share = ""
        if work.startswith("index ") and not work.startswith("index again"):
            n = counts[work.split()[-1]]
            engine = engines.get(tool, "lite")
            rate = f"{n / wall:.2f}"
            share = f"{n / wall / med(ceiling[engine]):.0%}" if engine in ceiling else ""
        print(f"| {tool} | {work} | {wall:.1f} | {cpu:.1f} | {peak:.0f} | {rate} | {share} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "ceilings": ceiling,
                    "runs": {f"{t} / {w}": [vars(r) for r in rs] for (t, w), rs in rows.items()},
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
