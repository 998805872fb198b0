"""``overlock predict``: the trained classifier's calibrated top-k classes, or the detector's calibrated
detections, for files, directories and globs of images.

Images of any format PIL reads, any size and mode (grayscale, RGBA, CMYK, palette, 16-bit PNG) are read as
``overlock.inference.images.read_rgb`` reads them and run in batches. An unreadable file prints one
``error: <file>: ...`` line on stderr and the batch goes on; the exit code is then 1 (2: bad arguments or
no model). The classifier runs in its deploy form (re-parameterized) unless ``--form trained``; its
probabilities are ``softmax(logits / T)`` with the temperature fitted by the calibrate stage (without one they
are uncalibrated and a note says so). ``--task detect`` writes each image with its detections drawn and a
COCO-style ``detections.json`` (images, categories, annotations with calibrated ``score``, ``raw_score``,
``bbox`` [x, y, w, h] and an RLE ``segmentation`` for Mask R-CNN) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pbm", ".pnm", ".ico", ".jp2", ".jfif", ".tga", ".dib", ".pcx", ".sgi", ".eps"})
GLOB_CHARS = frozenset("*?[")
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlock predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Calibrated top-k classes (or, with --task detect, calibrated detections) of images.",
        epilog="examples:\n"
               "  overlock predict photos/ 'more/**/*.jpg' one.png --format csv > predictions.csv\n"
               "  overlock predict --task detect street/ --out-dir predictions/\n"
               "exit code: 0 all predicted, 1 some images could not be read (named on stderr), 2 bad input")
    parser.add_argument("inputs", nargs="+", metavar="PATH",
                        help="image files, directories (searched recursively) and globs ('**' recurses)")
    parser.add_argument("--task", choices=["classify", "detect"], default="classify", help="default: classify")
    parser.add_argument("--classifier", default="models/classifier",
                        help="pretrain output directory (model.json + final.pth/best.pth) or one of its .pth "
                             "files (default: %(default)s)")
    parser.add_argument("--weights", choices=["final", "best"], default=None,
                        help="checkpoint of the --classifier directory (default: final.pth, the weights the "
                             "temperature was fitted on; else best.pth)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights instead of the raw ones")
    parser.add_argument("--form", choices=["deploy", "trained"], default="deploy",
                        help="deploy: re-parameterized for inference (default; same outputs, faster); "
                             "trained: the model as trained")
    parser.add_argument("--detector", default="models/detector",
                        help="finetune output directory (config.py + detector.pth; default: %(default)s)")
    parser.add_argument("--calibration", default="models/calibration",
                        help="calibrate output directory (temperature.json, detector_calibration.json; "
                             "default: %(default)s)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text",
                        help="classification output on stdout (or --out): text (default), json (one "
                             "array), csv (one row per image and rank)")
    parser.add_argument("--out", default=None, help="write the classification output to this file")
    parser.add_argument("--out-dir", default="predictions",
                        help="--task detect: drawn images and detections.json go here (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="--task detect: keep detections with calibrated score >= this (default: "
                             "%(default)s)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """(image files in order, without duplicates; problems): a directory gives its image files (recursive,
    sorted), a glob its matches, a file itself (whatever its suffix: the reader decides)."""
    files, problems, seen = [], [], set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: directory has no image files")
            for p in found:
                add(p)
        elif path.exists() or not GLOB_CHARS & set(item):
            add(path)  # a missing plain file is reported by the reader, in order
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                problems.append(f"{item}: the pattern matches no file")
            for p in matches:
                add(p)
    return files, problems


def read_batches(files: Sequence[Path], batch_size: int, failed: list[str]) -> Iterator[list[tuple[Path, object]]]:
    """Batches of (path, RGB image); an unreadable file is reported on stderr, added to ``failed`` and
    skipped."""
    from overlock.inference.images import ImageReadError, read_rgb

    batch = []
    for path in files:
        try:
            batch.append((path, read_rgb(path)))
        except ImageReadError as err:
            _error(str(err))
            failed.append(str(path))
            continue
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _device(name: str):
    from overlock.compute import select_device
    from overlock.params import ComputeParams

    return select_device(ComputeParams(device=name))


def _checkpoint(args) -> Path:
    path = Path(args.classifier)
    if args.weights and path.is_dir():
        return path / f"{args.weights}.pth"
    return path


def classify(args, files: Sequence[Path], failed: list[str]) -> list[dict]:
    """Rows {"image", "classes", "class_ids", "probabilities", "temperature"} of the readable ``files``."""
    from tqdm import tqdm

    from overlock.inference.predictor import ClassifierPredictor

    calibration = Path(args.calibration)
    calibration = calibration if (calibration / "temperature.json").exists() or calibration.is_file() else None
    predictor = ClassifierPredictor.load(_checkpoint(args), calibration, ema=args.ema, device=_device(args.device),
                                         deploy=args.form == "deploy")
    if predictor.temperature is None:
        print(f"note: no {args.calibration}/temperature.json; probabilities are NOT calibrated "
              "(run `dvc repro calibrate`)", file=sys.stderr)
    rows = []
    with tqdm(total=len(files), desc="predict", unit="img", disable=None, file=sys.stderr) as bar:
        for batch in read_batches(files, args.batch_size, failed):
            tops = predictor.top_k(predictor.probabilities([img for _, img in batch]), args.topk)
            rows += [{"image": str(path), "classes": top.classes, "class_ids": top.class_ids,
                      "probabilities": top.probabilities, "temperature": predictor.temperature}
                     for (path, _), top in zip(batch, tops)]
            bar.update(len(batch))
    return rows


def format_rows(rows: list[dict], fmt: str) -> str:
    """The classification rows as text, JSON or CSV."""
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "rank", "class", "class_id", "probability", "temperature"])
        for row in rows:
            for rank, (name, cid, prob) in enumerate(zip(row["classes"], row["class_ids"], row["probabilities"]), 1):
                writer.writerow([row["image"], rank, name, cid, f"{prob:.6f}", row["temperature"] or ""])
        return buf.getvalue()
    lines = []
    for row in rows:
        t = row["temperature"]
        lines.append(row["image"] + (f"  (calibrated, T={t:.3f})" if t else "  (uncalibrated)"))
        lines += [f"  {rank}. {name:<30} {prob:7.2%}"
                  for rank, (name, prob) in enumerate(zip(row["classes"], row["probabilities"]), 1)]
    return "\n".join(lines) + ("\n" if lines else "")


def draw_detections(image, detections: list[dict]):
    """A copy of the RGB ``image`` with masks (tinted), boxes and "label score" drawn."""
    import numpy as np
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils

    arr = np.asarray(image, dtype=np.float32).copy()
    for det in detections:
        if "mask" in det:
            m = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()}) > 0
            arr[m] = 0.5 * arr[m] + 0.5 * np.array(PALETTE[det["label_id"] % len(PALETTE)], dtype=np.float32)
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for det in detections:
        colour = PALETTE[det["label_id"] % len(PALETTE)]
        draw.rectangle(det["bbox"], outline=colour, width=2)
        draw.text((det["bbox"][0] + 2, det["bbox"][1] + 1), f"{det['label']} {det['score']:.2f}", fill=colour)
    return out


def detect(args, files: Sequence[Path], failed: list[str]) -> Path:
    """Drawn images and the COCO-style ``detections.json`` of the readable ``files`` in ``--out-dir``."""
    from tqdm import tqdm

    from overlock.inference.detector import DetectorPredictor, mmdet_available
    from overlock.state import write_json_atomic

    detector_dir = Path(args.detector)
    missing = [f for f in ("config.py", "detector.pth") if not (detector_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{detector_dir} has no {', '.join(missing)}: run `dvc repro finetune` or pass "
                                "--detector DIR")
    problem = mmdet_available()
    if problem:
        raise ValueError(f"MMDetection is not importable ({problem}); install mmcv-full 1.7.2 and mmdet 2.28.2")
    calibration = Path(args.calibration)
    predictor = DetectorPredictor.load(detector_dir, calibration if calibration.exists() else None,
                                       device=_device(args.device))
    if predictor.calibrator is None:
        print(f"note: no fitted detector calibration in {args.calibration}; scores are the raw detector scores",
              file=sys.stderr)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": "overlock predict --task detect", "score": "calibrated" if predictor.calibrator
                     else "raw"}, "images": [], "annotations": [],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(predictor.class_names)]}
    names: set[str] = set()
    with tqdm(total=len(files), desc="detect", unit="img", disable=None, file=sys.stderr) as bar:
        for batch in read_batches(files, args.batch_size, failed):
            for (path, image), dets in zip(batch, predictor.detect([img for _, img in batch])):
                dets = [d for d in dets if d["score"] >= args.score_threshold]
                drawn = f"{path.stem}.jpg"
                for n in range(1, 1 << 20):
                    if drawn not in names:
                        break
                    drawn = f"{path.stem}_{n}.jpg"
                names.add(drawn)
                draw_detections(image, dets).save(out_dir / drawn, quality=90)
                image_id = len(coco["images"]) + 1
                coco["images"].append({"id": image_id, "file_name": str(path), "drawn": drawn,
                                       "width": image.width, "height": image.height})
                for det in dets:
                    x1, y1, x2, y2 = det["bbox"]
                    ann = {"id": len(coco["annotations"]) + 1, "image_id": image_id,
                           "category_id": det["label_id"] + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                           "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "score": det["score"],
                           "raw_score": det["raw_score"]}
                    if "mask" in det:
                        ann["segmentation"] = det["mask"]
                    coco["annotations"].append(ann)
            bar.update(len(batch))
    write_json_atomic(out_dir / "detections.json", coco)
    print(f"{len(coco['images'])} images, {len(coco['annotations'])} detections (score >= "
          f"{args.score_threshold}) -> {out_dir}/detections.json and {len(coco['images'])} drawn images")
    return out_dir / "detections.json"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``overlock predict``; returns the exit code (1 when an image failed, 2 on bad input)."""
    args = build_parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        _error("--topk and --batch-size must be >= 1")
        return 2
    files, problems = expand_inputs(args.inputs)
    for problem in problems:
        _error(problem)
    if not files:
        _error("no images to predict")
        return 2
    failed: list[str] = []
    try:
        if args.task == "detect":
            detect(args, files, failed)
        else:
            text = format_rows(classify(args, files, failed), args.format)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text)
            else:
                sys.stdout.write(text)
    except (FileNotFoundError, ValueError, KeyError) as err:
        _error(str(err))
        return 2
    if failed or problems:
        _error(f"{len(failed)} of {len(files)} images could not be read"
               + (f"; {len(problems)} inputs matched nothing" if problems else ""))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
