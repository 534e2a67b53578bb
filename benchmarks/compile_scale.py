"""Compile time, peak memory and disk of ``zcompile`` on Llama-3.2-1B / 3B / Llama-3.1-8B-shaped models.

For each size (``--sizes``), ``scale_models.py build`` writes a random-weight fp16 decoder with
PEFT-form LoRA (r 16, alpha 32) on all seven projections and one external data file, in a child
process (its time, peak RSS and disk are recorded too). Then, each in its own child process:

- copy baseline: ``cp`` of the ``.data`` file to the work disk, the source's page cache dropped
  first (``posix_fadvise(DONTNEED)``: ``/proc/sys/vm/drop_caches`` is not writable here; the
  resident bytes before and after, from ``fincore``, are recorded); ``sync`` of the copy timed
  apart. This is the baseline of the growth law "wall time within 1.5x of copying the model's
  bytes plus the verification's compute".
- ``zcompile MODEL -o OUT --strategy S --report R -q`` for every strategy (``--strategies``) and
  verification mode: the default, plus whatever ``zcompile compile --help`` offers to switch it
  (``--verify regions`` / ``--verify off`` where that flag exists, else ``--no-verify``). The
  input's page cache is dropped before each run. Recorded: exit code, wall time, peak RSS from
  the OS (``os.wait4``'s ``ru_maxrss`` of the child) and the process tree's sampled peak RSS,
  ``report.json``'s ``timings_s``, the output directory's size and files, the work disk's peak
  use during the run, and the growth ratio ``wall / (copy_s + verification_s)`` where
  ``verification_s`` sums the report's steps named ``verify*`` and ``check the * artifact*``.
- the user's alternative for merge (sizes ``--peft-sizes`` whose estimated memory fits under
  ``--rss-limit-gib``): the same model in transformers + PEFT with the same numbers,
  ``merge_and_unload()``, then ``torch.onnx.export(dynamo=True)`` with external data.

Safety: every child runs under a watchdog that polls the process tree's RSS (psutil) every
``--poll-s`` and kills the tree above ``--rss-limit-gib``, when the machine's ``MemAvailable``
falls below ``--min-available-gib``, or when the work disk's free space falls below
``--min-free-disk-gib`` (recorded as ``killed``). Free disk is checked before each size is built
(model, copy and the compile's estimated peak) and a size that does not fit is refused with a
message (exit 2 at the end). Outputs are deleted after measuring, and the work directory
(a fresh ``compile-scale-*`` directory under ``--workdir``, default ``/tmp``) is removed at the
end, unless ``--keep``.

    python benchmarks/compile_scale.py --sizes 1b --out benchmarks/results/compile_scale_1b_before.json
    python benchmarks/compile_scale.py --sizes 3b,8b --build-only         # the builder alone
    python benchmarks/compile_scale.py --quick --out /tmp/q.json           # tiny config, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import scale_models as sm  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compile_scale.json"
GIB = 1024**3
STRATEGIES = ("fuse", "merge", "strip")
# Disk the compile needs at its peak, in model sizes: the output (1x) and ONNX Runtime's optimized
# artifact (fp16 on CPU: ~1.85x, fp32 copies of the weights). Measured at 1B fp16 (commit 504fcd7):
# peak 2.87x (8.65 GB for 3.02 GB, every strategy and verification mode); 3.2 leaves a margin for
# the temporary files. Checked before a size is built; each run's measured peak is recorded.
COMPILE_DISK_FACTOR = 3.2
# The PEFT alternative holds the model (1x) and the exporter's copies: ~2.5x the weights' bytes.
PEFT_MEMORY_FACTOR = 2.5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1b", help="comma list of 1b, 3b, 8b (default 1b)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of fuse, merge, strip")
    parser.add_argument("--verify-modes", default="auto", help="auto (default + what --help offers), or a comma list of default, no-verify, full, regions, off")
    parser.add_argument("--peft-sizes", default="1b,3b", help="sizes that also run PEFT merge_and_unload + dynamo export, if they fit in memory ('' for none)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="a fresh compile-scale-* directory is made (and removed) here")
    parser.add_argument("--keep", action="store_true", help="keep the models, outputs and the work directory")
    parser.add_argument("--quick", action="store_true", help="a tiny config (hidden 64, 2 layers), all strategies, seconds")
    parser.add_argument("--build-only", action="store_true", help="only build each size (measure the builder), no compile")
    parser.add_argument("--rss-limit-gib", type=float, default=20.0, help="kill a child whose process tree exceeds this RSS (default 20)")
    parser.add_argument("--min-available-gib", type=float, default=1.0, help="kill a child when MemAvailable falls below this (default 1)")
    parser.add_argument("--min-free-disk-gib", type=float, default=2.0, help="kill a child when the work disk's free space falls below this (default 2)")
    parser.add_argument("--poll-s", type=float, default=0.2, help="watchdog polling interval")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="kill a child running longer than this")
    parser.add_argument("--zflora-rev", help="compile with this git revision's zflora_compile (a git archive snapshot on PYTHONPATH) instead of the working tree's")
    parser.add_argument("--target", default="ort", help="zcompile --target (default ort; onnx: no engine build, the verified model only)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.sizes = ["tiny"] if args.quick else _list(args.sizes, ("1b", "3b", "8b"), parser, "--sizes")
    args.strategies = _list(args.strategies, STRATEGIES, parser, "--strategies")
    args.peft_sizes = ["tiny"] if args.quick else _list(args.peft_sizes, ("1b", "3b", "8b"), parser, "--peft-sizes", empty_ok=True)
    return args


def _list(text: str, allowed, parser, flag: str, empty_ok: bool = False) -> list[str]:
    items = [item.strip().lower() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or (not items and not empty_ok):
        parser.error(f"{flag}: expected a comma list of {', '.join(allowed)}; got {text!r}")
    return items


# ------------------------------------------------------------------------------- the watchdog


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (psutil; /proc VmRSS without it)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the environment
        return _proc_tree_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _proc_tree_rss(pid: int) -> int:  # pragma: no cover - fallback
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        stack.extend(children.get(current, []))
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def run_guarded(cmd: list[str], args, *, disk: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group under the watchdog; what the OS says about it.

    ``max_rss_gib``: ``/usr/bin/time -v``'s "Maximum resident set size" of the command (the
    kernel's high-water mark, from ``wait4`` in ``time``, a small process: Linux carries a
    process's peak across ``exec``, so ``wait4`` here would report at least this Python's own RSS
    at fork); without ``/usr/bin/time``, ``ru_maxrss`` from ``os.wait4`` (``rss_source`` says which);
    ``tree_peak_rss_gib``: the largest sampled RSS sum over the process tree; ``disk_peak_gib``:
    the largest drop of the work disk's free space during the run (other users of the disk
    count too); ``killed``: why the watchdog ended it, if it did."""
    timer = Path("/usr/bin/time")
    time_file = log.with_suffix(".time")
    if timer.exists():
        cmd = [str(timer), "-v", "-o", str(time_file), *cmd]
    disk_start = free_disk(disk)
    peak_tree, min_free, min_avail, killed = 0, disk_start, mem_available(), None
    timeline: list[list[float]] = []  # [seconds, GiB]: the largest sample of each second
    started = time.perf_counter()
    with open(log, "wb") as sink:
        # cwd: the work disk, so that no child imports zflora_compile from the current directory
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env or child_env(), cwd=disk)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, avail, free = tree_rss(proc.pid), mem_available(), free_disk(disk)
            peak_tree, min_free, min_avail = max(peak_tree, rss), min(min_free, free), min(min_avail, avail)
            _sample(timeline, time.perf_counter() - started, rss)
            reason = _kill_reason(rss, avail, free, time.perf_counter() - started, args)
            if reason and killed is None:
                killed = reason
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group this call started, by its id
            time.sleep(args.poll_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    timed = _time_v_max_rss(time_file)
    return {
        "cmd": [str(c) for c in cmd],
        "exit_code": _exit_code(proc.returncode, time_file),
        "wall_s": round(wall, 3),
        "max_rss_gib": round((timed if timed is not None else usage.ru_maxrss * 1024) / GIB, 3),
        "rss_source": "/usr/bin/time -v" if timed is not None else "os.wait4 ru_maxrss",
        "tree_peak_rss_gib": round(peak_tree / GIB, 3),
        "min_mem_available_gib": round(min_avail / GIB, 3),
        "disk_peak_gib": round((disk_start - min_free) / GIB, 3),
        "killed": killed,
        "rss_timeline": timeline,
        "log_tail": log.read_text(errors="replace")[-2000:],
    }


def _sample(timeline: list, elapsed: float, rss: int) -> None:
    """Keep one point per whole second: the largest tree RSS sampled in it."""
    second, gib = float(int(elapsed)), round(rss / GIB, 3)
    if timeline and timeline[-1][0] == second:
        timeline[-1][1] = max(timeline[-1][1], gib)
    else:
        timeline.append([second, gib])


def step_peaks(timeline: list, timings: dict, wall: float) -> dict:
    """Approximate peak tree RSS (GiB) per report step, from the per-second timeline: the steps
    run back to back, the first starting ``wall - total`` seconds in (interpreter start and
    imports; exit counted there too, so windows may start up to ~1 s early); a step's peak is the
    largest sample whose second overlaps its window."""
    steps = [(k, v) for k, v in timings.items() if k != "total"]
    if not steps or not timeline or "total" not in timings:
        return {}
    clock, peaks = max(0.0, wall - timings["total"]), {}
    for name, seconds in steps:
        window = [gib for second, gib in timeline if second + 1 > clock and second < clock + seconds]
        peaks[name] = max(window) if window else None
        clock += seconds
    return peaks


def _time_v_max_rss(path: Path) -> int | None:
    """Bytes of "Maximum resident set size (kbytes)" in a ``/usr/bin/time -v`` output file."""
    with contextlib.suppress(OSError, ValueError):
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
        return int(found.group(1)) * 1024 if found else None
    return None


def _exit_code(code: int, time_file: Path) -> int:
    """The command's exit code: ``time`` passes it on; a command killed by signal N shows as
    ``time``'s 128 + N ("Command terminated by signal N"), reported here as -N like Popen's."""
    with contextlib.suppress(OSError):
        found = re.search(r"Command terminated by signal (\d+)", time_file.read_text())
        if found:
            return -int(found.group(1))
    return code


def _kill_reason(rss: int, avail: int, free: int, elapsed: float, args) -> str | None:
    if rss > args.rss_limit_gib * GIB:
        return f"killed at {rss / GIB:.1f} GiB RSS (limit {args.rss_limit_gib} GiB)"
    if avail < args.min_available_gib * GIB:
        return f"killed at {rss / GIB:.1f} GiB RSS: MemAvailable {avail / GIB:.2f} GiB < {args.min_available_gib} GiB"
    if free < args.min_free_disk_gib * GIB:
        return f"killed at {rss / GIB:.1f} GiB RSS: free disk {free / GIB:.2f} GiB < {args.min_free_disk_gib} GiB"
    if elapsed > args.timeout_s:
        return f"killed after {elapsed:.0f} s (timeout)"
    return None


# --------------------------------------------------------------------------- page cache, copy


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``), or None."""
    tool = shutil.which("fincore")
    if not tool:
        return None
    try:
        out = subprocess.run([tool, "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True, text=True, timeout=60)
        return int(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def drop_cache(*paths: Path) -> dict:
    """``posix_fadvise(DONTNEED)`` on each file (written and fsynced: its pages are clean)."""
    before = sum(resident_bytes(p) or 0 for p in paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    after = sum(resident_bytes(p) or 0 for p in paths)
    return {"method": "posix_fadvise DONTNEED", "resident_before_gib": round(before / GIB, 3), "resident_after_gib": round(after / GIB, 3)}


def copy_baseline(data: Path, workdir: Path, args) -> dict:
    """``cp`` of the model's data file (source cache dropped), then ``sync`` of the copy, timed apart."""
    target = workdir / "copy" / data.name
    target.parent.mkdir(parents=True, exist_ok=True)
    cache = drop_cache(data)
    run = run_guarded(["cp", str(data), str(target)], args, disk=workdir, log=workdir / "copy.log")
    start = time.perf_counter()
    subprocess.run(["sync", str(target)], check=False)
    sync_s = time.perf_counter() - start
    size = target.stat().st_size if target.exists() else 0
    shutil.rmtree(target.parent, ignore_errors=True)
    return {"bytes": size, "cp_s": run["wall_s"], "sync_s": round(sync_s, 3), "cp_plus_sync_s": round(run["wall_s"] + sync_s, 3),
            "exit_code": run["exit_code"], "max_rss_gib": run["max_rss_gib"], "page_cache": cache}


