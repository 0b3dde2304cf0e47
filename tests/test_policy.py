"""The automatic policy backend and raw patch draws, against brute force and exact."""

from __future__ import annotations

import pytest
import torch

from machines import AutoBackend, ExactBackend, SummaryBackend, TopKBackend, alpha_sigma2, native
from patchbank import MemoryBank, to_model_range
from patchbank.geometry import BucketKey, centre_index, patches_at

H = 12


@pytest.fixture(scope="module")
def mnist(mnist_at):
    return mnist_at(80, resize=H)


@pytest.fixture(scope="module")
def bank(mnist):
    return MemoryBank(mnist, dedup=True)


def _queries(mnist, t: float, P: int = 3, seed: int = 0, key: tuple[int, ...] | None = None):
    a, s2 = alpha_sigma2(t)
    x = to_model_range(mnist.images[-4:], torch.float64)
    xt = a * x + s2**0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bucket = BucketKey("bbELS", P, "zeros", key or (P // 2,) * 4, None)
    return patches_at(xt, bucket.locations(H, H), P, "zeros").flatten(0, 1), bucket, a, s2


@pytest.mark.parametrize("P,key", [(3, None), (5, (0, 2, 2, 2)), (5, (0, 2, 0, 2))])
def test_raw_draws_follow_the_counts(bank, P, key):
    """Uniform draws over (image, location) are draws of distinct patches with probability count/n."""
    bucket = BucketKey("bbELS", P, "zeros", key or (P // 2,) * 4, None)
    table = bank.unique_patches(bucket)
    m = 20000
    draws = bank.sample_patches(bucket, m, torch.Generator().manual_seed(1))
    assert draws.keys.shape == (m, P * P) and draws.values.shape == (m, 1)
    torch.testing.assert_close(draws.values[:, 0], draws.keys[:, centre_index(1, P)[0]])
    rows = {tuple(r): i for i, r in enumerate(table.patches.tolist())}
    ids = torch.tensor([rows[tuple(r)] for r in (draws.keys * 255).round().to(torch.int64).tolist()])  # KeyError: not in bucket
    freq = torch.bincount(ids, minlength=len(rows)).double() / m
    p = table.counts.double() / table.total
    top = p.argsort(descending=True)[:5]
    assert ((freq[top] - p[top]).abs() <= 5 * (p[top] * (1 - p[top]) / m).sqrt() + 1e-12).all()
    assert bank.bucket_size(bucket) == table.total


def test_draw_errors(bank):
    with pytest.raises(ValueError, match="whole images"):
        bank.sample_patches(BucketKey("IS", None, "zeros", (), None), 4, torch.Generator())
    with pytest.raises(ValueError, match="m >= 1"):
        bank.sample_patches(BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1)), 0, torch.Generator())


def test_shared_estimates_match_brute_force_snis(bank, mnist):
    """Means, standard errors and ESS over the same draws, computed one query at a time."""
    q, bucket, a, s2 = _queries(mnist, 0.6)
    backend = AutoBackend(samples=3000, max_samples=3000, growth=2, chunk=700, seed=5, draw_dtype=torch.float64)
    means, se, ok = backend.sampled(bank, bucket, q, a, s2)
    from machines.posterior import draw_seed as _seed

    draws = bank.sample_patches(bucket, 700, gen := torch.Generator().manual_seed(_seed(5, bucket, a)))
    keys = [draws.keys] + [bank.sample_patches(bucket, m, gen).keys for m in (700, 700, 700, 200)]
    keys = torch.cat(keys)
    v = keys[:, centre_index(1, 3)]
    for i in range(0, q.shape[0], 7):
        logw = -(q[i] - a * keys).pow(2).sum(1) / (2 * s2)
        w = torch.softmax(logw, 0)
        mu = (w[:, None] * v).sum(0)
        torch.testing.assert_close(means[i], mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(se[i], (w.pow(2) * (v[:, 0] - mu[0]).pow(2)).sum().sqrt(), rtol=1e-9, atol=1e-14)
        ess = 1 / w.pow(2).sum()
        assert bool(ok[i]) == bool(ess >= backend.min_ess and se[i] <= backend.se_tol)


@pytest.mark.parametrize("t", [0.1, 0.6, 1.0])
def test_fused_moments_and_float32_draws_agree_with_torch_operations(bank, mnist, t):
    """The fused moment kernel gives the torch operations' estimates to round-off (float64 draws),
    and float32 draws change them by float32 round-off only (same draws, same escalation)."""
    from machines import native

    if not native.available():
        pytest.skip(f"no fused kernel here: {native.unavailable_reason()}")
    q, bucket, a, s2 = _queries(mnist, t, P=5, key=(0, 2, 2, 2))  # rows escalate at different rounds: the row-subset path
    args = dict(samples=256, max_samples=4096, growth=2, chunk=300, se_tol=0.01, seed=3)
    ref = AutoBackend(kernel="torch", draw_dtype=torch.float64, **args).sampled(bank, bucket, q, a, s2)
    fused = AutoBackend(kernel="fused", draw_dtype=torch.float64, **args).sampled(bank, bucket, q, a, s2)
    f32 = AutoBackend(kernel="fused", draw_dtype=torch.float32, **args).sampled(bank, bucket, q, a, s2)
    torch.testing.assert_close(fused[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-9, atol=1e-7)  # SE = √(cancelling sums): round-off ~1e-16 → 1e-8
    assert torch.equal(fused[2], ref[2])
    assert (f32[0] - ref[0]).abs().max() < 1e-3 and (f32[1] - ref[1]).abs().max() < 1e-3
    assert (f32[2] != ref[2]).float().mean() < 0.02  # acceptance flips only at the threshold


FALLBACK_TOL = 1e-5  # float32 exact fallback against float64 (DESIGN: float32 logits lose ~1e-6 relative)


@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 1.0])
def test_answers_are_exact_or_within_a_few_standard_errors(bank, mnist, t):
    q, bucket, a, s2 = _queries(mnist, t)
    backend = AutoBackend(samples=1024, max_samples=4096, se_tol=0.05, min_ess=64, seed=2, probe=0)  # always draw first
    out = backend.posterior(bank, bucket, q, a, s2)
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)
    means, se, ok = AutoBackend(samples=1024, max_samples=4096, se_tol=0.05, min_ess=64, seed=2).sampled(bank, bucket, q, a, s2)
    err = (out - exact).abs().amax(1)
    assert (err[~ok] < FALLBACK_TOL).all()  # the rest went to the (float32) exact backend
    torch.testing.assert_close(out[ok], means[ok])
    if ok.any():
        assert (se[ok] <= 0.05).all()
        # the requested tolerance holds for the measured errors too (as a standard error does)
        assert (err[ok] <= 2 * 0.05).double().mean() >= 0.95 and (err[ok] <= 5 * 0.05).all()
        if t >= 0.3:  # at late times a few unseen heavy patches make the SE optimistic (errors ~1e-5 there)
            assert (err[ok] <= 4 * se[ok] + 1e-9).double().mean() >= 0.9
    s = backend.stats.summary()
    assert s["queries"] == q.shape[0]
    assert s["sampled_fraction"] + s["exact_fraction"] == pytest.approx(1.0)
    assert s["sampled_fraction"] == pytest.approx(float(ok.double().mean()))
    assert s["low_ess_fraction"] + s["high_se_fraction"] == pytest.approx(s["exact_fraction"])


def test_unbiased_over_seeds_for_a_broad_posterior(bank, mnist):
    """At t = 1 every query passes; the average over seeds converges to the exact mean (SNIS bias O(1/m))."""
    q, bucket, a, s2 = _queries(mnist, 1.0)
    q = q[:20]
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)[:, 0]
    runs = torch.stack([AutoBackend(samples=256, max_samples=256, se_tol=1.0, min_ess=8, seed=s).sampled(bank, bucket, q, a, s2)[0][:, 0]
                        for s in range(200)])
    sem = runs.std(0) / 200**0.5
    assert ((runs.mean(0) - exact).abs() <= 4 * sem + 1e-6).double().mean() >= 0.9
    assert (runs.std(0) > 0).all()  # the draws do differ between seeds


