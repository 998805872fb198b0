"""``overlock predict IMAGE...``: calibrated top-k classes of images with the trained classifier.

The probabilities are ``softmax(logits / T)`` with the temperature fitted by the calibrate stage
(``<calibration>/temperature.json``); without it they are uncalibrated and a note says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlock predict",
        description="Print the calibrated top-k classes (human names from classes.json) of each image.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) (any format PIL reads)")
    parser.add_argument(
        "--classifier",
        default="models/classifier",
        help="pretrain output directory (model.json + final.pth; default: models/classifier)",
    )
    parser.add_argument(
        "--calibration",
        default="models/calibration",
        help="calibrate output directory with temperature.json (default: models/calibration)",
    )
    parser.add_argument(
        "--topk", type=int, default=5, help="number of classes to print per image (default: 5)"
    )
    parser.add_argument("--ema", action="store_true", help="use the EMA weights instead of the raw ones")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    return parser


def predict_images(
    images: Sequence[Path],
    classifier: Path,
    calibration: Path | None,
    topk: int = 5,
    ema: bool = False,
    device: str = "auto",
) -> list[dict]:
    """[{"image", "top": [(class name, probability), ...]}] for each image, calibrated when T is available."""
    from PIL import Image, UnidentifiedImageError

    from overlock.compute import select_device
    from overlock.inference.calibrated import load_temperature
    from overlock.inference.classifier import eval_transform, load_classifier, logits_of, read_classifier_info
    from overlock.params import ComputeParams

    dev = select_device(ComputeParams(device=device))
    info = read_classifier_info(classifier)
    model = load_classifier(classifier, ema=ema, device=dev)
    if model is None:
        raise ValueError(f"{classifier} has no EMA weights; drop --ema")
    transform = eval_transform(model, info)
    temperature = load_temperature(calibration)
    names = info.class_names
    results = []
    for path in images:
        try:
            with Image.open(path) as img:
                x = transform(img.convert("RGB"))[None].to(dev)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        with torch.no_grad():
            logits = logits_of(model(x)).float().cpu()[0]
        probs = (logits / (temperature or 1.0)).softmax(0)
        values, indices = probs.topk(min(topk, len(names)))
        results.append(
            {
                "image": str(path),
                "temperature": temperature,
                "top": [(names[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())],
            }
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``overlock predict``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    if args.topk < 1:
        print("error: --topk must be >= 1", file=sys.stderr)
        return 2
    try:
        results = predict_images(
            [Path(p) for p in args.images],
            Path(args.classifier),
            Path(args.calibration),
            args.topk,
            args.ema,
            args.device,
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results and results[0]["temperature"] is None:
        print(
            f"note: no {args.calibration}/temperature.json; probabilities are NOT calibrated "
            "(run `dvc repro calibrate`)",
            file=sys.stderr,
        )
    for res in results:
        t = res["temperature"]
        print(f"{res['image']}" + (f"  (calibrated, T={t:.3f})" if t else "  (uncalibrated)"))
        for rank, (name, prob) in enumerate(res["top"], 1):
            print(f"  {rank}. {name:<30} {prob:7.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
