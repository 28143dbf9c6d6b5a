"""The comparison report: one table (markdown + JSON) and plots over one or several runs.

    python -m qframe.report RUN_DIR [RUN_DIR ...] [--out DIR]

A RUN_DIR is a run directory of ``python -m qframe`` (it holds ``metrics.json``) or a
``--multirun`` sweep directory (every ``*/metrics.json`` below it). Each run also writes its own
report (``report.md``, ``report.json``, ``*.png``) as its last stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

from qframe.errors import QFrameError
from qframe.measure.table import markdown_table
from qframe.utils.env import machine_text
from qframe.utils.io import atomic_savefig, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

ACCURACY_COLUMNS = [
    ("method", "method"), ("precision", "precision"), ("accuracy", "test acc %"),
    ("delta", "Δ vs FP32"), ("loss", "test loss"), ("size_kib", "size KiB"), ("compression", "× smaller"),
]
REPORT_COLUMNS = [
    ("method", "method"), ("precision", "precision"), ("backend", "backend/device"), ("accuracy", "test acc %"),
    ("delta", "Δ vs FP32"), ("size_kib", "size KiB"), ("latency_ms", "latency ms"), ("latency_p90_ms", "p90 ms"),
    ("throughput", "images/s"), ("peak_memory_mib", "peak MiB"), ("watts_cell", "watts"), ("jpi_cell", "J/image"),
    ("ipj_cell", "images/J"),
]


def run_table(metrics: dict) -> str:
    """The accuracy table of one run's ``metrics.json``, with a title line."""
    d = metrics["data"]
    title = (f"{metrics['model']['name']} on {d['name']} ({d['test']} test images, {d['classes']} classes), "
             f"{metrics['device']}, {metrics['elapsed_s']} s")
    return title + "\n\n" + markdown_table(metrics["results"], ACCURACY_COLUMNS)


def find_runs(paths) -> list[Path]:
    """Run directories under ``paths`` (a run itself, or a sweep holding runs)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise QFrameError(f"run directory {str(p)!r} does not exist; give folders written by python -m qframe")
        found = [p] if (p / "metrics.json").is_file() else sorted(m.parent for m in p.glob("**/metrics.json"))
        if not found:
            raise QFrameError(f"no metrics.json in or under {str(p)!r}; give folders written by python -m qframe")
        runs += found
    return runs


def _cells(row: dict) -> dict:
    row = dict(row)
    if row.get("peak_memory_bytes") is not None:
        row["peak_memory_mib"] = row["peak_memory_bytes"] / 2**20
    energy = row.get("energy")
    row["watts_cell"] = row.get("watts") if row.get("watts") is not None else (energy or "n/a")
    row["ipj_cell"] = row.get("images_per_joule") if row.get("images_per_joule") is not None else "n/a"
    row["jpi_cell"] = f"{row['joules_per_image']:.3g}" if row.get("joules_per_image") is not None else "n/a"
    return row


def build(runs: list[dict]) -> dict:
    """One report from several runs' metrics: rows (with the run they came from) and what they ran on."""
    rows = []
    for m in runs:
        for r in m["results"]:
            rows.append(_cells({**r, "run": m.get("run_dir"), "model": m["model"]["name"], "data": m["data"]["name"]}))
    first = runs[0]
    measure = (first.get("config") or {}).get("measure")
    measure = measure if isinstance(measure, dict) else {}
    return {"rows": rows, "machine": first.get("machine"), "versions": first.get("versions"), "date": first.get("date"),
            "batch_sizes": measure.get("batch_sizes"), "warmup": measure.get("warmup"), "runs": measure.get("runs"),
            "sources": [m.get("run_dir") for m in runs], "energy": first.get("energy"),
            "notes": [n for m in runs for key in ("parity_notes", "onnxruntime_notes")
                      for n in ((m.get("export") or {}).get(key) or [])]}


