"""Interchangeable expert-path backends behind one small interface.

A backend takes the packed expert weights once (:meth:`ExpertBackend.prepare`, where it may
re-lay them out, still at 4 bits per weight) and then runs the grouped expert path for
routed rows: GMM1 (int4 x int8), SwiGLU-clip-quant, GMM2, then the weighted sum of
each token's rows (:func:`combine_rows`). ``reference`` is plain torch and exact by
construction; faster backends must match it bit for bit.
"""

from w4a8moe.kernels.base import ExpertBackend, PackedExpertWeights, available_backends, combine_rows, get_backend

__all__ = ["ExpertBackend", "PackedExpertWeights", "available_backends", "combine_rows", "get_backend"]
