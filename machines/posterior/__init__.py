"""Posterior backends: how a machine's posterior means are computed, bucket by bucket.

One protocol (:class:`Backend`), one rule for how a bucket is served (:func:`serving`), and one
registry of spec strings (:func:`make_backend`, ``patchbank backends``):

=========== ============================================================ ===========
``exact``   streaming log-sum-exp over every entry (fused C kernel, pruning) exact
``topk``    k nearest distinct patches + certified bound, exact fallback   certified
``tail``    exact top-k head + importance-sampled tail                     statistical
``summary`` clusters summarised or dropped under a per-pixel bound         certified
``auto``    shared importance draws accepted per pixel, the rest exact     statistical
=========== ============================================================ ===========
"""

from .base import (
    Backend,
    BackendBase,
    BackendStats,
    CertifiedStats,
    FallbackStats,
    Guarantee,
    NeighbourSearch,
    Serving,
    distance_logits,
    draw_seed,
    entry_bias,
    fill_rest,
    logits,
    serving,
    with_ones,
)
from .registry import BACKENDS, BackendSpec, describe_backends, make_backend, parse_backend, register
from .shards import shard_sums
from .summary import ClusterMoments, cluster_moments
from .sums import RunningSums, merge_all, merge_bounded
from .tail import TailEstimate

REGISTERED = {c.__name__: c for entry in BACKENDS.values() for c in (entry.cls, entry.stats)}
"""Every registered backend class and its statistics class, by name: exported here (and from :mod:`machines`) by
their :func:`register` call, so a new backend touches only its own module and the registry."""
globals().update(REGISTERED)

__all__ = [
    "BACKENDS",
    "REGISTERED",
    "Backend",
    "BackendBase",
    "BackendSpec",
    "BackendStats",
    "CertifiedStats",
    "ClusterMoments",
    "FallbackStats",
    "Guarantee",
    "NeighbourSearch",
    "RunningSums",
    "Serving",
    "TailEstimate",
    "cluster_moments",
    "describe_backends",
    "distance_logits",
    "draw_seed",
    "entry_bias",
    "fill_rest",
    "logits",
    "make_backend",
    "merge_all",
    "merge_bounded",
    "parse_backend",
    "register",
    "serving",
    "shard_sums",
    "with_ones",
    *REGISTERED,
]
