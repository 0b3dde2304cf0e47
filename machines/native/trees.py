"""Whole pruned sweeps over a bucket's cluster tree in one C call: the exact backend's sums and provenance's.

Both take a :class:`~patchbank.clusters.ClusteredPatches` (int16 distinct patches grouped into clusters, with
squared norms, log counts and offsets), queries scaled by ``a/(s²·255)``, an upper bound per (cluster, query) on
every member's logit and the cluster each query visits first; then every cluster is visited by the queries whose
bound is at least their running maximum less ``threshold``. The logits are made in registers from the int16
patches and folded at once: no block is written to memory and no Python runs per cluster.

* :func:`tree_sums` (``c/sweep.c``): the running maximum and ``(Σw·v, Σw)`` of chosen centre coordinates — the
  exact posterior sums of a patch bucket.
* :func:`tree_provenance` (``c/provenance.c``): ``Σw``, ``Σw·ℓ`` (the entropy) and a running list of each
  query's heaviest patches — what explains a generated pixel.
"""

from __future__ import annotations

import ctypes

import torch

from patchbank.clusters import ClusteredPatches

from .build import by_rows, check_arrays, declare, over_rows, require

_i64, _ptr, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
declare("provenance_tree", _i64, [_i64] * 3 + [_ptr] * 3 + [_f64] + [_ptr] * 4 + [_i64, _ptr, _f64, _i64] + [_ptr] * 5 + [_f64])
for _name in ("sweep_f32_tree", "sweep_f64_tree"):
    declare(_name, _i64, [ctypes.c_int] + [_i64] * 3 + [_ptr] * 3 + [_f64] + [_ptr] * 2 + [_i64] + [_ptr] * 2
            + [_i64, _ptr, _f64] + [_ptr] * 2 + [_f64, _ptr])


def _tree_checks(qs: torch.Tensor, tree: ClusteredPatches, upper_t: torch.Tensor, first: torch.Tensor) -> list:
    R, D = qs.shape
    U, NC = tree.patches.shape[0], tree.n_clusters
    return [("qs", qs, (R, D), qs.dtype), ("patches", tree.patches, (U, D), torch.int16),
            ("sq_norms", tree.sq_norms, (U,), torch.float64), ("log_counts", tree.log_counts, (U,), torch.float64),
            ("offsets", tree.offsets, (NC + 1,), torch.int64), ("upper_t", upper_t, (NC, R), torch.float64),
            ("first", first, (R,), torch.int64)]


