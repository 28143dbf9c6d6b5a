"""Where a converted model's time goes on a GPU, against the float forms it replaces.

    python benchmarks/gpu/convert_profile.py [--model mobilenet_v2] [--out DIR]

For each zoo model (the default config's shapes: digits, one channel, 32x32, 10 classes; weights
randomly initialised and PTQ-calibrated on random inputs: only speed is measured here) it times,
at batch 1 and 64 with CUDA events (median of 50 after 10 warm-up calls): FP32 eager, FP32 under
bf16 autocast, the w8a8 fake-quant model, ``qframe.convert``'s integer model, and the integer model
replayed as a CUDA graph (the same kernels without the host's per-launch cost: the gap between
the last two is launch overhead). Then ``torch.profiler`` lists the converted model's top CUDA
kernels at batch 64 and counts its kernel launches per forward. Prints markdown; with ``--out``
also writes ``convert_profile.md`` there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import qframe
from qframe.kernels import dispatch
from qframe.measure.profile import Autocast
from qframe.measure.timing import benchmark
from qframe.utils.env import environment

MODELS = ("compact_cnn", "mobilenet_v2", "resnet18")
WIDTHS = {"mobilenet_v2": 0.5}
BATCHES = (1, 64)
log = logging.getLogger("convert_profile")


def build(name: str, device: torch.device):
    torch.manual_seed(0)
    model = qframe.build_model(name, 10, 1, 32, width_mult=WIDTHS.get(name, 1.0)).to(device).eval()
    calib = [(torch.randn(64, 1, 32, 32, device=device), None) for _ in range(4)]
    fake = qframe.ptq(model, qframe.preset("w8a8"), calib, num_batches=4, device=device).eval()
    return model, fake, qframe.convert(fake).eval()


class Graphed:
    """``model`` captured once as a CUDA graph for a fixed input shape and replayed."""

    def __init__(self, model, x):
        self.static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                model(self.static_x)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_y = model(self.static_x)

    def __call__(self, x):
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_y


def times(forms: dict, batch: int, device) -> dict:
    x = torch.randn(batch, 1, 32, 32, device=device)
    out = {}
    for name, model in forms.items():
        try:
            fn = Graphed(model, x) if name.endswith("CUDA graph") else model
            with torch.inference_mode():
                out[name] = benchmark(fn, x, warmup=10, runs=50).median_ms
        except Exception as exc:  # a form that cannot be captured says why instead of stopping the table
            log.warning("%s at batch %d: %s: %s", name, batch, type(exc).__name__, str(exc).splitlines()[0][:200])
            out[name] = None
    return out


def kernel_table(model, batch: int, device, top: int = 12) -> tuple[str, int]:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 1, 32, 32, device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    launches = sum(e.count for e in events) / 5
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in events) or 1.0
    lines = ["| kernel | calls per forward | µs per forward | share |", "|---|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| `{e.key[:90]}` | {e.count / 5:.0f} | {e.self_device_time_total / 5:.1f} | "
                     f"{100 * e.self_device_time_total / total:.1f} % |")
    return "\n".join(lines), int(launches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        parser.error("needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    sections = []
    for name in args.models:
        model, fake, converted = build(name, device)
        forms = {"FP32 eager": model, "bf16 autocast": Autocast(model), "w8a8 fake-quant": fake,
                 "w8a8 converted": converted, "w8a8 converted, CUDA graph": converted}
        with dispatch.record() as ran:
            rows = {b: times(forms, b, device) for b in BATCHES}
        lines = [f"## {name}", "", "| form | " + " | ".join(f"batch {b} ms (x FP32)" for b in BATCHES) + " |",
                 "|---|" + "---|" * len(BATCHES)]
        for form in forms:
            cells = []
            for b in BATCHES:
                t, base = rows[b][form], rows[b]["FP32 eager"]
                cells.append("n/a" if t is None else f"{t:.3f} ({base / t:.2f}x)")
            lines.append(f"| {form} | " + " | ".join(cells) + " |")
        table, launches = kernel_table(converted, BATCHES[-1], device)
        _, fp32_launches = kernel_table(model, BATCHES[-1], device)
        paths = sorted({m.path for m in converted.modules() if hasattr(m, "path")})
        lines += ["", f"Integer paths: {', '.join(paths)}; GEMM backends that ran: "
                      f"{', '.join(sorted({f'{op} [{b}]' for op, b in ran}))}.",
                  f"Kernel launches per forward at batch {BATCHES[-1]}: converted {launches}, FP32 {fp32_launches}.", "",
                  f"Top CUDA kernels of the converted model at batch {BATCHES[-1]}:", "", table]
        sections.append("\n".join(lines))
        del model, fake, converted
        torch.cuda.empty_cache()

    env = environment()
    g = env["machine"].get("gpu") or {}
    head = (f"# Converted models on {g.get('name')}: where the time goes\n\n"
            f"GPU {g.get('name')} (sm_{str(g.get('capability', '')).replace('.', '')}), CUDA {g.get('cuda')}, "
            f"driver {g.get('driver')}; torch {env['versions']['torch']}, triton {env['versions'].get('triton')}; "
            f"{env['date']}.\nCommand: `python benchmarks/gpu/convert_profile.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`\n\nMedians of 50 CUDA-event timed forwards after 10 "
            "warm-up calls; random weights, w8a8 PTQ calibrated on random inputs (speed only); input 1x32x32.\n")
    text = head + "\n" + "\n\n".join(sections) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "convert_profile.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
