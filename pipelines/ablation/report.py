"""An ablation's report: rows from per-step records, the fastest accurate configuration, CSV and markdown."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import torch

from machines.metrics import pearson_r, r2
from patchbank.atomic import atomic_write

from .config import Variant


def make_row(v: Variant, backend, final: torch.Tensor, seconds: float, seeds: int, steps: list[dict], mem,
             reference_final: torch.Tensor, network_final: torch.Tensor | None) -> dict:
    """One configuration's row: time, memory, agreement with the exact reference (and the network), errors, bounds."""
    r = pearson_r(final, reference_final)
    certified = backend.guarantee in ("exact", "certified")
    device = v.device
    row = {
        "config": v.name,
        "kind": v.kind,
        "options": str(v.spec).partition(":")[2] or "-",
        "index": backend.index or "-",
        "device": device,
        "guarantee": backend.guarantee,
        "certified": certified,
        "seconds_per_sample": seconds / seeds,
        "seconds": seconds,
        "peak_rss_mb": round(mem.peak_mb, 1),
        "peak_rss_increase_mb": round(mem.peak_mb - mem.base_mb, 1),
        "peak_gpu_mb": round(mem.gpu_mb, 1) if device.startswith("cuda") else None,
        "pearson_r_median": statistics.median(r.tolist()),
        "pearson_r_min": float(r.min()),
        "r2_median": statistics.median(r2(final, reference_final).tolist()),
        "max_abs_diff": float((final - reference_final).abs().max()),
        "fallback_fraction": _mean([s.get("fallback_fraction") for s in steps]),
        "eps_median": _median([s.get("eps_median") for s in steps]),
        "certified_fraction": _mean([s.get("certified_fraction") for s in steps]),  # top-k: pixels with ε ≤ 1e-4 (or tol)
        "eps_max": _max([s.get("eps_max") for s in steps]),
        "se_median": _median([s.get("se_median") for s in steps]),
        "search_s": sum(s.get("search_s", 0.0) for s in steps),
        "exact_s": sum(s.get("exact_s", 0.0) for s in steps),
        "step_error_max": _max([s.get("error_max") for s in steps]),
        "within_bound": all(s.get("within_bound", True) for s in steps) if certified else None,
    }
    if network_final is not None:
        row["network_r_median"] = statistics.median(pearson_r(final, network_final).tolist())
        row["exact_network_r_median"] = statistics.median(pearson_r(reference_final, network_final).tolist())
    return row


def merge_steps(recs: list[dict]) -> dict:
    """One step's records from several seed batches as one: times and counts add up, maxima stay maxima,
    fractions and medians are averaged over batches, flags must hold in all."""
    if len(recs) == 1:
        return recs[0]
    out: dict = {}
    for k in recs[0]:
        vals = [r[k] for r in recs if k in r]
        if k in ("step", "t", "P") or not all(isinstance(x, (int, float)) for x in vals):
            out[k] = vals[0] if k != "choice" or len(set(vals)) == 1 else "mixed"
        elif isinstance(vals[0], bool):
            out[k] = all(vals)
        elif k in ("seconds", "queries") or k.endswith("_s"):
            out[k] = sum(vals)
        elif k.endswith("_max") or k in ("bound", "se_max_teacher"):
            out[k] = max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out


def _clean(xs):
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def _mean(xs):
    xs = _clean(xs)
    return sum(xs) / len(xs) if xs else None


def _median(xs):
    xs = _clean(xs)
    return statistics.median(xs) if xs else None


def _max(xs):
    xs = _clean(xs)
    return max(xs) if xs else None


def exact_row(rows: list[dict]) -> dict | None:
    """The grid's `exact` row (the speed-up baseline), if it has one."""
    return next((r for r in rows if r["config"] == "exact"), None)


