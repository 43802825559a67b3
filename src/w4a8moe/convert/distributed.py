"""Split each MoE layer's clip search across the processes of a ``torchrun`` launch.

``torchrun --nproc-per-node N -m w4a8moe.cli convert SRC DST ...`` starts N copies of the
same command. Rank 0 runs the conversion as a single process would (the calibration
forward, every file it writes, resume); the other ranks only serve: for each MoE layer rank
0 broadcasts the layer's MoE inputs and each expert's routed rows, every rank (rank 0
included) learns the clips of experts ``e`` with ``e % N == rank`` from the memory-mapped
source, and rank 0 gathers them. The clips of an expert depend only on its weights, its rows
and the clip settings, never on which process computed them, so the output is byte-identical
for every N, given the same torch thread count in each process (torch's fp32 matmuls, used
by the search's float steps, round differently with another thread count; ``torchrun``
sets one thread per process unless ``OMP_NUM_THREADS`` says otherwise) and the same kind of
device. With ``--device cuda`` each rank uses GPU ``LOCAL_RANK``.

The processes talk over gloo (CPU tensors; it works whatever the compute device), through
``torch.distributed``'s object collectives.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from w4a8moe.calibrate import ClipSearchSettings, ExpertClips
from w4a8moe.errors import ConversionError

LearnOne = Callable[[int, int, torch.Tensor, ClipSearchSettings, "dict[str, torch.Tensor] | None"], ExpertClips]
"""``learn_one(layer, expert, rows, settings, weights)``: that expert's clips from its routed
MoE-input rows (its weights loaded from the source when ``weights`` is ``None``)."""
ClipsOf = Callable[[int, "dict[str, torch.Tensor]"], ExpertClips]
"""``clips_of(expert, weights)``: an expert's clips, given its weights (already loaded)."""


def launched_world_size() -> int:
    """The process count of the ``torchrun`` launch this process belongs to (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ExpertSplit:
    """One process's part in a split clip search (a single process: the whole search)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world_size = launched_world_size()
        self._owns_group = False
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")
            self._owns_group = True
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        if self.world_size > 1 and dist.get_world_size() != self.world_size:
            raise ConversionError(f"WORLD_SIZE={self.world_size} but the process group has "
                                  f"{dist.get_world_size()} processes")

    @property
    def is_leader(self) -> bool:
        """Rank 0: the process that converts and writes."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """The compute device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None and self.world_size > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dev

    def _mine(self, num_experts: int) -> list[int]:
        return list(range(self.rank, num_experts, self.world_size))

    def _learn_share(self, layer: int, moe_input: torch.Tensor, routed_rows: list[torch.Tensor],
                     settings: ClipSearchSettings, learn_one: LearnOne) -> dict[int, ExpertClips]:
        return {e: learn_one(layer, e, moe_input[routed_rows[e]], settings, None)
                for e in self._mine(len(routed_rows))}

    def learn_layer(self, layer: int, moe_input: torch.Tensor, routed_rows: list[torch.Tensor],
                    settings: ClipSearchSettings, learn_one: LearnOne) -> ClipsOf:
        """Every expert's clips for this layer (leader side).

        A single process learns each expert when asked, from the weights its caller loaded
        anyway (nothing is held beyond one expert); in a launch the layer's work is shared
        out first and gathered here, and a worker's error is raised here.
        """
        if self.world_size == 1:
            return lambda e, weights: learn_one(layer, e, moe_input[routed_rows[e]], settings, weights)
        self._dist.broadcast_object_list([("layer", layer, moe_input, routed_rows, settings)], src=0)
        try:
            share: object = self._learn_share(layer, moe_input, routed_rows, settings, learn_one)
        except Exception as exc:  # noqa: BLE001 - the workers still wait in the gather
            share = exc
        gathered: list[object] = [None] * self.world_size
        self._dist.gather_object(share, gathered, dst=0)
        clips: dict[int, ExpertClips] = {}
        for rank, part in enumerate(gathered):
            if isinstance(part, Exception):
                raise ConversionError(f"layer {layer}: the clip search failed on rank {rank}: {part}") from part
            clips.update(part)
        if sorted(clips) != list(range(len(routed_rows))):
            raise ConversionError(f"layer {layer}: the ranks returned clips for experts {sorted(clips)}")
        return lambda e, _weights: clips[e]

    def serve(self, learn_one: LearnOne) -> None:
        """The worker loop: learn this rank's share of each layer the leader sends, until it stops."""
        while True:
            message: list[object] = [None]
            self._dist.broadcast_object_list(message, src=0)
            job = message[0]
            if job[0] == "stop":
                return
            _, layer, moe_input, routed_rows, settings = job
            try:
                share: object = self._learn_share(layer, moe_input, routed_rows, settings, learn_one)
            except Exception as exc:  # noqa: BLE001 - handed to the leader, which raises it
                share = exc
            self._dist.gather_object(share, None, dst=0)

    def finish(self) -> None:
        """Leader: release the workers (also after an error). Everyone: leave the group."""
        if self.world_size > 1:
            if self.is_leader:
                self._dist.broadcast_object_list([("stop",)], src=0)
            if self._owns_group:
                self._dist.destroy_process_group()
