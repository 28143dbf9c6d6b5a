"""The pipeline the command line runs: data -> model -> FP32 -> quantize -> evaluate -> results.

No maths here: each stage is a qframe function a user can also call from their own script.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from qframe.config import Config, DeviceConfig
from qframe.data import augment_batch, build_data
from qframe.distributed import is_main
from qframe.errors import QFrameError
from qframe.kernels.dispatch import available as kernel_backend_available
from qframe.kernels.dispatch import set_backend as set_kernel_backend
from qframe.measure.size import model_size_bytes
from qframe.kernels.convert import convert
from qframe.kernels.dispatch import record as record_kernels
from qframe.measure.profile import Autocast, Profiler
from qframe.export.stage import export_stage
from qframe.methods.ptq import ptq
from qframe.methods.qat import fold_qat, qat
from qframe.methods.rct import rct, to_fake_quant
from qframe.methods.rct.report import rct_summary
from qframe.quant.compat import check_tensorrt, tensorrt_problems
from qframe.quant.placement import deployment_target
from qframe.quant.modules import set_rounding
from qframe.models import build_model
from qframe.quant.recipe import check_rules, preset
from qframe.report import run_table, write_report
from qframe.train import check_settings, evaluate, fit, flat_settings, recorded_settings
from qframe.utils.env import environment
from qframe.utils.io import atomic_torch_save as _atomic_torch_save
from qframe.utils.io import (
    atomic_write_json, atomic_write_text, load_checkpoint, load_model_state, remove_stale_temporaries,
)
from qframe.utils.modules import copy_model

log = logging.getLogger(__name__)

def resolve_device(cfg: DeviceConfig) -> torch.device:
    """The torch device for a run; ``auto`` takes CUDA when it is there and says when it is not."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.torch_device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if cfg.target == "tensorrt":
            log.info("device %s: no CUDA GPU here, computing on the CPU (deployment target stays %s)", cfg.name, cfg.target)
        return torch.device("cpu")
    if cfg.torch_device.startswith("cuda") and not torch.cuda.is_available():
        raise QFrameError(f"device.torch_device={cfg.torch_device!r} but CUDA is not available here; use auto or cpu")
    return torch.device(cfg.torch_device)


def _row(method: str, precision: str, metrics: dict, size: int, fp32: dict | None) -> dict:
    row = {"method": method, "precision": precision, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
           "size_bytes": size, "size_kib": size / 1024}
    reference = fp32 if fp32 is not None else {**metrics, "size_bytes": size}
    row["delta"] = metrics["accuracy"] - reference["accuracy"]
    row["compression"] = reference["size_bytes"] / size
    return row


def atomic_torch_save(obj, path) -> None:
    """Under torchrun every rank computes the same results; only rank 0 writes them."""
    if is_main():
        _atomic_torch_save(obj, path)


def _augment(cfg: Config):
    def augment(x, generator):
        return augment_batch(x, shift=cfg.data.shift, hflip=cfg.data.hflip, generator=generator)

    return augment


def _resume(cfg: Config, path: Path) -> str | None:
    """What the stage checkpointing to ``path`` resumes from. ``train.resume=auto``: that checkpoint when it
    exists. A path: the stage whose checkpoint has that file name (``qat_w8a8_last.pt``), and the FP32
    stage any other file; the other stages start afresh."""
    resume = cfg.train.resume
    if resume == "auto":
        return str(path) if path.is_file() else None
    if resume is None or Path(resume).name == path.name:
        return resume
    stage = re.fullmatch(r"(qat|qat_sgd|rct)_.+_last\.pt", Path(resume).name)
    return resume if path.name == "fp32_last.pt" and stage is None else None


def _build(cfg: Config, data) -> torch.nn.Module:
    return build_model(cfg.model.name, data.num_classes, data.channels, data.image_size,
                       width_mult=cfg.model.width_mult, arch=cfg.model.arch, checkpoint=cfg.model.checkpoint,
                       factory=cfg.model.factory, kwargs=cfg.model.kwargs)


