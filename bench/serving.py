"""Per-image serving cost of each group on this CPU, against the 250 ms budget of issue 12.

For every group the node would serve (the bundled packages, plus the packages given with
``--package``, installed as ``models.directory`` would install them), one decoded radiograph goes
through what the node runs for that group, stage by stage, with torch limited to 1 and then 2
threads:

- **preprocess**: :func:`inference.pixels.prepare` once per distinct (input size, preprocessing)
  of the group's models, as the node shares them;
- **classifier**: its forward pass (logits);
- **map**: the fracture-map model's forward pass, with its card's flip TTA (the mirror image in
  the same batch), and the same pass without flip for comparison;
- **boxes**: the map upsampled to the input size and cut into boxes
  (:func:`inference.maps.map_boxes`), the image score read from it;
- **detector**: the YOLO detector, when it is the group's localiser or decides its probability.

Decoding the DICOM and building the SR/SC are not included (bench/run.py measures the whole
pipeline). Each figure is the median over ``--repeats`` calls after two warm-up calls. The
machine is shared: the load average at the start is printed with the results.

    .venv/bin/python bench/serving.py [--package DIR ...] [--image PATH | --synthetic] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BUDGET_MS = 250.0
FRACATLAS = Path("/work/shared/datasets/fracatlas/images")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _image(path: Path | None, synthetic: bool = False) -> tuple[np.ndarray, str]:
    from inference.datasets import read_image

    if path is not None:
        return read_image(path), path.name
    if FRACATLAS.is_dir() and not synthetic:
        first = sorted(FRACATLAS.glob("*.jpg"))[0]
        return read_image(first), f"FracAtlas {first.name}"
    rng = np.random.default_rng(0)
    return rng.random((2880, 2304), dtype=np.float32), "synthetic 2880 x 2304"


WIDTHS = {"prep": 7, "classif": 8, "map": 8, "map noflip": 10, "boxes": 7, "detector": 9}


def time_group(served: Any, image: np.ndarray, threads: int, repeats: int) -> tuple[dict[str, float], str]:
    """Median ms per stage of one group (a :class:`node.modelset.GroupModels`) on ``image``."""
    from dataclasses import replace

    import torch

    from inference.maps import map_boxes
    from inference.models.segmenter import box_cut, image_logits, upsample_maps
    from inference.pixels import PreprocessConfig, prepare
    from node.modelset import ProbabilitySource

    torch.set_num_threads(threads)
    cards = [m.card for m in (served.classifier, served.segmenter) if m is not None]
    detector_runs = served.detector is not None and (
        served.segmenter is None or served.probability_source is ProbabilitySource.DETECTOR
    )
    if detector_runs:
        cards.append(served.detector.card)
    keys = {(c.input_size, tuple(sorted(c.preprocessing.items()))) for c in cards}

    def batch_for(card: Any) -> np.ndarray:
        return prepare(image, PreprocessConfig.from_dict(card.preprocessing), card.input_size).pixels[None]

    def preprocess() -> None:
        for size, items in keys:
            prepare(image, PreprocessConfig.from_dict(dict(items)), size)

    timings = {"prep": _median_ms(preprocess, repeats)}
    if served.classifier is not None:
        pixels = batch_for(served.classifier.card)
        timings["classif"] = _median_ms(lambda: served.classifier.logits(pixels), repeats)
    if served.segmenter is not None:
        segmenter = served.segmenter
        card = segmenter.card
        spec = segmenter.spec
        mapped = batch_for(card)
        timings["map"] = _median_ms(lambda: segmenter.maps(mapped), repeats)
        if spec.flip:
            segmenter.spec = replace(spec, flip=False)
            timings["map noflip"] = _median_ms(lambda: segmenter.maps(mapped), repeats)
            segmenter.spec = spec
        coarse, heads = segmenter.maps(mapped)

        def boxes() -> None:
            image_logits(coarse, heads, spec.score)
            for full in upsample_maps(coarse, card.input_size):
                map_boxes(full, box_cut(spec), spec.map_temperature, spec.map_logit_offset)

        timings["boxes"] = _median_ms(boxes, repeats)
    if detector_runs:
        detector = served.detector
        found = batch_for(detector.card)
        detector.detect(found)
        torch.set_num_threads(threads)  # ultralytics resets torch's thread count on its first call
        timings["detector"] = _median_ms(lambda: detector.detect(found), repeats)
    names = ", ".join(f"{c.name}{' (flip)' if c.segmenter and c.segmenter.flip else ''}" for c in cards)
    if served.stack is not None:
        names += " [stack]"
    return timings, names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", type=Path, action="append", default=[], metavar="DIR")
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument(
        "--synthetic", action="store_true", help="a 2880 x 2304 random image (a full-size DX) instead"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--no-bundled", action="store_true", help="only the --package models")
    args = parser.parse_args(argv)

    import torch

    from node.modelset import load_model_set

    with tempfile.TemporaryDirectory() as folder:
        directory = None
        if args.package:
            directory = Path(folder)
            for package in args.package:
                (directory / package.resolve().name).symlink_to(package.resolve(), target_is_directory=True)
        models = load_model_set(directory, device="cpu", include_bundled=not args.no_bundled)
    image, what = _image(args.image, args.synthetic)
    load = os.getloadavg()
    print("fracnode serving cost per image (bench/serving.py)")
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(
        f"machine: {_cpu()}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}; "
        f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )
    print(f"image: {what} ({image.shape[1]} x {image.shape[0]} px, decoded); median of {args.repeats} calls")
    print(f"budget: {BUDGET_MS:.0f} ms per image for the whole group (issue 12)")
    print()
    header = (
        f"{'group':<15} {'thr':>3} {'prep':>7} {'classif':>8} {'map':>8} {'map noflip':>10} "
        f"{'boxes':>7} {'detector':>9} {'total':>8} {'/budget':>8}  models"
    )
    print(header)
    print("-" * len(header))
    for threads in [int(t) for t in args.threads.split(",") if t.strip()]:
        for group, served in sorted(models.groups.items()):
            timings, names = time_group(served, image, threads, args.repeats)
            total = sum(v for k, v in timings.items() if k != "map noflip")
            cells = {
                name: f"{timings[name]:>{width}.1f}" if name in timings else f"{'-':>{width}}"
                for name, width in WIDTHS.items()
            }
            print(
                f"{group!s:<15} {threads:>3} {cells['prep']} {cells['classif']} {cells['map']} "
                f"{cells['map noflip']} {cells['boxes']} {cells['detector']} {total:>8.1f} "
                f"{total / BUDGET_MS:>8.2f}  {names}"
            )
    print()
    print("ms per image; '/budget' is total / 250 ms (below 1.00 fits). 'map' includes the card's flip TTA.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
