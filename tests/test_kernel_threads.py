"""One thread pool per process: the native CPU kernel runs on torch's own OpenMP threads.

The kernel's parallel loops are OpenMP regions of the runtime torch has loaded, so a model
forward (torch ops, then the kernel, then torch again) uses one set of threads, sized by
``torch.set_num_threads``. These tests watch the process itself: its threads
(``/proc/self/task``), the CPU time of each (``/proc/self/task/<tid>/stat``), the libraries
mapped (``/proc/self/maps``), and a fork. The thread accounting runs in fresh processes,
whose threads are only those of torch and the kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

from w4a8moe.kernels import cpu as cpu_mod
from w4a8moe.kernels.base import PackedExpertWeights
from w4a8moe.quant import dynamic_quant_per_token, pack_int4_pairs

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")


def _native_or_skip() -> cpu_mod.CpuBackend:
    try:
        return cpu_mod.CpuBackend("native")
    except cpu_mod.KernelBuildError as exc:
        pytest.skip(f"the CPU kernel cannot be built here: {exc}")


def _openmp_kernel_or_skip() -> cpu_mod.CpuBackend:
    backend = _native_or_skip()
    if backend.kernel.openmp_runtime is None:
        pytest.skip(f"torch's OpenMP runtime is not usable here: {cpu_mod.torch_openmp_runtime()[1]}")
    return backend


def _openmp_runtimes_in_maps() -> set[str]:
    # Independent of the module's scan: every mapped file whose name says OpenMP runtime.
    found = set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            path = line.split(maxsplit=5)[5].strip() if len(line.split(maxsplit=5)) == 6 else ""
            name = os.path.basename(path)
            if path.startswith("/") and any(name.startswith(p) for p in ("libgomp", "libiomp", "libomp")) \
                    and ".so" in name and "plugin" not in name:
                found.add(os.path.realpath(path))
    return found


def test_runtime_name_pattern():
    match = cpu_mod._OPENMP_RUNTIME_NAME.match
    for name in ("libgomp.so.1", "libgomp-a34b3233.so.1", "libgomp.so", "libiomp5.so", "libomp.so", "libomp.so.5"):
        assert match(name), name
    for name in ("libgomp-plugin-nvptx.so.1", "libgompx.so", "libtorch_cpu.so", "libomptarget.so"):
        assert not match(name), name


def test_kernel_is_bound_to_torchs_runtime_and_only_one_is_mapped():
    backend = _openmp_kernel_or_skip()
    runtime, _ = cpu_mod.torch_openmp_runtime()
    assert os.path.realpath(backend.kernel.openmp_runtime) == runtime
    # The kernel brought no runtime of its own (such as the compiler's libgomp): one in all.
    assert _openmp_runtimes_in_maps() == {runtime}
    # And it is the one torch's thread count lives in.
    assert cpu_mod._runtime_max_threads(runtime) == torch.get_num_threads()


def test_team_follows_torch_set_num_threads():
    backend = _openmp_kernel_or_skip()
    saved = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            team = backend.kernel.team(backend.num_threads)
            assert len(team) == n and len(set(team)) == n
            assert team[0] == threading.get_native_id()  # the caller works too
    finally:
        torch.set_num_threads(saved)


# ---- fresh processes: which threads exist, and which do the work ---------------------------

_PRELUDE = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    from w4a8moe.kernels import cpu
    from w4a8moe.kernels.base import PackedExpertWeights
    from w4a8moe.quant import dynamic_quant_per_token, pack_int4_pairs

    def tasks():
        return sorted(int(t) for t in os.listdir("/proc/self/task"))

    def cpu_ticks(tid):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime

    torch.set_num_threads(1)  # the setup starts no thread: each test counts from its own start
    try:
        backend = cpu.CpuBackend("native")
    except cpu.KernelBuildError as exc:
        print("SKIP", exc)
        sys.exit(0)
    if backend.kernel.openmp_runtime is None:
        print("SKIP serial build:", cpu.torch_openmp_runtime()[1])
        sys.exit(0)
    g = torch.Generator().manual_seed(0)
    E, H, I, M, K = 8, 1024, 512, 16, 4
    weights = PackedExpertWeights(
        pack_int4_pairs(torch.randint(-8, 8, (E, 2 * I, H), dtype=torch.int8, generator=g)),
        torch.rand(E, 2 * I, generator=g) * 0.02 + 1e-4,
        pack_int4_pairs(torch.randint(-8, 8, (E, H, I), dtype=torch.int8, generator=g)),
        torch.rand(E, H, generator=g) * 0.02 + 1e-4)
    prepared = backend.prepare(weights)
    x_q, x_scale = dynamic_quant_per_token(torch.randn(M, H, generator=g))
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]).reshape(-1)
    order = torch.argsort(ids, stable=True)
    token_ids = torch.div(order, K, rounding_mode="floor")
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(ids, minlength=E), 0)
    alpha = torch.linspace(0.5, 1.0, E)
    row_weights = torch.rand(M * K, generator=g)
    x_big = torch.randn(512, 1024, generator=g)
    linear = backend.prepare_int8_linear(torch.randint(-127, 128, (1024, 1024), dtype=torch.int8, generator=g),
                                         torch.rand(1024, generator=g))

    def kernel_calls():
        out = backend.combined_forward(prepared, x_q, x_scale, token_ids, offsets, alpha, row_weights)
        bq, bs = backend.quantize_per_token(x_big)
        backend.int8_linear(linear, bq, bs)
        return out

    def torch_parallel_op():
        torch.randn(2048, 2048).mul_(1.5)  # above torch's grain size: an OpenMP region
""")


