"""``python -m qframe``: the Hydra entry point. Thin: compose, validate, run, print the table."""

import dataclasses
import os
import signal
import sys
from pathlib import Path

_HYDRA_NOISE = ("To append to your config", "Set the environment", "full_key", "reference_type", "object_type",
                "Config search path", "provider=")


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line composition errors as one line: what is wrong and what is valid."""
    text = str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause).splitlines() and str(cause).splitlines()[0] not in text:
        text += "\n" + str(cause)
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(_HYDRA_NOISE):
            continue
        if raw.startswith("\t") and parts and parts[-1].endswith((":", ",")):
            parts[-1] += (" " if parts[-1].endswith(":") else " ") + line + ","  # an options list
        else:
            parts.append(line)
    node_type = getattr(cause if cause is not None else exc, "object_type", None)
    if "not in" in text and dataclasses.is_dataclass(node_type):  # an unknown key: list the valid ones
        parts.append("valid keys: " + ", ".join(f.name for f in dataclasses.fields(node_type)))
    return "; ".join(p.rstrip(",.") for p in parts)


def main() -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from qframe.config import register, to_config
    from qframe.errors import QFrameError

    register()

    @hydra.main(version_base=None, config_path="pkg://qframe.conf", config_name="config")
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from qframe.app import run
        from qframe.report import run_table

        try:
            config = to_config(cfg)
            metrics = run(config, HydraConfig.get().runtime.output_dir, OmegaConf.to_container(cfg, resolve=True))
        except QFrameError as exc:
            if full_traces:
                raise
            out = HydraConfig.get().runtime.output_dir
            if os.path.abspath(out) in existed:  # a directory the user had before is theirs: as it was
                restore_files(before)
            elif discard_unstarted(out):
                remove_new_parents(out, absent)
                discard_empty_sweep(absent, swept)
            print(f"qframe: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            out = HydraConfig.get().runtime.output_dir
            print(f"qframe: {interrupted(out)}", file=sys.stderr)
            if os.path.abspath(out) not in existed and discard_unstarted(out):  # nothing to resume from
                remove_new_parents(out, absent)
            sys.exit(130)
        out = HydraConfig.get().runtime.output_dir
        report = Path(out) / "report.md"
        speed = report.read_text() if report.is_file() else ""
        print("\n" + run_table(metrics) + ("\n\n" + speed if speed else "") + f"\nresults in {out}")

    # `kill` and `timeout` send SIGTERM: stop as Ctrl-C does, so temporary files are removed and the
    # last line says how to resume
    signal.signal(signal.SIGTERM, _terminate)
    # Let composition errors reach us (instead of Hydra's multi-line report) unless the user
    # asked for Hydra's full traces.
    full_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # run directories named on the command line that exist already (before Hydra writes into them)
    named = [a.split("=", 1)[1] for a in sys.argv[1:] if a.lstrip("+").startswith("hydra.run.dir=")]
    sweeps = [a.split("=", 1)[1] for a in sys.argv[1:] if a.lstrip("+").startswith("hydra.sweep.dir=")]
    swept = {os.path.abspath(d) for d in sweeps if os.path.exists(d)}  # the user's: never removed
    existed = {os.path.abspath(d) for d in named if os.path.exists(d)}
    before = saved_files(existed)  # what Hydra will overwrite in them (its config copy) and append to (the log)
    absent = absent_parents(named + sweeps)  # folders a run may make above its directory that are not there now
    os.environ["HYDRA_FULL_ERROR"] = "1"
    sys.argv[1:] = flags_first(sys.argv[1:])
    try:
        if not full_traces:
            try:
                check_printed_config(sys.argv[1:])
            except QFrameError as exc:
                print(f"qframe: error: {exc}", file=sys.stderr)
                sys.exit(2)
        _main()
    except (HydraException, OmegaConfBaseException) as exc:
        if full_traces:
            raise
        print(f"qframe: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        # a file system refusal (an unwritable or impossible hydra.run.dir, a full disk, a missing
        # permission) is about the machine, not qframe: name the path and the reason
        if full_traces or exc.filename is None:
            raise
        print(f"qframe: error: {os_error_line(exc, _run_dir())}", file=sys.stderr)
        sys.exit(2)
    except (AssertionError, AttributeError) as exc:
        # OmegaConf fails this way, not with its own errors, on an override that sets a key under
        # a node that is null in the chosen config (e.g. quant.budget.size_ratio with quant=w4a8).
        if full_traces or not _raised_in_omegaconf(exc):
            raise
        budget = any(a.lstrip("+").startswith("quant.budget.") for a in sys.argv[1:])
        hint = ("quant.budget exists only in quant=auto: e.g. quant=auto quant.budget.size_ratio=0.18"
                if budget else "choose the config group option that defines that node")
        print(f"qframe: error: cannot apply the overrides: a key is set under a node that is null in the "
              f"composed config ({exc}); {hint}", file=sys.stderr)
        sys.exit(2)


_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun")
_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _is(arg: str, flags) -> bool:
    """``arg`` is one of ``flags``, or an abbreviation argparse takes for one of their long forms."""
    return arg in flags or (arg.startswith("--") and len(arg) > 3 and any(f.startswith(arg) for f in flags
                                                                          if f.startswith("--")))


def flags_first(args: list) -> list:
    """``args`` with Hydra's flags (and their values) ahead of the overrides: Hydra's parser takes overrides
    only after its flags (``+experiment=smoke --cfg job train.lr=0.1`` was an 8-line usage error). A bare
    ``--info`` (its value is optional) and a value flag with nothing after it stay last, where the parser
    takes no override for their value."""
    flags, overrides, last = [], [], []
    i = 0
    while i < len(args):
        arg = args[i]
        following = args[i + 1] if i + 1 < len(args) else None
        if not arg.startswith("-"):  # an override starts with a key, +, ++ or ~, never with -
            overrides.append(arg)
        elif _is(arg, _VALUE_FLAGS) or (_is(arg, ("--info", "-i")) and following in _INFO):
            if following is None:
                last.append(arg)
            else:
                flags += [arg, following]
                i += 1
        elif _is(arg, ("--info", "-i")):
            last.append(arg)
        else:
            flags.append(arg)
        i += 1
    return flags + overrides + last


def check_printed_config(args: list) -> None:
    """With ``--cfg`` / ``-c`` Hydra prints the composed config and exits 0 without running: the config it prints
    is validated first, so a bad value is the one line a run would give (exit 2). Composed as a run composes it
    (Hydra's own settings included, so ``${hydra:...}`` values resolve); another config tree (``-cd``, ``-cp``,
    ``-cn``) and multirun sweeps (each job is validated when it runs) are left to Hydra, and so is a command
    this composition cannot take: Hydra reports it as it would."""
    elsewhere = ("-m", "--multirun", "-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")
    if not any(_is(a, ("--cfg", "-c")) or a.startswith(("--cfg=", "-cjob", "-chydra", "-call")) for a in args) or \
            any(_is(a, elsewhere) or a.startswith(("--config-", "-cd=", "-cp=", "-cn=")) for a in args):
        return
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from qframe.config import to_config

    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        try:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except Exception:  # noqa: BLE001 (Hydra's own composition says what is wrong, as in a run)
            return
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        to_config(cfg)


HYDRA_FILES = (".hydra", "qframe.log")  # what Hydra writes into a run directory before qframe runs


def discard_unstarted(run_dir) -> bool:
    """Remove a run directory that holds only what Hydra wrote (its config copy, the log): a run stopped by bad
    input leaves no half-written directory behind. One with anything of qframe's (a checkpoint to resume
    from, results) is kept. Returns whether it was removed."""
    import shutil

    path = Path(run_dir)
    if not path.is_dir() or any(p.name not in HYDRA_FILES for p in path.iterdir()):
        return False
    for name in HYDRA_FILES:
        target = path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:  # something appeared meanwhile: leave it
        return False
    return True


def _hydra_files(run_dir) -> list:
    return [*Path(run_dir, ".hydra").glob("*"), Path(run_dir, "qframe.log")]


def _work(run_dir) -> dict:
    """``{path: (size, mtime)}`` of what a run directory holds besides Hydra's files, at its top and one folder
    down (where a run writes: its files, checkpoints/, tensorrt/; writes are renames, which touch the folder):
    what a run's work changes, at a cost that does not grow with unrelated trees below."""
    root, hydra = Path(run_dir), {Path(run_dir, name) for name in HYDRA_FILES}
    seen = {}
    try:
        for entry in root.iterdir():
            if entry in hydra:
                continue
            for path in [entry, *(entry.iterdir() if entry.is_dir() else ())]:
                stat = path.stat()
                seen[path] = (stat.st_size, stat.st_mtime_ns)
    except OSError:  # unreadable, or changing while read: count it as work, restore nothing
        seen[root] = None
    return seen


