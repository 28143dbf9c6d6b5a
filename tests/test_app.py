"""The command line end to end on tiny settings, and its one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qframe.measure.energy import detect_meters

ROOT = Path(__file__).resolve().parents[1]


def _qframe(*args, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_smoke_run_writes_metrics_checkpoint_and_log(tmp_path):
    proc = _qframe("+experiment=smoke", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {(r["method"], r["precision"]): r for r in metrics["results"]}
    assert set(rows) == {("fp32", "fp32"), ("ptq", "w8a8"), ("convert", "ptq_w8a8"), ("ptq", "w4a8"), ("ptq", "w4a16")}
    fp32 = rows["fp32", "fp32"]
    assert 10.0 < fp32["accuracy"] <= 100.0  # one epoch on 16x16 digits already beats chance
    assert rows["ptq", "w8a8"]["size_bytes"] < 0.3 * fp32["size_bytes"]
    assert rows["ptq", "w4a8"]["size_bytes"] < rows["ptq", "w8a8"]["size_bytes"]
    assert metrics["config"]["model"]["name"] == "compact_cnn" and metrics["versions"]["torch"]
    assert (tmp_path / "fp32.pt").is_file() and (tmp_path / "ptq_w8a8.pt").is_file()
    assert (tmp_path / "results.md").read_text().count("| ptq ") == 3
    # metrics.json comes last: a run killed while writing its report leaves none, so it never looks finished
    assert all((tmp_path / "metrics.json").stat().st_mtime_ns >= (tmp_path / name).stat().st_mtime_ns
               for name in ("results.md", "report.md", "report.json"))
    # qframe.convert's integer model of the main recipe: the fake-quant model's predictions, its size
    converted = rows["convert", "ptq_w8a8"]
    assert converted["backend"] == "qframe.convert [cpu] / cpu" or converted["backend"].startswith("qframe.convert [reference")
    assert abs(converted["accuracy"] - rows["ptq", "w8a8"]["accuracy"]) <= 100 / 269 + 1e-9  # one image at most
    assert converted["size_bytes"] <= rows["ptq", "w8a8"]["size_bytes"] * 1.05 and "int8_mm" in converted["kernel_paths"]
    assert list(tmp_path.glob("*.log")), "Hydra's run log is missing"
    assert "test acc %" in proc.stdout and "w4a8" in proc.stdout
    # the measure and report stages: timings for every form, energy said to be unavailable here
    assert all(r["latency_ms"] > 0 and r["throughput"] > 0 and r["timings"] for r in metrics["results"])
    report = (tmp_path / "report.md").read_text()
    assert "images/s" in report
    if not detect_meters():  # this machine has no energy counter: the report must say so, not invent one
        reason = "unavailable (no RAPL/NVML/INA3221 on this machine)"
        assert all(r["energy"] == reason and r["watts"] is None for r in metrics["results"])
        assert reason in report
    else:
        assert all(r["watts"] > 0 and r["images_per_joule"] > 0 for r in metrics["results"])
    assert (tmp_path / "accuracy_vs_size.png").stat().st_size > 5000
    assert (tmp_path / "throughput_vs_bits.png").stat().st_size > 5000


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.weight.bits=9", "bits=9 is out of range; valid: integers 2..8"),
        ("model=compact_cnn model.name=alexnet", "unknown model 'alexnet'"),
        ("data=imagefolder data.root=/nonexistent/faces", "does not exist"),
        ("quant.bits=9", "Key 'bits' not in 'QuantRecipe'; valid keys: name, weight, input, rules, fold_bn"),
        ("model=vgg", "Could not find 'model/vgg'; Available options in 'model': compact_cnn, custom, mobilenet_v2"),
        ("quant.weight.bits=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("quant=w4a8 quant.budget.size_ratio=0.18", "quant.budget exists only in quant=auto"),
        ("train.resume=bogus", "train.resume='bogus': that checkpoint does not exist; valid: 'auto'"),
        ("train.checkpoint=/", "checkpoint '/' is a folder, not a file"),
        ("experiment=smoke", "No match in the defaults list; To append to your default list use +experiment=smoke"),
    ],
)
def test_cli_bad_input_is_one_line(override, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = _qframe(*override.split(), f"hydra.run.dir={run_dir}", "train.epochs=0", timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("qframe: error: ") and message in lines[-1], proc.stderr[-1000:]
    assert sum("error" in line.lower() for line in lines) == 1
    assert not run_dir.exists()  # nothing half-written: not even Hydra's config copy and an empty log


def test_a_run_directory_is_discarded_only_when_it_holds_hydras_files_alone(tmp_path):
    from qframe.__main__ import discard_unstarted

    def run_dir(name, *extra):
        path = tmp_path / name
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (path / "qframe.log").write_text("")
        for file in extra:
            (path / file).write_bytes(b"x")
        return path

    assert discard_unstarted(run_dir("bad")) and not (tmp_path / "bad").exists()
    kept = run_dir("resumable", "fp32.pt")  # an earlier run's checkpoint: train.resume=auto needs it
    assert not discard_unstarted(kept) and (kept / "fp32.pt").is_file() and (kept / ".hydra").is_dir()
    assert not discard_unstarted(tmp_path / "missing")


@pytest.mark.slow
def test_export_stage_writes_onnx_lint_parity_and_dla_report(tmp_path):
    proc = _qframe("+experiment=smoke", "device=orin", "export.enabled=true", "method.compare=[]",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    export = metrics["export"]
    assert export["lint"] == []  # the Q/DQ graph follows TensorRT's explicit-quantization rules
    for level in ("basic", "all"):  # ORT_ENABLE_BASIC and ORT_ENABLE_ALL; below 99 % the run would have stopped
        assert export["parity_fp32"][level]["agreement"] == 100.0
        assert export["parity_ptq_w8a8"][level]["agreement"] >= 99.0 and export["parity_ptq_w8a8"][level]["images"] == 269
    assert (tmp_path / "model_fp32.onnx").is_file() and (tmp_path / "model_ptq_w8a8.onnx").is_file()
    onnx_rows = [r for r in metrics["results"] if r["method"] == "onnx" and r["backend"].startswith("onnxruntime")]
    assert [r["precision"] for r in onnx_rows] == ["fp32", "ptq_w8a8", "ptq_w8a8"] and all(r["latency_ms"] > 0 for r in onnx_rows)
    # without TensorRT: the trtexec script and the files it needs (DLA: Q/DQ-free ONNX + calibration cache)
    script = (tmp_path / "tensorrt" / "build_engines.sh").read_text()
    assert "--useDLACore=0" in script and "--allowGPUFallback" in script and "--calib=" in script
    assert (tmp_path / "tensorrt" / "model_int8_noqdq.calib").read_text().startswith("TRT-")
    assert export["tensorrt"]["tensorrt"] is False and "TensorRT is not installed here" in export["tensorrt"]["message"]
    dla = (tmp_path / "dla_report.md").read_text()
    assert "| Conv |" in dla and export["dla"]["subgraphs"] >= 1


@pytest.mark.slow
def test_a_dla_run_reports_accuracy_under_dla_and_gpu_rounding(tmp_path):
    proc = _qframe("+experiment=smoke", "method=qat", "method.epochs=1", "method.compare=[]", "device.dla=true",
                   "measure.enabled=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["method"], r["precision"]): r for r in json.loads((tmp_path / "metrics.json").read_text())["results"]}
    for method in ("ptq", "qat"):
        dla, gpu = rows[method, "w8a8 DLA rounding"], rows[method, "w8a8 GPU rounding"]
        assert "round half away" in dla["backend"] and "round half to even" in gpu["backend"]
        assert abs(dla["accuracy"] - gpu["accuracy"]) < 5.0  # ties are rare: the two agree closely
    ckpt = torch.load(tmp_path / "qat_w8a8.pt", weights_only=False)
    assert ckpt["recipe"]["input"]["rounding"] == "half_away"


def _config(*overrides):
    from hydra import compose, initialize_config_module

    from qframe.config import register, to_config

    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return to_config(compose(config_name="config", overrides=["+experiment=smoke", *overrides]))


def test_a_trained_checkpoint_of_another_model_names_both(digits, tmp_path):
    from qframe.app import train_fp32
    from qframe.errors import QFrameError
    from qframe.models import build_model
    from qframe.utils.io import atomic_torch_save

    cnn = build_model("compact_cnn", digits.num_classes, digits.channels, digits.image_size)
    atomic_torch_save({"model": cnn.state_dict(), "model_name": "compact_cnn", "num_classes": digits.num_classes},
                      tmp_path / "fp32.pt")
    # train.resume=auto in a run directory whose fp32.pt another model wrote
    cfg = _config("model=mobilenet_v2", "model.width_mult=0.25", "train.resume=auto")
    with pytest.raises(QFrameError) as err:
        train_fp32(cfg, digits, tmp_path, torch.device("cpu"))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"trained checkpoint {str(tmp_path / 'fp32.pt')!r} does not fit "
                                                      "MobileNetV2: ")
    assert "it was saved from compact_cnn with 10 classes; this run builds mobilenet_v2 (width_mult 0.25) with 10 " \
           "classes: with train.resume=auto use the settings the run directory was started with" in message
    # train.checkpoint of the same model for another number of classes
    five = tmp_path / "five.pt"
    atomic_torch_save({"model": build_model("compact_cnn", 5, digits.channels, digits.image_size).state_dict(),
                       "model_name": "compact_cnn", "num_classes": 5}, five)
    with pytest.raises(QFrameError, match=r"classifier\.1\.weight is \(5, 128\) in the checkpoint, \(10, 128\) in the "
                                          r"model\); it was saved from compact_cnn with 5 classes; .* give the model "
                                          "and data it was trained with"):
        train_fp32(_config(f"train.checkpoint={five}"), digits, tmp_path, torch.device("cpu"))


def test_the_interrupted_line_names_what_the_run_kept(tmp_path):
    from qframe.__main__ import interrupted

    assert interrupted(tmp_path) == f"interrupted before the first checkpoint; nothing in {tmp_path} to resume from"
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "fp32_last.pt")
    (tmp_path / "checkpoints" / ".fp32_last.pt.x1y2.tmp").write_bytes(b"half")  # a killed write: not kept
    line = interrupted(tmp_path)
    assert line == (f"interrupted; {tmp_path} keeps checkpoints/fp32_last.pt: add train.resume=auto "
                    f"hydra.run.dir={tmp_path} to the same command to continue from there")


@pytest.mark.slow
def test_a_terminated_run_says_how_to_resume_and_resumes_to_the_same_result(tmp_path):
    import signal
    import time

    args = ["+experiment=smoke", "measure.enabled=false", "method.compare=[]", "train.epochs=3",
            f"hydra.run.dir={tmp_path}"]
    reference = tmp_path / "reference"
    whole = _qframe(*args[:-1], f"hydra.run.dir={reference}")
    assert whole.returncode == 0
    # said before any work, for a run killed outright (SIGKILL prints nothing): where it is and how it continues
    assert f"continues with train.resume=auto hydra.run.dir={reference}" in (reference / "qframe.log").read_text()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "qframe", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    last = tmp_path / "checkpoints" / "fp32_last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert last.is_file(), "the first epoch's checkpoint never appeared"
    proc.send_signal(signal.SIGTERM)  # what kill and timeout send
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("qframe: interrupted; ") and "train.resume=auto" in lines[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists() and not list(tmp_path.rglob(".*.tmp"))
    resumed = _qframe(*args, "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = (tmp_path / "qframe.log").read_text()
    assert f"resuming fp32 from {last} at epoch" in log
    got, want = (json.loads((d / "metrics.json").read_text())["results"] for d in (tmp_path, reference))
    # seeded per epoch: the resumed run ends where the uninterrupted one did
    assert [(r["method"], r["loss"]) for r in got] == [(r["method"], r["loss"]) for r in want]


def test_resume_auto_reuses_fp32_only_under_the_settings_it_was_trained_with(digits, tmp_path, caplog):
    import logging

    from qframe.app import train_fp32
    from qframe.errors import QFrameError

    device = torch.device("cpu")
    trained = train_fp32(_config("train.batch_size=256"), digits, tmp_path, device)
    # a longer schedule, a new learning rate or other data would not be this model: say so
    for overrides, named in [(["train.epochs=3"], "train.epochs=1 (now 3)"),
                             (["train.lr=0.01"], "train.lr=0.003 (now 0.01)"),
                             (["data.shift=0.2"], "data.shift=0.1 (now 0.2)"),
                             (["seed=5"], "with seed=0 (now 5)")]:
        with pytest.raises(QFrameError) as err:
            train_fp32(_config("train.batch_size=256", "train.resume=auto", *overrides), digits, tmp_path, device)
        assert str(err.value).startswith(f"trained checkpoint {str(tmp_path / 'fp32.pt')!r} was written with ")
        assert named in str(err.value) and "choose a new hydra.run.dir" in str(err.value)
    # the same settings: the directory's model is loaded, not trained again
    with caplog.at_level(logging.INFO, logger="qframe"):
        again = train_fp32(_config("train.batch_size=256", "train.resume=auto"), digits, tmp_path, device)
    assert "loaded trained FP32 model from" in caplog.text and "epoch 1/1" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))


def test_a_quant_rule_that_names_no_layer_stops_the_run_before_training(digits, tmp_path, monkeypatch):
    import qframe.app as app
    from qframe.errors import QFrameError

    monkeypatch.setattr(app, "fit", lambda *a, **k: pytest.fail("training started before the rules were checked"))
    cfg = _config("quant.rules=[{pattern:backbone.*,weight_bits:4}]")
    with pytest.raises(QFrameError, match=r"^quant rule pattern 'backbone\.\*' matches no quantizable layer of "
                                          r"CompactCNN \(recipe w8a8\); layers are: features\.0\.0, "):
        app.train_fp32(cfg, digits, tmp_path, torch.device("cpu"))
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file where the run directory's parent should be")
    proc = _qframe("+experiment=smoke", f"hydra.run.dir={blocker}/run", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"qframe: error: cannot write or read '{blocker}/run': Not a directory; valid: a "
                         "hydra.run.dir in a folder you can write to")


def test_a_file_error_blames_hydra_run_dir_only_for_paths_in_the_run_directory(tmp_path):
    from qframe.__main__ import os_error_line

    run = tmp_path / "runs" / "r1"
    hint = "; valid: a hydra.run.dir in a folder you can write to"
    data = FileNotFoundError(2, "No such file or directory", str(tmp_path / "faces" / "cat" / "001.jpg"))
    assert os_error_line(data, run) == f"cannot write or read '{tmp_path}/faces/cat/001.jpg': No such file or directory"
    inside = PermissionError(13, "Permission denied", str(run / "checkpoints" / "fp32_last.pt"))
    assert os_error_line(inside, run).endswith("Permission denied" + hint)
    assert os_error_line(FileNotFoundError(2, "No such file or directory", str(run)), None).endswith(hint)


def test_moving_the_data_or_the_backbone_does_not_block_a_resume_but_another_one_does():
    from qframe.app import _recorded as recorded

    def at(root, backbone):
        return recorded(_config("data=imagefolder", f"data.root={root}", f"model.checkpoint={backbone}"))

    a = at("/mnt/a/faces", "/mnt/a/backbone.pt")
    assert at("/home/me/faces", "/tmp/backbone.pt") == a
    assert at("/mnt/a/cars", "/mnt/a/backbone.pt")["data"] != a["data"]
    assert at("/mnt/a/faces", "/mnt/a/other.pt")["model"] != a["model"]


def test_a_run_directory_that_existed_before_is_kept_after_bad_input(tmp_path):
    mine = tmp_path / "mine"
    (mine / ".hydra").mkdir(parents=True)
    (mine / "qframe.log").write_text("an earlier run's log\n")
    proc = _qframe("quant.weight.bits=9", f"hydra.run.dir={mine}", "train.epochs=0", timeout=120)
    assert proc.returncode == 2 and "qframe: error: quant.weight: quantization bits=9" in proc.stderr
    assert mine.is_dir() and (mine / "qframe.log").read_text().startswith("an earlier run's log")


@pytest.mark.slow
def test_a_refused_run_leaves_a_finished_runs_record_and_makes_no_folders(tmp_path):
    """Hydra rewrote a finished run's .hydra/ (overrides.yaml then named the refused value) and appended to its
    log; a refused run in a new nested folder left the empty folders above its directory."""
    done = tmp_path / "done"
    (done / ".hydra").mkdir(parents=True)
    record = {".hydra/overrides.yaml": "- train.lr=0.1\n", ".hydra/config.yaml": "seed: 0\n",
              "qframe.log": "the finished run's log\n", "metrics.json": "{}\n"}
    for name, text in record.items():
        (done / name).write_text(text)
    proc = _qframe("+experiment=smoke", "train.lr=-1", f"hydra.run.dir={done}", timeout=120)
    assert proc.returncode == 2 and "train.lr=-1.0 is invalid" in proc.stderr
    assert {str(p.relative_to(done)): p.read_text() for p in done.rglob("*") if p.is_file()} == record
    nested = tmp_path / "new" / "a" / "b"
    proc = _qframe("+experiment=smoke", "train.weight_decay=-1", f"hydra.run.dir={nested}", timeout=120)
    assert proc.returncode == 2 and "train.weight_decay=-1.0 is invalid" in proc.stderr
    assert not (tmp_path / "new").exists()
    # a sweep refused at its first job left its multirun.yaml in the folders it made; one whose first job ran keeps it
    sweep = tmp_path / "sweeps" / "s"
    proc = _qframe("-m", "+experiment=smoke", "train.lr=-1,0.1", f"hydra.sweep.dir={sweep}", timeout=120)
    assert proc.returncode == 2 and "train.lr=-1.0 is invalid" in proc.stderr
    assert not (tmp_path / "sweeps").exists()
    proc = _qframe("-m", "+experiment=smoke", "train.epochs=1", "train.lr=0.1,-1", "measure.enabled=false",
                   "method.compare=[]", f"hydra.sweep.dir={sweep}", timeout=300)
    assert proc.returncode == 2 and "train.lr=-1.0 is invalid" in proc.stderr
    assert (sweep / "multirun.yaml").is_file() and len(list(sweep.glob("*/metrics.json"))) == 1
    mine = tmp_path / "mine"  # a sweep folder the user made stays, as empty as it was
    mine.mkdir()
    proc = _qframe("-m", "+experiment=smoke", "train.lr=-1,0.1", f"hydra.sweep.dir={mine}", timeout=120)
    assert proc.returncode == 2 and mine.is_dir() and not any(mine.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["+experiment=ptq_orin", "quant=w4a16"], "quant recipe 'w4a16' cannot run on orin: weight.granularity=per_group"),
    (["quant=auto", "quant.budget.size_ratio=0.001"], "quant budget 0.0010 of FP32's size is below the cheapest"),
])
def test_what_the_config_and_architecture_decide_is_refused_before_training(args, says, tmp_path):
    """Both were refused after the FP32 model had trained (16 epochs by default, minutes), which stayed behind."""
    run_dir = tmp_path / "run"
    proc = _qframe(*args, f"hydra.run.dir={run_dir}", timeout=90)
    assert proc.returncode == 2 and says in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("args, rc, says", [
    (["--cfg", "job", "+experiment=smoke", "train.lr=-1"], 2, "qframe: error: train.lr=-1.0 is invalid"),
    (["--cfg", "hydra", "+train.epoch=3"], 2, "qframe: error: unknown key train.epoch"),
    (["--cfg", "job", "+experiment=smoke", "train.lr=0.01"], 0, "lr: 0.01"),
    (["+experiment=smoke", "--cfg", "job", "train.lr=0.01"], 0, "lr: 0.01"),  # an override after the flag
    (["--cfg", "job", "data=imagefolder", "data.root=${hydra:runtime.cwd}/faces"], 0, "root: ${hydra:runtime.cwd}"),
    (["--cfg", "job", "data=imagefolder", "data.root=${hydra:runtime.cwd}/faces", "train.lr=-1"], 2,
     "qframe: error: train.lr=-1.0 is invalid"),  # a ${hydra:} value resolves as in a run, the rest is checked
    (["--cfg", "job", "hydra.verbose=true", "train.lr=-1"], 2, "qframe: error: train.lr=-1.0 is invalid"),
])
def test_printing_the_config_validates_it_first(args, rc, says):
    """--cfg printed any config and exited 0, bad values included."""
    proc = _qframe(*args, timeout=120)
    assert proc.returncode == rc and says in (proc.stderr if rc else proc.stdout)
    if rc:
        assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip()


def test_a_killed_fp32_run_resumes_only_under_the_data_model_and_seed_it_started_with(digits, tmp_path):
    from qframe.app import _start_over, train_fp32
    from qframe.errors import QFrameError

    device = torch.device("cpu")
    train_fp32(_config("train.batch_size=256", "train.epochs=1"), digits, tmp_path, device)
    (tmp_path / "fp32.pt").unlink()  # killed after its last epoch's checkpoint, before the trained model was saved
    last = tmp_path / "checkpoints" / "fp32_last.pt"
    for override, named in [("data.seed=1", "data.seed=0 (now 1)"), ("seed=3", "seed=0 (now 3)"),
                            ("data.image_size=24", "data.image_size=16 (now 24)")]:
        with pytest.raises(QFrameError) as err:
            train_fp32(_config("train.batch_size=256", "train.epochs=1", "train.resume=auto", override), digits,
                       tmp_path, device)
        assert str(err.value).startswith(f"resume checkpoint {str(last)!r} was written with "), str(err.value)
        assert named in str(err.value)
    # a run started without train.resume trains afresh: what an earlier run left to resume from goes with it
    old = tmp_path / "checkpoints" / "qat_w8a8_last.pt"
    for path in (old, tmp_path / "fp32.pt", tmp_path / "metrics.json"):
        path.write_bytes(last.read_bytes())
    _start_over(tmp_path, keep=(None, str(last)))  # a file the configuration names (model.checkpoint) stays
    assert last.is_file() and not old.exists()
    assert not (tmp_path / "fp32.pt").exists() and not (tmp_path / "metrics.json").exists()
    _start_over(tmp_path, keep=(None, None))
    assert not last.exists()


def test_an_explicit_resume_path_goes_to_the_stage_it_belongs_to(tmp_path):
    from qframe.app import _resume

    stages = [tmp_path / "checkpoints" / name for name in ("fp32_last.pt", "qat_w8a8_last.pt", "qat_w4a8_last.pt",
                                                           "qat_sgd_w8a8_last.pt", "rct_w8a8_last.pt")]

    def resumed(value):
        return [_resume(_config(f"train.resume={value}"), path) for path in stages]

    assert resumed("/old/run/checkpoints/fp32_last.pt") == ["/old/run/checkpoints/fp32_last.pt"] + [None] * 4
    assert resumed("/old/backup.pt") == ["/old/backup.pt"] + [None] * 4  # any other name: the FP32 stage's
    assert resumed("/old/qat_w4a8_last.pt") == [None, None, "/old/qat_w4a8_last.pt", None, None]
    assert resumed("/old/rct_w8a8_last.pt") == [None] * 4 + ["/old/rct_w8a8_last.pt"]
    (stages[1].parent).mkdir(parents=True)
    stages[1].write_bytes(b"")
    assert resumed("auto") == [None, str(stages[1]), None, None, None]


def test_flags_go_ahead_of_the_overrides_with_their_values():
    """Hydra's parser takes overrides only after its flags: an override after --cfg job or -m was argparse's
    8-line usage error."""
    from qframe.__main__ import flags_first

    assert flags_first(["+experiment=smoke", "--cfg", "job", "train.lr=0.1"]) == \
        ["--cfg", "job", "+experiment=smoke", "train.lr=0.1"]
    assert flags_first(["a=1", "-m", "~b", "--info", "config", "-cn", "config", "--info", "c=2"]) == \
        ["-m", "--info", "config", "-cn", "config", "a=1", "~b", "c=2", "--info"]  # a bare --info takes no override
    assert flags_first(["--cfg", "job", "a=1", "-cn"]) == ["--cfg", "job", "a=1", "-cn"]  # no value: the parser says so
    assert flags_first(["b=2", "--pack", "train", "--cfg", "job"]) == ["--pack", "train", "--cfg", "job", "b=2"]


def test_printing_the_config_of_another_config_tree_is_left_to_hydra(tmp_path):
    """The check composed qframe's own tree, so a recipe of the user's (-cd) was 'not found'."""
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "mine.yaml").write_text("defaults:\n  - w4a8\n  - _self_\nname: mine\n")
    proc = _qframe("--cfg", "job", "-cd", str(tmp_path), "quant=mine", timeout=120)
    assert proc.returncode == 0 and "name: mine" in proc.stdout, proc.stderr[-500:]


def test_a_refused_run_restores_hydras_files_only_where_nothing_else_changed(tmp_path):
    """A run that failed after working (a resume that trained, then stopped at export) lost its log and the
    record of its overrides to the restore meant for refusals before any work."""
    from qframe.__main__ import restore_files, saved_files

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- train.lr=0.1\n")
    (run / "qframe.log").write_text("first run\n")
    (run / "fp32.pt").write_bytes(b"weights")
    saved = saved_files([run])
    (run / ".hydra" / "overrides.yaml").write_text("- train.lr=-1\n")  # what Hydra writes for the new command
    (run / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    with open(run / "qframe.log", "a") as log:
        log.write("refused\n")
    restore_files(saved)  # nothing but Hydra's files changed: a refusal, undone
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- train.lr=0.1\n"
    assert not (run / ".hydra" / "hydra.yaml").exists() and (run / "qframe.log").read_text() == "first run\n"
    saved = saved_files([run])
    (run / ".hydra" / "overrides.yaml").write_text("- train.resume=auto\n")
    (run / "metrics.json").write_text("{}\n")  # the run worked before it failed
    restore_files(saved)
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- train.resume=auto\n"
