"""One-GPU check of the model: parity, training and inference throughput, peak memory (at most ~5 minutes).

Needs only torch, torchvision and timm of the machine plus this repository on PYTHONPATH (it imports
``overlock.models`` alone: no mmcv, natten, mlflow or ray; natten is used only when it imports)::

    PYTHONPATH=. python benchmarks/gpu_check.py --json gpu_check.json        # on a GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run --json /tmp/x.json  # CPU, tiny (the test suite)

(a) parity: the official fixture (``tests/fixtures/parity/tiny_a_128x128.pt``, float64 logits) against the
    model run in fp32 (TF32 off) on the device, for every ContMix backend that runs there (fast, gather,
    natten when it imports, triton when it imports); eval logits, deploy-form logits and train-mode aux
    logits; max error relative to the largest reference logit, below ``PARITY_RTOL``.
    ``--include-wrong-backend`` adds the fast backend with its window slots reversed, which must fail
    (proof that the check can fail).
(b) training images/s of OverLoCK-XT and -T and timm's convnext_tiny: 224 px, batch 128, bf16 autocast,
    channels_last, AdamW step; eager and ``torch.compile`` (inductor; the compile time is reported apart).
(c) inference images/s (bf16 autocast, channels_last, inference mode): the plain model vs the deploy form
    (``reparameterize``), whose outputs are compared too.
(d) peak GPU memory of every measurement;
(e) the ContMix aggregation alone, forward + backward ms per backend (what decides a default for CUDA).
Prints a table and writes JSON. ``--dry-run``: tiny models at 64 px, batch 2, 1 warm-up + 2 timed
iterations on the CPU, ``torch.compile`` with the light ``eager`` backend (inductor takes minutes on a CPU);
the triton backend runs through Triton's interpreter there. A measurement that would overrun
``--budget-s`` is skipped with the reason recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "tiny_a_128x128.pt"
PARITY_RTOL = 1e-4  # model logits, fp32 (TF32 off) vs the float64 fixture: ~5e-7 measured on CPU
OP_RTOL = 1e-5  # ContMix alone, fp32 vs float64: ~1e-7 measured on CPU
# (H, W, kernel, dilation): non-square, dilation, a map smaller than the kernel; the GPU adds real sizes
OP_SHAPES = [(9, 11, 5, 1), (7, 10, 3, 2), (5, 4, 7, 1)]
OP_SHAPES_GPU = OP_SHAPES + [(14, 14, 13, 1), (56, 56, 7, 1), (28, 28, 13, 2)]
HEAVY = ("mmcv", "mmdet", "mmseg", "mlflow", "ray", "dvc", "pydantic")
TINY_OVERLOCK = dict(depth=[1, 1, 1, 1], sub_depth=[1, 1], embed_dim=[16, 32, 64, 96], sub_num_heads=[2, 2],
                     num_classes=10)
TINY_CONVNEXT = dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 96), num_classes=10)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    ap.add_argument("--json", default="gpu_check.json", help="where to write the results")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip what would overrun this (default: 285 s on a GPU, none for --dry-run)")
    ap.add_argument("--include-wrong-backend", action="store_true",
                    help="also check a deliberately wrong ContMix backend (it must fail)")
    ap.add_argument("--skip-compile", action="store_true", help="eager measurements only")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors (interpreter)
        # the depth-wise convolutions a GPU runs: PyTorch's own (fast_conv's oneDNN detours are CPU-only)
        os.environ.setdefault("OVERLOCK_DWCONV_BACKEND", "torch")
    import torch
    import timm
    from overlock.models import contmix

    start = time.perf_counter()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    cfg = _config(args.dry_run)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result = {"schema": 1, "dry_run": args.dry_run, "started": started,
              "machine": _machine(torch, timm, device), "config": cfg}
    budget = args.budget_s if args.budget_s is not None else (float("inf") if args.dry_run else 285.0)
    deadline = start + budget
    result["parity"] = check_parity(torch, contmix, device, args.include_wrong_backend,
                                    OP_SHAPES if args.dry_run else OP_SHAPES_GPU)
    result["train"], result["inference"] = [], []
    for name in cfg["models"]:
        result["train"].append(_guarded(torch, device, name, "eager", measure_train, torch, timm, name, cfg,
                                        device, "eager", deadline))
    for name in cfg["models"]:
        if name != "convnext_tiny":
            rows = _guarded(torch, device, name, "plain+deploy", measure_inference, torch, name, cfg, device,
                            deadline)
            result["inference"].extend(rows if isinstance(rows, list) else [rows])
    for name in cfg["models"]:
        if args.skip_compile:
            result["train"].append(_skipped(name, "compile", "--skip-compile"))
        else:
            result["train"].append(_guarded(torch, device, name, "compile", measure_train, torch, timm, name,
                                            cfg, device, "compile", deadline))
    result["contmix"] = measure_contmix(torch, contmix, device, cfg, deadline)
    result["heavy_modules_imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    checked = [r for r in result["parity"]["results"] if not r["skipped"]]
    result["ok"] = all(r["ok"] != r["deliberately_wrong"] for r in checked) \
        and not result["heavy_modules_imported"]
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    verdict = "OK" if result["ok"] else "FAILED"
    print(f"JSON written to {args.json}; overall {verdict} in {result['wall_s']} s")
    return 0 if result["ok"] else 1


def _config(dry_run: bool) -> dict:
    if dry_run:
        return {"models": ["overlock_xt", "overlock_t", "convnext_tiny"], "image_size": 64, "batch": 2,
                "warmup": 1, "iters": 2, "compile_backend": "eager", "overrides": "tiny",
                "compile_note": "dry run: torch.compile with the 'eager' backend (inductor: minutes on CPU)"}
    return {"models": ["overlock_xt", "overlock_t", "convnext_tiny"], "image_size": 224, "batch": 128,
            "warmup": 3, "iters": 10, "compile_backend": "inductor", "overrides": None, "compile_note": None}


def _machine(torch, timm, device) -> dict:
    info = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "cuda": torch.version.cuda, "platform": platform.platform()}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except Exception as exc:  # noqa: BLE001 - recorded, not needed
        info["torchvision"] = f"unavailable: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


# ------------------------------------------------------------------------------------------------ parity

@contextlib.contextmanager
def contmix_backend(contmix, name: str):
    """Select a ContMix backend for the block (``set_contmix_backend`` when the package has one)."""
    setter = getattr(contmix, "set_contmix_backend", None)
    previous = os.environ.get(contmix.BACKEND_ENV_VAR)
    if setter is not None:
        setter(name)
    os.environ[contmix.BACKEND_ENV_VAR] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(contmix.BACKEND_ENV_VAR, None)
        else:
            os.environ[contmix.BACKEND_ENV_VAR] = previous
        if setter is not None:
            setter(previous or "auto")


@contextlib.contextmanager
def wrong_fast_backend(contmix):
    """The fast backend with every window's slots reversed: the same shapes, wrong numbers."""
    real = contmix._IMPLEMENTATIONS["fast"]
    contmix._IMPLEMENTATIONS["fast"] = lambda attn, value, *rest: real(attn.flip(-1), value, *rest)
    try:
        yield
    finally:
        contmix._IMPLEMENTATIONS["fast"] = real