def test_small_buckets_go_exact_and_everything_can_go_exact(bank, mnist):
    q, bucket, a, s2 = _queries(mnist, 0.5, P=5, key=(0, 2, 0, 2))  # a corner: a single location
    backend = AutoBackend(samples=512)
    torch.testing.assert_close(backend.posterior(bank, bucket, q[:2], a, s2), ExactBackend().posterior(bank, bucket, q[:2], a, s2),
                               rtol=0, atol=FALLBACK_TOL)
    assert backend.stats.summary()["choice"] == "exact"
    q, bucket, a, s2 = _queries(mnist, 0.5)
    strict = AutoBackend(samples=256, max_samples=512, se_tol=1e-12)  # nothing passes
    torch.testing.assert_close(strict.posterior(bank, bucket, q, a, s2), ExactBackend().posterior(bank, bucket, q, a, s2),
                               rtol=0, atol=FALLBACK_TOL)
    assert strict.stats.exact == q.shape[0] and strict.stats.sampled == 0


def test_rest_goes_to_certified_topk(bank, mnist):
    """What the draws do not answer goes to top-k where its plan says top-k pays (a free search here), else to exact."""
    q, bucket, a, s2 = _queries(mnist, 0.1)
    costly = AutoBackend(samples=256, max_samples=512, se_tol=0.02, topk=TopKBackend(k=64, tol=1e-6), search_cost=1e6)
    costly.posterior(bank, bucket, q, a, s2)
    assert costly.stats.topk == 0 and costly.stats.exact > 0 and list(costly.topk_plans.values()) == [False]
    topk = TopKBackend(k=64, tol=1e-6)
    backend = AutoBackend(samples=256, max_samples=512, se_tol=0.02, topk=topk, search_cost=0)
    out = backend.posterior(bank, bucket, q, a, s2)
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)
    rest = backend.stats.topk
    assert rest > 0 and topk.stats.queries == rest
    assert (out - exact).abs().max() <= 0.2  # sampled answers are statistical; top-k ones within 2·tol
    means, se, ok = AutoBackend(samples=256, max_samples=512, se_tol=0.02).sampled(bank, bucket, q, a, s2)
    assert ((out - exact).abs().amax(1)[~ok] <= 2 * topk.tol + 1e-12).all()