def best_configuration(rows: list[dict], min_r: float = 0.999) -> dict | None:
    """The fastest row whose final samples keep Pearson r ≥ ``min_r`` (minimum over seeds) with exact."""
    ok = [r for r in rows if r["pearson_r_min"] >= min_r]
    if not ok:
        return None
    best = min(ok, key=lambda r: r["seconds"])
    exact = exact_row(rows)
    return {"config": best["config"], "seconds_per_sample": best["seconds_per_sample"], "pearson_r_min": best["pearson_r_min"],
            "speedup_vs_exact": best.get("speedup_vs_exact"), "baseline": "exact row" if exact else "reference run"}


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def summary_markdown(report: dict) -> str:
    """A markdown table of the rows (and the concentration cells) for a README or a paper."""
    cfg = report["config"]
    base = ("× exact is against the warm `exact` row." if exact_row(report["rows"]) else
            "no `exact` row: × exact is against the reference run's seconds.")
    lines = [f"Ablation: {cfg['machine']} on {cfg['dataset']} ({cfg['n_train'] or 'all'} images, resize {cfg['resize']}), "
             f"schedule {cfg['calibration'] or cfg['schedule']}, {len(cfg['seeds'])} seeds × {cfg['steps']} steps; "
             f"exact reference {report['reference_seconds'] / len(cfg['seeds']):.1f} s/sample (cold: includes building tables); " + base, "",
             "| config | s/sample | × exact | r min | max abs Δ | fallback | certified | ε median | step err max | within bound | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(
            f"| `{r['config']}` | {r['seconds_per_sample']:.2f} | {r['speedup_vs_exact'] or 0:.2f} | {r['pearson_r_min']:.6f} | "
            f"{r['max_abs_diff']:.1e} | {_fmt(r['fallback_fraction'], '.3f')} | {_fmt(r.get('certified_fraction'), '.3f')} | "
            f"{_fmt(r['eps_median'], '.1e')} | "
            f"{_fmt(r['step_error_max'], '.1e')} | {_bound_text(r)} | "
            f"{r['peak_rss_mb']:.0f} |")
    best = report.get("best")
    lines += ["", f"Fastest configuration with r ≥ 0.999 against exact: `{best['config']}`, "
                  f"{best['seconds_per_sample']:.2f} s/sample, ×{_fmt(best['speedup_vs_exact'], '.2f')} vs the {best['baseline']}."
              if best else "No configuration kept r ≥ 0.999 against exact."]
    if "network_r_median" in report["rows"][0]:
        lines += ["", "Machine-vs-network median r per config: " + ", ".join(
            f"`{r['config']}` {r['network_r_median']:.4f}" for r in report["rows"])]
    certified = {name: recs for name, recs in report.get("steps", {}).items()
                 if recs and any(rec.get("certified_fraction") is not None for rec in recs)}
    if certified:
        lines += ["", "Pixels certified by top-k per step (ε ≤ tol, or 1e-4 without one; the rest go to the exact fallback):", "",
                  "| config | " + " | ".join(f"t={rec['t']:.2f} P={rec.get('P', '–')}" for rec in next(iter(certified.values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(certified.values())))]
        for name, recs in certified.items():
            lines.append(f"| `{name}` | " + " | ".join(_fmt(rec.get("certified_fraction"), ".3f") for rec in recs) + " |")
    if report.get("certificate"):
        ks = sorted({c["k"] for c in report["certificate"]})
        lines += ["", "Certificate study: fraction of sampled pixels each top-k configuration certifies (ε ≤ its tol, or 1e-4), "
                      "per k from one search; P from the schedule.", "",
                  "| config | t | P | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|---:|---:|" + "---:|" * len(ks)]
        cells: dict[tuple, dict] = {}
        for c in report["certificate"]:
            cells.setdefault((c["config"], c["t"], c["P"]), {})[c["k"]] = c["certified"]
        for (name, t, P), by_k in cells.items():
            lines.append(f"| `{name}` | {t:.2f} | {P} | " + " | ".join(_fmt(by_k.get(k), ".3f") for k in ks) + " |")
    if report.get("concentration"):
        lines += ["", "Posterior concentration (median over pixels): distinct patches holding 1 − 10⁻³ of the mass / bucket distinct "
                      "entries; effective number exp(H).", "", "| t | P | k(0.999) | of | exp(H) distinct | exp(H) patches |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in report["concentration"]:
            lines.append(f"| {c['t']:.2f} | {c['P']} | {c['k_mass_median']:.0f} | {c['entries_median']:.0f} | "
                         f"{c['n_eff_distinct_median']:.1f} | {c['n_eff_patches_median']:.1f} |")
    return "\n".join(lines) + "\n"


def _bound_text(r: dict) -> str:
    if r["guarantee"] == "statistical":
        return f"statistical (SE median {_fmt(r.get('se_median'), '.1e')})"
    return "uncertified" if r["within_bound"] is None else str(r["within_bound"])


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