def available_backends(contmix, device) -> list[tuple[str, str | None]]:
    """(backend, why it is skipped or None) for every ContMix backend."""
    out = [("fast", None), ("gather", None)]
    natten = contmix._natten_error()
    out.append(("natten", natten))
    try:
        from overlock.models.contmix_triton import triton_error
        out.append(("triton", triton_error(device)))
    except ImportError as exc:
        out.append(("triton", f"overlock.models.contmix_triton not importable: {exc}"))
    return out


def check_parity(torch, contmix, device, include_wrong: bool, op_shapes=None) -> dict:
    from overlock.models.overlock import OverLoCK, reparameterize

    data = torch.load(FIXTURE, weights_only=True)
    config = json.loads(bytes(data["config_json"].tolist()).decode())
    state = {k[4:]: v.float() for k, v in data.items() if k.startswith("cls.")}
    x = data["x"].float().to(device)
    runs = [(name, why, False) for name, why in available_backends(contmix, device)]
    if include_wrong:
        runs.append(("fast", None, True))
    results = []
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, why, wrong in runs:
            row = {"backend": name + (" (slots reversed)" if wrong else ""), "deliberately_wrong": wrong,
                   "skipped": why, "ok": None, "max_rel_err": {}}
            if why is None:
                try:
                    with contmix_backend(contmix, name), (wrong_fast_backend(contmix) if wrong
                                                          else contextlib.nullcontext()):
                        t0 = time.perf_counter()
                        row["max_rel_err"] = _parity_errors(torch, OverLoCK, reparameterize, config, state, x,
                                                            data)
                        row["op_max_rel_err"] = _op_errors(torch, contmix, device, name, op_shapes)
                        row["seconds"] = round(time.perf_counter() - t0, 2)
                    row["ok"] = max(row["max_rel_err"].values()) < PARITY_RTOL \
                        and max(row["op_max_rel_err"].values()) < OP_RTOL
                except Exception as exc:  # noqa: BLE001 - a crash fails the check; the run goes on
                    row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc)[:300]}"
            results.append(row)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"fixture": str(FIXTURE.relative_to(ROOT)), "precision": "fp32 (TF32 off)", "rtol": PARITY_RTOL,
            "op_rtol": OP_RTOL, "op_shapes": [list(map(str, s)) for s in op_shapes], "results": results}