def _recorded(cfg: Config) -> dict:
    """What fp32.pt was trained from, by config section: train.resume=auto reuses it only under the same.
    Paths (a data folder, a backbone checkpoint) count by their last part, so moving them does not block
    a resume."""
    def last_parts(section: dict, *paths: str) -> dict:
        return {k: Path(v).name if k in paths and v else v for k, v in section.items()}

    return {"model": last_parts(asdict(cfg.model), "checkpoint"), "data": last_parts(asdict(cfg.data), "root"),
            "train": recorded_settings(cfg.train), "seed": {"seed": cfg.seed}}


def _checkpoint_hint(cfg: Config, data, state: dict, resumed: bool) -> str:
    """What would fit, for a trained checkpoint that does not fit this run's model."""
    this = f"this run builds {cfg.model.name} (width_mult {cfg.model.width_mult}) with {data.num_classes} classes"
    saved = (f"it was saved from {state['model_name']} with {state.get('num_classes', '?')} classes; "
             if "model_name" in state else "")
    if resumed:
        return (f"{saved}{this}: with train.resume=auto use the settings the run directory was started with, "
                "or choose a new hydra.run.dir")
    return f"{saved}{this}: give the model and data it was trained with, or a checkpoint of this model"


def train_fp32(cfg: Config, data, run_dir: Path, device: torch.device):
    """The FP32 model: built (optionally from a backbone checkpoint), then trained or loaded."""
    model = _build(cfg, data)
    for recipe in [cfg.quant] + [preset(n) for n in cfg.method.compare]:
        check_rules(model, recipe)  # a rule naming no layer is known now, not after training
    if cfg.quant.budget is not None:  # so is a budget below the cheapest configuration (costs need no training)
        from qframe.methods.mixed import check_budget

        check_budget(model, cfg.quant, next(iter(data.loader("train", cfg.method.calib_batch_size)))[0])
    trained = cfg.train.checkpoint
    resumed = trained is None and cfg.train.resume == "auto" and (run_dir / "fp32.pt").is_file()
    if resumed:
        trained = str(run_dir / "fp32.pt")  # an earlier, interrupted run of this directory got this far
    if trained:
        state = load_checkpoint(trained)
        if resumed:  # the directory's own model: it must come from this configuration's training
            for prefix, current in _recorded(cfg).items():
                check_settings(state.get("settings", {}).get(prefix), current, f"trained checkpoint {trained!r}",
                               "" if prefix == "seed" else f"{prefix}.")
        load_model_state(model, state["model"], f"trained checkpoint {trained!r}",
                         _checkpoint_hint(cfg, data, state, resumed))
        log.info("loaded trained FP32 model from %s", trained)
        return model.to(device)
    last = run_dir / "checkpoints" / "fp32_last.pt"
    train_cfg = dataclasses.replace(cfg.train, resume=_resume(cfg, last))
    # fp32_last.pt records what fp32.pt will: a resume under another data split, model or seed is refused
    fit(model, data, train_cfg, device=device, seed=cfg.seed, checkpoint_path=last, augment=_augment(cfg), desc="fp32",
        settings=flat_settings({**_recorded(cfg), "seed": cfg.seed}))
    atomic_torch_save({"model": model.state_dict(), "model_name": cfg.model.name, "num_classes": data.num_classes,
                       "class_names": data.class_names, "settings": _recorded(cfg)}, run_dir / "fp32.pt")
    return model


def _measured(row: dict, model, profiler: Profiler | None, device) -> dict:
    """``row`` with the speed, memory and energy columns of ``model`` (when measuring is on)."""
    form = "fp32" if row["method"] == "fp32" else "fake-quant"
    row["backend"] = f"pytorch {form} / {device.type}"
    if profiler is not None:
        row.update(profiler(model))
    return row


def gpu_rounding_row(dla_row: dict, qmodel, test, fp32: dict, device) -> dict:
    """The last row's model evaluated with the GPU's rounding (ties to even) instead of the DLA's."""
    gpu = copy_model(qmodel)
    set_rounding(gpu, "half_even")
    row = _row(dla_row["method"], f"{dla_row['precision']} GPU rounding", evaluate(gpu, test, device),
               dla_row["size_bytes"], fp32)
    row["backend"] = f"pytorch fake-quant, round half to even / {device.type}"
    dla_row["precision"] = f"{dla_row['precision']} DLA rounding"
    dla_row["backend"] = f"pytorch fake-quant, round half away (DLA) / {device.type}"
    log.info("%s %s: test accuracy %.2f%% with DLA rounding, %.2f%% with GPU rounding", dla_row["method"],
             row["precision"].split()[0], dla_row["accuracy"], row["accuracy"])
    return row