def _run(body: str, *args: str, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body), *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_THREAD_COUNT = """
    n, torch_first = int(sys.argv[1]), sys.argv[2] == "torch-first"
    torch.set_num_threads(n)
    stages = {"start": tasks()}
    for name, fn in ((("torch", torch_parallel_op), ("kernel", kernel_calls)) if torch_first
                     else (("kernel", kernel_calls), ("torch", torch_parallel_op))):
        for _ in range(3):
            fn()
        stages[name] = tasks()
    for _ in range(3):
        torch_parallel_op(); kernel_calls()
    stages["alternating"] = tasks()
    print(json.dumps(stages))
"""


@pytest.mark.parametrize("order", ["torch-first", "kernel-first"])
@pytest.mark.parametrize("n", [2, 3])
def test_kernel_adds_no_threads_to_torchs_pool(order, n):
    # A separate pool (the old pthread helpers) shows as threads beyond torch's own.
    stages = _run(_THREAD_COUNT, str(n), order)
    first, second = ("torch", "kernel") if order == "torch-first" else ("kernel", "torch")
    grown = set(stages[first]) - set(stages["start"])
    assert len(grown) == n - 1, stages  # the OpenMP team: the caller and n - 1 threads
    assert stages[second] == stages[first], stages
    assert stages["alternating"] == stages[first], stages


_WHO_WORKS = """
    torch.set_num_threads(2)
    torch_parallel_op()
    main = threading.get_native_id()
    pool = [t for t in tasks() if t != main]
    result = {"pool": pool, "main": main}
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        before = {t: cpu_ticks(t) for t in tasks()}
        start = time.process_time()
        calls = 0
        while time.process_time() - start < 0.6 or calls < 20:
            kernel_calls()
            calls += 1
        result[f"team{n}-" + str(len([k for k in result if k.startswith(f"team{n}-")]))] = {
            str(t): cpu_ticks(t) - before.get(t, 0) for t in tasks()}
        result.setdefault("teams", []).append(backend.kernel.team(backend.num_threads))
    print(json.dumps(result))
"""


def test_kernel_honours_torch_set_num_threads_at_each_call():
    result = _run(_WHO_WORKS)
    main, pool = result["main"], result["pool"]
    assert result["teams"][0] == [main] and result["teams"][2] == [main]
    assert len(result["teams"][1]) == 2 and set(result["teams"][1]) - {main} <= set(pool)
    for key in ("team1-0", "team1-1"):
        ticks = {int(t): v for t, v in result[key].items()}
        # One thread: only the caller burns CPU (torch's idle pool threads sleep).
        assert ticks[main] >= 30, result  # >= 0.3 s in clock ticks
        assert sum(v for t, v in ticks.items() if t != main) <= 0.1 * ticks[main] + 2, result
    ticks = {int(t): v for t, v in result["team2-0"].items()}
    # Two threads: torch's pool thread takes part of the work (and no other thread exists).
    assert set(ticks) == {main, *pool}
    assert sum(v for t, v in ticks.items() if t != main) > 0, result


