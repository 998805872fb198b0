"""Which archives each dataset needs, where they come from and the checksum each must match.

The published archives (ImageNet, CIFAR-10, COCO 2017) and their MD5 checksums ship as package data in
``overlock/reference/dataset_archives.json``. The demo archives are generated locally; their SHA-256 is
computed when they are generated (see :mod:`overlock.data.demo`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "reference"

# Archive files of the demo datasets, by role (packed like ImageNet and COCO 2017).
DEMO_ARCHIVES = {"demo": {"train": "demo_img_train.tar", "val": "demo_img_val.tar",
                          "devkit": "demo_devkit_t12.tar.gz"},
                 "demo_coco": {"train": "demo_coco_train2017.zip", "val": "demo_coco_val2017.zip",
                               "annotations": "demo_coco_annotations_trainval2017.zip"},
                 "demo_ade": {"trainval": "demo_ADEChallengeData2016.zip"}}
# The dataset whose archives a dataset is built from (ImageNet-100 is a subset of ImageNet-1K).
ARCHIVE_DATASET = {"imagenet100": "imagenet1k"}
LOGIN_REQUIRED = {"imagenet1k"}


@dataclass(frozen=True)
class ArchiveSpec:
    """One archive of a dataset: its role (train/val/devkit/annotations/python), file name and checksum."""
    dataset: str
    role: str
    file: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    expected_images: int | dict | None = None

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, hex digest) the archive must match."""
        if self.sha256:
            return "sha256", self.sha256
        if self.md5:
            return "md5", self.md5
        raise ValueError(f"archive {self.file} has no checksum")


@lru_cache(maxsize=1)
def published_archives() -> dict:
    """The table of the real datasets' archives (``dataset_archives.json``)."""
    return json.loads((REFERENCE / "dataset_archives.json").read_text())


def archive_dataset(dataset: str) -> str:
    """The dataset whose archives ``dataset`` is built from."""
    return ARCHIVE_DATASET.get(dataset, dataset)


def published_specs(dataset: str) -> list[ArchiveSpec]:
    """Archives of a real dataset (``imagenet1k``, ``imagenet100``, ``cifar10``, ``coco2017``)."""
    name = archive_dataset(dataset)
    table = published_archives()
    if name not in table:
        raise ValueError(f"no published archives for dataset {dataset!r}; known: "
                         f"{', '.join(k for k in table if not k.startswith('_'))}")
    return [ArchiveSpec(dataset=name, role=role, file=e["file"], url=e.get("url"), md5=e.get("md5"),
                        sha256=e.get("sha256"), expected_images=e.get("images"))
            for role, e in table[name].items()]


def expected_counts(dataset: str) -> dict[str, int]:
    """Published image counts per split (``train``/``val``), empty when unknown (demo, ImageNet-100, own data)."""
    if dataset in DEMO_ARCHIVES or dataset in ("imagenet100", "folder", "coco_folder"):
        return {}
    out: dict[str, int] = {}
    for spec in published_specs(dataset):
        if isinstance(spec.expected_images, dict):
            out.update(spec.expected_images)
        elif isinstance(spec.expected_images, int) and spec.role in ("train", "val"):
            out[spec.role] = spec.expected_images
    return out


def imagenet100_classes() -> list[str]:
    """The 100 ImageNet wnids of the CMC paper's ImageNet-100 subset."""
    lines = (REFERENCE / "imagenet100_classes.txt").read_text().split()
    return [w.strip() for w in lines if w.strip()]


def selected_datasets(data) -> list[str]:
    """The datasets a ``data`` params section selects (classification, then detection and segmentation
    unless ``none``)."""
    names = [data.dataset]
    if data.detection_dataset != "none":
        names.append(data.detection_dataset)
    if getattr(data, "segmentation_dataset", "none") != "none":
        names.append(data.segmentation_dataset)
    return names