def tree_sums(qs: torch.Tensor, tree: ClusteredPatches, coef: float, upper_t: torch.Tensor, first: torch.Tensor,
              threshold: float, centre: torch.Tensor, m: torch.Tensor, acc: torch.Tensor, skip: float,
              threads: int | None = None) -> tuple[int, int]:
    """The exact backend's whole pruned sweep, in place; returns the (query, patch) pairs computed and how many of
    them had their exponential skipped.

    qs: float32 or float64 ``[R, D]`` (the precision of the logits); each member's logit is
    ``ℓ = coef·‖p‖² + log count + ⟨qs, p⟩`` (``coef = −a²/(2s²)``, ``p`` the int16 patch); upper_t: float64
    ``[K, R]``, a bound on every member's ``ℓ`` per cluster and query; first: int64 ``[R]``; centre: int64 ``[C]``,
    the coordinates whose values (``/255``) are averaged. State, in place: m float64 ``[R]`` (running maximum,
    finite: start at ``-1e300``) and acc float64 ``[R, C+1]`` (``Σw·v``, ``Σw`` relative to it); a row of a visit
    whose maximum lies more than ``skip`` below the running maximum adds nothing. Queries split over threads, each
    thread sweeping the tree for its own."""
    lib = require()
    if qs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"tree_sums needs float32 or float64 queries, got {qs.dtype}")
    R, D = qs.shape
    NC, C, U = tree.n_clusters, centre.numel(), tree.patches.shape[0]
    check_arrays(*_tree_checks(qs, tree, upper_t, first), ("centre", centre, (C,), torch.int64),
                 ("m", m, (R,), torch.float64), ("acc", acc, (R, C + 1), torch.float64))
    if C and (int(centre.min()) < 0 or int(centre.max()) >= D):
        raise ValueError(f"centre coordinates must lie in [0, {D})")
    fn, size = (lib.sweep_f32_tree, 4) if qs.dtype == torch.float32 else (lib.sweep_f64_tree, 8)

    def call(n: int, start: int, stop: int) -> tuple[int, int]:
        skipped = ctypes.c_int64(0)
        done = fn(n, stop - start, D, NC, qs.data_ptr() + size * start * D, tree.patches.data_ptr(), tree.sq_norms.data_ptr(),
                  coef, tree.log_counts.data_ptr(), centre.data_ptr(), C, tree.offsets.data_ptr(), upper_t.data_ptr() + 8 * start,
                  R, first.data_ptr() + 8 * start, threshold, m.data_ptr() + 8 * start, acc.data_ptr() + 8 * start * (C + 1),
                  skip, ctypes.byref(skipped))
        if done < 0:
            raise MemoryError("tree_sums could not allocate its work buffers")
        return done, skipped.value

    parts = over_rows(call, R, U, threads)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def tree_provenance(qs: torch.Tensor, tree: ClusteredPatches, coef: float, upper_t: torch.Tensor, first: torch.Tensor,
                    threshold: float, m: torch.Tensor, Z: torch.Tensor, S: torch.Tensor, top: torch.Tensor,
                    top_id: torch.Tensor, skip: float, threads: int | None = None) -> int:
    """A whole provenance sweep, in place; returns the (query, patch) pairs computed.

    qs: float64 ``[R, D]``; each member's log weight is ``ℓ = coef·‖p‖² + ⟨qs, p⟩``; upper_t: float64 ``[K, R]``, a
    bound on every member's ``ℓ + log count``; first: int64 ``[R]``. State, in place: m, Z, S float64 ``[R]``
    (running maximum of ``ℓ + log count``, finite: start at ``-1e300``; ``Σw`` and ``Σw·ℓ`` with
    ``w = e^(ℓ + log count − m)``), top float64 ``[R, K]`` (the ``K`` largest ``ℓ`` so far, descending; start at
    ``-1e300``) and top_id int64 ``[R, K]`` (their distinct-patch ids, the tree's ``order``; start at −1); terms
    more than ``skip`` below the maximum add nothing. Queries split over Python threads, each sweeping the tree
    for its own."""
    lib = require()
    R, D = qs.shape
    NC, K, U = tree.n_clusters, top.shape[1], tree.patches.shape[0]
    check_arrays(*_tree_checks(qs, tree, upper_t, first), ("qs", qs, (R, D), torch.float64),
                 ("order", tree.order, (U,), torch.int64), ("m", m, (R,), torch.float64), ("Z", Z, (R,), torch.float64),
                 ("S", S, (R,), torch.float64), ("top", top, (R, K), torch.float64), ("top_id", top_id, (R, K), torch.int64))

    def part(start: int, stop: int) -> int:
        done = lib.provenance_tree(stop - start, D, NC, qs.data_ptr() + 8 * start * D, tree.patches.data_ptr(),
                                   tree.sq_norms.data_ptr(), coef, tree.log_counts.data_ptr(), tree.order.data_ptr(),
                                   tree.offsets.data_ptr(), upper_t.data_ptr() + 8 * start, R, first.data_ptr() + 8 * start,
                                   threshold, K, m.data_ptr() + 8 * start, Z.data_ptr() + 8 * start,
                                   S.data_ptr() + 8 * start, top.data_ptr() + 8 * start * K,
                                   top_id.data_ptr() + 8 * start * K, skip)
        if done < 0:
            raise MemoryError("tree_provenance could not allocate its work buffers")
        return done

    return sum(by_rows(part, R, U, threads))