_FORK = """
    torch.set_num_threads(2)
    expect = kernel_calls().numpy().tobytes()  # the parent ran a two-thread team
    assert len(backend.kernel.team(2)) == 2
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # no torch parallel op here: libgomp would hang in it (torch's own limit)
        os.close(read_fd)
        got = kernel_calls().numpy().tobytes()
        os.write(write_fd, json.dumps({"same": got == expect, "team": len(backend.kernel.team(2))}).encode())
        os._exit(0)
    os.close(write_fd)
    deadline, done = time.time() + 60, False
    while not done and time.time() < deadline:
        done = os.waitpid(pid, os.WNOHANG) != (0, 0)
        time.sleep(0.05)
    if not done:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    child = json.loads(os.read(read_fd, 4096) or b"{}")
    print(json.dumps({"hung": not done, **child}))
"""


def test_kernel_runs_in_a_forked_child():
    # GNU libgomp cannot start a team in a child forked after the parent ran one; the kernel
    # must notice and run serially (same bits) rather than hang, as vLLM may fork workers.
    result = _run(_FORK)
    assert result == {"hung": False, "same": True, "team": 1}


_SECOND_RUNTIME = """
import ctypes, json, sys
import torch
torch.set_num_threads(2)
torch.randn(2048, 2048).mul_(1.5)  # torch's runtime is up, with its team
ctypes.CDLL(sys.argv[1])  # a second runtime, as a wheel's bundled libgomp brings one (vLLM: sentencepiece's)
torch.set_num_threads = lambda n: None  # as vLLM's CPU worker does once it has bound its threads
from w4a8moe.kernels import cpu
path, why = cpu.torch_openmp_runtime()
print(json.dumps({"path": path, "why": why, "mapped": cpu._mapped_openmp_runtimes(), "threads": torch.get_num_threads()}))
"""


def test_torchs_runtime_found_beside_a_second_one_without_torch_set_num_threads():
    compiler = cpu_mod._compiler()
    if compiler is None:
        pytest.skip("no C compiler: no second libgomp to load")
    other = os.path.realpath(subprocess.run([compiler, "-print-file-name=libgomp.so.1"], capture_output=True,
                                            text=True).stdout.strip())
    if not os.path.isfile(other) or os.path.dirname(torch.__file__) in other:
        pytest.skip(f"no libgomp apart from torch's: {other!r}")
    proc = subprocess.run([sys.executable, "-c", _SECOND_RUNTIME, other], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert other in [os.path.realpath(p) for p in result["mapped"]] and len(result["mapped"]) == 2, result
    assert result["path"] is not None and result["path"] != other, result
    assert result["threads"] == 2, result  # the probe left the count as it was


def test_serial_build_where_torchs_runtime_is_not_found(monkeypatch):
    backend = _native_or_skip()
    three_threads = cpu_mod.CpuBackend("native", num_threads=3)
    monkeypatch.setattr(cpu_mod, "torch_openmp_runtime", lambda: (None, "pretend: no OpenMP runtime"))
    monkeypatch.setattr(cpu_mod, "_WARNED_SERIAL", False)
    cpu_mod.load_kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            serial = cpu_mod.CpuBackend("native")
        assert [str(w.message) for w in caught if "single-threaded" in str(w.message)] == [
            "w4a8moe: the CPU kernel runs single-threaded: pretend: no OpenMP runtime"]
        assert serial.kernel.openmp_runtime is None and serial.kernel.path != backend.kernel.path
        assert serial.kernel.team(4) == [threading.get_native_id()]
        # The same bits as the OpenMP build, whatever the thread count asked for.
        g = torch.Generator().manual_seed(3)
        e, h, inter, m = 4, 96, 40, 9
        weights = PackedExpertWeights(
            pack_int4_pairs(torch.randint(-8, 8, (e, 2 * inter, h), dtype=torch.int8, generator=g)),
            torch.rand(e, 2 * inter, generator=g) * 0.02, pack_int4_pairs(torch.randint(-8, 8, (e, h, inter),
                                                                                        dtype=torch.int8, generator=g)),
            torch.rand(e, h, generator=g) * 0.02)
        x_q, x_scale = dynamic_quant_per_token(torch.randn(m, h, generator=g))
        ids = torch.randint(0, e, (m,), generator=g)
        order = torch.argsort(ids, stable=True)
        offsets = torch.zeros(e + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.bincount(ids, minlength=e), 0)
        alpha = torch.linspace(0.3, 1.0, e)
        outs = [b.grouped_forward(b.prepare(weights), x_q, x_scale, order, offsets, alpha)
                for b in (backend, serial, three_threads)]
        assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
        assert torch.equal(outs[0].view(torch.int16), outs[2].view(torch.int16))
    finally:
        cpu_mod.load_kernel.cache_clear()
