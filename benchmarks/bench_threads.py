"""BLAS threads under load: `minilora demo --quick` alone and beside one busy process, on BLAS's default threads and
on the project's default of one thread.

    python benchmarks/bench_threads.py                    # 2 repetitions of each of the 4 cases
    python benchmarks/bench_threads.py --repeats 1 --json runs/bench_threads.json

Cases: {BLAS default threads (`minilora --threads 0`), one thread (the default)} x {quiet, busy neighbour}. The
neighbour is one Python process spinning in a loop (bounded: it stops by itself after --neighbour-max-s, and is
ended as soon as the case is measured). Every case runs the whole command as a subprocess and times its wall
clock; the cases run interleaved, round by round, so that a change in the machine's other load hits them alike.
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and MKL_NUM_THREADS are removed from the children's environment, so "default"
means the BLAS library's own choice (usually one thread per core).

The goal: with one busy neighbour the run takes at most 2x its quiet time. On a shared machine the "quiet" cases
are only as quiet as the other users allow; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
CASES = [("default", "quiet"), ("default", "busy"), ("1", "quiet"), ("1", "busy")]
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_kind() -> dict:
    """CPU model, core count and AVX-512 extensions (what `grep -o 'avx512[a-z]*' /proc/cpuinfo | sort -u` shows)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return {"model": model.group(1).strip() if model else platform.processor(), "cores": os.cpu_count(),
            "avx512": sorted(set(re.findall(r"\bavx512[a-z]*", text)))}


def numpy_blas() -> list:
    """NumPy's BLAS as threadpoolctl sees it in a fresh interpreter (name, version, kernel, default threads)."""
    code = ("import json, numpy; from threadpoolctl import threadpool_info; print(json.dumps([{k: p.get(k) for k in "
            "('internal_api', 'version', 'architecture', 'threading_layer', 'num_threads')} for p in "
            "threadpool_info() if p.get('user_api') == 'blas']))")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                     check=True).stdout)


def run_case(threads: str, neighbour: str, out: Path, neighbour_max_s: float) -> float:
    """Wall seconds of one `minilora demo --quick` run; with neighbour="busy" one spinning process runs beside it."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    argv = [sys.executable, "-m", "minilora", "--threads", "0" if threads == "default" else threads, "demo",
            "--quick", "--no-progress", "--out", str(out)]
    spinner = None
    if neighbour == "busy":
        spinner = subprocess.Popen([sys.executable, "-c", SPIN, str(neighbour_max_s)])
    try:
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.wait()
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="runs of each case (interleaved)")
    p.add_argument("--neighbour-max-s", type=float, default=900.0, help="the busy process stops by itself after this")
    p.add_argument("--json", default=None, help="also write the results here (atomically)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    info = {"cpu": cpu_kind(), "numpy_blas": numpy_blas(), "python": platform.python_version(),
            "load_average_before": os.getloadavg()}
    print(f"CPU: {info['cpu']['model']}, {info['cpu']['cores']} cores, AVX-512: "
          f"{' '.join(info['cpu']['avx512']) or 'none'}")
    for b in info["numpy_blas"]:
        print(f"NumPy BLAS: {b['internal_api']} {b['version']} ({b['architecture']}, {b['threading_layer']}), "
              f"default threads {b['num_threads']}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in info['load_average_before'])}")
    times = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        for rep in range(args.repeats):
            for i, (threads, neighbour) in enumerate(CASES):
                wall = run_case(threads, neighbour, Path(tmp) / f"r{rep}-{i}", args.neighbour_max_s)
                times[(threads, neighbour)].append(wall)
                print(f"  round {rep + 1}: threads={threads:<7} {neighbour:<5} {wall:6.1f} s", flush=True)
    info["load_average_after"] = os.getloadavg()
    med = {case: statistics.median(v) for case, v in times.items()}
    print(f"load average after: {' '.join(f'{x:.2f}' for x in info['load_average_after'])}\n")
    print("| BLAS threads | quiet (s) | beside one busy process (s) | busy / quiet |")
    print("|---|---:|---:|---:|")
    rows = []
    for threads in ("default", "1"):
        q, b = med[(threads, "quiet")], med[(threads, "busy")]
        label = f"library default ({info['numpy_blas'][0]['num_threads'] if info['numpy_blas'] else '?'})" \
            if threads == "default" else "1 (minilora's default)"
        print(f"| {label} | {q:.1f} | {b:.1f} | {b / q:.2f}x |")
        rows.append({"threads": threads, "quiet_s": times[(threads, "quiet")], "busy_s": times[(threads, "busy")],
                     "quiet_median_s": q, "busy_median_s": b, "ratio": b / q})
    ok = med[("1", "busy")] <= 2 * med[("1", "quiet")]
    print(f"\ngoal (busy <= 2x quiet on the default of one thread): {'met' if ok else 'NOT met'}")
    if args.json:
        from minilora.io import save_json
        save_json(args.json, {**info, "repeats": args.repeats, "cases": rows, "goal_met": ok})
    return 0


if __name__ == "__main__":
    sys.exit(main())
