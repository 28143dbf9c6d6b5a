"""CPU inference, FP32 against every INT8 form qframe can produce or feed: speed at batch 1 and 32 and top-1 agreement.

    python benchmarks/cpu_inference.py                          # zoo models on digits 32x32, this CPU's ISA
    python benchmarks/cpu_inference.py --isa avx2               # the same with qframe, torch and oneDNN capped at AVX2
    python benchmarks/cpu_inference.py --keep runs/cpu_inference   # keep the trained models; a second run reuses them
    python benchmarks/cpu_inference.py --models resnet18 --pt2e --compile

Per zoo model (trained briefly on digits, PTQ w8a8 with 8 calibration batches of 64, as
benchmarks/convert.py does), the forms, timed side by side in interleaved rounds (medians) at batch 1
and 32 with ``--threads`` threads each:

* PyTorch FP32 eager; torch.compile FP32 (``--compile``);
* ``qframe.convert`` (engine auto: the oneDNN int8 graph where it runs) and ``qframe.convert`` with
  ``engine="qframe"`` (qframe's GEMM ops, dispatched by the measured int8 table);
* onnxruntime FP32, and INT8 from qframe's Q/DQ ONNX: the standard form and its onnxruntime form;
* OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32``: without it OpenVINO runs an FP32 model in bf16 on a
  CPU with AVX-512 BF16), INT8 from the standard form and from its OpenVINO form
  (:func:`qframe.export.ov_form.openvino_form`), and INT8 from NNCF's PTQ of the FP32 ONNX (same
  calibration images, NNCF's defaults), where ``openvino`` / ``nncf`` import;
* PT2E X86InductorQuantizer INT8 + torch.compile (``--pt2e``; where torchao's PT2E imports).

Agreement: share of the held-out images (validation and test splits: neither trains nor calibrates
the models) whose top-1 class equals the FP32 model's and the fake-quant model's; accuracy on the same
images. ``--observer`` / ``--bias-correction`` change qframe's PTQ (the calibration a user would set to
resemble NNCF's defaults: mean of per-image min/max ranges, fast bias correction). ``--isa avx2`` reruns in a child process with ``QFRAME_CPU_ISA=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2`` and ``ATEN_CPU_CAPABILITY=avx2`` (qframe's kernels, torch and its oneDNN
capped at AVX2; OpenVINO's CPU plugin reads ONEDNN_MAX_CPU_ISA too, onnxruntime picks its own code paths). Writes
benchmarks/results/cpu_inference[_<isa>].md and .json with machine, CPU flags, versions and date.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("resnet18", "mobilenet_v2", "compact_cnn")
WIDTHS = {"mobilenet_v2": 0.5}  # as in conf/model
EPOCHS = {"compact_cnn": 3, "mobilenet_v2": 8, "resnet18": 3}  # as benchmarks/onnx_speed.py: trained, briefly
ISA_ENV = {"avx2": {"QFRAME_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
BATCHES = (1, 32)
NNCF = "OpenVINO INT8, NNCF PTQ"
log = logging.getLogger("cpu_inference")


def _ort(path, threads):
    from qframe.export.ort import ort_session

    session = ort_session(path, threads)
    name = session.get_inputs()[0].name

    def run(x):
        import torch

        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    return run


def _openvino(model_or_path, threads, precision=None):
    import openvino as ov
    import torch

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model_or_path, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        return torch.from_numpy(request.infer([x.numpy()])[compiled.output(0)].copy())
    return run


def _nncf_int8(fp32_onnx, calib_images, threads):
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    batches = [calib_images[i:i + 1].numpy() for i in range(len(calib_images))]
    quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
    return _openvino(quantized, threads)


def _pt2e(model, calib_images):
    """PT2E X86InductorQuantizer INT8 + torch.compile, exported per batch size (1 and 32: static shapes)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    compiled = {}
    with torch.no_grad():
        for b in BATCHES:
            quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(torch.export.export(model, (calib_images[:b],)).module(), quantizer)
            for i in range(0, len(calib_images) - b + 1, b):
                prepared(calib_images[i:i + b])
            compiled[b] = torch.compile(convert_pt2e(prepared))
            compiled[b](calib_images[:b])

    def run(x):
        return compiled[x.shape[0]](x)
    return run