def markdown(report: dict) -> str:
    m, v = report["machine"] or {}, report["versions"] or {}
    lines = [
        "# qframe comparison report", "",
        markdown_table(report["rows"], REPORT_COLUMNS), "",
        f"Latency: median and p90 at batch {report['rows'][0].get('latency_batch', 1)}; images/s at batch "
        f"{report['rows'][0].get('throughput_batch', 'n/a')} (onnxruntime rows: the export stage's own "
        f"timing at batch 1 and export.timing_batch, their size the ONNX file); medians of {report['runs']} timed runs after "
        f"{report['warmup']} warm-up runs, batch sizes {report['batch_sizes']}. Size counts quantized weights packed "
        "at their bit width, what a deployment stores (the .pt checkpoints hold the fake-quant model's float weights; "
        "qframe.convert keeps 4-bit depthwise, grouped and per-group layers as int8). Peak MiB: the process's peak resident memory (CPU) or peak GPU allocation while timing the largest batch.",
        f"Machine: {machine_text(m, str(m.get('torch_threads')) + ' torch threads', str(m.get('arch')))}"
        f"{_gpu_text(m.get('gpu'))}; Python {v.get('python')}, torch {v.get('torch')}, qframe {v.get('qframe')}; "
        f"{report['date']}.",
    ]
    energy = report.get("energy")
    if energy:
        lines.insert(-1, f"Energy: {energy.get('meter')}; watts are the average over each window, J/image the "
                         f"window's energy net of idle power over its images. {energy.get('idle')}.")
    lines += [f"Note: {n}." for n in report.get("notes") or []]
    return "\n".join(lines) + "\n"


def _gpu_text(gpu: dict | None) -> str:
    if not gpu:
        return ""
    return (f"; GPU {gpu.get('name')} (sm_{str(gpu.get('capability', '')).replace('.', '')}, CUDA {gpu.get('cuda')}, "
            f"driver {gpu.get('driver') or 'unknown'})")


def _bits(precision: str) -> int:
    """Weight bits of a precision label: ``w4a8`` and ``qat_w4a8`` -> 4, RCT's ``w6.5a8`` -> 6.5, ``fp32`` -> 32."""
    match = re.search(r"w(\d+(?:\.\d+)?)a", precision)
    return float(match.group(1)) if match else 32


