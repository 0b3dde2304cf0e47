"""The native layer: C kernels compiled for this CPU on first use, and their checked Python entry points.

Every exact sum of the engine ends here — the exact backend, the policy's draws and fallback, provenance's
cluster scan and calibration's many-scale pass — so the kernels live apart from the backends that call them:

=================== ================================================================ ==============
module              entry points                                                     C source
=================== ================================================================ ==============
:mod:`.build`       :func:`available`, :func:`check_option`, :func:`use_fused`,       ``common.h``
                    :func:`cpu_flags`, :func:`wide_vectors`; compiling, loading, the
                    one argument check
:mod:`.folds`       :func:`fold_logits`, :func:`fold_moments` (a logits block);       ``rows.c``,
                    :func:`fold_tiles`, :func:`moments_tiles` (logits in registers)   ``fold.c``
:mod:`.trees`       :func:`tree_sums` (exact), :func:`tree_provenance` (provenance)   ``sweep.c``,
                                                                                     ``provenance.c``
:mod:`.boxes`       :func:`box_scales` (a machine at several scales at once)          ``box.c``
:mod:`.tables`      :class:`RowTable`, :func:`counting_order`                         ``match.c``
:mod:`.peak`        :func:`peak_gflops` (the float32 yardstick of benchmarks)         ``peak.c``
=================== ================================================================ ==============

A new kernel family is one C file listed in :data:`build.SOURCES` and one module declaring its signatures
(:func:`build.declare`) and checking its arguments (:func:`build.check_arrays`); a family that needs CPU
features checks :func:`cpu_flags` at run time and says once why it falls back.
"""

from .boxes import BOX_RULES, box_scales
from .build import available, check_arrays, check_option, cpu_flags, unavailable_reason, use_fused, wide_vectors
from .folds import MIN_TILE_ROWS, TILE_WIDTH, TileKeys, fold_logits, fold_moments, fold_tiles, lay_out_keys, moments_tiles
from .peak import peak_gflops
from .tables import RowTable, counting_order
from .trees import tree_provenance, tree_sums

__all__ = [
    "BOX_RULES",
    "MIN_TILE_ROWS",
    "TILE_WIDTH",
    "RowTable",
    "TileKeys",
    "available",
    "box_scales",
    "check_arrays",
    "check_option",
    "counting_order",
    "cpu_flags",
    "fold_logits",
    "fold_moments",
    "fold_tiles",
    "lay_out_keys",
    "moments_tiles",
    "peak_gflops",
    "tree_provenance",
    "tree_sums",
    "unavailable_reason",
    "use_fused",
    "wide_vectors",
]