def bf16_row(model, test, fp32: dict, device, profiler: Profiler | None) -> dict:
    """The FP32 model run under bf16 autocast: the float baseline a GPU user would otherwise deploy."""
    wrapped = Autocast(model, torch.bfloat16)
    row = _row("fp32", "bf16 autocast", evaluate(wrapped, test, device), fp32["size_bytes"], fp32)
    row["backend"] = f"pytorch bf16 autocast / {device.type}"
    if profiler is not None:
        row.update(profiler(wrapped))
    return row


def converted_row(method: str, recipe, qmodel, test, fp32: dict, device, profiler: Profiler | None) -> dict | None:
    """The row of ``qframe.convert(qmodel)``: integer weights running qframe's GEMM kernels, measured like
    the other forms; None (with the reason logged) when the model has no layer convert can take."""
    try:
        imodel = convert(qmodel).eval()
    except QFrameError as exc:
        log.warning("convert %s %s: %s; the report has no converted-model row", method, recipe.name, exc)
        return None
    with record_kernels() as ran:
        row = _row("convert", f"{method}_{recipe.name}", evaluate(imodel, test, device), model_size_bytes(imodel), fp32)
        if profiler is not None:
            row.update(profiler(imodel))
    backends = sorted({backend for _, backend in ran})
    row["backend"] = f"qframe.convert [{', '.join(backends) or 'no GEMM op'}] / {device.type}"
    row["kernel_paths"] = sorted({m.path for m in imodel.modules() if hasattr(m, "path")})
    log.info("convert %s %s: test accuracy %.2f%% on %s (paths: %s)", method, recipe.name, row["accuracy"],
             row["backend"], ", ".join(row["kernel_paths"]))
    return row


def ptq_label(options) -> str:
    """The method column of a PTQ row: ``ptq``, or with its remedies, e.g. ``ptq+cle+adaround+bc``."""
    parts = (["cle"] if options.equalize else []) + ([options.rounding] if options.rounding != "nearest" else []) \
        + (["bc"] if options.bias_correction else [])
    return "+".join(["ptq"] + parts)


def quantize_and_evaluate(cfg: Config, recipe, model, data, fp32: dict, run_dir: Path, device,
                          profiler: Profiler | None = None) -> tuple[list[dict], torch.nn.Module]:
    """PTQ (and QAT when ``method=qat``) of ``model`` with ``recipe``: result rows and the final model."""
    if cfg.device.target == "tensorrt":
        check_tensorrt(recipe, cfg.device.name)
    test = data.loader("test", 256)

    def calib():
        return data.loader("train", cfg.method.calib_batch_size, shuffle=True, seed=cfg.seed)

    primary = recipe is cfg.quant
    if cfg.device.dla and recipe.input is not None:
        # the DLA rounds activations half away from zero: calibrate, train and evaluate that way
        recipe = dataclasses.replace(recipe, input=dataclasses.replace(recipe.input, rounding="half_away"))
    target = deployment_target(cfg.device.target, cfg.device.dla, cfg.export.target)  # where quantizers go
    o = cfg.method.ptq_options()
    qmodel = ptq(model, recipe, calib(), cfg.method.calib_batches, device, target=target, equalize=o.equalize,
                 bias_correction=o.bias_correction, rounding=o.rounding, adaround=o.adaround,
                 gptq=o.gptq)
    label = ptq_label(o)
    rows = [_measured(_row(label, recipe.name, evaluate(qmodel, test, device), model_size_bytes(qmodel), fp32),
                      qmodel, profiler, device)]
    log.info("%s %s: test accuracy %.2f%% (FP32 %.2f%%)", label, recipe.name, rows[-1]["accuracy"], fp32["accuracy"])
    dla_rounding = cfg.device.dla and recipe.input is not None
    if dla_rounding:
        rows.append(gpu_rounding_row(rows[-1], qmodel, test, fp32, device))
    if primary:
        atomic_torch_save({"model": qmodel.state_dict(), "recipe": asdict(recipe)}, run_dir / f"ptq_{recipe.name}.pt")
    if cfg.method.name == "qat":
        last = run_dir / "checkpoints" / f"qat_{recipe.name}_last.pt"
        qmodel = qat(model, recipe, data, cfg.method.qat_config(), cfg.train, calib_batches=calib(),
                     num_batches=cfg.method.calib_batches, device=device, seed=cfg.seed, checkpoint_path=last,
                     resume=_resume(cfg, last), augment=_augment(cfg), target=target)
        fold_qat(qmodel)
        rows.append(_measured(_row("qat", recipe.name, evaluate(qmodel, test, device), model_size_bytes(qmodel), fp32),
                              qmodel, profiler, device))
        log.info("qat %s: test accuracy %.2f%% (FP32 %.2f%%)", recipe.name, rows[-1]["accuracy"], fp32["accuracy"])
        if dla_rounding:
            rows.append(gpu_rounding_row(rows[-1], qmodel, test, fp32, device))
        if primary:
            atomic_torch_save({"model": qmodel.state_dict(), "recipe": asdict(recipe)}, run_dir / f"qat_{recipe.name}.pt")
    if cfg.method.name == "rct":
        rows_rct, qmodel, summary = rct_stage(cfg, recipe, model, data, fp32, run_dir, device, calib, profiler, target,
                                              primary)
        rows += rows_rct
        if primary:
            rows[-1]["rct"] = summary
    if primary and cfg.measure.convert:
        row = converted_row(rows[-1]["method"], recipe, qmodel, test, fp32, device, profiler)
        rows += [row] if row is not None else []
    return rows, qmodel


