"""Sharded safetensors I/O: header inspection, lazy reading, atomic sharded writing."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from w4a8moe.errors import CheckpointError

_HEADER_LIMIT = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ELEMENT_SIZE = {name: dt.itemsize for name, dt in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor, without reading its data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; raise :class:`CheckpointError` if it is unusable.

    Checks that the header is complete JSON, that each tensor's byte range matches its dtype
    and shape, and that the file is long enough for every range (a truncated shard fails here).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _HEADER_LIMIT or 8 + header_len > size:
                raise CheckpointError(
                    f"{path.name}: truncated or corrupt safetensors file: header claims {header_len} bytes, "
                    f"file has {size}"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path.name}: cannot read safetensors file: {exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header: not a JSON object")
    data_len = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry") from exc
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype_name}")
        if end - start != math.prod(shape) * _ELEMENT_SIZE[dtype_name]:
            raise CheckpointError(
                f"{path.name}: tensor {name!r} byte range {start}..{end} does not match {dtype_name} {list(shape)}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path.name}: truncated file: tensor {name!r} needs bytes up to {end}, only {data_len} present"
            )
        infos[name] = TensorInfo(name, path, SAFETENSORS_DTYPES[dtype_name], shape)
    return infos


class ShardedSafetensorsReader:
    """A checkpoint's tensors across one or more safetensors files, read lazily.

    With an index json, every file it names must exist, every tensor it lists must be in
    the file it names, and no file may hold tensors the index does not list.
    """

    def __init__(self, directory: Path, index_name: str, single_names: Iterable[str], glob: str):
        self.directory = Path(directory)
        index_path = self.directory / index_name
        self.infos: dict[str, TensorInfo] = {}
        if index_path.exists():
            self._read_indexed(index_path)
            listed = {info.file.name for info in self.infos.values()}
            stray = sorted(p.name for p in self.directory.glob(glob) if p.name not in listed)
            if stray:
                raise CheckpointError(
                    f"{index_path.name}: weight file {stray[0]} is in the folder but not in the index "
                    "(a stale or unfinished shard?)"
                )
        else:
            singles = [self.directory / n for n in single_names if (self.directory / n).exists()]
            files = singles or sorted(self.directory.glob(glob))
            if not files:
                raise CheckpointError(f"{self.directory}: no {index_name} and no {glob} weight files")
            if len(files) > 1:
                raise CheckpointError(
                    f"{self.directory}: {len(files)} weight files but no {index_name} to say which tensor is where"
                )
            self.infos = read_safetensors_header(files[0])
        self._handles: dict[Path, object] = {}

    def _read_indexed(self, index_path: Path) -> None:
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path.name}: corrupt index ({exc}); expected {{'weight_map': {{...}}}}") from exc
        by_file: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
                raise CheckpointError(f"{index_path.name}: tensor {tensor!r} maps to invalid file name {fname!r}")
            by_file.setdefault(fname, []).append(tensor)
        for fname, tensors in sorted(by_file.items()):
            fpath = self.directory / fname
            if not fpath.exists():
                raise CheckpointError(
                    f"{index_path.name}: shard {fname} is missing (it should hold {len(tensors)} tensors, "
                    f"e.g. {tensors[0]!r})"
                )
            header = read_safetensors_header(fpath)
            for t in tensors:
                if t not in header:
                    raise CheckpointError(f"{fname}: tensor {t!r} listed in {index_path.name} is not in the file")
            extra = sorted(set(header) - set(tensors))
            if extra:
                raise CheckpointError(
                    f"{fname}: holds tensor {extra[0]!r} (and {len(extra) - 1} more) not listed in {index_path.name}"
                )
            self.infos.update(header)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor; raise :class:`CheckpointError` naming it if it is absent."""
        info = self.infos.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name!r}")
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(info.file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{info.file.name}: cannot open: {exc}") from exc
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def close(self) -> None:
        """Drop the open file handles (and their memory maps); later reads reopen them."""
        self._handles.clear()

    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        total = 0
        for info in self.infos.values():
            total += math.prod(info.shape) * info.dtype.itemsize
        return total


# Test seam: when set, called as ``write_step_hook(step, path)`` at each filesystem step of the
# atomic writers here and of the converter's progress record ("temp": a temp file is complete
# but not yet renamed; "renamed": it is in place; "mkdir", "unlinked", "rmdir"), so a test can
# kill the process at every instant a crash could hit. ``None`` outside tests.
write_step_hook: Callable[[str, Path], None] | None = None


def write_step(step: str, path: Path) -> None:
    """Report one filesystem step to :data:`write_step_hook` (a no-op unless a test set it)."""
    if write_step_hook is not None:
        write_step_hook(step, Path(path))


def _atomic_write(path: Path, fill: Callable[[str], None]) -> None:
    """``fill(temp_path)`` writes the content; then fsync and rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        write_step("temp", Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_step("renamed", path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: Path, obj: object) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a safetensors file atomically: temp file in the same folder, fsync, rename."""
    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def atomic_copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` (bytes and metadata) to ``dst`` atomically."""
    _atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete the temp files an interrupted atomic write left in ``directory``; return them.

    They are the ``.{name}.*.tmp`` files of the atomic writers here; no finished file ever
    has that name.
    """
    removed = []
    for tmp in sorted(Path(directory).glob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()


_QUEUE_ALIGN = 64
_QUEUE_SLACK = 1 << 20
"""Bytes beyond ``max_shard_bytes`` in the shard buffer: room for the alignment of queued tensors."""


class ShardedSafetensorsWriter:
    """Accumulate tensors and write them as numbered shards plus an index, each atomically.

    Shards are named ``{prefix}-00001.safetensors`` ...; the index (``{prefix}.safetensors.index.json``
    by default) is written last by :meth:`close`, so a checkpoint without its index is visibly
    unfinished. ``max_shard_bytes`` bounds the tensor bytes held before a shard is flushed.
    """

    def __init__(self, directory: Path, prefix: str, index_name: str, max_shard_bytes: int = 4 << 30,
                 metadata: dict[str, str] | None = None,
                 on_flush: Callable[[str, list[str]], None] | None = None):
        """``on_flush(file_name, tensor_names)`` is called after each shard is in place (resume points)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.index_name = index_name
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._buffer: torch.Tensor | None = None
        self._buffer_used = 0
        self._shard_count = 0
        self.on_flush = on_flush

    def restore(self, weight_map: dict[str, str], total_bytes: int) -> None:
        """Continue after shards written earlier (a resumed run): numbering goes on after them."""
        if self.weight_map or self._pending:
            raise ValueError("restore() must come before any tensor is added")
        self.weight_map = dict(weight_map)
        self.total_bytes = int(total_bytes)
        self._shard_count = len(set(weight_map.values()))

    def shard_name(self, number: int) -> str:
        """File name of shard ``number`` (1-based)."""
        return f"{self.prefix}-{number:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flush a shard first if it would overflow the size bound."""
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self._pending[name] = self._queue_copy(tensor.detach().cpu())
        self._pending_bytes += size

    def _queue_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in the shard buffer: one block of ``max_shard_bytes`` reused for
        every shard, so the queue never holds more than that, and never holds its callers'
        blocks (a queued view of a bigger block would keep all of it alive). Copying also frees
        the producer's tensor at once: queued outputs left among freed temporaries fragmented
        the heap by about 100 MB per DeepSeek-V3 expert. A tensor that does not fit (larger
        than a shard) is queued as its own copy."""
        size = tensor_nbytes(tensor)
        start = -(-self._buffer_used // _QUEUE_ALIGN) * _QUEUE_ALIGN
        if start + size > self.max_shard_bytes + _QUEUE_SLACK:
            return tensor.clone(memory_format=torch.contiguous_format)
        if self._buffer is None:
            # Untouched pages cost nothing: only what is queued becomes resident.
            self._buffer = torch.empty(self.max_shard_bytes + _QUEUE_SLACK, dtype=torch.uint8)
        self._buffer_used = start + size
        out = self._buffer[start : start + size].view(tensor.dtype).view(tensor.shape)
        out.copy_(tensor)
        return out

    def flush(self) -> str | None:
        """Write the queued tensors as the next shard; return its file name."""
        if not self._pending:
            return None
        self._shard_count += 1
        fname = self.shard_name(self._shard_count)
        atomic_save_safetensors(self.directory / fname, self._pending, self.metadata)
        for name in self._pending:
            self.weight_map[name] = fname
        self.total_bytes += self._pending_bytes
        flushed = list(self._pending)
        self._pending = {}
        self._pending_bytes = 0
        self._buffer_used = 0  # the shard is on disk: its buffer space is free again
        if self.on_flush is not None:
            self.on_flush(fname, flushed)
        return fname

    def close(self) -> Path:
        """Flush what is left and write the index; return the index path."""
        self.flush()
        index_path = self.directory / self.index_name
        atomic_write_json(index_path, {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map})
        return index_path