def saved_files(run_dirs) -> dict:
    """Per existing run directory, ``(the bytes of Hydra's files in it, what else it holds)`` (:func:`_work`);
    a directory whose files cannot be read is left out (nothing of it is restored)."""
    saved = {}
    for run_dir in run_dirs:
        try:
            saved[run_dir] = ({p: p.read_bytes() for p in _hydra_files(run_dir) if p.is_file()}, _work(run_dir))
        except OSError:
            continue
    return saved


def restore_files(saved: dict) -> None:
    """Put Hydra's files of a run directory back as :func:`saved_files` read them, and remove those Hydra added,
    where the run refused its input before any work (nothing else in the directory changed): a finished run's
    record stays as it was. A run that failed after working keeps the record and the log of that work."""
    for run_dir, (files, work) in saved.items():
        if _work(run_dir) != work:
            continue
        try:
            for path in _hydra_files(run_dir):
                if path.is_file() and path not in files:
                    path.unlink(missing_ok=True)
        except OSError:
            pass
        for path, data in files.items():
            try:
                path.write_bytes(data)
            except OSError:  # a file the user can no longer write: leave it, restore the rest
                pass
        hydra = Path(run_dir, ".hydra")
        try:
            if not any(p.parent == hydra for p in files) and hydra.is_dir() and not any(hydra.iterdir()):
                hydra.rmdir()
        except OSError:
            pass


