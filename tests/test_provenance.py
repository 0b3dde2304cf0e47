"""Patch-mosaic provenance: the paper's two-image example, IS memorisation, LS locality, ELS equivariance,
agreement with a brute-force softmax over every training patch, and that explaining never changes a sample."""

from __future__ import annotations

import pytest
import torch
from conftest import noised

from machines import ScoreMachine, alpha_sigma2, noise_from_seeds, sample
from machines.metrics import pearson_r
from machines.posterior.topk import TopKBackend
from machines.provenance import explain, memorisation, mosaic_statistics, provenance, reassembled_mosaic
from patchbank import BankSpec, ImageData, MemoryBank, PatchBank, dictionary_groups, patches_at, to_model_range, two_image
from patchbank.geometry import BucketKey
from pipelines.figures import source_gallery


def test_two_image_mosaic_sources_are_the_image_of_each_pixels_colour():
    machine = ScoreMachine(two_image(10), "ELS", 3)
    noise = noise_from_seeds([0, 1, 2], (1, 10, 10), torch.float64)
    final, found = explain(machine, noise, steps=20, at=[19])
    p = found[19]
    colour = (final[:, 0] > 0).long()  # image 0 is all black, image 1 all white
    assert torch.equal(p.images[..., 0], colour)
    assert (p.image_share[..., 0] > 1 - 1e-6).all()
    assert torch.equal(final, sample(machine, noise, steps=20))  # explaining does not change the sample
    stats = mosaic_statistics(p)
    assert all(s["distinct_sources"] <= 2 and s["top_share_ge_0.9"] == 1.0 and sum(s["regions"]) == 100 for s in stats)


def test_is_names_the_memorised_image_at_every_pixel(tiny):
    data = tiny(3)
    machine = ScoreMachine(data, "IS")
    final, found = explain(machine, noise_from_seeds([4, 5], (3, 7, 9), torch.float64), steps=20, at=[19], m=3)
    train = to_model_range(data.images, torch.float64).flatten(1)
    memorised = torch.cdist(final.flatten(1), train).argmin(1)
    p = found[19]
    assert (p.images[..., 0] == memorised[:, None, None]).all() and (p.image[..., 0] == memorised[:, None, None]).all()
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(9), indexing="ij")
    assert (p.row[..., 0] == rows).all() and (p.col[..., 0] == cols).all()


def test_ls_sources_sit_at_the_pixels_own_location(tiny):
    data = tiny(1)
    p = provenance(ScoreMachine(data, "LS", 3), noised(data, 0.3, 2), 0.3, m=4)
    rows, cols = torch.meshgrid(torch.arange(7), torch.arange(9), indexing="ij")
    assert (p.row == rows[None, :, :, None]).all() and (p.col == cols[None, :, :, None]).all()
    assert (p.image >= 0).all() and (p.share.sum(-1) <= 1 + 1e-12).all()