# ----------------------------------------------------------------------------- zcompile runs


CHILD_ENV: dict[str, str] = dict(os.environ)  # what children run with; --zflora-rev adds PYTHONPATH


def snapshot_source(rev: str, workdir: Path) -> dict:
    """``git archive REV zflora_compile`` under ``workdir/src``, first on the children's
    PYTHONPATH (before the editable install's finder, which sits at the end of sys.meta_path)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True, check=True).stdout.strip()
    src = workdir / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "zflora_compile"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    CHILD_ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    return {"rev": rev, "commit": commit, "path": str(src)}


def child_env(**extra) -> dict:
    return dict(CHILD_ENV, **extra)


def zcompile_exe() -> list[str]:
    exe = Path(sys.executable).parent / "zcompile"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zflora_compile.cli"]


def verify_modes(requested: str) -> tuple[list[str], str]:
    """The verification modes to run and the help text they were read from: ``default`` plus
    ``regions`` / ``off`` when ``--verify {...}`` is offered, else ``no-verify``."""
    help_text = subprocess.run([*zcompile_exe(), "compile", "--help"], capture_output=True, text=True, env=child_env(), cwd=tempfile.gettempdir()).stdout
    found = re.search(r"--verify\s*\{([^}]*)\}", help_text)
    choices = found.group(1).split(",") if found else []
    if requested != "auto":
        return [m.strip() for m in requested.split(",") if m.strip()], help_text
    if choices:
        return ["default"] + [m for m in ("regions", "off") if m in choices], help_text
    return (["default", "no-verify"] if "--no-verify" in help_text else ["default"]), help_text


def verify_flags(mode: str) -> list[str]:
    if mode == "default":
        return []
    if mode == "no-verify":
        return ["--no-verify"]
    return ["--verify", mode]


def dir_files(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def verification_seconds(timings: dict) -> float:
    """The report's verification steps: ``verify*`` and the target artifact's check."""
    return sum(v for k, v in timings.items() if k.startswith("verify") or (k.startswith("check the") and "artifact" in k))


def compile_run(model: Path, strategy: str, mode: str, workdir: Path, args, copy_s: float | None) -> dict:
    """One ``zcompile`` child, page cache of the input dropped first; its record."""
    tag = f"{strategy}-{mode}"
    out, report_path = workdir / f"out-{tag}", workdir / f"report-{tag}.json"
    cache = drop_cache(model, model.with_name(sm.DATA_NAME))
    env = child_env(TMPDIR=str(workdir / "tmp"))
    (workdir / "tmp").mkdir(exist_ok=True)
    cmd = [*zcompile_exe(), str(model), "-o", str(out), "--strategy", strategy, "--target", args.target, "--report", str(report_path), "-q", *verify_flags(mode)]
    run = run_guarded(cmd, args, disk=workdir, log=workdir / f"{tag}.log", env=env)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    files = dir_files(out)
    timings = report.get("timings_s", {})
    record = {"strategy": strategy, "verify": mode, **run, "page_cache": cache, "timings_s": timings,
              "step_peak_rss_gib": step_peaks(run["rss_timeline"], timings, run["wall_s"]),
              "verification": _verification_summary(report), "artifact_check": _artifact_check_summary(report), "status": report.get("status"),
              "output_bytes": sum(files.values()), "output_files": files}
    if copy_s:
        record["verification_s"] = round(verification_seconds(timings), 3)
        record["growth_ratio"] = round(run["wall_s"] / (copy_s + record["verification_s"]), 3)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(workdir / "tmp", ignore_errors=True)
    return record


def _verification_summary(report: dict) -> dict | None:
    verification = report.get("verification")
    if not isinstance(verification, dict):
        return None
    keep = ("passed", "skipped", "reason", "max_abs_diff", "mode", "cases")
    summary = {k: verification[k] for k in keep if k in verification and not isinstance(verification[k], (list, dict))}
    return summary or {"keys": sorted(verification)}


def _artifact_check_summary(report: dict) -> dict | None:
    """How the target's artifact was checked: mode (full or regions), why, passed."""
    check = (report.get("target") or {}).get("check")
    if not isinstance(check, dict):
        return None
    return {k: check[k] for k in ("mode", "mode_reason", "passed", "skipped") if k in check}


