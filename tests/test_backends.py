"""Every registered posterior backend against exact on the same small banks, the registry of specs, the
shared serving rule and statistics, and the CLI sampling with every backend."""

from __future__ import annotations

import math

import pytest
import torch

from machines import BACKENDS, ExactBackend, ScaleSchedule, ScoreMachine, describe_backends, make_backend, noise_from_seeds, parse_backend, sample
from machines.posterior import BackendStats, serving
from machines.posterior.topk import TopKStats
from patchbank import BankSpec, BucketKey, MemoryBank, PatchBank
from pipelines.cli import build_parser, main

H = 12
SCHEDULE = ScaleSchedule(((1.0, 3), (0.5, 5), (0.0, 3)))


def _max_abs(tol: float):
    return lambda out, ref: float((out - ref).abs().max()) <= tol


def _correlated(out, ref) -> bool:
    return all(float(torch.corrcoef(torch.stack([o.flatten(), r.flatten()]))[0, 1]) > 0.99 for o, r in zip(out, ref))


# Per kind: a spec for small banks, what its answers must satisfy against exact (from its guarantee:
# a certified tolerance compounds over the steps; statistical answers must correlate), and a check that
# its own route (not only the exact fallback) served some pixels.
CASES = {
    "exact": ("exact:prune=0", _max_abs(1e-12), lambda st: st.visited == st.total > 0),
    "topk": ("topk:k=32:tol=1e-4", _max_abs(1e-3), lambda st: st.fallback < st.queries),
    "tail": ("tail:k=32:samples=512", _correlated, lambda st: st.fallback < st.queries),
    "summary": ("summary:tol=1e-3:leaf_size=32", _max_abs(1e-2), lambda st: st.summarised > 0),
    "auto": ("auto:samples=1024:se_tol=0.02:plan_margin=1", _correlated, lambda st: st.sampled > 0),
    "sharded": ("sharded:shards=3:inner=topk:k=32", _max_abs(1e-3), lambda st: st.fallback < st.queries),
}


def test_every_registered_backend_has_a_case():
    assert set(CASES) == set(BACKENDS)


@pytest.fixture(scope="module")
def banks(mnist_at, tmp_path_factory) -> dict:
    data = mnist_at(60, resize=H)
    disk = PatchBank.build(data, tmp_path_factory.mktemp("backends") / "bank", BankSpec(scales=[3, 5], index="Flat"), progress=False)
    return {"memory": MemoryBank(data, dedup=True), "disk": disk}


@pytest.fixture(scope="module")
def exact_samples(banks) -> torch.Tensor:
    noise = noise_from_seeds([0, 1], (1, H, H), torch.float64)
    return sample(ScoreMachine(banks["memory"], "bbELS", SCHEDULE), noise, steps=6)


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("kind", list(CASES))
def test_backend_sample_tracks_exact(banks, exact_samples, kind, where):
    spec, agrees, served = CASES[kind]
    backend = make_backend(spec)
    noise = noise_from_seeds([0, 1], (1, H, H), torch.float64)
    out = sample(ScoreMachine(banks[where], "bbELS", SCHEDULE, backend=backend), noise, steps=6)
    assert agrees(out, exact_samples), spec
    assert served(backend.stats), spec
    bound = backend.stats.summary()["error_bound"]
    assert (bound is not None) == (backend.guarantee in ("exact", "certified")), spec
    again = sample(ScoreMachine(banks[where], "bbELS", SCHEDULE, backend=spec), noise, steps=6)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # deterministic, draws included


def test_serving_rule(banks):
    memory = MemoryBank(banks["memory"].data, dedup=True, materialise_max=3)
    assert serving(memory, BucketKey("IS", None, "zeros", ())) == "image"
    assert serving(memory, BucketKey("bbELS", 3, "zeros", (1, 1, 1, 1))) == "table"
    assert serving(memory, BucketKey("bbELS", 5, "zeros", (2, 2, 2, 2))) == "stream"
    assert serving(banks["disk"], BucketKey("bbELS", 5, "zeros", (2, 2, 2, 2))) == "table"