def _forms(name, model, fake, data, args, tmp: Path):
    """{form: (callable, note)}; a form that cannot run here maps to (None, why)."""
    import torch

    import qframe
    from qframe.export.onnx import export_onnx
    from qframe.export.ort_form import onnxruntime_form
    from qframe.export.ov_form import openvino_form

    forms = {"PyTorch FP32 eager": (model, "")}
    example = data.test.tensors[0][:1]
    if args.compile:
        try:
            compiled = torch.compile(model)
            for b in BATCHES:
                compiled(data.test.tensors[0][:b])
            forms["torch.compile FP32"] = (compiled, "")
        except Exception as exc:
            forms["torch.compile FP32"] = (None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    forms["qframe.convert w8a8 (engine auto)"] = (qframe.convert(fake), "")
    forms["qframe.convert w8a8 (engine qframe)"] = (qframe.convert(fake, engine="qframe"), "")
    fp32_onnx = export_onnx(model, example, tmp / f"{name}_fp32.onnx")
    int8_onnx = export_onnx(fake, example, tmp / f"{name}_int8.onnx")
    import onnx

    ort_onnx = tmp / f"{name}_int8_ort.onnx"
    onnx.save(onnxruntime_form(int8_onnx), str(ort_onnx))
    ov_onnx = tmp / f"{name}_int8_openvino.onnx"
    onnx.save(openvino_form(int8_onnx), str(ov_onnx))
    ov_full_onnx = tmp / f"{name}_int8_openvino_full.onnx"
    onnx.save(openvino_form(int8_onnx, full_unsigned_range=True), str(ov_full_onnx))
    forms["onnxruntime FP32"] = (_ort(fp32_onnx, args.threads), "")
    forms["onnxruntime INT8, qframe Q/DQ (standard form)"] = (_ort(int8_onnx, args.threads), "")
    forms["onnxruntime INT8, qframe Q/DQ (onnxruntime form)"] = (_ort(ort_onnx, args.threads), "")
    try:
        import openvino  # noqa: F401

        forms["OpenVINO FP32"] = (_openvino(str(fp32_onnx), args.threads, "f32"), "")
        forms["OpenVINO INT8, qframe Q/DQ (standard form)"] = (_openvino(str(int8_onnx), args.threads), "")
        forms["OpenVINO INT8, qframe Q/DQ (OpenVINO form)"] = (_openvino(str(ov_onnx), args.threads), "")
        forms["OpenVINO INT8, qframe Q/DQ (OpenVINO form, full uint8 range after ReLU)"] = (
            _openvino(str(ov_full_onnx), args.threads), "")
        calib = torch.cat([x for x, _ in data.loader("train", 64, shuffle=True, seed=args.seed)][:8])
        try:
            forms[NNCF] = (_nncf_int8(fp32_onnx, calib[:300], args.threads), "")
        except ImportError as exc:
            forms[NNCF] = (None, f"nncf not importable ({exc})")
    except ImportError as exc:
        forms["OpenVINO"] = (None, f"openvino not importable ({exc})")
    if args.pt2e:
        try:
            calib = torch.cat([x for x, _ in data.loader("train", 64, shuffle=True, seed=args.seed)][:8])
            forms["PT2E X86InductorQuantizer INT8 + torch.compile"] = (_pt2e(model, calib), "")
        except Exception as exc:
            forms["PT2E X86InductorQuantizer INT8 + torch.compile"] = (
                None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return forms


def _predict(fn, images, batch=BATCHES[-1]):
    """Top-1 classes in batches of 32 (the last one padded), so every form only ever sees the timed shapes."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            n = len(x)
            if n < batch:
                x = torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))])
            out.append(fn(x).argmax(1)[:n])
    return torch.cat(out)


def trained_model(name, data, epochs=None, seed=0, keep=None):
    """Zoo model ``name`` trained briefly on ``data`` (``epochs``, default EPOCHS), in eval mode; with ``keep``
    (a folder) the trained weights are kept there and reused by the next call."""
    import torch

    import qframe
    from qframe.train import TrainConfig, fit

    torch.manual_seed(seed)
    model = qframe.build_model(name, data.num_classes, data.channels, data.image_size, width_mult=WIDTHS.get(name, 1.0))
    epochs = epochs or EPOCHS[name]
    saved = Path(keep) / f"{name}_e{epochs}_s{seed}.pt" if keep else None
    if saved is not None and saved.is_file():
        model.load_state_dict(torch.load(saved))
    else:
        fit(model, data, TrainConfig(epochs=epochs, batch_size=64), seed=seed, desc=name)
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), saved)
    return model.eval()


def run_model(name, data, args) -> list[dict]:
    import torch

    import qframe

    model = trained_model(name, data, args.epochs, args.seed, args.keep)
    if args.train_only:
        return []
    recipe = qframe.preset("w8a8") if args.observer is None else qframe.preset("w8a8", input={"observer": args.observer})
    fake = qframe.ptq(model, recipe, data.loader("train", 64, shuffle=True, seed=args.seed), num_batches=8,
                      bias_correction=args.bias_correction)
    images, labels = (torch.cat(t) for t in zip(data.val.tensors, data.test.tensors))  # held out: val + test
    ref_fp32, ref_fake = _predict(model, images), _predict(fake, images)
    with tempfile.TemporaryDirectory() as tmp:
        forms = _forms(name, model, fake, data, args, Path(tmp))
        rows, live = [], {}
        for form, (fn, note) in forms.items():
            row = {"model": name, "form": form, "note": note}
            if fn is not None:
                try:
                    pred = _predict(fn, images)
                    if pred.shape != ref_fp32.shape:
                        raise RuntimeError(f"returned {tuple(pred.shape)} predictions for {len(images)} images")
                except Exception as exc:  # one broken form must not lose the others' figures
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    rows.append(row)
                    continue
                row.update(agreement_fp32=(pred == ref_fp32).double().mean().item() * 100,
                           agreement_fake_quant=(pred == ref_fake).double().mean().item() * 100,
                           accuracy=(pred == labels).double().mean().item() * 100)
                live[form] = fn
            rows.append(row)
        for b in BATCHES:
            x = images[:b].contiguous()
            wall, cpu = {f: [] for f in live}, {f: [] for f in live}
            with torch.no_grad():
                for f, fn in live.items():
                    fn(x)
                    fn(x)
                for _ in range(args.rounds):
                    for f, fn in live.items():
                        t, c = time.perf_counter(), time.process_time()
                        fn(x)
                        cpu[f].append((time.process_time() - c) * 1e3)
                        wall[f].append((time.perf_counter() - t) * 1e3)
            for row in rows:
                if row["form"] in wall:
                    row[f"wall_ms_batch{b}"] = statistics.median(wall[row["form"]])
                    row[f"cpu_ms_batch{b}"] = statistics.median(cpu[row["form"]])
                    row[f"ms_batch{b}"] = row[f"{args.clock}_ms_batch{b}"]
            times = cpu if args.clock == "cpu" else wall
            if NNCF in times:
                from qframe.export.ort import paired_ratio

                for row in rows:
                    if row["form"] in times and row["form"] != NNCF:
                        row[f"vs_nncf_batch{b}"] = paired_ratio(times[NNCF], times[row["form"]])
    return rows


def table(rows) -> str:
    head = ["model", "form", "batch 1 ms (x FP32)", "batch 32 ms (x FP32)", "top-1 agreement with FP32 %",
            "with fake-quant %", "accuracy %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {}
    for r in rows:
        if r["form"] == "PyTorch FP32 eager":
            base[r["model"]] = r
    for r in rows:
        if "ms_batch1" not in r:
            lines.append(f"| {r['model']} | {r['form']} | n/a | n/a | {r['note']} | | |")
            continue
        b = base[r["model"]]
        cells = [f"{r[f'ms_batch{n}']:.2f} ({b[f'ms_batch{n}'] / r[f'ms_batch{n}']:.2f}x)" for n in BATCHES]
        lines.append(f"| {r['model']} | {r['form']} | {cells[0]} | {cells[1]} | {r['agreement_fp32']:.2f} | "
                     f"{r['agreement_fake_quant']:.2f} | {r['accuracy']:.1f} |")
    versus = [r for r in rows if "vs_nncf_batch1" in r and "INT8" in r["form"]]
    if versus:
        lines += ["", f"INT8 forms against {NNCF}, paired by round: NNCF's time / the form's time, median over "
                  "rounds [95 % bootstrap interval]; above 1 = faster than NNCF.", "",
                  "| model | form | batch 1 | batch 32 |", "|---|---|---|---|"]
        for r in versus:
            cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in (r[f"vs_nncf_batch{n}"] for n in BATCHES)]
            lines.append(f"| {r['model']} | {r['form']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=None, help=f"FP32 epochs for every model (default {EPOCHS})")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isa", choices=sorted(ISA_ENV), default=None, help="cap qframe, torch and oneDNN at this ISA")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile FP32")
    parser.add_argument("--pt2e", action="store_true", help="also time PT2E X86InductorQuantizer INT8 + torch.compile")
    parser.add_argument("--keep", default=None, help="folder to keep the trained FP32 models in and reuse them from "
                        "(e.g. for a second run with --isa avx2 on the very same models)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the table shows: process CPU time per call (default: robust on a shared machine, "
                        "where other processes take turns on the cores) or wall-clock time; the JSON has both")
    parser.add_argument("--train-only", action="store_true", help="train and keep the models (--keep), time nothing")
    parser.add_argument("--observer", default=None, choices=("minmax", "ema", "percentile", "mse", "entropy"),
                        help="activation observer of qframe's PTQ (default: the w8a8 preset's, percentile 99.99)")
    parser.add_argument("--bias-correction", action="store_true", help="qframe's PTQ with bias correction")
    parser.add_argument("--tag", default="", help="suffix of the results files (a partial rerun beside the full one)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.isa and os.environ.get("QFRAME_CPU_ISA") != args.isa:
        env = {**os.environ, **ISA_ENV[args.isa]}
        return subprocess.call([sys.executable, __file__, *argv], env=env)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.WARNING)
    import torch

    import qframe
    from qframe.kernels.cpu import isa
    from qframe.utils.env import environment

    torch.set_num_threads(args.threads)
    data = qframe.build_data("digits", image_size=32, channels=1, seed=args.seed)
    rows = []
    for name in args.models:
        rows += run_model(name, data, args)
        log.info("\n%s", table([r for r in rows if r["model"] == name]))
    env = environment()
    versions = dict(env["versions"])
    for mod in ("openvino", "nncf", "torchao"):
        try:
            versions[mod] = __import__(mod).__version__.split("-")[0]  # openvino: 2026.4.1-<build>-<branch>
        except ImportError:
            versions[mod] = None
    flags = sorted(f for f in isa.cpu_flags() if f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                                       "avx512_bf16", "amx_int8", "asimddp"))
    ptq_note = "".join([f", activation observer {args.observer}" if args.observer else "",
                        ", bias correction" if args.bias_correction else ""])
    command = ("python benchmarks/cpu_inference.py " + " ".join(argv)).strip()
    capped = {k: os.environ[k] for k in ISA_ENV.get(args.isa or "", {})}
    text = (
        f"# CPU inference: FP32 against INT8 forms, digits 32x32\n\n"
        f"Machine: {env['machine']['cpu']} ({env['machine']['cores']} cores), {args.threads} threads per form. "
        f"CPU int8 ISA detected: {isa.detected()}; in force for qframe: {isa.current()}"
        f"{f'; capped by {capped}' if capped else ''}. Flags: {', '.join(flags)}.\n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}. Date: {env['date']}.\n"
        f"Command: `{command}`\n\n"
        f"Models trained briefly on digits (epochs: {', '.join(f'{m} {args.epochs or EPOCHS[m]}' for m in args.models)}), "
        f"PTQ w8a8 (8 calibration batches of 64{ptq_note}); {len(data.val) + len(data.test)} held-out images "
        f"(validation and test splits) for agreement and accuracy. Times: medians of {args.rounds} "
        f"interleaved rounds of {'process CPU time per call (all threads of the process; robust where other processes share the cores)' if args.clock == 'cpu' else 'wall-clock time per call'}, "
        "`(Nx)` = PyTorch FP32 eager time / form time. Agreement: share of those images whose "
        "top-1 class equals the FP32 model's / the fake-quant model's.\n\n" + table(rows) + "\n")
    print("\n" + text)
    if not args.no_write:
        from qframe.utils.io import atomic_write_json, atomic_write_text

        suffix = (f"_{args.isa}" if args.isa else "") + (f"_{args.tag}" if args.tag else "")
        atomic_write_text(text, RESULTS / f"cpu_inference{suffix}.md")
        atomic_write_json({"command": command, **env, "versions": versions, "isa": isa.current(), "capped": capped,
                           "cpu_flags": flags, "threads": args.threads, "rows": rows},
                          RESULTS / f"cpu_inference{suffix}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
