"""Run ultralytics offline: what must be in place before ``import ultralytics``.

ultralytics reads ``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL`` and ``YOLO_CONFIG_DIR`` when it is
imported, and its font check tries the network unless ``Arial.ttf`` is in the config directory
(STACK-NOTES "ultralytics offline"). This is called right before the lazy import in the detector
runtime and trainer, never at module import. Variables an operator has already set win.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def prepare_ultralytics(config_dir: Path | None = None) -> Path:
    """Set the offline variables (unless set), place the font, and return the config folder."""
    folder = Path(
        os.environ.get("YOLO_CONFIG_DIR") or config_dir or Path(tempfile.gettempdir()) / "fracnode-yolo"
    )
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(folder))
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for target in (folder / "Arial.ttf", folder / "Ultralytics" / "Arial.ttf"):
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(font, target)
    return folder
