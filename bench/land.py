"""`flywheel land` benchmark: throughput against the bare cost of reading and decoding the same folder,
and peak memory as the folder grows (it must stay flat: land streams).

Measures, side by side in one run, on a generated ImageFolder tree of RGB JPEGs (3 classes):
  1. `land` (read, check, hash, write batch files) vs reading + decoding every file with PIL
     (target >= 0.5x);
  2. the peak resident memory of `land` in a fresh process at each folder size (target: flat).
Prints a table, then one JSON line with the figures.

    .venv/bin/python bench/land.py [--sizes 1000 50000] [--side 256] [--batch-size 1000]
"""

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog", "fox")


def make_folder(root: Path, count: int, side: int) -> Path:
    """`count` distinct JPEG photos (noise over a class colour) in SOURCE/<class>/."""
    rng = random.Random(0)
    base = Image.effect_noise((side, side), 40).convert("RGB")
    for index in tqdm(range(count), desc=f"writing {count} images", leave=False):
        name = CLASSES[index % len(CLASSES)]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image = base.copy()
        # An 8x8 block whose colour and place encode the index: every file's bytes differ after JPEG.
        x, y = 8 * (index % (side // 8)), 8 * ((index // (side // 8)) % (side // 8))
        image.paste((index % 256, (index // 256) % 256, rng.randrange(256)), (x, y, x + 8, y + 8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{index:07d}.jpg").write_bytes(buffer.getvalue())
    return root


def bare_decode(source: Path) -> float:
    """Images per second to read and fully decode every file."""
    files = sorted(source.rglob("*.jpg"))
    started = time.perf_counter()
    for path in files:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()
    return len(files) / (time.perf_counter() - started)


LAND_CHILD = """
import resource, sys, time
from pathlib import Path
from transforms.land import land, open_source
problems = []
source = open_source(sys.argv[1], None, problems)
total = source.total
started = time.perf_counter()
report = land(source, Path(sys.argv[2]), "bench", int(sys.argv[3]), problems)
elapsed = time.perf_counter() - started
assert report.landed == total and not problems, (report.landed, total, problems[:3])
print(report.landed / elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def land_in_child(source: Path, landing: Path, batch_size: int) -> tuple[float, float]:
    """(images per second, peak resident MiB) of `land` in a fresh process."""
    completed = subprocess.run(
        [sys.executable, "-c", LAND_CHILD, str(source), str(landing), str(batch_size)],
        cwd=REPO, capture_output=True, text=True,
    )
    if completed.returncode:
        raise SystemExit(f"land failed: {completed.stderr.strip().splitlines()[-1]}")
    rate, peak_kib = completed.stdout.split()
    return float(rate), int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--side", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()

    rows, figures = [], {"side": args.side, "batch_size": args.batch_size, "sizes": {}}
    for count in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            source = make_folder(Path(folder) / "photos", count, args.side)
            decode_rate = bare_decode(source)
            land_rate, peak_mib = land_in_child(source, Path(folder) / "landing", args.batch_size)
        figures["sizes"][count] = {
            "land_images_per_second": round(land_rate, 1), "decode_images_per_second": round(decode_rate, 1),
            "land_vs_decode_ratio": round(land_rate / decode_rate, 3), "land_peak_mib": round(peak_mib, 1),
        }
        rows.append((count, land_rate, decode_rate, land_rate / decode_rate, peak_mib))
    peaks = [row[4] for row in rows]
    figures["peak_growth_ratio"] = round(max(peaks) / min(peaks), 3)
    figures["land_vs_decode_ratio_target_min"] = 0.5

    print(f"\n{'images':>8}{'land img/s':>14}{'read+decode img/s':>20}{'ratio':>8}{'peak MiB':>10}")
    for count, land_rate, decode_rate, ratio, peak in rows:
        print(f"{count:>8}{land_rate:>14,.0f}{decode_rate:>20,.0f}{ratio:>8.2f}{peak:>10.1f}")
    print(f"peak memory, largest vs smallest folder: {figures['peak_growth_ratio']:.2f}x (target: flat); "
          f"throughput ratio target >= 0.5x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