def test_rest_goes_to_cluster_summaries(bank, mnist):
    q, bucket, a, s2 = _queries(mnist, 0.1)
    summary = SummaryBackend(tol=1e-4, leaf_size=16)
    backend = AutoBackend(samples=256, max_samples=512, se_tol=0.02, summary=summary, probe=0)  # always draw first
    out = backend.posterior(bank, bucket, q, a, s2)
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)
    rest = backend.stats.summaries
    assert rest > 0 and summary.stats.queries == rest and backend.stats.exact == 0
    assert backend.stats.summary()["fallback_fraction"] == rest / q.shape[0]
    means, se, ok = AutoBackend(samples=256, max_samples=512, se_tol=0.02).sampled(bank, bucket, q, a, s2)
    assert ((out - exact).abs().amax(1)[~ok] <= summary.tol).all()


def test_not_materialised_scales_stream_exactly(mnist):
    streamed = MemoryBank(mnist, dedup=True, materialise_max=3)
    q, bucket, a, s2 = _queries(mnist, 0.4, P=5)
    with pytest.raises(ValueError, match="no distinct-patch table"):
        streamed.unique_patches(bucket)
    torch.testing.assert_close(ExactBackend().posterior(streamed, bucket, q, a, s2),
                               ExactBackend().posterior(MemoryBank(mnist, dedup=True), bucket, q, a, s2), rtol=0, atol=1e-12)
    exact = ExactBackend().posterior(streamed, bucket, q, a, s2)
    means, se, ok = AutoBackend(samples=512, se_tol=0.05).sampled(streamed, bucket, q, a, s2)  # draws need no table either
    assert ok.any() and ((means - exact).abs().amax(1)[ok] <= 2 * 0.05).double().mean() >= 0.95  # within 2·se_tol
    out = AutoBackend(samples=512, se_tol=0.05, probe=0).posterior(streamed, bucket, q, a, s2)
    torch.testing.assert_close(out[~ok], exact[~ok], rtol=0, atol=FALLBACK_TOL)  # what the draws do not answer is exact
    torch.testing.assert_close(out[ok], means[ok], rtol=0, atol=0)


