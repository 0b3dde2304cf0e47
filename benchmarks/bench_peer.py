"""One bbELS step against the paper's own code, on the same inputs, in the same run.

The paper's module (``LocalEquivBordersScoreModule`` of Kamb & Ganguli's ``idealscore.py``, kept
unmodified in ``../shared/peers/kamb_convolutional_diffusion/``) sums every training patch for every
pixel, in float32. This script gives it and patchbank's backends the same training images and the
same noised query, converts the peer's score to x̂0 (``x̂0 = (x + β·score)/√(1 − β)``), and prints per
P: seconds, speed-up over the peer, Pearson r and max |Δ| against the peer and against patchbank's
exact float64 answer, and for the exact backends the arithmetic they did against the machine's
float32 peak.

Arithmetic: the exact backends compute logits ``−‖q − a·p‖²/2s²`` as one inner product per (query
pixel, distinct patch) pair they visit, ``2·D`` flops with ``D = C·P²``, then fold one exponential
and ``C + 1`` multiply-adds. ``GFLOP/s`` counts ``(2·D + 2·(C + 1))`` flops per visited pair;
``peak`` is ``--peak-gflops`` per thread (default: measured here, by
:func:`machines.native.peak_gflops`, a C loop of independent float32 multiply-adds; about
116 on this project's AVX-512 CPU, where the nominal figure is 95), so ``of peak`` is the achieved
fraction of the float32 floor for the pairs the backend chose to visit (pruning skips the rest).

    PATCHBANK_DATASETS=../shared/datasets python benchmarks/bench_peer.py --n-train 1000 --scales 3 7 11
    python benchmarks/bench_peer.py --n-train 200 --scales 3 --repeat 1 --peer-repeat 1   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from machines import AutoBackend, ExactBackend, ScoreMachine, alpha_sigma2, native
from machines.metrics import pearson_r
from patchbank import MemoryBank, load_dataset, to_model_range

PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "kamb_convolutional_diffusion"


class _Images(torch.utils.data.Dataset):
    """The training images as the peer reads them: ``(image in [-1, 1] as [C, H, W] float32, label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def timed(fn, repeat: int) -> tuple[torch.Tensor, float]:
    """``fn()``'s answer and its median seconds over ``repeat`` runs."""
    runs, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - start)
    return out, statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--scales", nargs="+", type=int, default=[3, 7, 11])
    ap.add_argument("--t", type=float, default=0.35, help="diffusion time of the step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per patchbank backend (median)")
    ap.add_argument("--peer-repeat", type=int, default=1, help="runs of the peer's step (median)")
    ap.add_argument("--peak-gflops", type=float, default=None, help="float32 peak per thread, GFLOP/s (default: measured)")
    ap.add_argument("--peer", default=str(PEER), help="folder holding the paper's idealscore.py")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, args.peer)
    try:
        import idealscore  # the paper's module: a baseline only, never imported by the package
    except ImportError as err:
        raise SystemExit(f"the paper's idealscore.py could not be imported from {args.peer}: {err}") from None

    data = load_dataset(args.dataset, resize=32, limit=args.n_train or None)
    C = data.shape[0]  # data.shape is one image's (C, H, W)
    test = load_dataset(args.dataset, split="test", resize=32, limit=1)
    x0 = to_model_range(test.images, torch.float64)
    a, s2 = alpha_sigma2(args.t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (a * x0 + s2**0.5 * noise).float().double()  # representable in float32: both sides see the same query
    peer_data = _Images(to_model_range(data.images, torch.float32), data.labels)
    peak = (args.peak_gflops or native.peak_gflops()) * torch.get_num_threads()
    print(f"# {len(data)} training images {tuple(data.shape)}, 1 query at t = {args.t}, "
          f"{torch.get_num_threads()} threads, peak {peak:.0f} GFLOP/s")
    print(f"{'P':>3} {'method':16} {'step_s':>8} {'× peer':>7} {'r peer':>9} {'r exact':>9} {'max|Δ|':>8} "
          f"{'visited':>8} {'GFLOP/s':>8} {'of peak':>7}")
    for P in args.scales:
        peer = idealscore.LocalEquivBordersScoreModule(peer_data, kernel_size=P, batch_size=256, image_size=32,
                                                      channels=C, schedule=idealscore.cosine_noise_schedule)
        tt = torch.full((1,), args.t)
        beta = idealscore.cosine_noise_schedule(tt)
        xf = x.float()
        score, peer_s = timed(lambda: peer(tt, xf, device=torch.device("cpu"), k=P), args.peer_repeat)
        ref_peer = ((xf + beta * score) / (1 - beta).sqrt()).double()
        print(f"{P:3d} {'paper (float32)':16} {peer_s:8.3f} {1.0:7.1f} {1.0:9.6f} {'':>9} {'':>8}", flush=True)
        ref_exact = None
        for name, backend in (("exact float64", ExactBackend()), ("exact float32", ExactBackend(dtype=torch.float32)),
                              ("auto", AutoBackend())):
            machine = ScoreMachine(MemoryBank(data), "bbELS", scales=P, backend=backend)
            machine(x, 1.0)  # distinct-patch tables and clusters, built once per bank (not timed)
            backend.stats.reset()
            out, secs = timed(lambda: machine(x, args.t), args.repeat)
            if ref_exact is None:
                ref_exact = out
            cols = ""
            if isinstance(backend, ExactBackend):
                visited = backend.stats.visited / args.repeat
                gflops = visited * (2 * C * P * P + 2 * (C + 1)) / secs / 1e9
                cols = f"{backend.stats.visited_fraction:8.3f} {gflops:8.1f} {gflops / peak:7.1%}"
            print(f"{P:3d} {name:16} {secs:8.3f} {peer_s / secs:7.1f} {float(pearson_r(out, ref_peer)[0]):9.6f} "
                  f"{float(pearson_r(out, ref_exact)[0]):9.6f} {float((out - ref_peer).abs().max()):8.1e} {cols}", flush=True)


if __name__ == "__main__":
    main()
