"""Turning the runs' records into the comparison: pure functions, a plot and a markdown section.

Owns: reading/writing the records file (one JSON line per run, committed under docs/ so the
report rebuilds without re-running), time-to-accuracy, accuracy at a wall budget, the headline
ratio, the tables, the plot, and (until the shared helper lands) writing the section into a
markdown file. Knows nothing about how runs are launched.

A record's ``points`` are ``[seconds, training images seen, test accuracy]``, seconds on the
probe's clock (from the launch of the process, the probe's own evaluations left out).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

LIT_FT = "lit-ft"
KEY = ("setting", "peer", "seed")


# --------------------------------------------------------------------------- records


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if not all(k in r for k in (*KEY, "points")) or not r["points"]:
            raise ValueError(f"{path}:{n}: not a run record (needs {', '.join(KEY)} and points); fix or delete that line")
        out.append(r)
    return out


def save_records(path: Path, records: list[dict]) -> None:
    """One line per run, sorted, so the file diffs cleanly as runs are added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(records, key=lambda r: (r["setting"], r["peer"], r["seed"]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def upsert(records: list[dict], record: dict) -> list[dict]:
    """``records`` with ``record`` replacing any run of the same (setting, peer, seed)."""
    return [r for r in records if tuple(r[k] for k in KEY) != tuple(record[k] for k in KEY)] + [record]


# --------------------------------------------------------------------------- measures


def time_to(points: list[list[float]], target: float) -> Optional[float]:
    """Seconds at which test accuracy first reaches ``target``, linearly interpolated between the
    test point before and the first at or above it; ``None`` if it never does."""
    prev = None
    for s, _, acc in points:
        if acc >= target:
            if prev is None:
                return float(s)
            s0, a0 = prev
            return s0 + (target - a0) / (acc - a0) * (s - s0)
        prev = (s, acc)
    return None


def acc_at(points: list[list[float]], seconds: float) -> Optional[float]:
    """Test accuracy of the latest point taken by ``seconds`` (``None`` if none yet). A run that
    finished earlier keeps its final accuracy."""
    before = [acc for s, _, acc in points if s <= seconds]
    return before[-1] if before else None


def final(r: dict) -> tuple[float, float]:
    """(seconds, accuracy) of the run's last point: its whole run."""
    s, _, acc = r["points"][-1]
    return float(s), float(acc)


def ratio(lit: dict, peer: dict) -> Optional[float]:
    """lit-ft's time to the peer's final accuracy / the peer's time to it (its whole run);
    ``None`` if lit-ft never reached it."""
    peer_s, peer_acc = final(peer)
    t = time_to(lit["points"], peer_acc)
    return None if t is None else t / peer_s


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _pct(xs: list[float]) -> str:
    m, sd = _mean_sd([x * 100 for x in xs])
    return f"{m:.1f}" if math.isnan(sd) else f"{m:.1f} ± {sd:.1f}"


def _minutes(xs: list[Optional[float]]) -> str:
    if not xs:
        return "-"
    if any(x is None for x in xs):
        reached = [x for x in xs if x is not None]
        return f"not reached ({len(reached)}/{len(xs)} seeds)" if reached else "not reached"
    return f"{statistics.mean(xs) / 60:.1f}"


# --------------------------------------------------------------------------- report


def by_peer(records: list[dict], setting: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["setting"] == setting:
            out.setdefault(r["peer"], []).append(r)
    return out


def setting_table(records: list[dict], setting: str, peers: dict[str, str], budget_s: float, target: float) -> str:
    runs = by_peer(records, setting)
    lines = [
        f"| tool | epochs | final test acc % | min to final | min to {target * 100:g}% | acc % at {budget_s / 60:g} min "
        "| peak RSS MB | processes x threads | start-up s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for peer, label in peers.items():
        rs = runs.get(peer)
        if not rs:
            continue
        at_budget = [acc_at(r["points"], budget_s) for r in rs]
        lines.append(
            f"| {label} | {'/'.join(sorted({str(r['epochs']) for r in rs}))} | {_pct([final(r)[1] for r in rs])} "
            f"| {_minutes([final(r)[0] for r in rs])} | {_minutes([time_to(r['points'], target) for r in rs])} "
            f"| {_pct([a for a in at_budget if a is not None]) if all(a is not None for a in at_budget) else '-'} "
            f"| {statistics.mean(r['peak_rss_mb'] for r in rs):,.0f} "
            f"| {'/'.join(sorted({str(r['processes']) + ' x ' + str(r['threads']) for r in rs}))} "
            f"| {statistics.mean(r['setup_seconds'] or 0 for r in rs):.0f} | {', '.join(str(r['seed']) for r in rs)} |"
        )
    return "\n".join(lines)


def headline(records: list[dict], setting: str, peers: dict[str, str], budget_s: float) -> list[dict]:
    """Per peer: the mean over shared seeds of lit-ft's time-to-its-final-accuracy ratio, and
    whether lit-ft is at least as accurate at the budget (every shared seed)."""
    runs = by_peer(records, setting)
    lit = {r["seed"]: r for r in runs.get(LIT_FT, [])}
    out = []
    for peer, label in peers.items():
        if peer == LIT_FT or peer not in runs:
            continue
        pairs = [(lit[r["seed"]], r) for r in runs[peer] if r["seed"] in lit]
        if not pairs:
            continue
        ratios = [ratio(a, b) for a, b in pairs]
        lit_b = [acc_at(a["points"], budget_s) for a, _ in pairs]
        peer_b = [acc_at(b["points"], budget_s) for _, b in pairs]
        ahead = all(x is not None and (y is None or x >= y) for x, y in zip(lit_b, peer_b))
        out.append({
            "peer": peer, "label": label, "seeds": [b["seed"] for _, b in pairs],
            "ratio": None if any(x is None for x in ratios) else statistics.mean(ratios),
            "peer_final": statistics.mean(final(b)[1] for _, b in pairs),
            "peer_seconds": statistics.mean(final(b)[0] for _, b in pairs),
            "ahead_at_budget": ahead,
        })
    return out


def findings(records: list[dict], setting: str, peers: dict[str, str], budget_s: float, target: float,
             max_ratio: float) -> list[str]:
    """Plain statements computed from the runs of one setting (means over seeds)."""
    runs = {p: rs for p, rs in by_peer(records, setting).items() if p in peers}
    if not runs:
        return []
    out = []
    finals = {p: statistics.mean(final(r)[1] for r in rs) for p, rs in runs.items()}
    best = max(finals, key=finals.get)
    out.append(f"Most accurate at the end: {peers[best]}, {finals[best] * 100:.1f}%.")
    times = {p: [time_to(r["points"], target) for r in rs] for p, rs in runs.items()}
    reached = {p: statistics.mean(ts) for p, ts in times.items() if all(t is not None for t in ts)}
    if reached:
        first = min(reached, key=reached.get)
        out.append(f"First to {target * 100:g}%: {peers[first]}, {reached[first] / 60:.1f} min"
                   + (f"; never reached by {', '.join(peers[p] for p in runs if p not in reached)}" if len(reached) < len(runs) else "")
                   + ".")
    else:
        out.append(f"No tool reached {target * 100:g}%.")
    at = {p: [acc_at(r["points"], budget_s) for r in rs] for p, rs in runs.items()}
    at = {p: statistics.mean(a) for p, a in at.items() if all(x is not None for x in a)}
    if at:
        top = max(at, key=at.get)
        out.append(f"Most accurate at {budget_s / 60:g} min: {peers[top]}, {at[top] * 100:.1f}%.")
    heads = headline(records, setting, peers, budget_s)
    if heads and LIT_FT in runs:
        met = [h["label"] for h in heads if h["ratio"] is not None and h["ratio"] <= max_ratio and h["ahead_at_budget"]]
        missed = [h["label"] for h in heads if h["label"] not in met]
        out.append(f"Target (lit-ft reaches each peer's final accuracy in <= {max_ratio:g}x its time and is at least as "
                   f"accurate at {budget_s / 60:g} min): " + (f"met against {', '.join(met)}" if met else "met against none")
                   + (f"; not met against {', '.join(missed)}" if missed else "") + ".")
    return out


def headline_table(rows: list[dict], max_ratio: float) -> str:
    lines = ["| peer | peer's final acc % | peer's time min | lit-ft's time to it / peer's | target <= "
             f"{max_ratio:g}x | lit-ft at least as accurate at the budget |", "|---|---|---|---|---|---|"]
    for h in rows:
        r = "lit-ft never reached it" if h["ratio"] is None else f"**{h['ratio']:.2f}x**"
        met = "no" if h["ratio"] is None or h["ratio"] > max_ratio else "yes"
        lines.append(f"| {h['label']} | {h['peer_final'] * 100:.1f} | {h['peer_seconds'] / 60:.1f} | {r} | {met} "
                     f"| {'yes' if h['ahead_at_budget'] else 'no'} |")
    return "\n".join(lines)


def readme_row(heads: dict[str, list[dict]], setting_names: dict[str, str], max_ratio: float) -> str:
    """The README performance-table row: lit-ft's time to each peer's final accuracy / the peer's."""
    cells = []
    for setting, rows in heads.items():
        parts = [f"{h['label']} {'-' if h['ratio'] is None else format(h['ratio'], '.2f') + 'x'}" for h in rows]
        if parts:
            cells.append(f"{setting_names[setting]}: " + ", ".join(parts))
    return (f"| lit-ft's default recipe: wall time to each peer's final accuracy / the peer's (Fashion-MNIST, "
            f"EfficientNet-Lite0, 2 CPU cores) | {'; '.join(cells)} | <= {max_ratio:g}x |")


def plot(records: list[dict], settings: dict[str, str], peers: dict[str, str], budgets: dict[str, float],
         targets: dict[str, float], path: Path) -> None:
    """Test accuracy vs wall time, one curve per tool and seed, a panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in settings if any(r["setting"] == s for r in records)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(6.5 * len(shown), 4.5), squeeze=False)
    colors = dict(zip(peers, plt.get_cmap("tab10").colors))
    for ax, setting in zip(axes[0], shown):
        runs = by_peer(records, setting)
        for peer in [p for p in peers if p in runs]:  # the registry's order: same legend in every panel
            for i, r in enumerate(runs[peer]):
                xs, ys = [p[0] / 60 for p in r["points"]], [p[2] * 100 for p in r["points"]]
                ax.plot(xs, ys, color=colors.get(peer, "black"), marker="o", ms=3, lw=1.5 if i == 0 else 0.8,
                        ls="-" if i == 0 else "--", label=peers.get(peer, peer) if i == 0 else None)
        ax.axhline(targets[setting] * 100, color="0.6", ls=":", lw=0.8)
        ax.axvline(budgets[setting] / 60, color="0.6", ls="--", lw=0.8)
        ax.set_title(settings[setting], fontsize=9)
        ax.set_xlabel("wall minutes (start-up included, test evaluations excluded)")
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
