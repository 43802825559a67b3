"""Crash-safe progress of a conversion: what a resumed run may keep and where it restarts.

The manifest (``.w4a8moe-progress/manifest.json`` in the output folder) is written, with the
settings hash and nothing done, before anything else goes into the folder, so a folder a
conversion has touched is recognisable as an interrupted conversion from its first write.
After every output shard is renamed into place, the manifest is rewritten atomically with:
the settings hash, the shards' weight map and byte total, each written tensor's AscendV1
type and compressed-tensors ``ignore`` entries,
the index of the unit of work (a decoder layer, or the non-layer tensors) being emitted when
the shard was cut, the report entries of the units before it, and, when calibrating, the
hidden states entering that unit (a safetensors file beside the manifest). A resumed run keeps
exactly the shards the manifest names, regenerates that unit from its saved input (tensors
already in finished shards are skipped) and carries on; temp files of interrupted writes are
deleted and shards the manifest does not name are removed, so nothing half-written is ever
taken for finished output. Once every shard is in place the manifest says so (``resume_unit``
past the last unit), the metadata files follow, and the record is removed last, manifest file
before its folder; a folder whose record is gone holds the finished conversion (its report
names the settings hash).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from w4a8moe.errors import ConversionError
from w4a8moe.formats.safetensors_io import (
    atomic_save_safetensors,
    atomic_write_json,
    remove_stale_temp_files,
    write_step,
)

PROGRESS_DIR = ".w4a8moe-progress"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ProgressManifest:
    """The progress record of one output folder."""

    def __init__(self, dst: Path, settings_hash: str):
        self.dst = Path(dst)
        self.dir = self.dst / PROGRESS_DIR
        self.settings_hash = settings_hash
        self.state: dict | None = None

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST

    def start_fresh(self) -> None:
        """A new conversion: the output folder must be absent or empty; record that nothing is done."""
        if self.dst.exists() and any(self.dst.iterdir()):
            raise ConversionError(
                f"{self.dst}: output folder exists and is not empty; choose an empty folder, or pass "
                "resume=True (--resume) to continue an interrupted conversion into it"
            )
        self._begin()

    def _begin(self) -> None:
        """Create the record with nothing done (before any output file is written)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_step("mkdir", self.dir)
        remove_stale_temp_files(self.dir)
        self.save(weight_map={}, total_bytes=0, types={}, ignore=[], resume_unit=0, reports={}, hidden=None,
                  hidden_unit=None)

    def clean_finished(self) -> None:
        """Drop what the cut-short cleanup of a finished conversion left: an emptied record folder."""
        remove_stale_temp_files(self.dst)
        if self.dir.exists():
            remove_stale_temp_files(self.dir)
            self.dir.rmdir()

    def load_for_resume(self, shard_glob: str) -> dict | None:
        """The saved state, checked against this run's settings; ``None`` when starting afresh.

        Raises :class:`ConversionError` if the settings differ, if the folder holds output but
        no manifest, or if the manifest is unreadable.
        """
        if not self.path.exists():
            if self.dst.exists() and any(p.name != PROGRESS_DIR for p in self.dst.iterdir()):
                raise ConversionError(
                    f"{self.dst}: cannot resume: the folder holds files but no {PROGRESS_DIR}/{MANIFEST} "
                    "(not a conversion of ours, or a finished one with other settings); choose an empty folder"
                )
            self._begin()  # nothing was written yet (or only an unfinished first record)
            return None
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{self.path}: unreadable progress manifest ({exc})") from exc
        if state.get("version") != MANIFEST_VERSION:
            raise ConversionError(f"{self.path}: manifest version {state.get('version')!r}, expected {MANIFEST_VERSION}")
        if state.get("settings_hash") != self.settings_hash:
            raise ConversionError(
                f"{self.dst}: cannot resume: this conversion was started with different settings or a different "
                f"source (settings hash {state.get('settings_hash')} != {self.settings_hash}); use the same "
                "arguments (a learned conversion started by converter version 1 resumes with --refine-form direct), "
                "or start again in an empty folder"
            )
        remove_stale_temp_files(self.dst)
        remove_stale_temp_files(self.dir)
        kept = set(state["weight_map"].values())
        for shard in self.dst.glob(shard_glob):
            if shard.name not in kept:
                shard.unlink()  # renamed into place but never recorded: regenerated identically
        for name in kept:
            if not (self.dst / name).exists():
                raise ConversionError(f"{self.dst}: cannot resume: finished shard {name} named in the manifest is gone")
        self.state = state
        return state

    def hidden(self, state: dict) -> torch.Tensor | None:
        """The saved hidden states entering the resume unit, if any."""
        fname = state.get("hidden_file")
        if not fname:
            return None
        path = self.dir / fname
        if not path.exists():
            raise ConversionError(f"{path}: saved calibration hidden states are missing; cannot resume")
        return load_file(str(path))["hidden"]

    def save(self, *, weight_map: dict[str, str], total_bytes: int, types: dict[str, str], ignore: list[str],
             resume_unit: int, reports: dict[str, dict], hidden: torch.Tensor | None,
             hidden_unit: int | None) -> int | None:
        """Record progress atomically; return the unit whose input hidden states are now on disk."""
        hidden_file = None
        if hidden is not None:
            hidden_file = f"hidden-unit{resume_unit:05d}.safetensors"
            if hidden_unit != resume_unit or not (self.dir / hidden_file).exists():
                atomic_save_safetensors(self.dir / hidden_file, {"hidden": hidden.contiguous()})
            hidden_unit = resume_unit
        atomic_write_json(self.path, {
            "version": MANIFEST_VERSION,
            "settings_hash": self.settings_hash,
            "weight_map": weight_map,
            "total_bytes": total_bytes,
            "types": types,
            "ignore": ignore,
            "resume_unit": resume_unit,
            "reports": reports,
            "hidden_file": hidden_file,
        })
        for old in self.dir.glob("hidden-unit*.safetensors"):
            if old.name != hidden_file:
                old.unlink()
                write_step("unlinked", old)
        return hidden_unit

    def remove(self) -> None:
        """Delete the progress record (the conversion is complete): the manifest last but its folder."""
        for path in sorted(self.dir.iterdir()):
            if path != self.path:
                path.unlink()
                write_step("unlinked", path)
        self.path.unlink()
        write_step("unlinked", self.path)
        self.dir.rmdir()
        write_step("rmdir", self.dir)