def peft_run(size: str, cfg, workdir: Path, args) -> dict:
    """``scale_models.py peft-merge`` in a child: PEFT merge_and_unload + dynamo export, its phases."""
    estimate = sm.model_bytes(cfg) * PEFT_MEMORY_FACTOR
    if size not in args.peft_sizes:
        return {"skipped": f"{size} not in --peft-sizes"}
    if estimate > args.rss_limit_gib * GIB:
        return {"skipped": f"estimated {estimate / GIB:.1f} GiB (~{PEFT_MEMORY_FACTOR}x the weights) > --rss-limit-gib {args.rss_limit_gib}"}
    out, result = workdir / "peft-merged", workdir / "peft-result.json"
    cmd = [sys.executable, str(HERE / "scale_models.py"), "peft-merge", "--size", size, "--dtype", cfg.dtype, "--out", str(out), "--result", str(result)]
    run = run_guarded(cmd, args, disk=workdir, log=workdir / "peft.log", env=child_env(TMPDIR=str(workdir)))
    phases = json.loads(result.read_text()) if result.exists() else {}
    files = dir_files(out)
    record = {**run, "phases_s": phases.get("phases_s", {}), "output_bytes": sum(files.values()), "output_files": files}
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------- per size


def disk_needed(cfg, build_only: bool, target: str = "ort") -> int:
    """Bytes a size needs on the work disk: the model, and unless ``build_only`` the larger of its
    copy (deleted before the compiles) and the compile's estimated peak (:data:`COMPILE_DISK_FACTOR`;
    each output is deleted before the next run; ``--target onnx`` writes about the model once more)."""
    return int(sm.model_bytes(cfg) * (1 if build_only else 1 + max(1.0, COMPILE_DISK_FACTOR if target != "onnx" else 1.05)))