def plot(report: dict, runs: list[dict], out: Path) -> list[Path]:
    """PNG plots: accuracy against size, throughput against weight bits, RCT bit widths when present."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    # a row lacking a value (e.g. an engine run without TensorRT's Python runtime has no accuracy) is left out of
    # the plots that need it; the table still shows it as n/a
    rows = [r for r in report["rows"] if _number(r.get("accuracy")) and _number(r.get("size_kib")) and r["size_kib"] > 0]
    if rows:
        paths.append(_plot_accuracy(plt, matplotlib.ticker, rows, out / "accuracy_vs_size.png"))

    timed = [r for r in report["rows"] if r.get("accuracy") is not None and _number(r.get("throughput"))
             and r["throughput"] > 0 and isinstance(r.get("precision"), str)]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(r.get("method") for r in timed):
            sel = [r for r in timed if r.get("method") == method]
            ax.scatter([_bits(r["precision"]) for r in sel], [r["throughput"] for r in sel], label=str(method), s=40)
            for r in sel:
                ax.annotate(r["precision"], (_bits(r["precision"]), r["throughput"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 4, 8, 16, 32], labels=["2", "4", "8", "16", "32"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="weight bits", ylabel="images/s (onnxruntime: batch 1)",
               title="Throughput against bit width")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, out / "throughput_vs_bits.png"))

    bits_plot = plot_rct_bits(runs, out / "rct_bits.png")
    if bits_plot is not None:
        paths.append(bits_plot)
    return paths


def _number(value) -> bool:
    """A finite real number (not a bool, a string or None): a value a plot can place."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plot_accuracy(plt, ticker, rows: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.get("method") for r in rows):
        sel = [r for r in rows if r.get("method") == method]
        ax.scatter([r["size_kib"] for r in sel], [r["accuracy"] for r in sel], label=str(method), s=40)
        for r in sel:
            ax.annotate(str(r.get("precision")), (r["size_kib"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    # label 1-2-5 steps: a log axis spanning less than a decade would otherwise show one number
    label = ticker.FuncFormatter(lambda v, _: f"{v:.0f}" if f"{v:.0e}"[0] in "125" else "")
    ax.xaxis.set_major_formatter(label)
    ax.xaxis.set_minor_formatter(label)
    ax.set(xlabel="model size (KiB, log scale)", ylabel="test accuracy (%)", title="Accuracy against model size")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_rct_bits(runs: list[dict], path: Path) -> Path | None:
    """Each RCT layer's weight bits against the training step, with the average over weights."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    trajectories = [(m, m["rct"]["bit_history"]) for m in runs if (m.get("rct") or {}).get("bit_history")]
    if trajectories:
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, history in trajectories:
            steps = m["rct"].get("history_steps")
            last = m["rct"].get("steps")
            if steps and last and last > steps[-1]:  # the widths hold from the last decision to the last step
                steps = [*steps, last]
                history = {layer: [*bits, bits[-1]] for layer, bits in history.items()}
            for layer, bits in history.items():
                ax.plot(steps if steps and len(steps) == len(bits) else range(len(bits)), bits, alpha=0.5, lw=1,
                        drawstyle="steps-post")  # a width holds until the next controller decision
            average = m["rct"].get("average_bits_history")
            if average and steps and len(steps) == len(average) + 1:
                average = [*average, average[-1]]
            if average:
                ax.plot(steps if steps and len(steps) == len(average) else range(len(average)), average, color="black",
                        lw=2.5, drawstyle="steps-post", label="average over weights")
                ax.legend()
        ax.set(xlabel="training step" if trajectories[0][0]["rct"].get("history_steps") else "controller step",
               ylabel="weight bits", title="RCT bit width per layer")
        ax.grid(alpha=0.3)
        return _save(fig, path)
    return None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(runs: list[dict], out: str | Path) -> dict:
    """Write the plots, report.json and report.md into ``out``; return the report.

    The table text is built before anything is written and report.md is written last, so a report that fails
    while building leaves the folder as it was, and one that fails while plotting leaves the previous report.json
    and report.md (beside some new plots, each written whole)."""
    out = Path(out)
    report = build(runs)
    text = markdown(report)
    report["plots"] = [str(p.name) for p in plot(report, runs, out)]
    atomic_write_json(report, out / "report.json")
    atomic_write_text(text, out / "report.md")
    return report


METRICS_VALID = "a metrics.json written by python -m qframe (a JSON object with a non-empty 'results' list)"


def load_metrics(path: Path) -> dict:
    """A run's ``metrics.json``, checked for what the report reads; else one line naming the file and the fault."""
    def bad(what: str) -> QFrameError:
        return QFrameError(f"{path}: {what}; valid: {METRICS_VALID}")

    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad(f"is not JSON ({exc})") from None
    if not isinstance(metrics, dict):
        raise bad(f"holds a JSON {_json_type(metrics)}, not an object")
    results = metrics.get("results")
    if "results" not in metrics:
        raise bad("has no 'results'")
    if not isinstance(results, list) or not results:
        raise bad("'results' is an empty list" if results == [] else f"'results' is a JSON {_json_type(results)}")
    for i, row in enumerate(results):
        if not isinstance(row, dict):
            raise bad(f"results[{i}] is a JSON {_json_type(row)}, not an object")
    for key in ("model", "data"):
        if not isinstance(metrics.get(key), dict) or "name" not in metrics[key]:
            raise bad(f"'{key}' is {'missing' if key not in metrics else 'not an object with a name'}")
    for key in ("config", "machine", "versions", "energy", "export", "rct"):
        if metrics.get(key) is not None and not isinstance(metrics[key], dict):
            raise bad(f"'{key}' is a JSON {_json_type(metrics[key])}, not an object")
    return metrics


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qframe.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or --multirun sweep directories")
    parser.add_argument("--out", help="where to write the report (default: the single run's directory, or ./report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dirs = find_runs(args.runs)
        runs = [{**load_metrics(d / "metrics.json"), "run_dir": str(d)} for d in dirs]
        out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else Path("report"))
        report = write_report(runs, out)
    except QFrameError as exc:
        print(f"qframe: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(report) + f"\nwritten to {out}: report.md, report.json, {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