def initial_model(cfg: Config, data, device) -> torch.nn.Module:
    """The model as built, before any training (seeded by ``cfg.seed``; the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = _build(cfg, data)
    return model.to(device)


def same_optimizer_qat_row(cfg: Config, recipe, start, data, fp32: dict, run_dir: Path, device, calib, profiler,
                           target: str) -> dict:
    """QAT of ``start`` with RCT's optimizer (SGD with RCT's momentum), learning rate, epochs,
    activation-range tracking and BatchNorm handling (folded before training, or with
    ``quant.fold_bn=false`` training beside the layers): the row RCT is judged against."""
    m = cfg.method
    train = dataclasses.replace(cfg.train, optimizer="sgd", momentum=m.rct.momentum or cfg.train.momentum)
    last = run_dir / "checkpoints" / f"qat_sgd_{recipe.name}_last.pt"
    qmodel = qat(start, recipe, data, m.qat_config(), train, calib_batches=calib(), num_batches=m.calib_batches,
                 device=device, seed=cfg.seed, checkpoint_path=last, resume=_resume(cfg, last),
                 augment=_augment(cfg), target=target, train_bn=False)
    fold_qat(qmodel)
    row = _measured(_row("qat", recipe.name, evaluate(qmodel, data.loader("test", 256), device),
                         model_size_bytes(qmodel), fp32), qmodel, profiler, device)
    row["optimizer"] = f"sgd, momentum {train.momentum} (as RCT)"
    log.info("qat %s with RCT's optimizer: test accuracy %.2f%%", recipe.name, row["accuracy"])
    return row


def rct_stage(cfg: Config, recipe, model, data, fp32: dict, run_dir: Path, device, calib, profiler,
              target: str = "tensorrt", primary: bool = True):
    """RCT from the trained FP32 model (or, with ``method.rct.from_scratch``, from the untrained one),
    with QAT of the same start and optimizer beside it (``method.rct.compare_qat``): result rows,
    the deployable model and the RCT summary."""
    last = run_dir / "checkpoints" / f"rct_{recipe.name}_last.pt"
    m = cfg.method
    start = initial_model(cfg, data, device) if m.rct.from_scratch else model
    rows = [same_optimizer_qat_row(cfg, recipe, start, data, fp32, run_dir, device, calib, profiler, target)] \
        if m.rct.compare_qat else []
    rmodel, optimizer = rct(start, recipe, data, m.rct, cfg.train, epochs=m.epochs, lr=m.lr, calib_batches=calib(),
                            num_batches=m.calib_batches, device=device, seed=cfg.seed, checkpoint_path=last,
                            resume=_resume(cfg, last), augment=_augment(cfg), observer_steps=m.observer_steps,
                            ema_momentum=m.ema_momentum)
    summary = rct_summary(start, rmodel, optimizer, recipe, data, cfg, device)
    qmodel = to_fake_quant(rmodel)
    precision = f"w{summary['average_bits']:.1f}a{recipe.input.bits if recipe.input else 32}"
    row = _measured(_row("rct", precision, evaluate(qmodel, data.loader("test", 256), device),
                         model_size_bytes(qmodel), fp32), qmodel, profiler, device)
    log.info("rct %s: test accuracy %.2f%% (FP32 %.2f%%), average weight bits %.2f", recipe.name, row["accuracy"],
             fp32["accuracy"], summary["average_bits"])
    if primary:  # as ptq_ / qat_<preset>.pt: the main preset's model
        atomic_torch_save({"model": rmodel.state_dict(), "recipe": asdict(recipe), "bits": summary["final_bits"]},
                          run_dir / f"rct_{recipe.name}.pt")
    return rows + [row], qmodel, summary


def mixed_precision_stage(cfg: Config, model, data, run_dir: Path, device) -> tuple[Config, dict]:
    """``quant=auto``: search per-layer weight widths for ``cfg.quant.budget``; the config with the recipe found.

    Writes the recipe as a ``quant/`` group file (``mixed_recipe.yaml``: copy it into ``conf/quant/`` to reuse
    it as ``quant=<name>``), the search (``mixed_search.json``) and its Pareto front (``mixed_front.png``).
    """
    from qframe.methods.mixed import plot_front, recipe_yaml, search

    calib = data.loader("train", cfg.method.calib_batch_size, shuffle=True, seed=cfg.seed)
    result = search(model, cfg.quant, calib, cfg.method.calib_batches, device, equalize=cfg.method.equalize,
                    seed=cfg.seed)
    if is_main():
        atomic_write_text(recipe_yaml(result.recipe), run_dir / "mixed_recipe.yaml")
        atomic_write_json(result.summary(), run_dir / "mixed_search.json")
        try:
            plot_front(result, run_dir / "mixed_front.png")
        except ImportError as exc:  # matplotlib is optional
            log.warning("mixed precision: no plot of the front (%s)", exc)
    return dataclasses.replace(cfg, quant=result.recipe), result.summary()


def _start_over(run_dir: Path, keep: tuple) -> None:
    """A run without train.resume trains every stage afresh: what an earlier run of this directory left to
    resume from (its per-epoch checkpoints, its trained fp32.pt) goes, or a later train.resume=auto would
    continue it as if this run had written it; so does its metrics.json, the mark of a finished run. Files
    the configuration names (``keep``: train.checkpoint, model.checkpoint) stay."""
    kept = {Path(p).resolve() for p in keep if p}
    old = [p for p in [*(run_dir / "checkpoints").glob("*_last.pt"), run_dir / "fp32.pt", run_dir / "metrics.json"]
           if p.is_file() and p.resolve() not in kept]
    for path in old:
        path.unlink(missing_ok=True)  # under torchrun every rank clears the same directory
    if old:
        log.info("starting over: removed %s an earlier run left in %s (train.resume=auto continues a run instead)",
                 ", ".join(str(p.relative_to(run_dir)) for p in old), run_dir)


def run(cfg: Config, run_dir: str | Path, config_echo: dict | None = None) -> dict:
    """Run the whole pipeline into ``run_dir``; return (and write) its ``metrics.json`` content."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_temporaries(run_dir):  # a killed run's half-written files, never read
        log.info("removed %d temporary files a killed run left in %s", len(stale), run_dir)
    torch.manual_seed(cfg.seed)
    if cfg.device.target == "tensorrt":  # what the config alone decides is refused before any data or training
        for recipe in [cfg.quant] + [preset(n) for n in cfg.method.compare]:
            if errors := tensorrt_problems(recipe)[0]:  # the warnings come with the recipe's stage
                raise QFrameError(f"quant recipe {recipe.name!r} cannot run on {cfg.device.name}: " + "; ".join(errors))
    device = resolve_device(cfg.device)
    set_kernel_backend(cfg.device.kernels)  # the low-bit GEMM backend of converted layers, for the whole run
    if cfg.device.kernels != "auto" and not (usable := kernel_backend_available(cfg.device.kernels, device))[0]:
        log.warning("device.kernels=%s cannot run on %s here: %s", cfg.device.kernels, device.type, usable[1])
    d = cfg.data
    data = build_data(d.name, root=d.root if d.name == "imagefolder" else None, image_size=d.image_size,
                      channels=d.channels, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed)
    log.info("data %s: %d classes, train/val/test = %d/%d/%d images of %dx%d", d.name, data.num_classes,
             len(data.train), len(data.val), len(data.test), d.image_size, d.image_size)
    if cfg.train.resume is None:  # after the data loaded: a run stopped by bad input leaves the directory as it was
        _start_over(run_dir, (cfg.train.checkpoint, cfg.model.checkpoint))
    # said before the work starts: a run killed outright (SIGKILL, out of memory, a lost machine) prints nothing more
    log.info("run directory %s: a run stopped or killed after a training epoch continues with train.resume=auto "
             "hydra.run.dir=%s", run_dir, run_dir)
    model = train_fp32(cfg, data, run_dir, device).eval()
    fp32 = {**evaluate(model, data.loader("test", 256), device), "size_bytes": model_size_bytes(model)}
    profiler = Profiler(cfg.measure, device, (data.channels, data.image_size, data.image_size)) if cfg.measure.enabled else None
    rows = [_measured(_row("fp32", "fp32", fp32, fp32["size_bytes"], None), model, profiler, device)]
    if device.type == "cuda" and cfg.measure.bf16:
        rows.append(bf16_row(model, data.loader("test", 256), fp32, device, profiler))
    mixed = None
    if cfg.quant.budget is not None:
        cfg, mixed = mixed_precision_stage(cfg, model, data, run_dir, device)
    recipes = [cfg.quant] + [preset(n) for n in cfg.method.compare if n != cfg.quant.name]
    exported = rct_info = None
    for recipe in recipes:
        new_rows, qmodel = quantize_and_evaluate(cfg, recipe, model, data, fp32, run_dir, device, profiler)
        rct_info = rct_info or next((r.pop("rct") for r in new_rows if "rct" in r), None)
        rows += new_rows
        if recipe is cfg.quant:
            exported = (f"{cfg.method.name}_{recipe.name}", qmodel)
    export_summary = None
    if cfg.export.enabled and is_main():
        export_summary, onnx_rows = export_stage(cfg.export, model, exported[1], exported[0], data, run_dir,
                                                 cfg.device.dla)
        for row in onnx_rows:
            row.update(delta=row["accuracy"] - fp32["accuracy"] if "accuracy" in row else None,
                       energy=profiler.energy_note if profiler else None)
        rows += onnx_rows
    metrics = {
        "results": rows,
        "data": {"name": d.name, "classes": data.num_classes, "train": len(data.train), "val": len(data.val),
                 "test": len(data.test), "image_size": d.image_size},
        "model": {"name": cfg.model.name, **({"factory": cfg.model.factory} if cfg.model.factory else {}),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "device": str(device),
        "target": {"name": cfg.device.name, "runtime": cfg.device.target, "dla": cfg.device.dla},
        "export": export_summary,
        "energy": {"meter": profiler.energy_note, "idle": profiler.idle_note()} if profiler and profiler.meter else None,
        **({"rct": rct_info} if rct_info is not None else {}),
        **({"mixed_precision": mixed} if mixed is not None else {}),
        "elapsed_s": round(time.perf_counter() - start, 1),
        "config": config_echo if config_echo is not None else asdict(cfg),
        **environment(),
    }
    if is_main():
        atomic_write_text(run_table(metrics) + "\n", run_dir / "results.md")
        write_report([{**metrics, "run_dir": str(run_dir)}], run_dir)
        # last: a directory with metrics.json holds a finished run (qframe.report and sweeps look for it)
        atomic_write_json(metrics, run_dir / "metrics.json")
    return metrics