def measure_size(size: str, workdir: Path, args, modes: list[str], console) -> dict:
    """Build, copy baseline, compile runs and the PEFT alternative for one size."""
    cfg = sm.SIZES[size].with_(dtype=args.dtype)
    entry = {"size": size, "config": dict(cfg.__dict__, head_dim=cfg.head_dim, tied_head=False),
             "parameters": sm.parameter_count(cfg), "weight_bytes": sm.model_bytes(cfg)}
    need, free = disk_needed(cfg, args.build_only, args.target), free_disk(workdir)
    if need + args.min_free_disk_gib * GIB > free:
        entry["refused"] = (f"{size}: needs ~{need / GIB:.1f} GiB on the disk of {args.workdir} (model {sm.model_bytes(cfg) / GIB:.1f} GiB"
                            f"{'' if args.build_only else f', and the compile at ~{COMPILE_DISK_FACTOR}x the model'}) "
                            f"+ {args.min_free_disk_gib} GiB margin; {free / GIB:.1f} GiB free")
        console.print(f"[red]refused[/red] {entry['refused']}")
        return entry
    model_dir = workdir / f"model-{size}"
    console.print(f"[bold]{size}[/bold]: building {entry['parameters'] / 1e9:.2f} B parameters ({cfg.dtype}) ...")
    cmd = [sys.executable, str(HERE / "scale_models.py"), "build", "--size", size, "--dtype", cfg.dtype, "--out", str(model_dir)]
    entry["build"] = run_guarded(cmd, args, disk=workdir, log=workdir / f"build-{size}.log")
    entry["build"]["disk_bytes"] = sum(dir_files(model_dir).values())
    model = model_dir / "model.onnx"
    if entry["build"]["exit_code"] != 0 or args.build_only:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
        return entry
    console.print(f"{size}: copy baseline ...")
    entry["copy"] = copy_baseline(model_dir / sm.DATA_NAME, workdir, args)
    entry["runs"] = []
    for strategy in args.strategies:
        for mode in modes:
            console.print(f"{size}: zcompile --strategy {strategy} ({mode}) ...")
            entry["runs"].append(compile_run(model, strategy, mode, workdir, args, entry["copy"]["cp_s"]))
            _print_run(console, entry["runs"][-1])
    console.print(f"{size}: PEFT merge_and_unload + dynamo export ...")
    entry["peft_alternative"] = peft_run(size, cfg, workdir, args)
    if not args.keep:
        shutil.rmtree(model_dir, ignore_errors=True)
    return entry


