"""The fused exact kernel: against float64 brute force and the torch-operations backend."""

from __future__ import annotations

import math
import os

import pytest
import torch

from machines import ExactBackend, ScoreMachine, alpha_sigma2, native
from patchbank import MemoryBank, to_model_range

# Locally a machine without a C compiler skips these; with $CI set they run, and fail if the kernel does not compile.
needs_kernel = pytest.mark.skipif(not os.environ.get("CI") and not native.available(),
                                  reason=f"no fused kernel here: {native.unavailable_reason()}")


def _brute(logits: torch.Tensor, values: torch.Tensor, skip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference: the running maximum and the sums (Σw·v, Σw) relative to it, entries below −skip dropped."""
    x = logits.double()
    m = x.amax(1)
    d = x - m[:, None]
    w = d.exp() * (d > -skip)
    return m, torch.cat([w @ values.double(), w.sum(1, keepdim=True)], 1)


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("V", [1, 3])
def test_fold_matches_brute_force_over_blocks(dtype, tol, V):
    """Folding a row's entries block by block (in any order of magnitudes) equals one float64 softmax sum."""
    g = torch.Generator().manual_seed(V)
    R, blocks, M = 37, 5, 300  # 37 rows: split over 1, 2 and 3 threads (unevenly)
    spread = torch.tensor([1.0, 30.0, 200.0, 5000.0])[torch.arange(R) % 4][:, None]  # broad to concentrated rows
    logits = torch.randn(R, blocks * M, generator=g, dtype=torch.float64) * spread + 50 * torch.randn(R, 1, generator=g, dtype=torch.float64)
    values = torch.randn(blocks * M, V, generator=g, dtype=torch.float64)
    skip = 60.0
    m = torch.full((R,), -1e300, dtype=torch.float64)
    acc = torch.zeros(R, V + 1, dtype=torch.float64)
    skipped = 0
    for b in range(blocks):
        cols = slice(b * M, (b + 1) * M)
        wide = torch.zeros(R, M + 7, dtype=dtype)  # a row stride larger than the row
        wide[:, :M] = logits[:, cols].to(dtype)
        skipped += native.fold_logits(wide[:, :M], values[cols].to(dtype).T.contiguous(), m, acc, skip, threads=1 + b % 3)
    m_ref, acc_ref = _brute(logits.to(dtype), values.to(dtype), skip)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=0)
    scale = acc_ref[:, -1:]  # sums relative to Σw (≥ 1: the maximum's weight)
    assert ((acc - acc_ref).abs() / scale).max() <= tol
    assert skipped > 0  # the concentrated rows skip most entries, and do so without changing the sums


@needs_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 5e-6)])
@pytest.mark.parametrize("C", [1, 3])
def test_moments_match_brute_force_over_blocks(dtype, tol, C):
    """First and second moments of the draws' weights, folded block by block, equal float64 sums
    relative to the overall maximum; weights that underflow are zero."""
    g = torch.Generator().manual_seed(10 + C)
    R, blocks, M = 37, 4, 257
    spread = torch.tensor([1.0, 30.0, 200.0, 5000.0])[torch.arange(R) % 4][:, None]
    logits = torch.randn(R, blocks * M, generator=g, dtype=torch.float64) * spread + 50 * torch.randn(R, 1, generator=g, dtype=torch.float64)
    values = torch.randn(blocks * M, C, generator=g, dtype=torch.float64)
    m = torch.full((R,), -1e300, dtype=torch.float64)
    s1, s2 = torch.zeros(R, C + 1, dtype=torch.float64), torch.zeros(R, 2 * C + 1, dtype=torch.float64)
    for b in range(blocks):
        cols = slice(b * M, (b + 1) * M)
        wide = torch.zeros(R, M + 5, dtype=dtype)
        wide[:, :M] = logits[:, cols].to(dtype)
        native.fold_moments(wide[:, :M], values[cols].to(dtype).T.contiguous(), m, s1, s2, threads=1 + b % 3)
    x, v = logits.to(dtype).double(), values.to(dtype).double()
    torch.testing.assert_close(m, x.amax(1), rtol=0, atol=0)
    w = (x - m[:, None]).exp()
    w2 = w * w
    ref1 = torch.cat([w @ v, w.sum(1, keepdim=True)], 1)
    ref2 = torch.cat([w2 @ v, w2 @ (v * v), w2.sum(1, keepdim=True)], 1)
    assert ((s1 - ref1).abs() / ref1[:, -1:]).max() <= tol  # relative to Σw (≥ 1) and Σw² (≥ 1)
    assert ((s2 - ref2).abs() / ref2[:, -1:]).max() <= 3 * tol


