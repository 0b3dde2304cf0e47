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

from .auto import AutoBackend, PolicyStats
from .base import Backend, BackendBase, BackendStats, Guarantee, NeighbourSearch, Serving, draw_seed, entry_bias, logits, serving, with_ones
from .exact import ExactBackend, PairStats
from .shards import ShardedBackend, shard_sums
from .sums import RunningSums, merge_all, merge_bounded
from .registry import BACKENDS, BackendSpec, describe_backends, make_backend, parse_backend, register
from .summary import ClusterMoments, SummaryBackend, SummaryStats, cluster_moments
from .tail import SampledTailBackend, TailEstimate, TailStats
from .topk import TopKBackend, TopKStats

__all__ = [
    "BACKENDS",
    "AutoBackend",
    "Backend",
    "BackendBase",
    "BackendSpec",
    "BackendStats",
    "ClusterMoments",
    "ExactBackend",
    "Guarantee",
    "NeighbourSearch",
    "PairStats",
    "RunningSums",
    "ShardedBackend",
    "PolicyStats",
    "SampledTailBackend",
    "Serving",
    "SummaryBackend",
    "SummaryStats",
    "TailEstimate",
    "TailStats",
    "TopKBackend",
    "TopKStats",
    "cluster_moments",
    "describe_backends",
    "draw_seed",
    "entry_bias",
    "logits",
    "make_backend",
    "merge_all",
    "merge_bounded",
    "parse_backend",
    "register",
    "serving",
    "shard_sums",
    "with_ones",
]