@pytest.mark.parametrize("t", [0.02, 0.1, 0.3, 0.6, 1.0])
def test_the_default_float32_fallback_is_within_its_tolerance(bank, mnist, t):
    """The policy's exact fallback sums in float32 by default: within FALLBACK_TOL of float64 at every time."""
    q, bucket, a, s2 = _queries(mnist, t)
    assert AutoBackend().exact.dtype == torch.float32
    f32 = AutoBackend().exact.posterior(bank, bucket, q, a, s2)
    assert (f32.double() - ExactBackend().posterior(bank, bucket, q, a, s2)).abs().max() <= FALLBACK_TOL


def test_queries_that_leave_the_draws_early_would_fail_at_the_limit(bank, mnist):
    """A query whose projected need exceeds 8× the limit leaves before the limit; sampled all the way to
    the limit, such queries (nearly all) indeed fail, so leaving early saves the rounds and changes the
    route of few answers."""
    leavers, failed = 0, 0
    for t in (0.2, 0.3, 0.5, 0.8):
        q, bucket, a, s2 = _queries(mnist, t)
        early = AutoBackend(samples=256, max_samples=8192, growth=2, se_tol=0.01, min_ess=64, seed=3)
        left = early.draw(bank, bucket, q, a, s2).left_early
        assert early.stats.stopped_early == int(left.sum())
        _, _, ok_at_limit = AutoBackend(samples=8192, max_samples=8192, se_tol=0.01, min_ess=64, seed=3).sampled(bank, bucket, q, a, s2)
        leavers, failed = leavers + int(left.sum()), failed + int((~ok_at_limit[left]).sum())
    assert leavers > 100 and failed >= 0.95 * leavers, (failed, leavers)


def test_bad_parameters():
    with pytest.raises(ValueError):
        AutoBackend(samples=1)
    with pytest.raises(ValueError):
        AutoBackend(samples=1024, max_samples=512)
    with pytest.raises(ValueError):
        AutoBackend(se_tol=0)
    with pytest.raises(ValueError, match="draw_dtype"):
        AutoBackend(draw_dtype=torch.float16)
    with pytest.raises(ValueError, match="kernel"):
        AutoBackend(kernel="cuda")


@pytest.mark.parametrize("rule,P,key", [("bbELS", 5, (2, 2, 2, 2)), ("bbELS", 5, (0, 2, 1, 2)), ("ELS", 3, ()), ("LS", 3, (4, 7))])
def test_streamed_patches_equal_by_strided_views_and_by_gathers(mnist, monkeypatch, rule, P, key):
    """Dictionaries are pixel rectangles, streamed through strided views; the general gather path gives the same."""
    import patchbank.base as base

    padding = "circular" if rule == "ELS" else "zeros"
    bucket = BucketKey(rule, P, padding, key, None)
    bank = MemoryBank(mnist, dedup=False)
    assert base._rectangle(bucket.locations(H, H)) is not None
    views = torch.cat([c.keys for c in bank.stream(bucket, 300)])
    monkeypatch.setattr(base, "_rectangle", lambda locs: None)
    gathers = torch.cat([c.keys for c in bank.stream(bucket, 300)])
    x = to_model_range(mnist.images, torch.float64)
    direct = patches_at(x, bucket.locations(H, H), P, padding).flatten(0, 1)  # image-major, pixels row-major
    torch.testing.assert_close(views, gathers, rtol=0, atol=0)
    torch.testing.assert_close(views, direct, rtol=0, atol=1e-15)