@needs_kernel
def test_moments_reject_bad_input():
    logits = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="s2 must be"):
        native.fold_moments(logits, torch.zeros(1, 6), torch.zeros(4, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64),
                        torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError):
        native.fold_moments(logits, torch.zeros(1, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                        torch.zeros(4, 2, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))


@needs_kernel
def test_fold_skips_whole_blocks_far_below_the_running_maximum():
    m = torch.tensor([0.0, 0.0], dtype=torch.float64)
    acc = torch.tensor([[0.5, 1.0], [0.5, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[-61.0, -70.0], [-59.0, -70.0]], dtype=torch.float64)
    skipped = native.fold_logits(logits.clone(), torch.ones(1, 2, dtype=torch.float64), m, acc, 60.0)
    assert skipped == 3  # row 0 whole, row 1 its −70 entry
    assert acc[0].tolist() == [0.5, 1.0]
    assert acc[1, 1].item() == pytest.approx(1 + math.exp(-59), rel=1e-15)


@needs_kernel
def test_fold_rejects_bad_input():
    m, acc = torch.zeros(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="same dtype"):
        native.fold_logits(torch.zeros(2, 4), torch.zeros(1, 4, dtype=torch.float64), m, acc, 60.0)
    with pytest.raises(ValueError, match="values_t"):
        native.fold_logits(torch.zeros(2, 4), torch.zeros(1, 5), m, acc, 60.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        native.fold_logits(torch.zeros(4, 2).T, torch.zeros(1, 4), m, acc, 60.0)
    with pytest.raises(ValueError, match="float64"):
        native.fold_logits(torch.zeros(2, 4), torch.zeros(1, 4), m.float(), acc, 60.0)


def _tree(U: int, D: int, leaf: int, seed: int):
    """A cluster tree of U distinct random int16 patches (few values, so many ties) with random counts."""
    from patchbank.clusters import cluster_patches
    from patchbank.tables import UniquePatches

    g = torch.Generator().manual_seed(seed)
    rows = torch.unique(torch.randint(0, 6, (3 * U, D), generator=g, dtype=torch.int16) * 51, dim=0)[:U]
    counts = torch.randint(1, 40, (rows.shape[0],), generator=g)
    return cluster_patches(UniquePatches(rows[torch.randperm(rows.shape[0], generator=g)], counts), leaf_size=leaf)


def _sweep(tree, q, a, s2, K, threshold, threads=None):
    from machines.posterior.exact import cluster_upper

    R = q.shape[0]
    m, Z, S = torch.full((R,), -1e300, dtype=torch.float64), torch.zeros(R, dtype=torch.float64), torch.zeros(R, dtype=torch.float64)
    top, top_id = torch.full((R, K), -1e300, dtype=torch.float64), torch.full((R, K), -1, dtype=torch.long)
    upper = cluster_upper(q, tree, a, s2)
    pairs = native.tree_provenance((q * (a / s2 / 255)).contiguous(), tree, -(a * a) / (2 * s2), upper.T.contiguous(),
                              upper.argmax(1).contiguous(), threshold, m, Z, S, top, top_id, 60.0, threads=threads)
    return m, Z, S, top, top_id, pairs


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
def test_scan_tree_matches_brute_force_sums_and_top_list(threads):
    """The C sweep over a cluster tree, with no pruning margin reached: log Z, Σw·ℓ and the K largest ℓ equal one
    float64 pass over every patch; among equal values the listed ids are ones of that value."""
    tree = _tree(700, 9, 64, threads)
    g = torch.Generator().manual_seed(threads)
    R, K, a, s2 = 150, 6, 0.8, 0.05  # ≥ 64 rows per thread, so 3 threads split the rows
    q = a * tree.patches[torch.randint(0, tree.patches.shape[0], (R,), generator=g)].double() / 255 \
        + 0.2 * torch.randn(R, 9, generator=g, dtype=torch.float64)
    m, Z, S, top, top_id, pairs = _sweep(tree, q, a, s2, K, threshold=1e9, threads=threads)
    assert pairs == R * tree.patches.shape[0]  # nothing pruned: every (query, patch) pair once
    keys = tree.patches.double() / 255
    ell = (2 * a * q @ keys.T - a * a * keys.pow(2).sum(1)) / (2 * s2)  # each copy's log weight, without −‖q‖²/2s²
    weighted = ell + tree.log_counts
    peak = weighted.amax(1)
    torch.testing.assert_close(m, peak, rtol=0, atol=1e-9)
    w = (weighted - peak[:, None]).exp()
    torch.testing.assert_close(m + Z.log(), peak + w.sum(1).log(), rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(S / Z, (w * ell).sum(1) / w.sum(1), rtol=1e-12, atol=1e-9)
    want = ell.sort(dim=1, descending=True).values[:, :K]
    torch.testing.assert_close(top, want, rtol=0, atol=1e-9)
    listed = ell.gather(1, torch.argsort(tree.order)[top_id])  # the listed ids' own ℓ are the listed values
    torch.testing.assert_close(listed, top, rtol=0, atol=1e-9)
    assert all(len(set(r.tolist())) == K for r in top_id)


@needs_kernel
def test_scan_tree_prunes_only_clusters_whose_bound_allows_it():
    """With the pruning margin, clusters far from a query are skipped (fewer pairs) and the log Z left is
    within the margin's bound of the full sum."""
    tree = _tree(2000, 4, 32, 5)
    g = torch.Generator().manual_seed(5)
    R, K, a, s2 = 40, 3, 0.99, 0.002
    q = a * tree.patches[torch.randint(0, tree.patches.shape[0], (R,), generator=g)].double() / 255
    full = _sweep(tree, q, a, s2, K, threshold=1e9)
    tol = 1e-12
    pruned = _sweep(tree, q, a, s2, K, threshold=math.log(tree.patches.shape[0] / tol))
    assert pruned[5] < 0.5 * full[5]
    torch.testing.assert_close(pruned[0] + pruned[1].log(), full[0] + full[1].log(), rtol=0, atol=2 * tol)
    assert torch.equal(pruned[3], full[3]) and torch.equal(pruned[4], full[4])


@needs_kernel
def test_scan_tree_lists_fewer_than_k_and_rejects_bad_input():
    tree = _tree(3, 2, 8, 0)
    q = torch.zeros(1, 2, dtype=torch.float64)
    m, Z, S, top, top_id, _ = _sweep(tree, q, 0.5, 0.1, 5, threshold=1e9)
    assert (top_id[0, :3] >= 0).all() and top_id[0, 3:].tolist() == [-1, -1] and (top[0, 3:] == -1e300).all()
    state = [torch.full((1,), -1e300, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
             torch.full((1, 5), -1e300, dtype=torch.float64), torch.full((1, 5), -1, dtype=torch.long)]
    upper, first = torch.zeros(tree.n_clusters, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="qs must be contiguous"):
        native.tree_provenance(q.float(), tree, -1.0, upper, first, 1e9, *state, 60.0)
    with pytest.raises(ValueError, match=r"upper_t must be contiguous CPU torch.float64 \[1, 1\]"):
        native.tree_provenance(q, tree, -1.0, upper.T.contiguous().expand(2, 1), first, 1e9, *state, 60.0)
    with pytest.raises(ValueError, match="top_id must be"):
        native.tree_provenance(q, tree, -1.0, upper, first, 1e9, *state[:4], state[4].int(), 60.0)


def _exact_sweep(tree, q, a, s2, centre, threshold, dtype, threads=None, skip=60.0):
    """The exact backend's C sweep from an empty state: (posterior means [R, C], running maxima [R], pairs, skipped)."""
    from machines.posterior.exact import cluster_upper

    R, C = q.shape[0], centre.numel()
    m, acc = torch.full((R,), -1e300, dtype=torch.float64), torch.zeros(R, C + 1, dtype=torch.float64)
    upper = cluster_upper(q, tree, a, s2)
    pairs, skipped = native.tree_sums((q * (a / s2 / 255)).to(dtype).contiguous(), tree, -(a * a) / (2 * s2),
                                        upper.T.contiguous(), upper.argmax(1).contiguous(), threshold, centre, m, acc, skip,
                                        threads=threads)
    return acc[:, :C] / acc[:, C:], m, pairs, skipped


def _brute_posterior(tree, q, a, s2, centre):
    """Float64 over every distinct patch with its count: the posterior means of the centre coordinates and the largest logit."""
    keys = tree.patches.double() / 255
    ell = (2 * a * q @ keys.T - a * a * keys.pow(2).sum(1)) / (2 * s2) + tree.log_counts
    return torch.softmax(ell, 1) @ keys[:, centre], ell.amax(1)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("D,centre", [(9, [4]), (27, [4, 13, 22])])  # grey and RGB 3×3 patches, channel-major
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_sweep_tree_matches_brute_force(threads, D, centre, dtype, tol):
    """The exact backend's C sweep with no pruning margin reached: every (query, patch) pair once, and the posterior
    means of the centre coordinates equal one float64 softmax over every patch, in float64 to round-off and in
    float32 within its round-off; clusters of uneven sizes (padding to the vector width weighs nothing)."""
    tree = _tree(700, D, 50, threads)
    g = torch.Generator().manual_seed(threads + D)
    R, a, s2 = 150, 0.8, 0.05  # ≥ 64 rows per thread, so 3 threads split the rows; a remainder of 150 % 6 queries
    q = a * tree.patches[torch.randint(0, tree.patches.shape[0], (R,), generator=g)].double() / 255 \
        + 0.2 * torch.randn(R, D, generator=g, dtype=torch.float64)
    centre = torch.tensor(centre)
    mean, m, pairs, skipped = _exact_sweep(tree, q, a, s2, centre, 1e9, dtype, threads)
    assert pairs == R * tree.patches.shape[0] and 0 <= skipped < pairs
    want, peak = _brute_posterior(tree, q, a, s2, centre)
    torch.testing.assert_close(mean, want, rtol=0, atol=tol)
    torch.testing.assert_close(m, peak, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sweep_tree_prunes_within_its_tolerance(dtype):
    """With the backend's pruning margin ln(U/tol), far clusters are skipped (under half the pairs) and the means
    stay within tol of the unpruned sweep's; a margin of 0 (only the first cluster and ties with it) does not."""
    tree = _tree(2000, 4, 32, 5)
    g = torch.Generator().manual_seed(5)
    R, a, s2, tol = 40, 0.99, 0.002, 1e-12
    q = a * tree.patches[torch.randint(0, tree.patches.shape[0], (R,), generator=g)].double() / 255 \
        + 0.01 * torch.randn(R, 4, generator=g, dtype=torch.float64)
    centre = torch.tensor([1])
    full = _exact_sweep(tree, q, a, s2, centre, 1e9, dtype)
    pruned = _exact_sweep(tree, q, a, s2, centre, math.log(tree.patches.shape[0] / tol), dtype)
    assert pruned[2] < 0.5 * full[2]
    torch.testing.assert_close(pruned[0], full[0], rtol=0, atol=2 * tol if dtype == torch.float64 else 1e-6)
    greedy = _exact_sweep(tree, q, a, s2, centre, 0.0, dtype)
    assert greedy[2] < pruned[2]


@needs_kernel
def test_sweep_tree_rejects_bad_input():
    tree = _tree(30, 9, 8, 0)
    R = 2
    q = torch.zeros(R, 9, dtype=torch.float64)
    upper, first = torch.zeros(tree.n_clusters, R, dtype=torch.float64), torch.zeros(R, dtype=torch.long)
    m, acc = torch.full((R,), -1e300, dtype=torch.float64), torch.zeros(R, 2, dtype=torch.float64)
    centre = torch.tensor([4])
    with pytest.raises(TypeError, match="float32 or float64 queries"):
        native.tree_sums(q.half(), tree, -1.0, upper, first, 1e9, centre, m, acc, 60.0)
    with pytest.raises(ValueError, match=r"acc must be contiguous CPU torch.float64 \[2, 2\]"):
        native.tree_sums(q, tree, -1.0, upper, first, 1e9, centre, m, torch.zeros(R, 3, dtype=torch.float64), 60.0)
    with pytest.raises(ValueError, match="centre coordinates must lie in"):
        native.tree_sums(q, tree, -1.0, upper, first, 1e9, torch.tensor([9]), m, acc, 60.0)
    with pytest.raises(ValueError, match="upper_t must be"):
        native.tree_sums(q, tree, -1.0, upper.T.contiguous(), first, 1e9, centre, m, acc, 60.0)


@needs_kernel
@pytest.mark.parametrize("kind,P", [("bbELS", 5), ("ELS", 3)])
def test_pruned_sweep_equals_cluster_visits(mnist, kind, P, monkeypatch):
    """The backend's pruned pass through the one-call C sweep equals its cluster-by-cluster visits (a matrix product
    per block, then the fold): float64 to round-off, float32 no further from float64 than the visits are."""
    bank = MemoryBank(mnist)
    x0 = to_model_range(mnist.images[-2:], torch.float64)
    for t in (0.05, 0.4, 0.9):
        a, s2 = alpha_sigma2(t)
        x = a * x0 + s2**0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        out = {}
        for sweep in (True, False):
            for dtype in (torch.float64, torch.float32):
                backend = ExactBackend(kernel="fused", dtype=dtype, tiles=sweep)
                out[sweep, dtype] = ScoreMachine(bank, kind, scales=P, backend=backend)(x, t)
                assert backend.stats.visited > 0
        torch.testing.assert_close(out[True, torch.float64], out[False, torch.float64], rtol=0, atol=1e-12)
        ref = out[True, torch.float64]
        err_sweep = (out[True, torch.float32].double() - ref).abs().max()
        err_visits = (out[False, torch.float32].double() - ref).abs().max()
        assert err_sweep <= max(2 * err_visits, 1e-5)


@pytest.fixture(scope="module")
def mnist(mnist_at):
    return mnist_at(60, resize=16)


@needs_kernel
@pytest.mark.parametrize("kind,P", [("bbELS", 5), ("ELS", 3), ("LS", 7), ("IS", None)])
@pytest.mark.parametrize("dedup,prune", [(False, False), (True, True)])
def test_fused_backend_equals_torch_operations(mnist, kind, P, dedup, prune):
    """Across t ∈ [0.05, 1]: float64 fused = torch ops to round-off, float32 fused within float32 round-off."""
    bank = MemoryBank(mnist, dedup=dedup)
    x0 = to_model_range(mnist.images[-2:], torch.float64)
    for t in (0.05, 0.3, 0.6, 0.95, 1.0):
        a, s2 = alpha_sigma2(t)
        x = a * x0 + s2**0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ref = ScoreMachine(bank, kind, scales=P, backend=ExactBackend(kernel="torch", prune=prune, chunk_size=500))(x, t)
        fused = ExactBackend(kernel="fused", prune=prune, chunk_size=500, query_chunk=40)
        torch.testing.assert_close(ScoreMachine(bank, kind, scales=P, backend=fused)(x, t), ref, rtol=0, atol=1e-10)
        f32 = ScoreMachine(bank, kind, scales=P, backend=ExactBackend(kernel="fused", prune=prune, dtype=torch.float32))(x, t)
        assert (f32.double() - ref).abs().max() <= 2e-3  # float32 logits: ~1e-4 relative weights at late times


def test_auto_falls_back_to_torch_without_a_compiler(mnist, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATCHBANK_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native.build, "_state", {})
    assert not native.available() and "no C compiler" in native.unavailable_reason()
    with pytest.raises(RuntimeError, match="unavailable"):
        ExactBackend(kernel="fused")
    auto = ExactBackend()
    assert not auto.uses_fused("cpu")
    bank = MemoryBank(mnist, dedup=False)
    x = to_model_range(mnist.images[:1], torch.float64)
    out = ScoreMachine(bank, "bbELS", scales=3, backend=auto)(x, 0.4)
    ref = ScoreMachine(bank, "bbELS", scales=3, backend=ExactBackend(kernel="torch"))(x, 0.4)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_kernel
def test_kernel_compiles_into_a_fresh_cache(monkeypatch, tmp_path):
    """First use compiles into the cache (temporary name, then rename); later loads reuse the file."""
    monkeypatch.setenv("PATCHBANK_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(native.build, "_state", {})
    assert native.available()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("native-") and files[0].suffix == ".so"
    stamp = files[0].stat().st_mtime_ns
    monkeypatch.setattr(native.build, "_state", {})
    assert native.available() and files[0].stat().st_mtime_ns == stamp


def test_kernel_option_is_checked():
    with pytest.raises(ValueError, match="kernel"):
        ExactBackend(kernel="cuda")


@needs_kernel
def test_row_table_finds_each_row_and_only_equal_rows():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(-3, 4, (3000, 4), generator=gen, dtype=torch.int16).unique(dim=0)  # dense: many near-collisions
    table = native.RowTable(rows)
    pick = torch.randint(0, rows.shape[0], (20000,), generator=gen)
    queries = rows[pick].clone()
    queries[::5, 2] = 9  # outside the table's values: no row equals these
    found, missing = table.find(queries)
    want = torch.where(torch.arange(pick.numel()) % 5 == 0, -1, pick)
    assert torch.equal(found, want) and missing == int((want < 0).sum())
    with pytest.raises(ValueError, match="two equal rows"):
        native.RowTable(torch.cat([rows, rows[:1]]))
    with pytest.raises(ValueError, match="int16"):
        table.find(queries.float())


@needs_kernel
@pytest.mark.parametrize("padding,C,P", [("zeros", 1, 5), ("circular", 3, 3)])
def test_row_table_reads_windows_in_place_as_patches_at_makes_them(padding, C, P):
    from patchbank.geometry import all_locations, pad_images, patches_at

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (4, C, 6, 7), generator=gen, dtype=torch.int16) * 100
    locs = all_locations(6, 7)[torch.randperm(42, generator=gen)[:30]]
    entries = patches_at(x, locs, P, padding).flatten(0, 1)
    rows = entries[: entries.shape[0] // 2].unique(dim=0)  # some windows are missing from the table
    table = native.RowTable(rows)
    found, missing = table.find_windows(pad_images(x, P // 2, padding), locs, P)
    want, want_missing = table.find(entries)
    assert torch.equal(found, want) and missing == want_missing and 0 < missing < entries.shape[0]
    hit = found >= 0
    assert torch.equal(rows[found[hit]], entries[hit])
    with pytest.raises(ValueError, match="inside the padded images"):
        table.find_windows(x, locs, P)


def test_counting_order_is_the_stable_sort():
    keys = torch.randint(0, 40, (5000,), generator=torch.Generator().manual_seed(2))
    order = native.counting_order(keys, torch.bincount(keys, minlength=50))
    assert torch.equal(order, torch.argsort(keys, stable=True))
    if native.available():
        with pytest.raises(ValueError, match="sum to the number of keys"):
            native.counting_order(keys, torch.bincount(keys, minlength=50)[:-11])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("C", [1, 3, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_register_tile_blocks_match_brute_force_and_the_block_kernels(threads, C, dtype, tol):
    """fold_keys and moments_keys (logits made in registers from prepared keys; 333 keys, padded to the tile width)
    against a float64 softmax over every key and against fold / moments on the same logits block, over two blocks
    (the running maximum rescales the first)."""
    g = torch.Generator().manual_seed(threads + 10 * C)
    R, M, D = 200, 333, 27  # 200 rows: 3 threads split them; 200 % 6 leaves a partial tile of queries
    q = torch.randn(R, D, generator=g, dtype=torch.float64)
    parts = [(torch.rand(M, D, generator=g, dtype=torch.float64) + shift, -3 * torch.rand(M, generator=g, dtype=torch.float64),
              torch.rand(M, C, generator=g, dtype=torch.float64)) for shift in (0.0, 0.3)]
    ell = torch.cat([q @ k.T + b for k, b, _ in parts], 1)
    vals = torch.cat([v for _, _, v in parts])
    want = torch.softmax(ell, 1) @ vals
    m, acc = torch.full((R,), -1e300, dtype=torch.float64), torch.zeros(R, C + 1, dtype=torch.float64)
    m2 = torch.full((R,), -1e300, dtype=torch.float64)
    s1, s2 = torch.zeros(R, C + 1, dtype=torch.float64), torch.zeros(R, 2 * C + 1, dtype=torch.float64)
    m3, t1, t2 = m2.clone(), s1.clone(), s2.clone()
    qs = q.to(dtype).contiguous()
    for keys, bias, values in parts:
        block = native.lay_out_keys(keys, bias, values, dtype)
        assert block.keys_t.shape[1] % native.TILE_WIDTH == 0 and block.n == M
        native.fold_tiles(qs, block, m, acc, 60.0, threads=threads)
        native.moments_tiles(qs, block, m2, s1, s2, threads=threads)
        native.fold_moments((qs.double() @ keys.to(dtype).double().T + bias.to(dtype).double()).to(dtype).contiguous(),
                        values.to(dtype).T.contiguous(), m3, t1, t2)
    torch.testing.assert_close(acc[:, :C] / acc[:, C:], want, rtol=0, atol=tol)
    torch.testing.assert_close(m, ell.amax(1), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(m2, m3, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    rel = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(s1, t1, rtol=rel, atol=rel)
    torch.testing.assert_close(s2, t2, rtol=rel, atol=rel)


@needs_kernel
def test_register_tile_blocks_reject_bad_input():
    keys = native.lay_out_keys(torch.rand(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                                torch.rand(5, 4, dtype=torch.float64), torch.float64)
    q = torch.zeros(2, 4, dtype=torch.float64)
    m, acc = torch.full((2,), -1e300, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="share a float32 or float64 dtype"):
        native.fold_tiles(q.float(), keys, m, acc, 60.0)
    with pytest.raises(ValueError, match="laid out by lay_out_keys for dimension 3"):
        native.fold_tiles(q[:, :3].contiguous(), keys, m, acc, 60.0)
    with pytest.raises(ValueError, match=r"acc must be contiguous CPU torch.float64 \[2, 5\]"):
        native.fold_tiles(q, keys, m, acc[:, :4].contiguous(), 60.0)
    with pytest.raises(ValueError, match=r"s2 must be contiguous CPU torch.float64 \[2, 9\]"):
        native.moments_tiles(q, keys, m, acc, torch.zeros(2, 8, dtype=torch.float64))


@needs_kernel
def test_peak_is_measured_in_a_plausible_range():
    """The float32 multiply-add peak benchmarks divide by: a CPU core does between 1 and 10,000 GFLOP/s."""
    assert 1.0 < native.peak_gflops(0.05) < 1e4


@needs_kernel
def test_register_tile_kernels_give_the_same_sums_on_python_threads(monkeypatch):
    """Without OpenMP the register-tile kernels split the rows over Python threads instead; each row's sums do not
    depend on which thread or range computes them, so both ways agree to the bit (3 threads)."""
    tree = _tree(2000, 4, 32, 5)  # with the pruning margin, so each query's bounds decide which clusters it visits
    g = torch.Generator().manual_seed(3)
    q = 0.99 * tree.patches[torch.randint(0, tree.patches.shape[0], (150,), generator=g)].double() / 255 \
        + 0.01 * torch.randn(150, 4, generator=g, dtype=torch.float64)
    keys = native.lay_out_keys(torch.rand(333, 4, generator=g, dtype=torch.float64), torch.zeros(333, dtype=torch.float64),
                                torch.rand(333, 1, generator=g, dtype=torch.float64), torch.float64)

    def both():
        mean = _exact_sweep(tree, q, 0.99, 0.002, torch.tensor([1]), math.log(2000 / 1e-12), torch.float64, threads=3)
        m = torch.full((150,), -1e300, dtype=torch.float64)
        s1, s2 = torch.zeros(150, 2, dtype=torch.float64), torch.zeros(150, 3, dtype=torch.float64)
        native.moments_tiles(q.contiguous(), keys, m, s1, s2, threads=3)
        return mean, (m, s1, s2)

    with_omp = both()
    monkeypatch.setattr(native.build.library(), "kernels_openmp", lambda: 0)
    without = both()
    for a, b in zip([*with_omp[0], *with_omp[1]], [*without[0], *without[1]]):
        assert a == b if isinstance(a, int) else torch.equal(a, b)