def _print_run(console, run: dict) -> None:
    state = run["killed"] or f"exit {run['exit_code']}"
    console.print(f"  {state}, {run['wall_s']:.1f} s, peak RSS {run['max_rss_gib']:.2f} GiB, output {run['output_bytes'] / 1e9:.2f} GB")


# ------------------------------------------------------------------------------------- output


def versions() -> dict:
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime

    import zflora_compile

    found = {"zflora_compile": zflora_compile.__version__, "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
             "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0]}
    from importlib import metadata

    for name in ("torch", "transformers", "peft", "psutil"):  # not imported: this process stays small
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "zflora_compile"], capture_output=True, text=True).stdout
        found["zflora_compile_uncommitted"] = [line[3:] for line in status.splitlines()]  # the editable install runs these too
        if found["zflora_compile_uncommitted"]:
            found["zflora_compile_worktree_sha256"] = worktree_digest()
    return found


def worktree_digest() -> str:
    """sha256 over ``zflora_compile/**/*.py`` and ``*.json`` as they are on disk (names and bytes):
    identifies an uncommitted state of the package the children ran."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "zflora_compile").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".json"):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def table(results: dict):
    from rich.table import Table

    tab = Table(title="zcompile at scale (wall s, peak RSS from the OS)")
    for col in ("size", "method", "verify", "exit", "wall s", "peak RSS GiB", "output GB", "verify s", "x (copy+verify)", "note"):
        tab.add_column(col, justify="right" if col not in ("size", "method", "verify", "note") else "left")
    for entry in results["sizes"]:
        size = entry["size"]
        if "refused" in entry:
            tab.add_row(size, "-", "-", "-", "-", "-", "-", "-", "-", "refused: disk")
            continue
        build = entry["build"]
        tab.add_row(size, "build (scale_models)", "-", str(build["exit_code"]), f"{build['wall_s']:.1f}", f"{build['max_rss_gib']:.2f}",
                    f"{build['disk_bytes'] / 1e9:.2f}", "-", "-", build["killed"] or "")
        if "copy" in entry:
            copy = entry["copy"]
            tab.add_row(size, "cp .data (cold)", "-", str(copy["exit_code"]), f"{copy['cp_s']:.1f}", f"{copy['max_rss_gib']:.2f}",
                        f"{copy['bytes'] / 1e9:.2f}", "-", "-", f"+ sync {copy['sync_s']:.1f} s")
        for run in entry.get("runs", []):
            tab.add_row(size, f"zcompile {run['strategy']}", run["verify"], str(run["exit_code"]), f"{run['wall_s']:.1f}", f"{run['max_rss_gib']:.2f}",
                        f"{run['output_bytes'] / 1e9:.2f}", f"{run.get('verification_s', 0):.1f}", f"{run.get('growth_ratio', 0):.2f}", run["killed"] or "")
        peft = entry.get("peft_alternative")
        if peft and "skipped" not in peft:
            phases = peft["phases_s"]
            note = f"merge {phases.get('merge_and_unload_s', 0):.1f} s, export {phases.get('export_s', 0):.1f} s"
            tab.add_row(size, "PEFT merge+export", "-", str(peft["exit_code"]), f"{peft['wall_s']:.1f}", f"{peft['max_rss_gib']:.2f}",
                        f"{peft['output_bytes'] / 1e9:.2f}", "-", "-", peft["killed"] or note)
        elif peft:
            tab.add_row(size, "PEFT merge+export", "-", "-", "-", "-", "-", "-", "-", peft["skipped"])
    return tab


def main(argv=None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    from zflora_compile.latency import machine_info

    console = Console(width=200)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="compile-scale-", dir=args.workdir))
    started = time.perf_counter()
    try:
        source = snapshot_source(args.zflora_rev, workdir) if args.zflora_rev else {"rev": None, "path": "the installed zflora_compile (working tree)"}
        modes, help_text = ([], "") if args.build_only else verify_modes(args.verify_modes)
        results = {"benchmark": "compile_scale", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "zflora_source": source, "verify_modes": modes,
                   "verify_flags_in_help": re.findall(r"--(?:no-)?verify\b[^\n]*", help_text),
                   "compile_disk_factor": COMPILE_DISK_FACTOR, "peft_memory_factor": PEFT_MEMORY_FACTOR,
                   "machine": machine_info(), "versions": versions(),
                   "growth_ratio_definition": "wall_s / (copy.cp_s + verification_s); verification_s = report steps 'verify*' + 'check the * artifact*'",
                   "workdir": str(workdir), "sizes": []}
        for size in args.sizes:
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim]", end=" ")
            results["sizes"].append(measure_size(size, workdir, args, modes, console))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - started, 1)
    with contextlib.suppress(OSError):
        results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(table(results))
    console.print(f"saved {args.out}")
    return 2 if any("refused" in e for e in results["sizes"]) else 0


if __name__ == "__main__":
    sys.exit(main())
