"""``overlock export --format onnx``: the classifier's deploy form as ONNX, checked with ONNX Runtime.

The exported graph is the re-parameterized classifier (``reparameterize(remove_aux_head=True)``: one large
kernel per dilated block, no auxiliary head) with a dynamic batch dimension: input ``images`` float32
[batch, 3, H, W] (preprocessed), output ``logits`` float32 [batch, classes] (raw, before temperature).

- Exporter: ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript). Under ``torch.export``
  ``torch.compiler.is_compiling()`` is true, so the CPU-only oneDNN inference fusion
  (``overlock.models.inference_fusion``) steps aside and the plain re-parameterized layers are traced:
  standard ONNX Conv/MatMul/... that any runtime runs. ContMix is traced through a pure-PyTorch aggregation
  backend (``EXPORT_CONTMIX_BACKEND``, overridable; never natten, which has no ONNX form).
- Check: ONNX Runtime's outputs against the PyTorch deploy form as it runs eagerly (fusion on), at two batch
  sizes other than the traced one; ``max |onnx - torch| <= ATOL + RTOL * max |torch|``, else the export fails
  and no file is left.
- Preprocessing travels with it (DESIGN.md 11), in the model's ``metadata_props`` (read back with
  :func:`read_onnx_metadata` or ``onnxruntime.InferenceSession(...).get_modelmeta().custom_metadata_map``):
  ``input_size``, ``mean``, ``std`` (JSON lists), ``crop_pct`` (number), ``interpolation`` (timm name),
  ``classes`` (JSON list of class names, index = logit), ``temperature`` (number, only when the calibrate
  stage's ``temperature.json`` is given: calibrated probabilities are ``softmax(logits / temperature)``),
  and where the weights came from (``timm_name``, ``model_kwargs``, ``checkpoint``, ``weights``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from overlock.backends import contmix_backend_override
from overlock.inference.deploy import DeployClassifier, load_deploy_classifier, read_temperature

log = logging.getLogger(__name__)

__all__ = ["DeployClassifier", "load_deploy_classifier", "export_onnx", "check_onnx", "read_onnx_metadata",
           "onnx_metadata", "ort_session", "main"]

INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 20
# ContMix aggregation traced into the graph: "fast" (tiled dense matmuls; fewest, largest ops) exports to
# MatMul/GatherND/ScatterND; "gather" (index gather + Einsum) also exports and is numerically the same.
EXPORT_CONTMIX_BACKEND = "fast"
EXPORTABLE_CONTMIX_BACKENDS = ("fast", "gather", "unfold")
TRACE_BATCH = 2  # the example batch traced; the check runs other sizes (1 and 3) to prove the dynamic batch
CHECK_BATCHES = (1, 3)
# fp32 tolerance of the check, relative to the largest logit: both sides are fp32 with different summation
# orders (folded BNs, re-associated ContMix logits on the eager side); measured differences ~1e-6 relative.
ATOL, RTOL = 1e-4, 1e-4
METADATA_JSON_KEYS = ("input_size", "mean", "std", "crop_pct", "classes", "temperature", "model_kwargs")


class ExportError(RuntimeError):
    """The export could not be done or did not pass its check (the message names the problem and the fix)."""


def onnx_metadata(classifier: DeployClassifier, temperature: float | None = None) -> dict[str, str]:
    """The ``metadata_props`` written into the model (strings; JSON for lists and numbers)."""
    meta = {
        **{k: json.dumps(classifier.data_config[k]) for k in ("input_size", "crop_pct", "mean", "std")},
        "interpolation": classifier.data_config["interpolation"],
        "classes": json.dumps(classifier.class_names),
        "timm_name": classifier.timm_name,
        "model_kwargs": json.dumps(classifier.model_kwargs, sort_keys=True),
        "checkpoint": classifier.checkpoint.name,
        "weights": classifier.weights,
        "form": "deploy (re-parameterized, no aux head)",
        "input": f"{INPUT_NAME}: float32 [batch, 3, H, W], resized/cropped per crop_pct and interpolation, "
                 "RGB in [0, 1] normalized with mean/std",
        "output": f"{OUTPUT_NAME}: float32 [batch, classes], uncalibrated; probabilities = "
                  "softmax(logits / temperature)",
    }
    if temperature is not None:
        meta["temperature"] = json.dumps(float(temperature))
    return meta


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """``metadata_props`` of an exported model, JSON values decoded (see ``METADATA_JSON_KEYS``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) if p.key in METADATA_JSON_KEYS else p.value
            for p in model.metadata_props}


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int], *,
                metadata: dict[str, str] | None = None, opset: int = DEFAULT_OPSET,
                contmix: str = EXPORT_CONTMIX_BACKEND) -> Path:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch dimension and ``metadata`` as
    ``metadata_props``. ``input_size`` is (3, H, W). Writes ``path`` directly (see :func:`export_classifier`
    for the checked, atomic export)."""
    if contmix not in EXPORTABLE_CONTMIX_BACKENDS:
        raise ValueError(f"ContMix backend {contmix!r} cannot be exported; use one of "
                         f"{', '.join(EXPORTABLE_CONTMIX_BACKENDS)}")
    example = torch.randn(TRACE_BATCH, *input_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with contmix_backend_override(contmix), torch.no_grad():
            program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), optimize=True, verbose=False)
    except Exception as err:  # torch.export / onnxscript errors: say which step failed
        raise ExportError(f"torch.onnx.export (dynamo, opset {opset}, ContMix {contmix}) failed: "
                          f"{type(err).__name__}: {str(err)[:2000]}") from err
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=False)
    return Path(path)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` (``threads`` intra-op threads, one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path: str | os.PathLike, input_size: Sequence[int],
               batches: Sequence[int] = CHECK_BATCHES, atol: float = ATOL, rtol: float = RTOL,
               threads: int | None = None) -> list[dict]:
    """ONNX Runtime's logits of ``path`` against ``model``'s (eager, as deployed) on the same random images,
    one row per batch size: {"batch", "max_abs", "max_rel"} (``max_rel``: ``max_abs / max |torch logit|``).
    Raises ``ExportError`` when a batch is outside ``max_abs <= atol + rtol * max |torch logit|``."""
    import onnx

    onnx.checker.check_model(str(path))
    session = ort_session(path, threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        images = torch.randn(batch, *input_size, generator=generator)
        with torch.inference_mode():
            expected = _logits(model(images)).float()
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)} "
                              f"at batch {batch}")
        max_abs = float((got - expected).abs().max())
        scale = float(expected.abs().max())
        rows.append({"batch": batch, "max_abs": max_abs, "max_rel": max_abs / max(scale, 1e-12)})
        if not max_abs <= atol + rtol * scale:
            raise ExportError(f"ONNX Runtime differs from PyTorch at batch {batch}: max |diff| "
                              f"{max_abs:.3g} > {atol:g} + {rtol:g} * {scale:.3g}; the export is wrong "
                              "(try --contmix gather)")
    return rows


def _logits(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def export_classifier(checkpoint: str | os.PathLike, out: str | os.PathLike, *, calibration=None,
                      ema: bool = False, opset: int = DEFAULT_OPSET, check: bool = True,
                      contmix: str = EXPORT_CONTMIX_BACKEND) -> tuple[Path, list[dict]]:
    """Export the pipeline classifier at ``checkpoint`` to ``out`` (ONNX, deploy form, dynamic batch,
    preprocessing/classes/temperature in the metadata); with ``check`` compared with ONNX Runtime first.
    ``out`` appears only once everything passed. Returns (path, check rows)."""
    classifier = load_deploy_classifier(checkpoint, ema=ema)
    temperature = read_temperature(calibration) if calibration is not None else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(out.with_name(f".{out.name}.tmp{os.getpid()}"))  # as overlock.state's atomic writers name it
    try:
        input_size = classifier.data_config["input_size"]
        export_onnx(classifier.model, tmp, input_size, metadata=onnx_metadata(classifier, temperature),
                    opset=opset, contmix=contmix)
        rows = check_onnx(classifier.model, tmp, input_size) if check else []
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlock export",
        description="Export the trained classifier's deploy form (dynamic batch) with its preprocessing, "
                    "class names and temperature in the metadata, checked against PyTorch with ONNX Runtime.")
    parser.add_argument("--checkpoint", default="models/classifier",
                        help="pretrain output directory (model.json + final.pth, else best.pth) or one of "
                             "its .pth files (default: models/classifier)")
    parser.add_argument("--out", default="models/classifier.onnx", help="output file (default: %(default)s)")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    parser.add_argument("--calibration", default=None,
                        help="calibrate output directory or its temperature.json: the fitted temperature "
                             "goes into the metadata (default: models/calibration when it has one)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--contmix", default=EXPORT_CONTMIX_BACKEND, choices=EXPORTABLE_CONTMIX_BACKENDS,
                        help="ContMix aggregation traced into the graph (default: %(default)s)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="compare ONNX Runtime with PyTorch at batch 1 and 3 before writing "
                             "(default: on)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``overlock export``; returns the exit code (2 on bad input, 1 when the check fails)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    calibration = args.calibration
    if calibration is None and (Path("models/calibration") / "temperature.json").exists():
        calibration = "models/calibration"
    if calibration is None:
        print("note: no --calibration (models/calibration/temperature.json absent): the metadata has no "
              "temperature; probabilities from softmax(logits) are NOT calibrated", file=sys.stderr)
    try:
        out, rows = export_classifier(args.checkpoint, args.out, calibration=calibration, ema=args.ema,
                                      opset=args.opset, check=args.check, contmix=args.contmix)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for row in rows:
        print(f"check batch {row['batch']}: ONNX Runtime vs PyTorch max |diff| {row['max_abs']:.2e} "
              f"(relative {row['max_rel']:.2e}; tolerance {ATOL:g} + {RTOL:g} * max |logit|)")
    meta = read_onnx_metadata(out)
    print(f"wrote {out} (opset {args.opset}, dynamic batch, ContMix {args.contmix}; {len(meta['classes'])} "
          f"classes, input {meta['input_size']}, temperature {meta.get('temperature', 'none')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
