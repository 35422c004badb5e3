"""What the node's memory goes to: RSS after each start-up step, in one fresh process each.

Steps: the DICOM/database stack imported; torch + torchvision imported; the bundled fracture
and region models loaded (torchvision classifiers, the YOLO detector when it serves, the
fracture maps); one forward pass of each model on a 256-px image (the first call allocates
torch's CPU buffers). Each step runs in its own interpreter so that the figures do not include
one another's garbage.

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = r"""
import json, os, sys
sys.path.insert(0, {root!r})
def rss():
    fields = {{}}
    for line in open("/proc/self/status"):
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return [fields["VmRSS"], fields["RssAnon"], fields["RssFile"]]
out = {{"python": rss()}}
import node.service  # noqa: F401  (the DICOM, HTTP and database stack)
out["node stack imported"] = rss()
import torch, torchvision  # noqa: F401
out["torch imported"] = rss()
if {load}:
    from node.modelset import load_model_set
    models = load_model_set(None, device="cpu", include_bundled=True)
    out["models loaded"] = rss()
    out["models"] = sorted(f"{{c.kind}}:{{c.name}}" for c in models.cards())
    import numpy as np
    from inference.pixels import PreprocessConfig, prepare
    grey = np.random.default_rng(0).random((1024, 800), dtype=np.float32)
    seen = set()
    for group in models.groups.values():
        for model in (group.classifier, group.segmenter):
            if model is None or id(model) in seen:
                continue
            seen.add(id(model))
            size = model.card.input_size
            model.probabilities(prepare(grey, PreprocessConfig(), size).pixels[None])
    if models.region_model is not None:
        size = models.region_model.card.input_size
        models.region_model.predict(prepare(grey, PreprocessConfig(), size).pixels[None])
    out["after one forward pass each"] = rss()
print(json.dumps(out))
"""


def run(load: bool) -> dict[str, object]:
    code = STEP.format(root=str(ROOT), load=load)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    figures = run(load=True)
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    print(f"# bench/memory.py: {machine}, {datetime.now(UTC):%Y-%m-%d}")
    print(f"{'step':<32} {'RSS':>8} {'anon':>8} {'file':>8}  (MiB; anon = heap, file = mapped libraries)")
    previous = 0
    for name, value in figures.items():
        if name == "models":
            continue
        assert isinstance(value, list)
        total, anon, mapped = (v / 2**20 for v in value)
        print(f"{name:<32} {total:8.0f} {anon:8.0f} {mapped:8.0f}  (+{total - previous:.0f})")
        previous = total
    print("models:", ", ".join(str(m) for m in figures.get("models", [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
