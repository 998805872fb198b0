"""The ADE20K semantic-segmentation layout (``data.segmentation_dataset``: ``ade20k`` or the demo ``demo_ade``).

``ADEChallengeData2016.zip`` is extracted under ``segmentation/`` as released:
``ADEChallengeData2016/images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``
(label 0 = unlabelled, 1..K the classes; mmseg's ``reduce_zero_label`` maps them to ignore, 0..K-1). Then:
``splits/{train,calibration,val}.txt`` (image stems as mmseg's ``split`` files read them; the calibration
split is held out of training, deterministically from the seed; pairs with an unreadable image or label are
excluded) and ``classes.json`` (``objectInfo150.txt`` names when the archive has it).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from overlock.data.extract import ArchiveError, safe_extract
from overlock.state import write_json_atomic

log = logging.getLogger(__name__)

TOP = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}


def build_ade(archive: Path, root: Path) -> Path:
    """Extract the ADE20K-format zip under ``root`` (kept when already done); returns the dataset folder."""
    done = root / ".ade_done"
    if not done.exists():
        safe_extract(archive, root)
        for split in SPLIT_DIRS.values():
            for kind in ("images", "annotations"):
                if not (root / TOP / kind / split).is_dir():
                    raise ArchiveError(f"{archive.name} holds no {TOP}/{kind}/{split}/ folder; it is not the "
                                       f"ADEChallengeData2016 archive")
        done.touch()
    return root / TOP


def _class_names(folder: Path) -> list[str]:
    info = folder / "objectInfo150.txt"
    if not info.exists():
        return []
    rows = [r.split("\t") for r in info.read_text().splitlines()[1:] if r.strip()]
    return [r[-1].split(",")[0].strip() for r in rows]


def segmentation_splits(root: Path, seed: int, calibration_images: int, mode: str) -> dict:
    """Write ``splits/*.txt`` and ``classes.json`` under ``root``; return the segmentation report section."""
    from overlock.data.layouts import find_unreadable  # local: layouts imports this module

    folder = root / TOP
    report: dict = {"images": {}, "excluded_files": {}}
    stems: dict[str, list[str]] = {}
    for split, sub in SPLIT_DIRS.items():
        images = sorted(p.stem for p in (folder / "images" / sub).glob("*.jpg"))
        labels = {p.stem for p in (folder / "annotations" / sub).glob("*.png")}
        unlabelled = [s for s in images if s not in labels]
        rel = [f"{TOP}/images/{sub}/{s}.jpg" for s in images if s in labels]
        rel += [f"{TOP}/annotations/{sub}/{s}.png" for s in images if s in labels]
        bad = find_unreadable(root, rel, mode)
        bad.update({f"{TOP}/images/{sub}/{s}.jpg": "no annotation png" for s in unlabelled})
        report["excluded_files"].update(bad)
        bad_stems = {Path(p).stem for p in bad}
        stems[split] = [s for s in images if s not in bad_stems]
        report["images"][split] = len(images)
    train = stems["train"]
    count = min(calibration_images, len(train) // 4)
    if count < 1:
        raise ArchiveError(f"only {len(train)} readable segmentation train images: too few to hold out a "
                           f"calibration split; add images")
    pick = set(np.random.default_rng([seed % (2**32), 7]).choice(len(train), count, replace=False).tolist())
    splits = {"train": [s for i, s in enumerate(train) if i not in pick],
              "calibration": [s for i, s in enumerate(train) if i in pick], "val": stems["val"]}
    (root / "splits").mkdir(exist_ok=True)
    for name, names in splits.items():
        (root / "splits" / f"{name}.txt").write_text("".join(f"{s}\n" for s in names))
    classes = _class_names(folder)
    write_json_atomic(root / "classes.json", classes)
    report.update(classes=len(classes), class_names=classes, excluded=len(report["excluded_files"]),
                  splits={k: len(v) for k, v in splits.items()})
    return report