def absent_parents(named_dirs) -> set:
    """The folders above a run directory a run may make that do not exist now: those of the default
    ``runs/<date>/<time>`` and ``runs/multirun/<date>/<time>`` and of each ``hydra.run.dir`` or ``hydra.sweep.dir``
    named, up to the working directory."""
    import time

    cwd = Path.cwd().resolve()
    today = time.strftime("%Y-%m-%d")
    candidates = [cwd / "runs" / today, cwd / "runs" / "multirun" / today, *(Path(os.path.abspath(d)) for d in named_dirs)]
    absent = set()
    for path in candidates:
        for parent in [path, *path.parents]:
            if parent == cwd or os.path.exists(parent):  # Path.exists raises for a path below an unreadable folder
                break
            absent.add(str(parent))
    return absent


def remove_new_parents(run_dir, absent: set) -> None:
    """Remove the empty folders above ``run_dir`` that the run made (in ``absent``: not there before it)."""
    parent = Path(os.path.abspath(run_dir)).parent
    while str(parent) in absent:
        try:
            parent.rmdir()  # only an empty folder
        except OSError:
            return
        parent = parent.parent


def discard_empty_sweep(absent: set, existed: set) -> None:
    """In a ``--multirun`` sweep whose job was refused: a sweep directory that holds only Hydra's
    ``multirun.yaml`` (no job got further) goes too, with the empty folders above it the sweep made; not one that
    existed before the run (in ``existed``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sweep = Path(hydra_cfg.sweep.dir)
    try:
        if [p.name for p in sweep.iterdir()] != ["multirun.yaml"]:
            return
        (sweep / "multirun.yaml").unlink()
        if os.path.abspath(sweep) in existed:
            return  # a folder the user made: as empty as it was
        sweep.rmdir()
    except OSError:  # changed meanwhile, or not ours to remove: leave it
        return
    remove_new_parents(sweep, absent)


def os_error_line(exc: OSError, run_dir=None) -> str:
    """One line for a file system error: the path, the reason, and, for a path in the run directory
    (``run_dir``; None: the run directory was not made yet), the setting most likely behind it."""
    reason = exc.strerror or type(exc).__name__
    path = Path(os.path.abspath(str(exc.filename)))
    in_run = run_dir is None or path == Path(os.path.abspath(run_dir)) or Path(os.path.abspath(run_dir)) in path.parents
    hint = "; valid: a hydra.run.dir in a folder you can write to" if in_run and isinstance(
        exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError)) else ""
    return f"cannot write or read {str(exc.filename)!r}: {reason}{hint}"


def _run_dir():
    """The run directory Hydra made, or None before it made one."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.output_dir
    except Exception:  # Hydra not initialised: the error came while composing or making the run directory
        return None


def _terminate(signum, frame):
    raise KeyboardInterrupt


def interrupted(run_dir) -> str:
    """The last line of an interrupted run: what it kept and the command line that continues it."""
    run_dir = Path(run_dir)
    kept = sorted(p.name for p in run_dir.glob("*.pt")) + sorted(
        f"checkpoints/{p.name}" for p in (run_dir / "checkpoints").glob("*.pt"))
    if not kept:
        return f"interrupted before the first checkpoint; nothing in {run_dir} to resume from"
    return (f"interrupted; {run_dir} keeps {', '.join(kept)}: add train.resume=auto hydra.run.dir={run_dir} "
            "to the same command to continue from there")


def _raised_in_omegaconf(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "omegaconf" in Path(last).parts


if __name__ == "__main__":
    main()