def _op_errors(torch, contmix, device, backend: str, shapes) -> dict:
    """ContMix alone: output, grad attn, grad value of ``backend`` on the device in fp32 against the float64
    ``gather`` reference on the CPU (random inputs; the model-level logits barely move when ContMix is off by
    a little, this does). Max error relative to the largest reference value, over the shapes."""
    errors = {"out": 0.0, "grad_attn": 0.0, "grad_value": 0.0}
    gen = torch.Generator().manual_seed(0)
    for height, width, kernel, dilation in shapes:
        attn = torch.randn(1, 2, height, width, kernel * kernel, generator=gen, dtype=torch.float64)
        value = torch.randn(1, 2, height, width, 8, generator=gen, dtype=torch.float64)
        grad = torch.randn(1, 2, height, width, 8, generator=gen, dtype=torch.float64)
        results = []
        for dev, dtype, name in ((torch.device("cpu"), torch.float64, "gather"),
                                 (device, torch.float32, backend)):
            a = attn.to(dev, dtype).requires_grad_()
            v = value.to(dev, dtype).requires_grad_()
            out = contmix.na2d_av(a, v, kernel, dilation, backend=name)
            results.append((out, *torch.autograd.grad(out, (a, v), grad.to(dev, dtype))))
        for key, ref, got in zip(errors, results[0], results[1]):
            err = (got.detach().cpu().double() - ref.detach()).abs().max() / ref.detach().abs().max()
            errors[key] = max(errors[key], float(err))
    return errors


def _parity_errors(torch, OverLoCK, reparameterize, config, state, x, data) -> dict:
    def rel(out, key):
        ref = data[key].to(out.device)
        return float((out.double() - ref).abs().max() / ref.abs().max())

    model = OverLoCK(**config)
    model.load_state_dict(state)
    model = model.to(x.device)
    errors = {}
    with torch.no_grad():
        errors["eval_logits"] = rel(model.eval()(x), "eval_logits")
        train_copy = copy.deepcopy(model).train()  # train mode moves the BN statistics: a copy
        errors["train_aux"] = rel(train_copy(x)["aux"], "train_aux")
        errors["reparam_logits"] = rel(reparameterize(model).eval()(x), "reparam_logits")
    return errors


# ------------------------------------------------------------------------------------------- throughput

def _build(torch, timm, name: str, cfg: dict):
    if name == "convnext_tiny":
        kwargs = TINY_CONVNEXT if cfg["overrides"] == "tiny" else {}
        return timm.create_model("convnext_tiny", **kwargs)
    from overlock.models import create_overlock
    return create_overlock(name.split("_")[1], **(TINY_OVERLOCK if cfg["overrides"] == "tiny" else {}))


