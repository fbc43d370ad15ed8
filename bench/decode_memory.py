"""Peak memory and time of decoding one big image for the index (docs/RELIABILITY.md).

    python bench/decode_memory.py [--size 12000] [--folder /tmp]

Writes a WIDTHxWIDTH RGB PNG of stripes (about 1.7 MB for 12000, zlib streamed, so writing
it costs no memory), then decodes it in a fresh process as indexing does (224-pixel side)
and prints the peak resident memory the decode added and its time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MEASURE = """
import resource, sys, time
from pixseek.indexer.decode import decode_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
decoded = decode_file(sys.argv[1])
seconds = time.perf_counter() - start
added = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{decoded.width}x{decoded.height} -> {decoded.image.size}: "
      f"peak +{added:.0f} MB, {seconds:.1f} s")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hostile import make_big_png

    path = make_big_png(args.folder / f"big-{args.size}.png", (args.size, args.size))
    subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True)
    path.unlink()


if __name__ == "__main__":
    main()