@pytest.mark.parametrize("kind", list(CASES))
def test_whole_image_and_streamed_buckets_are_summed_exactly(banks, kind):
    data = banks["memory"].data
    streamed = MemoryBank(data, dedup=True, materialise_max=3)
    x = noise_from_seeds([3], (1, H, H), torch.float64)
    for machine, scales in (("IS", None), ("bbELS", 5)):
        backend = make_backend(CASES[kind][0])
        out = ScoreMachine(streamed, machine, scales, backend=backend)(x, 0.4)
        ref = ScoreMachine(streamed, machine, scales, backend=ExactBackend(prune=False))(x, 0.4)
        float32 = getattr(backend, "exact", backend).dtype == torch.float32  # the policy's fallback sums in float32
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 if float32 else 1e-12)


def test_specs_parse_into_configured_backends():
    topk = make_backend("topk:k=64:tol=none:nprobe=16:index=IVF64,Flat:dtype=float32")
    assert (topk.k, topk.tol, topk.nprobe, topk.index, topk.exact.dtype) == (64, None, 16, "IVF64,Flat", torch.float32)
    auto = make_backend("auto:se_tol=0.005:query_chunk=32")  # auto has no query_chunk: its exact fallback's
    assert (auto.se_tol, auto.exact.query_chunk) == (0.005, 32)
    tail = make_backend("tail:query_chunk=16:exact.query_chunk=64")  # tail has its own; exact.<name> reaches the fallback's
    assert (tail.query_chunk, tail.exact.query_chunk) == (16, 64)
    assert make_backend("exact:prune=0:dedup=false:chunk_size=1e3").chunk_size == 1000
    assert make_backend("summary:leaf_size=16").leaf_size == 16 and make_backend("summary:leaf_size=16").exact.leaf_size == 2048
    first, second = make_backend("auto"), make_backend("auto")
    assert first.stats is not second.stats
    assert str(parse_backend(" topk:k=8 ")) == "topk:k=8"


@pytest.mark.parametrize("bad, says", [
    ("fast", "unknown kind"), ("topk:k", "not option=value"), ("topk:kk=3", "no option 'kk'"), ("topk:k=1.5", "not an integer"),
    ("exact:dtype=float16", "float32, float64"), ("tail:proposal=magic", "count, uniform"), ("exact:prune=maybe", "not a flag"),
    ("auto:samples=1", "samples"), ("summary:tol=2", "tol"), ("topk:tol=0", "tol"), ("exact:exact.dtype=float32", "no option"),
])
def test_bad_specs_are_errors_naming_the_problem(bad, says):
    with pytest.raises(ValueError, match=says):
        parse_backend(bad)


def test_listing_shows_every_kind_option_and_default():
    text = describe_backends()
    for kind, entry in BACKENDS.items():
        assert f"{kind}:" in text
        for name in entry.options:
            assert f"    {name}=" in text, (kind, name)
    assert "se_tol=0.005" in text and "plan_margin=4.0" in text and "k=256" in text and "exact.<option>" in text


def test_stats_reset_restores_every_default():
    st = TopKStats()
    st.queries, st.certified = 5, False
    st.eps.append(torch.ones(2))
    with st.timer("search_s"):
        pass
    assert st.search_s > 0
    st.reset()
    assert st == TopKStats() and st.eps == [] and st.eps is not TopKStats().eps
    assert isinstance(st, BackendStats)


def test_backend_naming_an_index_needs_a_bank_with_it(banks):
    x = noise_from_seeds([0], (1, H, H), torch.float64)
    with pytest.raises(ValueError, match="IVF8,Flat"):
        ScoreMachine(banks["memory"], "bbELS", 3, backend="topk:index=IVF8,Flat")(x, 0.2)
    ScoreMachine(banks["disk"], "bbELS", 3, backend="topk:index=Flat")(x, 0.2)  # the bank's own index: fine


def test_every_job_takes_a_backend_spec():
    parser = build_parser()
    for argv in (["sample"], ["calibrate"], ["evaluate"]):
        assert parser.parse_args(argv + ["--backend", "auto:se_tol=0.005"]).backend == "auto:se_tol=0.005"
        with pytest.raises(SystemExit):
            parser.parse_args(argv + ["--backend", "topk:kk=1"])
    assert parser.parse_args(["ablate", "--grid", "exact", "auto:se_tol=0.005"]).grid == ["exact", "auto:se_tol=0.005"]