def _guarded(torch, device, name: str, mode: str, fn, *args):
    """``fn(*args)``; an exception (out of memory, a compiler error) becomes a row saying so, and the check
    goes on: one GPU call must bring back every number it can."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _skipped(name, mode, f"failed: {type(exc).__name__}: {str(exc)[:300]}")


def _skipped(name: str, mode: str, why: str, **extra) -> dict:
    return {"model": name, "mode": mode, "images_per_s": None, "peak_mem_gib": None, "skipped": why, **extra}


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(torch, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(torch, device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _estimate_ok(deadline: float, needed_s: float) -> bool:
    return time.perf_counter() + needed_s < deadline


def measure_train(torch, timm, name: str, cfg: dict, device, mode: str, deadline: float) -> dict:
    """Training images/s: forward (bf16 autocast), CE loss (+0.4 x aux), backward, AdamW step."""
    needed = 10.0 if cfg["overrides"] == "tiny" else (75.0 if mode == "compile" else 15.0)
    if not _estimate_ok(deadline, needed):
        return _skipped(name, mode, f"time budget: less than {needed:.0f} s left")
    model = _build(torch, timm, name, cfg).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model, backend=cfg["compile_backend"]) if mode == "compile" else model
    batch, size = cfg["batch"], cfg["image_size"]
    classes = model.num_classes if hasattr(model, "num_classes") else 1000
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = step_model(x)
        main, aux = (out["main"], out.get("aux")) if isinstance(out, dict) else (out, None)
        loss = torch.nn.functional.cross_entropy(main.float(), y)
        if aux is not None:
            loss = loss + 0.4 * torch.nn.functional.cross_entropy(aux.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    _reset_peak(torch, device)
    t0 = time.perf_counter()
    first_loss = float(step().detach())
    _sync(torch, device)
    first_s = time.perf_counter() - t0
    for _ in range(cfg["warmup"] - 1):
        step()
    _sync(torch, device)
    t0 = time.perf_counter()
    for _ in range(cfg["iters"]):
        step()
    _sync(torch, device)
    seconds = time.perf_counter() - t0
    row = {"model": name, "mode": mode, "images_per_s": round(batch * cfg["iters"] / seconds, 1),
           "step_ms": round(1000 * seconds / cfg["iters"], 1), "peak_mem_gib": _peak(torch, device),
           "first_step_s": round(first_s, 1), "first_loss": round(first_loss, 4), "skipped": None}
    if mode == "compile":
        row["compile_backend"] = cfg["compile_backend"]
    del model, optimizer, step_model
    return row


def measure_inference(torch, name: str, cfg: dict, device, deadline: float) -> list[dict]:
    """Inference images/s of the plain eval model and of its deploy form (bf16 autocast, channels_last)."""
    import timm
    needed = 5.0 if cfg["overrides"] == "tiny" else 20.0
    if not _estimate_ok(deadline, needed):
        why = f"time budget: less than {needed:.0f} s left"
        return [_skipped(name, form, why) for form in ("plain", "deploy")]
    from overlock.models import reparameterize
    plain = _build(torch, timm, name, cfg).to(device).eval()
    deploy = reparameterize(copy.deepcopy(plain)).eval()
    batch, size = cfg["batch"], cfg["image_size"]
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    rows, outputs = [], {}
    for form, model in (("plain", plain), ("deploy", deploy)):
        model = model.to(memory_format=torch.channels_last)
        _reset_peak(torch, device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for _ in range(cfg["warmup"]):
                outputs[form] = model(x).float()
            _sync(torch, device)
            t0 = time.perf_counter()
            for _ in range(cfg["iters"]):
                model(x)
            _sync(torch, device)
        seconds = time.perf_counter() - t0
        rows.append({"model": name, "mode": form, "images_per_s": round(batch * cfg["iters"] / seconds, 1),
                     "peak_mem_gib": _peak(torch, device), "skipped": None})
    ref = outputs["plain"]
    rows[1]["max_rel_diff_vs_plain"] = float((outputs["deploy"] - ref).abs().max() / ref.abs().max())
    return rows


def measure_contmix(torch, contmix, device, cfg: dict, deadline: float) -> list[dict]:
    """ContMix aggregation alone, forward + backward ms per backend that runs here (bf16; the shapes of
    OverLoCK-T's stage 3 (14x14, K=13) and stage 2-like maps at batch 128 x heads): the measurement that
    decides whether ``triton`` may become the CUDA default."""
    shapes = [(2, 2, 6, 7, 5, 8)] if cfg["overrides"] == "tiny" else [(128, 4, 14, 14, 13, 32),
                                                                      (128, 4, 28, 28, 7, 32)]
    rows = []
    for batch, heads, height, width, kernel, channels in shapes:
        attn = torch.randn(batch, heads, height, width, kernel * kernel, device=device, dtype=torch.bfloat16)
        value = torch.randn(batch, heads, height, width, channels, device=device, dtype=torch.bfloat16)
        grad = torch.randn_like(value)
        for backend, why in available_backends(contmix, device):
            row = {"shape": f"{batch}x{heads}x{height}x{width} K{kernel} C{channels}", "backend": backend,
                   "fwd_bwd_ms": None, "skipped": why}
            if backend == "natten" and why is None and not (
                    device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8):
                row["skipped"] = "natten 0.17 has bf16 kernels only on CUDA sm80+ (it exits the process)"
            elif backend == "triton" and why is None and device.type == "cpu":
                row["skipped"] = "Triton's CPU interpreter: a timing would mean nothing (checked in parity)"
            elif why is None and not _estimate_ok(deadline, 5.0):
                row["skipped"] = "time budget"
            if row["skipped"] is None:
                try:
                    row["fwd_bwd_ms"] = _time_contmix(torch, contmix, device, cfg, backend, attn, value, grad,
                                                      kernel)
                except Exception as exc:  # noqa: BLE001 - e.g. natten's CPU kernels have no bf16
                    row["skipped"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    return rows


def _time_contmix(torch, contmix, device, cfg, backend, attn, value, grad, kernel) -> float:
    a, v = attn.clone().requires_grad_(), value.clone().requires_grad_()
    for i in range(cfg["warmup"] + cfg["iters"]):
        if i == cfg["warmup"]:
            _sync(torch, device)
            t0 = time.perf_counter()
        torch.autograd.grad(contmix.na2d_av(a, v, kernel, backend=backend), (a, v), grad)
    _sync(torch, device)
    return round(1000 * (time.perf_counter() - t0) / cfg["iters"], 3)


# ------------------------------------------------------------------------------------------------ report

def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"gpu_check ({'DRY RUN, tiny sizes on CPU' if result['dry_run'] else 'GPU'}): "
             f"{m.get('gpu') or m.get('cpu')}, torch {m['torch']}, timm {m['timm']}, {result['started']}", "",
             f"parity vs {result['parity']['fixture']} ({result['parity']['precision']}, "
             f"max rel err < {result['parity']['rtol']:g}; ContMix op < {result['parity']['op_rtol']:g})",
             "| backend | eval | deploy | train aux | ContMix op (out, grads) | result |",
             "|---|---|---|---|---|---|"]
    for r in result["parity"]["results"]:
        e = r["max_rel_err"]
        verdict = f"skipped: {r['skipped']}" if r["skipped"] else ("PASS" if r["ok"] else "FAIL")
        if r["deliberately_wrong"] and not r["skipped"]:
            verdict += " (expected FAIL)"
        op = r.get("op_max_rel_err") or {}
        cells = [f"{e[k]:.2e}" if k in e else "-" for k in ("eval_logits", "reparam_logits", "train_aux")]
        cells.append(f"{max(op.values()):.2e}" if op else "-")
        lines.append(f"| {r['backend']} | {' | '.join(cells)} | {verdict} |")
    c = result["config"]
    for title, rows in (("training", result["train"]), ("inference", result["inference"])):
        lines += ["", f"{title}: {c['image_size']} px, batch {c['batch']}, bf16 autocast, channels_last",
                  "| model | mode | img/s | peak GiB | note |", "|---|---|---|---|---|"]
        for r in rows:
            note = r["skipped"] or ""
            if r.get("first_step_s") is not None and r["mode"] == "compile":
                note = f"first step (compile) {r['first_step_s']} s, {r.get('compile_backend')}"
            if "max_rel_diff_vs_plain" in r:
                note = f"max rel diff vs plain {r['max_rel_diff_vs_plain']:.1e}"
            lines.append(f"| {r['model']} | {r['mode']} | {r['images_per_s'] or '-'} | "
                         f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else '-'} | {note} |")
    lines += ["", "ContMix aggregation alone (bf16, forward + backward)", "| shape | backend | ms | note |",
              "|---|---|---|---|"]
    for r in result["contmix"]:
        lines.append(f"| {r['shape']} | {r['backend']} | {r['fwd_bwd_ms'] or '-'} | {r['skipped'] or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
