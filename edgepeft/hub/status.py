"""The status page: fleets, devices and when each was last seen, versions and what went into each, a
metrics chart. Plain HTML with inline SVG: no script, nothing loaded from anywhere."""

from __future__ import annotations

import datetime
import html
from collections import defaultdict

from edgepeft.hub.store import Metric, Store

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}code{font-size:12px}
h2{margin-top:1.5em;border-bottom:2px solid #ddd}.muted{color:#888}"""
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def chart(metrics: list[Metric], width: int = 480, height: int = 160) -> str:
    """Inline SVG: the fleet mean of each metric per adapter version (x) it was reported for."""
    series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in metrics:
        series[m.name][m.version or 0].append(m.value)
    if not series:
        return '<p class="muted">no metrics reported yet</p>'
    points = {name: sorted((v, sum(xs) / len(xs)) for v, xs in by_v.items()) for name, by_v in series.items()}
    xs = [v for pts in points.values() for v, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 1, y1 + 1
    pad = 36

    def sx(v: float) -> float:
        return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y: float) -> float:
        return height - pad + (y0 - y) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16 * len(points)}" role="img" '
             f'aria-label="metrics by version">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="none" stroke="#ccc"/>',
             f'<text x="{pad}" y="{height - pad + 14}" font-size="10">v{x0}</text>',
             f'<text x="{width - pad - 20}" y="{height - pad + 14}" font-size="10">v{x1}</text>',
             f'<text x="2" y="{pad + 4}" font-size="10">{y1:.3g}</text>',
             f'<text x="2" y="{height - pad}" font-size="10">{y0:.3g}</text>']
    for i, (name, pts) in enumerate(sorted(points.items())):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(v):.1f},{sy(y):.1f}" for v, y in pts)
        parts.append(f'<polyline class="series" data-metric="{_e(name)}" points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts += [f'<circle cx="{sx(v):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>{_e(name)} v{v}: {y:.4g}</title></circle>'
                  for v, y in pts]
        parts.append(f'<text x="{pad}" y="{height + 12 + 16 * i}" font-size="12" fill="{color}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def login_page(error: str = "") -> str:
    """The login form: the admin token goes in a POST body, never in the URL (access logs keep URLs)."""
    note = f'<p class="error">{_e(error)}</p>' if error else ""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgepeft hub: sign in</title>"
            f"<style>{STYLE}</style></head><body><h1>edgepeft hub</h1>{note}"
            '<form method="post" action="/login"><label>Admin token <input type="password" name="token" '
            'autocomplete="current-password" required></label> <button type="submit">Sign in</button></form></body></html>')


def render_status(store: Store) -> str:
    """The whole page."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>edgepeft hub</title>",
           f"<style>{STYLE}</style></head><body><h1>edgepeft hub</h1>"]
    fleets = store.list_fleets()
    out.append(f"<p>{len(fleets)} fleet(s), page made {_when(datetime.datetime.now().timestamp())}</p>")
    for f in fleets:
        devices = store.list_devices(f.name)
        versions = store.list_versions(f.name, state=None)
        pending = store.list_deltas(f.name, pending=True)
        out.append(f'<section class="fleet" id="fleet-{_e(f.name)}"><h2>Fleet <span class="fleet-name">{_e(f.name)}</span></h2>')
        out.append(f"<p>bundle <code>{_e(f.bundle[:16])}</code> · policy: every {f.aggregate_every or '-'} deltas / "
                   f"{f.aggregate_minutes or '-'} min · staleness {f.staleness} · {len(pending)} delta(s) pending</p>")
        out.append("<h3>Devices</h3><table class='devices'><tr><th>device</th><th>last seen</th><th>added</th></tr>")
        out += [f"<tr><td class='device'>{_e(d.id)}</td><td>{_when(d.last_seen)}</td><td>{_when(d.created)}</td></tr>" for d in devices]
        out.append("</table><h3>Adapter versions</h3><table class='versions'><tr><th>adapter</th><th>version</th><th>state</th>"
                   "<th>created</th><th>aggregated</th><th>from devices</th><th>report</th></tr>")
        for v in versions:
            deltas = store.list_deltas(f.name, v.adapter, version=v.version)
            who = sorted({d.device for d in deltas})
            what = "published by admin" if "publish" in v.options else f"{len(deltas)} delta(s), {sum(d.samples for d in deltas)} samples"
            rep = ", ".join(f"{k}={v.report[k]:.4g}" if isinstance(v.report[k], float) else f"{k}={v.report[k]}"
                            for k in ("count", "clipped", "max_update_norm", "passes", "seconds") if k in v.report)
            out.append(f"<tr class='version'><td>{_e(v.adapter)}</td><td>v{v.version}</td><td>{_e(v.state)}</td><td>{_when(v.created)}</td>"
                       f"<td>{_e(what)}</td><td>{_e(', '.join(who)) or '-'}</td><td>{_e(rep)}</td></tr>")
        out.append("</table><h3>Metrics</h3>")
        out.append(chart(store.list_metrics(f.name)))
        out.append("</section>")
    out.append("</body></html>")
    return "".join(out)