@pytest.mark.parametrize("C,P,padding", [(1, 1, "zeros"), (3, 3, "circular"), (3, 7, "zeros"), (2, 5, "circular")])
def test_gathered_patches_are_the_patches_at_their_pixels(C, P, padding):
    """Draws gather patches from a padded table by a strided view: each equals the patch cut at its pixel."""
    from patchbank.base import gather_patches
    from patchbank.geometry import pad_images

    g = torch.Generator().manual_seed(C * 10 + P)
    x = torch.randint(-255, 256, (6, C, 9, 11), generator=g, dtype=torch.int16)
    img, loc = torch.randint(6, (40,), generator=g), torch.stack([torch.randint(9, (40,), generator=g), torch.randint(11, (40,), generator=g)], 1)
    got = gather_patches(pad_images(x, P // 2, padding).contiguous(), img, loc, P)
    every = patches_at(x.double(), loc, P, padding)  # [N, M, C·P·P]: every image's patch at every drawn pixel
    assert got.dtype == torch.int16 and torch.equal(got.double(), every[img, torch.arange(40)])


@pytest.mark.parametrize("P,t,draws", [(3, 0.05, True), (3, 0.4, True), (3, 1.0, False), (5, 0.05, False), (5, 0.6, False)])
def test_the_cost_model_draws_only_where_draws_pay(bank, mnist, P, t, draws):
    """The probe's plan per (bucket, level): where forced draws answer a third or more of the queries it draws
    (then every answer is the forced backend's, to the bit), where they answer (almost) none it sums every
    query exactly without drawing. The plan depends on neither the queries nor the batch. (A draw priced at 1.5
    exact pairs, as against the per-block exact route, and no margin, so the cases keep their thresholds.)"""
    q, bucket, a, s2 = _queries(mnist, t, P=P)
    forced = AutoBackend(samples=256, probe=0)
    want = forced.posterior(bank, bucket, q, a, s2)
    planned = AutoBackend(samples=256, draw_cost=1.5, plan_margin=1)
    got = planned.posterior(bank, bucket, q, a, s2)
    answered = forced.stats.summary()["sampled_fraction"]
    assert (answered >= 1 / 3) if draws else (answered < 0.1)  # the cases are what they claim
    assert list(planned.plans.values()) == [draws]
    if draws:
        assert torch.equal(got, want) and planned.stats.summary()["planned_exact_fraction"] == 0
    else:
        assert planned.stats.draws == 0 and planned.stats.summary()["planned_exact_fraction"] == 1
        assert torch.equal(got, ExactBackend(dtype=torch.float32).posterior(bank, bucket, q, a, s2))
    probe_s = planned.stats.probe_s
    alone = planned.posterior(bank, bucket, q[:37], a, s2)  # the plan is kept: no second probe
    assert planned.stats.probe_s == probe_s
    torch.testing.assert_close(alone, got[:37], rtol=0, atol=1e-6)  # the same routes alone as in the batch (float32 round-off)
    torch.testing.assert_close(AutoBackend(samples=256, draw_cost=1.5, plan_margin=1).posterior(bank, bucket, q[:37], a, s2), got[:37],
                               rtol=0, atol=1e-6)


def test_a_draw_is_priced_against_the_exact_route_it_replaces(monkeypatch):
    """By default a draw costs what was measured against the exact route: 2.0 pairs of the register-tile kernels, 1.5 of
    the per-block product and fold (no sweep, or no fused kernel); a given ``draw_cost`` wins."""
    assert AutoBackend(draw_cost=3.0).cost_of_a_draw() == 3.0
    assert AutoBackend(exact=ExactBackend(kernel="torch")).cost_of_a_draw() == 1.5
    assert AutoBackend(exact=ExactBackend(dtype=torch.float32, tiles=False)).cost_of_a_draw() == 1.5
    assert AutoBackend().cost_of_a_draw() == (2.0 if ExactBackend().uses_tiles("cpu") else 1.5)
    assert AutoBackend(exact=ExactBackend(dtype=torch.float32, tiles=True)).cost_of_a_draw() == (2.0 if native.available() else 1.5)


def test_the_cost_model_options_are_checked():
    with pytest.raises(ValueError, match="probe >= 0 and draw_cost > 0"):
        AutoBackend(probe=-1)
    with pytest.raises(ValueError, match="probe >= 0 and draw_cost > 0"):
        AutoBackend(draw_cost=0)


@pytest.mark.parametrize("search_cost,first", [(0.0, True), (1e6, False)])
def test_top_k_goes_first_where_its_cost_model_says_it_pays(bank, mnist, search_cost, first):
    """Where draws do not pay (P = 5, late), the plan sends the bucket to certified top-k first when search plus
    certificate plus the exact fallback for the pixels it cannot certify cost less than exact — with a free search
    here — and to exact when the search costs too much. Top-k answers are its own (within 2·tol of exact, so
    the route changes an answer by at most that); the plan is kept per (bucket, level) and depends on no batch."""
    q, bucket, a, s2 = _queries(mnist, 0.05, P=5)
    topk = TopKBackend(k=64, tol=1e-4)
    policy = AutoBackend(samples=256, draw_cost=1.5, topk=topk, search_cost=search_cost)
    got = policy.posterior(bank, bucket, q, a, s2)
    assert list(policy.plans.values()) == [False] and list(policy.topk_plans.values()) == [first]
    summary = policy.stats.summary()
    assert policy.stats.draws == 0 and summary["planned_topk_fraction"] == (1.0 if first else 0.0)
    assert summary["planned_exact_fraction"] == (0.0 if first else 1.0)
    exact = ExactBackend().posterior(bank, bucket, q, a, s2)
    if first:
        assert torch.equal(got, TopKBackend(k=64, tol=1e-4).posterior(bank, bucket, q, a, s2))
        assert 0 < topk.stats.fallback < q.shape[0]  # some pixels certified, the rest summed exactly by top-k's fallback
        assert (got - exact).abs().max() <= 2 * topk.tol
    else:
        assert topk.stats.queries == 0
        torch.testing.assert_close(got, exact, rtol=0, atol=FALLBACK_TOL)
    fresh = AutoBackend(samples=256, draw_cost=1.5, topk=TopKBackend(k=64, tol=1e-4), search_cost=search_cost)
    torch.testing.assert_close(fresh.posterior(bank, bucket, q[:7], a, s2), got[:7], rtol=0, atol=1e-6)
    assert fresh.topk_plans == policy.topk_plans


def test_a_search_of_every_pair_that_costs_more_than_exact_is_not_probed(bank, mnist, monkeypatch):
    """Torch search (like Flat) computes every pair: where ``search_cost · U`` alone is above the exact route's pairs,
    the top-k plan says no after one query's search, without answering the probe queries by top-k."""
    q, bucket, a, s2 = _queries(mnist, 0.05, P=5)

    def no_trial(*args, **kwargs):
        raise AssertionError("the probe queries were answered by top-k")

    monkeypatch.setattr(TopKBackend, "posterior", no_trial)
    policy = AutoBackend(samples=256, draw_cost=1.5, topk=TopKBackend(k=64, tol=1e-4), search_cost=1.0)
    assert not policy.topk_pays(bank, bucket, a, s2)
    assert policy.pairs[bucket, a, s2] <= bank.unique_patches(bucket).patches.shape[0]  # V ≤ U: exact never costs more


def test_a_top_k_route_from_a_spec():
    """``auto:topk_k=K`` gives the policy a certified top-k route whose fallback is the policy's own exact backend."""
    from machines.posterior.registry import make_backend

    policy = make_backend("auto:topk_k=256:search_cost=2")
    assert policy.topk is not None and policy.topk.k == 256 and policy.topk.exact is policy.exact and policy.search_cost == 2
    assert make_backend("auto").topk is None
    with pytest.raises(ValueError, match="search_cost >= 0 and topk_k >= 1"):
        AutoBackend(topk_k=0)


def test_draws_are_priced_against_the_pruned_exact_route(bank, mnist):
    """The draws' plan weighs what they save by the pairs the exact route really computes per query (``V``, measured on
    the probe queries, cluster pruning included; every entry where the bucket is streamed), not by the bucket's size."""
    q, bucket, a, s2 = _queries(mnist, 0.05)
    policy = AutoBackend(samples=256, draw_cost=1.5)
    policy.posterior(bank, bucket, q, a, s2)
    plan = (bucket, a, s2)
    exact = ExactBackend(dtype=torch.float32)
    exact.posterior(bank, bucket, policy._probe_queries(bank, bucket, a, s2), a, s2)
    assert policy.pairs[plan] == exact.stats.visited / policy.probe <= bank.stream_size(bucket)
    for V, draws in ((1.0, False), (1e12, True)):  # the same probe, priced against a cheap or a costly exact route
        priced = AutoBackend(samples=256, draw_cost=1.5)
        priced.pairs[plan] = V
        priced.posterior(bank, bucket, q, a, s2)
        assert priced.plans[plan] == draws and (priced.stats.draws > 0) == draws
    streamed = MemoryBank(mnist, dedup=True, materialise_max=1)  # no tables at P = 3: every entry, every query
    policy = AutoBackend(samples=256)
    assert policy.exact_pairs(streamed, bucket, a, s2) == streamed.stream_size(bucket)


def test_failing_queries_stop_drawing_at_the_exact_pairs_they_would_replace(bank, mnist):
    """With the cost model on, a query that fails escalates to at most ``V / draw_cost`` draws (``V``: the pruned exact
    pairs per query of the plan), then is summed exactly; without it, to a quarter of the bucket. Streamed buckets keep
    the quarter (their ``V`` is every entry)."""
    q, bucket, a, s2 = _queries(mnist, 0.05)
    plan, N = (bucket, a, s2), bank.stream_size(bucket)
    free = AutoBackend(samples=256, draw_cost=1.5, probe=0, se_tol=1e-4)  # no cost model: up to N/4 draws
    free.posterior(bank, bucket, q, a, s2)
    assert free.stats.draws == N // 4 and free.stats.exact > 0
    capped = AutoBackend(samples=256, draw_cost=1.5, se_tol=1e-4)
    capped.pairs[plan], capped.plans[plan] = 600.0, True  # a pruned exact route of 600 pairs; draw first regardless
    assert capped.draw_limit(bank, bucket, N, a, s2) == 400
    got = capped.posterior(bank, bucket, q, a, s2)
    assert capped.stats.draws == 400  # 256, then 400 rather than 1,024
    failed = capped.stats.exact
    assert failed > 0 and capped.stats.sampled + failed == q.shape[0]
    exact = ExactBackend(dtype=torch.float32).posterior(bank, bucket, q, a, s2)
    assert ((got - exact).abs().amax(1) <= 1e-6).sum() >= failed  # those it gave up on are exact
    streamed = MemoryBank(mnist, dedup=True, materialise_max=1)
    assert capped.draw_limit(streamed, bucket, N, a, s2) == N // 4


def test_the_plan_keeps_draws_only_past_its_margin(bank, mnist):
    """``plan_margin`` m keeps the draws only where what they save exceeds m times what they cost: the same probe, priced
    against the same exact route, draws at m = 1 and sums exactly where the saving falls short of m."""
    q, bucket, a, s2 = _queries(mnist, 0.05)
    plan = (bucket, a, s2)
    plain = AutoBackend(samples=256, draw_cost=1.5)
    plain.pairs[plan] = 1e6  # an exact route of a million pairs per query: the draws pay
    plain.posterior(bank, bucket, q, a, s2)
    assert plain.plans[plan] and plain.stats.draws > 0
    strict = AutoBackend(samples=256, draw_cost=1.5, plan_margin=1e6)
    strict.pairs[plan] = 1e6
    got = strict.posterior(bank, bucket, q, a, s2)
    assert not strict.plans[plan] and strict.stats.draws == 0
    assert torch.equal(got, ExactBackend(dtype=torch.float32).posterior(bank, bucket, q, a, s2))
    with pytest.raises(ValueError, match="plan_margin"):
        AutoBackend(plan_margin=0)