@pytest.mark.parametrize("kind", list(CASES))
def test_cli_samples_with_every_backend(kind, datasets_env, tmp_path, capsys):
    def run(spec: str, out: str) -> torch.Tensor:
        main(["sample", "--dataset", "mnist", "--resize", str(H), "--n-train", "60", "--seeds", "0-1", "--steps", "6",
              "--scale", "5", "--backend", spec, "--out", str(tmp_path / out)])
        return torch.load(tmp_path / out / "samples.pt")["samples"]

    ref = run("exact", "exact")
    out = run(CASES[kind][0], kind)
    assert CASES[kind][1](out.double(), ref.double()), kind
    main(["backends"])
    assert f"{kind}:" in capsys.readouterr().out
    assert not math.isnan(float(out.sum()))


@pytest.mark.parametrize("kind", list(CASES))
def test_a_sample_does_not_depend_on_its_batch(banks, kind):
    """Seed 3 alone and seed 3 among seeds 1, 2, 3 give the same sample, through every backend (up to the
    round-off of float32 draw logits blocked with other queries: ~1e-8)."""
    machine = ScoreMachine(banks["memory"], "bbELS", SCHEDULE, backend=CASES[kind][0])
    alone = sample(machine, noise_from_seeds([3], (1, H, H), torch.float64), steps=6)
    batch = sample(machine, noise_from_seeds([1, 2, 3], (1, H, H), torch.float64), steps=6)
    torch.testing.assert_close(batch[2:], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, P, conditional, C", [("bbELS", 3, False, 1), ("LS", 3, True, 3), ("IS", None, False, 3),
                                                      ("ELS", 5, True, 1)])
def test_sums_over_shards_merge_into_the_whole_posterior(tiny, kind, P, conditional, C):
    """1, 2 and 3 shards of a bucket's stream, summed apart and merged, give the single-pass posterior (1e-12)."""
    from conftest import noised

    from machines import alpha_sigma2
    from machines.posterior import merge_all, shard_sums
    from patchbank import dictionary_groups, patches_at

    data = tiny(C)
    bank = MemoryBank(data, dedup=True)
    a, s2 = alpha_sigma2(0.4)
    x = noised(data, 0.4, 2)
    padding = "circular" if kind == "ELS" else "zeros"
    label = 1 if conditional else None
    if P is None:
        groups = [(BucketKey("IS", None, "zeros", (), label), x.flatten(1))]
    else:
        groups = [(BucketKey(kind, P, padding, key, label), patches_at(x, locs, P, padding).flatten(0, 1))
                  for key, locs in dictionary_groups(7, 9, P, kind)]
    backend = ExactBackend(prune=False, chunk_size=5)
    for bucket, q in groups:
        whole = backend.posterior(bank, bucket, q, a, s2)
        for shards in (1, 2, 3):
            parts = [shard_sums(backend, bank, bucket, q, a, s2, i, shards, whole.shape[1]) for i in range(shards)]
            torch.testing.assert_close(merge_all(parts).mean(), whole, rtol=0, atol=1e-12)
            torch.testing.assert_close(merge_all(parts[::-1]).mean(), whole, rtol=0, atol=1e-12)


def test_on_rows_folds_views_the_state_itself_or_copies_written_back():
    from machines.posterior.base import on_rows

    def add_row_ids(m, acc):  # a fold that depends on which row it sees: row k's parts gain 10·(its position)
        m += 10 * torch.arange(m.shape[0], dtype=m.dtype)
        acc += 1
        return m.shape[0]

    m, acc = torch.zeros(5, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    assert on_rows(slice(1, 3), add_row_ids, m, acc) == 2
    assert m.tolist() == [0, 0, 10, 0, 0] and acc[:, 0].tolist() == [0, 1, 1, 0, 0]
    on_rows(torch.arange(5), add_row_ids, m, acc)  # every row, in order: the tensors themselves
    assert m.tolist() == [0, 10, 30, 30, 40]
    on_rows(torch.tensor([4, 0, 1, 2, 3]), add_row_ids, m, acc)  # every row, permuted: copies, written back by row
    assert m.tolist() == [10, 30, 60, 70, 40] and acc[:, 0].tolist() == [2, 3, 3, 2, 2]