def test_els_provenance_is_equivariant(tiny):
    data = tiny(3)
    machine = ScoreMachine(data, "ELS", 3)
    x = noised(data, 0.3, 2, seed=3)
    p = provenance(machine, x, 0.3, m=4)
    q = provenance(machine, torch.roll(x, (2, 5), (2, 3)), 0.3, m=4)
    at = (p.row[..., 0] - torch.arange(7)[None, :, None]) % 7, (p.col[..., 0] - torch.arange(9)[None, None, :]) % 9
    assert at[0].unique().numel() > 1 or at[1].unique().numel() > 1  # ELS sources come from other locations too
    for name in ("image", "row", "col", "images"):
        assert torch.equal(getattr(q, name), torch.roll(getattr(p, name), (2, 5), (1, 2))), name
    torch.testing.assert_close(q.share, torch.roll(p.share, (2, 5), (1, 2)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("conditional", [False, True])
def test_shares_mass_and_entropy_equal_a_brute_force_softmax(tiny, conditional):
    data = tiny(3)
    labels = torch.tensor([1, 0])
    machine = ScoreMachine(MemoryBank(data, dedup=True), "bbELS", 3, conditional=conditional)
    t = 0.2
    x = noised(data, t, 2, seed=9)
    p = provenance(machine, x, t, labels if conditional else None, m=5, block=7)  # many blocks
    a, s2 = alpha_sigma2(t)
    train = to_model_range(data.images, torch.float64)
    for b in range(2):
        keep = (data.labels == labels[b]) if conditional else torch.ones(len(data), dtype=torch.bool)
        for key, locs in dictionary_groups(7, 9, 3, "bbELS"):
            cand = patches_at(train[keep], locs, 3, "zeros").flatten(0, 1)  # every (image, location), image-major
            src = torch.nonzero(keep).view(-1).repeat_interleave(locs.shape[0])
            for (i, j), query in zip(locs.tolist(), patches_at(x[b : b + 1], locs, 3, "zeros")[0]):
                logp = (-(query - a * cand).pow(2).sum(1) / (2 * s2)).log_softmax(0)
                share, order = logp.exp().sort(descending=True)
                want = torch.zeros(5, dtype=torch.float64)  # fewer than m entries: the rest listed with share 0, image −1
                want[: min(5, share.numel())] = share[:5]
                torch.testing.assert_close(p.share[b, i, j], want, rtol=0, atol=1e-9)
                assert (p.image[b, i, j, share.numel():] == -1).all()
                assert abs(float(p.mass[b, i, j] - share[:5].sum())) <= 1e-9
                assert abs(float(p.entropy[b, i, j] + (logp.exp() * logp).sum())) <= 1e-9
                assert p.image[b, i, j, 0] == src[order[0]]
                assert (p.row[b, i, j, 0], p.col[b, i, j, 0]) == tuple(locs[order[0] % locs.shape[0]].tolist())
                per_image = torch.zeros(len(data), dtype=torch.float64).index_add_(0, src, logp.exp())
                assert abs(float(p.image_share[b, i, j, 0] - per_image.max())) <= 1e-9
    if conditional:
        assert all(s["sources_within_label"] for s in mosaic_statistics(p, labels))


def test_bad_requests_are_errors(tiny):
    data = tiny(1)
    with pytest.raises(ValueError, match="m must be"):
        provenance(ScoreMachine(data, "LS", 3), noised(data, 0.3, 1), 0.3, m=0)
    with pytest.raises(ValueError, match="ES"):
        provenance(ScoreMachine(data, "ES"), noised(data, 0.3, 1), 0.3)
    with pytest.raises(TypeError, match="analytic machines"):
        provenance(lambda x, t, labels=None: x, noised(data, 0.3, 1), 0.3)  # type: ignore[arg-type]


def test_explaining_along_another_denoiser_follows_its_trajectory(tiny):
    data = tiny(3)
    driver, machine = ScoreMachine(data, "bbELS", 5), ScoreMachine(data, "bbELS", 3)
    noise = noise_from_seeds([0, 1], (3, 7, 9), torch.float64)
    final, found = explain(machine, noise, steps=6, at=[4, 5], m=2, along=driver)
    assert torch.equal(final, sample(driver, noise, steps=6))  # the sample is the driver's
    states = {}
    sample(driver, noise, steps=6, callback=lambda step, t, x_prev, x0: states.setdefault(step + 1, x_prev))
    for step in (4, 5):  # provenance is the machine's at the driver's state, and the agreement its x̂0's r there
        p = found[step]
        want = provenance(machine, states[step], p.t, m=2)
        assert torch.equal(p.share, want.share) and torch.equal(p.image, want.image) and p.scale == 3
        r = pearson_r(machine(states[step], p.t), driver(states[step], p.t))
        torch.testing.assert_close(p.agreement, r, rtol=0, atol=1e-12)
    _, itself = explain(machine, noise, steps=6, at=[5], along=machine)
    torch.testing.assert_close(itself[5].agreement, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_memorisation_check_and_source_gallery(tiny, tmp_path):
    data = tiny(3)
    final, found = explain(ScoreMachine(data, "IS"), noise_from_seeds([4, 5], (3, 7, 9), torch.float64), steps=20, at=[19], m=3)
    checks = memorisation(final, found[19], data)
    train = to_model_range(data.images, torch.float64).flatten(1)
    assert [c["nearest_training_image"] for c in checks] == torch.cdist(final.flatten(1), train).argmin(1).tolist()
    assert all(c["nearest_training_rms"] < 1e-3 and c["mosaic_rms"] < 1e-3 for c in checks)  # IS memorises: both ~0
    rows = source_gallery(final[0], found[19], data, tmp_path / "is.png")
    assert rows == [{"image": checks[0]["nearest_training_image"], "label": int(data.labels[rows[0]["image"]]), "pixels": 63}]
    machine = ScoreMachine(data, "bbELS", 3)
    final, found = explain(machine, noise_from_seeds([0, 1], (3, 7, 9), torch.float64), steps=10, at=[9])
    rows = source_gallery(final[1], found[9], data, tmp_path / "bbels.png", b=1, n=2)
    counts = torch.bincount(found[9].image[1, :, :, 0].flatten())
    assert [r["pixels"] for r in rows] == counts.sort(descending=True).values[:2].tolist() and (tmp_path / "bbels.png").is_file()
    mosaic = reassembled_mosaic(found[9], data)
    p = found[9]
    torch.testing.assert_close(mosaic[1, :, 2, 3], to_model_range(data.images[p.image[1, 2, 3, 0], :, p.row[1, 2, 3, 0], p.col[1, 2, 3, 0]],
                                                                  torch.float64))


def _binary(n: int = 12) -> ImageData:
    """Black-and-white 8×8 images: their 3×3 patches repeat, as real data's do."""
    g = torch.Generator().manual_seed(0)
    return ImageData(((torch.rand(n, 1, 8, 8, generator=g) > 0.6) * 255).to(torch.uint8), torch.arange(n) % 2, "binary")


def _true_share(data, machine, x, t, b, i, j, image, row, col, label=None):
    """Brute force: the posterior share of one training patch (image, centre row/col) at pixel (i, j)."""
    a, s2 = alpha_sigma2(t)
    train = to_model_range(data.images, torch.float64)
    keep = torch.ones(len(data), dtype=torch.bool) if label is None else data.labels == label
    for key, locs in dictionary_groups(8, 8, 3, "bbELS"):
        hit = ((locs[:, 0] == i) & (locs[:, 1] == j)).nonzero()
        if hit.numel():
            cand = patches_at(train[keep], locs, 3, "zeros")  # [n, L, D]
            q = patches_at(x[b : b + 1], locs, 3, "zeros")[0, hit[0, 0]]
            logp = (-(q - a * cand.flatten(0, 1)).pow(2).sum(1) / (2 * s2)).log_softmax(0).view(cand.shape[:2])
            where = ((locs[:, 0] == row) & (locs[:, 1] == col)).nonzero()[0, 0]
            return float(logp[int(torch.nonzero(keep).view(-1).tolist().index(image)), where].exp())
    raise AssertionError("pixel not found")


@pytest.mark.parametrize("conditional", [False, True])
def test_certified_provenance_agrees_with_exact_within_its_certificate(conditional):
    data = _binary()
    labels = torch.tensor([0, 1]) if conditional else None
    machine = ScoreMachine(MemoryBank(data, dedup=True), "bbELS", 3, conditional=conditional)
    tol, scanned = 1e-3, False
    for t, seed in ((0.05, 3), (0.3, 4)):
        x = noised(data, t, 2, seed=seed)
        exact = provenance(machine, x, t, labels, m=4)
        cert = provenance(machine, x, t, labels, m=4, index=TopKBackend(k=8), tol=tol)
        assert exact.exact.all() and (~cert.exact).any()  # pixels certified …
        scanned = scanned or bool(cert.exact.any())  # … and (at t = 0.3) some scanned exactly
        same = cert.exact
        for name in ("share", "mass", "entropy", "image_share", "mass_lower"):  # scanned pixels: the exact scan's answer
            torch.testing.assert_close(getattr(cert, name)[same], getattr(exact, name)[same], rtol=0, atol=1e-12)
        c = ~same  # read off the top-k posterior: every share within its certificate
        assert (cert.share[c] >= exact.share[c] - 1e-12).all() and (cert.share[c] <= exact.share[c] * (1 + tol) + 1e-12).all()
        assert (cert.mass_lower <= exact.mass + 1e-12).all()
        assert ((cert.image_share[..., 0] - exact.image_share[..., 0]).abs()[c] <= tol + 1e-12).all()
        assert ((cert.entropy - exact.entropy).abs()[c] <= 1e-2).all()
        for b, i, j in c.nonzero()[:20].tolist():  # each listed source really carries the share listed (brute force)
            for r in range(4):
                truth = _true_share(data, machine, x, t, b, i, j, int(cert.image[b, i, j, r]), int(cert.row[b, i, j, r]),
                                    int(cert.col[b, i, j, r]), None if labels is None else int(labels[b]))
                assert truth - 1e-12 <= float(cert.share[b, i, j, r]) <= truth * (1 + tol) + 1e-12
    assert scanned
    strict = provenance(machine, x, t, labels, m=4, index=TopKBackend(k=8), tol=0.0)  # only buckets retrieved whole (ε = 0) kept
    kept = ~strict.exact
    assert kept.any() and not kept.all() and torch.equal(strict.mass_lower[kept], strict.mass[kept])
    torch.testing.assert_close(strict.share, exact.share, rtol=0, atol=1e-12)


def test_certified_provenance_through_a_faiss_index_equals_the_in_memory_one(tmp_path):
    pytest.importorskip("faiss")
    data = _binary()
    bank = PatchBank.build(data, tmp_path / "bank", BankSpec(scales=[3], rules=["bbELS"], index="Flat"), progress=False)
    x = noised(data, 0.05, 2, seed=3)
    here = provenance(ScoreMachine(MemoryBank(data, dedup=True), "bbELS", 3), x, 0.05, m=4, index=TopKBackend(k=8), tol=1e-3)
    there = provenance(ScoreMachine(bank, "bbELS", 3), x, 0.05, m=4, index=TopKBackend(k=8, index="Flat"), tol=1e-3)
    both = ~here.exact & ~there.exact
    assert both.float().mean() > 0.5
    torch.testing.assert_close(there.share[both], here.share[both], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(there.mass_lower[both], here.mass_lower[both], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["bbELS", "ELS"])
def test_provenance_through_distinct_patches_equals_the_scan_of_every_patch(kind):
    data = _binary()  # many repeated patches: each distinct one stands for many copies
    x = noised(data, 0.2, 2, seed=5)
    grouped = provenance(ScoreMachine(MemoryBank(data, dedup=True), kind, 3), x, 0.2, m=5)
    every = provenance(ScoreMachine(MemoryBank(data, dedup=False), kind, 3), x, 0.2, m=5)
    for name in ("share", "mass", "entropy", "image_share"):
        torch.testing.assert_close(getattr(grouped, name), getattr(every, name), rtol=0, atol=1e-9)
    unique_top = every.image_share[..., 0] > every.image_share[..., 1] + 1e-9  # where the top image is not a tie
    assert unique_top.float().mean() > 0.3 and torch.equal(grouped.images[..., 0][unique_top], every.images[..., 0][unique_top])
    train = to_model_range(data.images, torch.float64)
    pad = "zeros" if kind == "bbELS" else "circular"
    for b, i, j in [(0, 0, 0), (1, 4, 5), (0, 7, 3)]:  # each listed copy is a patch of the listed weight
        q = patches_at(x[b : b + 1], torch.tensor([[i, j]]), 3, pad)[0, 0]
        for r in range(5):
            src = patches_at(train[grouped.image[b, i, j, r] : grouped.image[b, i, j, r] + 1],
                             torch.stack([grouped.row[b, i, j, r], grouped.col[b, i, j, r]])[None], 3, pad)[0, 0]
            a, s2 = alpha_sigma2(0.2)
            ratio = float(grouped.share[b, i, j, r] / grouped.share[b, i, j, 0])
            want = float((-(q - a * src).pow(2).sum() / (2 * s2)).exp() / (-(q - a * patches_at(
                train[grouped.image[b, i, j, 0] : grouped.image[b, i, j, 0] + 1],
                torch.stack([grouped.row[b, i, j, 0], grouped.col[b, i, j, 0]])[None], 3, pad)[0, 0]).pow(2).sum() / (2 * s2)).exp())
            assert abs(ratio - want) <= 1e-9


@pytest.mark.parametrize("t,kernel", [(0.05, None), (0.3, None), (0.05, False), (0.3, False)])
def test_provenance_without_image_shares_prunes_clusters_and_keeps_every_patch_exact(mnist_at, monkeypatch, t, kernel):
    import machines.retrieval as retrieval

    data = mnist_at(30, 12)
    monkeypatch.setattr(retrieval, "LEAF_SIZE", 8)  # many clusters on a small bank, so some can be skipped
    monkeypatch.setattr(retrieval, "USE_KERNEL", kernel)  # None: the C scan where it compiles; False: torch operations
    if t == 0.3:
        monkeypatch.setattr(retrieval, "MERGE_EVERY", 64)  # torch: the running top-m merged down many times on the way
    pairs = []  # (query, patch) pairs computed: by the torch visits' logits blocks, or as the C sweep counts them
    real, sweep = retrieval.logits, retrieval.native.tree_provenance
    monkeypatch.setattr(retrieval, "logits", lambda q, keys, *rest: pairs.append(q.shape[0] * keys.shape[0]) or real(q, keys, *rest))
    monkeypatch.setattr(retrieval.native, "tree_provenance", lambda *args, **kw: pairs.append(sweep(*args, **kw)))
    machine = ScoreMachine(MemoryBank(data, dedup=True), "bbELS", 3, conditional=True)
    labels = data.labels[:2]
    x = noised(data, t, 2, seed=7)
    exact = provenance(machine, x, t, labels, m=5)
    pairs.clear()
    fast = provenance(machine, x, t, labels, m=5, image_shares=False)
    for name in ("share", "mass", "entropy", "mass_lower"):
        torch.testing.assert_close(getattr(fast, name), getattr(exact, name), rtol=0, atol=1e-9)
    gap = (exact.share[..., :-1] - exact.share[..., 1:]).abs() > 1e-9  # copies of one patch tie, listed in any order
    untied = torch.cat([gap, torch.ones_like(gap[..., :1])], -1) & torch.cat([torch.ones_like(gap[..., :1]), gap], -1)
    assert untied.float().mean() > 0.3
    for name in ("image", "row", "col", "label"):
        assert torch.equal(getattr(fast, name)[untied], getattr(exact, name)[untied]), name
    assert fast.listed_images and not exact.listed_images
    # the listed images' shares are lower bounds: never above the top image's true share, never below the top patch's
    assert (fast.image_share[..., 0] <= exact.image_share[..., 0] + 1e-12).all()
    assert (fast.image_share[..., 0] >= fast.share[..., 0] - 1e-12).all()
    torch.testing.assert_close(fast.image_share.sum(-1), fast.mass, rtol=0, atol=1e-12)
    listed = torch.where(fast.images >= 0, fast.images, -2)
    assert all(set(listed[b, i, j].tolist()) - {-2} == set(fast.image[b, i, j].tolist()) - {-1}
               for b in range(2) for i in range(12) for j in range(12))
    total = sum(machine.bank.unique_patches(BucketKey("bbELS", 3, "zeros", key, int(label))).patches.shape[0] * locs.shape[0]
                for key, locs in dictionary_groups(12, 12, 3, "bbELS") for label in labels)
    assert 0 < sum(pairs) <= total
    if t == 0.05:  # late: most clusters are provably negligible
        assert sum(pairs) < 0.5 * total


@pytest.mark.parametrize("kernel", [None, False])
def test_a_table_built_for_other_data_is_refused_by_the_source_map(tiny, monkeypatch, kernel):
    import machines.retrieval as retrieval
    from machines.retrieval import source_map
    from patchbank.tables import UniquePatches

    monkeypatch.setattr(retrieval, "USE_KERNEL", kernel)  # None: the C hash table where it compiles; False: sorted hashes
    data = tiny(1)
    bank = MemoryBank(data, dedup=True)
    key, locs = next(iter(dictionary_groups(7, 9, 3, "bbELS")))
    key = BucketKey("bbELS", 3, "zeros", key, None)
    table = bank.unique_patches(key)
    shuffled = UniquePatches(table.patches[1:], table.counts[1:])  # a patch missing: built for other data
    monkeypatch.setattr(bank, "unique_patches", lambda k: shuffled)
    with pytest.raises(ValueError, match="does not hold every patch"):
        source_map(bank, key, locs, bank.image_ids(None))
    recount = UniquePatches(table.patches, table.counts.flip(0))
    monkeypatch.setattr(bank, "unique_patches", lambda k: recount)
    if not torch.equal(recount.counts, table.counts):
        with pytest.raises(ValueError, match="counts do not match"):
            source_map(bank, key, locs, bank.image_ids(None))


@pytest.mark.parametrize("rule,P,colour", [("bbELS", 5, False), ("ELS", 3, True)])
def test_source_map_places_every_entry_and_both_lookups_agree(tiny, mnist_at, monkeypatch, rule, P, colour):
    """Each entry listed under its distinct patch is that patch (brute force), counts and per-image runs
    agree with the entries, and the C hash table and the sorted-hash lookup build the same map."""
    import machines.retrieval as retrieval
    from patchbank.geometry import patches_at

    data = tiny(3) if colour else mnist_at(20, 10)
    bank = MemoryBank(data, dedup=True)
    maps = []
    for kernel in (None, False):
        monkeypatch.setattr(retrieval, "USE_KERNEL", kernel)
        retrieval.forget_sources(bank)
        padding = "circular" if rule == "ELS" else "zeros"
        dkey, locs = next(iter(dictionary_groups(data.shape[-2], data.shape[-1], P, rule)))
        key = BucketKey(rule, P, padding, dkey, None)
        ids = bank.image_ids(None)
        maps.append(retrieval.source_map(bank, key, locs, ids))
    for a, b in zip(*maps):
        assert torch.equal(a, b)
    sources, table = maps[0], bank.unique_patches(key)
    x = data.images[ids].to(torch.int16).mul(2).sub(255)
    entries = patches_at(x, locs, P, padding).flatten(0, 1)  # [N·L, D], image-major
    for u in range(table.patches.shape[0]):
        mine = sources.order[sources.offsets[u] : sources.offsets[u + 1]]
        assert torch.equal(mine, torch.nonzero((entries == table.patches[u]).all(1)).view(-1))
        lo, hi = sources.image_offsets[u], sources.image_offsets[u + 1]
        images, count = (mine // locs.shape[0]).unique(return_counts=True)
        assert torch.equal(sources.image_pos[lo:hi], images) and torch.equal(sources.image_count[lo:hi], count)
