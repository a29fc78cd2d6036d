"""Show it: a self-contained HTML page for ``check --report`` and ``compare --report``.

The page holds the verdict, the runs and their settings, the first divergence, the module
localization, the fingerprint differences ranked by how likely each explains the
divergence, and one plot per parameter group (the parameters of one module, and the loss)
of the relative difference against the step on a log scale: a divergence that starts at
one step and grows reads differently from one present from step 1.

Plots need matplotlib (the ``[report]`` extra); it is imported only when a report is
drawn, and the figures are inlined as SVG (or base64 PNG), so the page needs no network
and no other file. Without matplotlib the page has the same sections with tables only.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..env._diff import Difference
from ..trace._compare import Comparison, TraceData
from ._explain import Explanation, Suspect
from ._localize import Localization
from ._results import CheckReport

__all__ = [
    "SECTIONS",
    "ReportRun",
    "check_page",
    "compare_page",
    "explanation_findings",
    "relative_differences",
    "render_html",
    "write_report",
]

# The page's sections, by element id, in page order (a test checks each is present).
SECTIONS = ("verdict", "runs", "divergence", "localization", "environment", "plots")
# Where a tensor's bits differ but its norm (or the loss value) is equal: drawn at this floor.
BITS_ONLY = 1e-18
_LOSS_GROUP = "loss"


@dataclass(frozen=True)
class ReportRun:
    """One run on the page: its name, the settings it ran with, and its trace."""

    name: str
    settings: dict[str, str] = field(default_factory=dict)
    trace: TraceData | None = None
    note: str = ""


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _group(entry: dict[str, Any]) -> str | None:
    kind, name = entry.get("kind"), str(entry.get("name"))
    if kind == "loss":
        return _LOSS_GROUP
    if kind == "param":
        return name.rsplit(".", 1)[0] if "." in name else "(model)"
    return None


def relative_differences(
    reference: TraceData, other: TraceData
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per parameter group and member, ``(step, relative difference)`` for common steps.

    The relative difference is ``|b - a| / |a|`` of the parameter's norm (the loss's value
    for the loss); 0.0 where the checksums are equal; :data:`BITS_ONLY` where the bits
    differ but the numbers shown are equal. Differing steps without norms (the trace
    records them every ``norm_every`` steps) have no point. Groups are the module owning each parameter
    (``features.0`` for ``features.0.weight``) and ``"loss"``.

    >>> hdr = {"format": "torchrepro-trace", "version": 2}
    >>> e = lambda n, c: {"name": "fc.weight", "kind": "param", "checksum": c, "norm": n}
    >>> a = TraceData("a", hdr, [{"step": 1, "entries": [e(2.0, "1")]}])
    >>> b = TraceData("b", hdr, [{"step": 1, "entries": [e(2.5, "2")]}])
    >>> relative_differences(a, b)
    {'fc': {'fc.weight': [(1, 0.25)]}}
    """
    other_steps = {r["step"]: r for r in other.records}
    pairs = [(r, other_steps.get(r["step"])) for r in reference.records]
    ends = reference.end, other.end
    if ends[0] is not None and ends[1] is not None and ends[0]["step"] == ends[1]["step"]:
        pairs.append((ends[0], ends[1]))  # the states both runs ended with
    groups: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record, twin in pairs:
        if twin is None:
            continue
        theirs = {(e.get("kind"), e.get("name")): e for e in twin["entries"]}
        for entry in record["entries"]:
            group = _group(entry)
            match = theirs.get((entry.get("kind"), entry.get("name")))
            if group is None or match is None:
                continue
            key = "value" if entry.get("kind") == "loss" else "norm"
            a, b = _as_float(entry.get(key)), _as_float(match.get(key))
            if entry.get("checksum") == match.get("checksum") and entry.get("bits") == match.get(
                "bits"
            ):
                rel = 0.0
            elif a is None or b is None:
                continue  # a step without norms (Trace's norm_every): no magnitude to plot
            elif not (math.isfinite(a) and math.isfinite(b)):
                rel = math.inf
            elif a == b:
                rel = BITS_ONLY
            else:
                rel = max(abs(b - a) / max(abs(a), 1e-300), BITS_ONLY)
            series = groups.setdefault(group, {}).setdefault(str(entry.get("name")), [])
            series.append((int(record["step"]), rel))
    return groups


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _table(head: Sequence[str], rows: Sequence[Sequence[object]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _plot_figure(
    group: str, series: list[tuple[str, str, list[tuple[int, float]]]], image_format: str
) -> str:
    """One group's figure as inline SVG or a base64 PNG ``<img>``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 2.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    comparisons = sorted({c for c, _, _ in series})
    for comparison, member, points in series:
        steps = [s for s, v in points if v > 0 and math.isfinite(v)]
        values = [v for _, v in points if v > 0 and math.isfinite(v)]
        if not steps:
            continue
        label = member.removeprefix(group + ".") if group != _LOSS_GROUP else "loss"
        if len(comparisons) > 1:
            label += f" ({comparison})"
        style = styles[comparisons.index(comparison) % len(styles)]
        ax.semilogy(steps, values, style, marker=".", markersize=3, linewidth=1, label=label)
    ax.set_title(group, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("relative difference", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    if image_format == "png":
        fig.savefig(buf, format="png")
        data = base64.b64encode(buf.getvalue()).decode()
        return f'<img alt="{_e(group)}" src="data:image/png;base64,{data}">'
    fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue().decode()
    return svg[svg.index("<svg") :]


def _plots(
    runs: dict[str, ReportRun], comparisons: Sequence[Comparison], image_format: str
) -> tuple[str, str]:
    """(the plots section body, a one-line note), drawn from every diverged comparison."""
    diverged = [c for c in comparisons if not c.identical]
    if not diverged:
        return "", "All compared runs are bitwise identical: there is no difference to plot."
    by_group: dict[str, list[tuple[str, str, list[tuple[int, float]]]]] = {}
    first_rows: list[list[object]] = []
    for c in diverged:
        ref, oth = runs.get(c.names[0]), runs.get(c.names[1])
        if ref is None or oth is None or ref.trace is None or oth.trace is None:
            continue
        label = f"{c.names[1]} vs {c.names[0]}"
        for group, members in relative_differences(ref.trace, oth.trace).items():
            for member, points in members.items():
                by_group.setdefault(group, []).append((label, member, points))
            differing = [(s, v) for points in members.values() for s, v in points if v != 0.0]
            first = min((s for s, _ in differing), default=None)
            worst = max((v for _, v in differing), default=0.0)
            first_rows.append([label, group, first, f"{worst:.3g}" if differing else "0"])
    table = _table(
        ["comparison", "group", "first differing step", "largest relative difference"],
        first_rows,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return table, (
            "matplotlib is not installed (pip install 'torchrepro[report]'): tables only."
        )
    order = sorted(by_group, key=lambda g: (g != _LOSS_GROUP, g))
    figures = [
        f'<figure class="plot">{_plot_figure(g, by_group[g], image_format)}</figure>' for g in order
    ]
    note = (
        "Relative difference |b - a| / |a| of each parameter's norm (the loss's value) per step, "
        f"log scale; identical steps are not drawn; {BITS_ONLY:g} marks bits that differ "
        "with equal norms."
    )
    return '<div class="plots">' + "".join(figures) + "</div>" + table, note


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.verdict{font:600 16px ui-monospace,monospace;padding:10px 14px;border-radius:6px}
.ok{background:#e7f6e7;border:1px solid #7bc67b}.bad{background:#fdeaea;border:1px solid #e08080}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.plots{display:flex;flex-wrap:wrap;gap:8px}
figure.plot{margin:0;border:1px solid #eee}figure.plot svg,figure.plot img{display:block;width:440px;height:auto}
.note{color:#555;font-size:13px}code{background:#f4f4f4;padding:0 3px}
"""


def render_html(
    *,
    title: str,
    verdict: str,
    ok: bool,
    runs: Sequence[ReportRun],
    comparisons: Sequence[Comparison],
    findings: Sequence[str] = (),
    localization: Localization | None = None,
    localization_note: str = "",
    suspects: Sequence[Suspect] = (),
    differences: Sequence[Difference] = (),
    environment_note: str = "",
    image_format: str = "svg",
) -> str:
    """The report page as one HTML string (no external resource).

    Args:
        title: the page title (e.g. the command checked).
        verdict: the one-line verdict.
        ok: whether the verdict is a success (colours the verdict).
        runs: every run, the reference first.
        comparisons: each comparison of a run with the reference.
        findings: extra verdict lines (batch differs / identical, the loader's warning).
        localization: the module localization, when one was made.
        localization_note: why none was made, or what it cost.
        suspects: ranked result-changing fingerprint differences.
        differences: every fingerprint difference (the harmless ones are listed too).
        environment_note: a sentence above the differences (e.g. no fingerprint in a header).
        image_format: ``"svg"`` (inline) or ``"png"`` (base64).

    Raises:
        ValueError: ``image_format`` is neither ``"svg"`` nor ``"png"``.
    """
    if image_format not in ("svg", "png"):
        raise ValueError(f"image_format must be 'svg' or 'png', got {image_format!r}")
    by_name = {r.name: r for r in runs}
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>torchrepro: {_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>torchrepro report</h1><p class=note><code>{_e(title)}</code></p>",
        f'<section id="verdict"><h2>Verdict</h2><div class="verdict {"ok" if ok else "bad"}">{_e(verdict)}</div>',
    ]
    parts += [f"<p>{_e(line)}</p>" for line in findings]
    parts.append("</section>")

    rows = []
    for run in runs:
        header = run.trace.header if run.trace is not None else {}
        facts = ", ".join(
            f"{k}={v}"
            for k, v in header.items()
            if k not in ("format", "fingerprint") and not isinstance(v, (dict, list))
        )
        settings = ", ".join(f"{k}={v}" for k, v in run.settings.items()) or "(base)"
        steps = len(run.trace.records) if run.trace is not None else 0
        rows.append([run.name, settings, steps, facts, run.note])
    parts.append('<section id="runs"><h2>Runs and settings</h2>')
    parts.append(_table(["run", "settings", "traced steps", "trace header", "note"], rows))
    parts.append("</section>")

    parts.append('<section id="divergence"><h2>First divergence</h2>')
    for c in comparisons:
        parts.append(f"<p><b>{_e(c.verdict)}</b></p>")
        if not c.identical:
            parts.append(
                _table(
                    ["kind", "name", "measure", "reference", "other", "difference", "note"],
                    [
                        [
                            e.kind,
                            e.name,
                            e.measure,
                            e.reference_value,
                            e.other_value,
                            f"{e.difference:+.3g}" if e.difference is not None else None,
                            e.note,
                        ]
                        for e in c.entries[:20]
                    ],
                )
            )
            if len(c.entries) > 20:
                parts.append(
                    f"<p class=note>... and {len(c.entries) - 20} more differing entries</p>"
                )
            parts.append(
                f"<p class=note>{c.later_differing_steps} later compared steps also differ.</p>"
            )
        parts += [f"<p class=note>note: {_e(n)}</p>" for n in c.notes]
    parts.append("</section>")

    parts.append('<section id="localization"><h2>Which module</h2>')
    if localization is not None:
        parts.append(f"<p><b>step {localization.step}</b>: {_e(localization.describe())}</p>")
        if localization.modules:
            parts.append(
                "<p class=note>differing, in execution order: "
                + _e(", ".join(localization.modules[:12]))
                + (" ..." if len(localization.modules) > 12 else "")
                + "</p>"
            )
    parts.append(
        f"<p class=note>{_e(localization_note or ('not localized' if localization is None else ''))}</p>"
    )
    parts.append("</section>")

    parts.append('<section id="environment"><h2>Environment differences</h2>')
    if environment_note:
        parts.append(f"<p class=note>{_e(environment_note)}</p>")
    if suspects:
        parts.append("<p>Differences that can change results, most likely explanation first:</p>")
        parts.append(
            _table(
                ["likelihood", "field", "reference", "other", "what it can do", "evidence"],
                [
                    [
                        s.likelihood,
                        s.difference.key,
                        s.difference.a,
                        s.difference.b,
                        s.difference.reason,
                        s.why,
                    ]
                    for s in suspects
                ],
            )
        )
    else:
        parts.append("<p>No fingerprint difference that can change results.</p>")
    suspected = {s.difference.key for s in suspects}
    harmless = [d for d in differences if not d.changes_results and d.key not in suspected]
    if harmless:
        parts.append(f"<p class=note>Harmless differences ({len(harmless)}):</p>")
        parts.append(
            _table(
                ["field", "reference", "other", "why harmless"],
                [[d.key, d.a, d.b, d.reason] for d in harmless],
            )
        )
    parts.append("</section>")

    body, note = _plots(by_name, comparisons, image_format)
    parts.append('<section id="plots"><h2>Relative difference per parameter group</h2>')
    parts.append(f"<p class=note>{_e(note)}</p>{body}</section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: str | os.PathLike[str], page: str) -> None:
    """Write ``page`` to ``path`` atomically (a temporary file, then ``os.replace``).

    Raises:
        OSError: the file cannot be written.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, target)


def _first_diverged(explanations: Sequence[Explanation]) -> Explanation | None:
    diverged = [e for e in explanations if not e.comparison.identical]
    return min(diverged, key=lambda e: e.comparison.first_step or 0, default=None)


def check_page(report: CheckReport, title: str, *, image_format: str = "svg") -> str:
    """The report page of a ``torchrepro check``."""
    runs = []
    for r in report.runs:
        settings = dict(r.spec.env)
        if r.spec.resume_at is not None:
            settings["stopped at"] = str(r.spec.resume_at)
            settings.update({f"after resume: {k}": v for k, v in r.spec.resume_env.items()})
        runs.append(ReportRun(r.spec.name, settings, r.trace, r.error or ""))
    first = _first_diverged([e for e in report.explanations if e.comparison in report.unexpected])
    return render_html(
        title=title,
        verdict=report.verdict(),
        ok=report.reproducible,
        runs=runs,
        comparisons=report.comparisons,
        findings=[
            *([report.pinpoint_note] if report.pinpoint_note else []),
            *explanation_findings(first, report.localization),
        ],
        localization=report.localization,
        localization_note=report.localization_note,
        suspects=first.suspects if first else [],
        differences=first.differences if first else [],
        environment_note=first.note if first else "",
        image_format=image_format,
    )


def compare_page(
    explanation: Explanation, reference: TraceData, other: TraceData, *, image_format: str = "svg"
) -> str:
    """The report page of a ``torchrepro compare``."""
    c = explanation.comparison
    runs = [ReportRun(c.names[0], {"trace": reference.path}, reference),
            ReportRun(c.names[1], {"trace": other.path}, other)]  # fmt: skip
    return render_html(
        title=f"torchrepro compare {reference.path} {other.path}",
        verdict=c.verdict,
        ok=c.identical,
        runs=runs,
        comparisons=[c],
        findings=explanation_findings(explanation, None),
        localization_note="compare reads traces only; `torchrepro check` localizes the module",
        suspects=explanation.suspects,
        differences=explanation.differences,
        environment_note=explanation.note,
        image_format=image_format,
    )


def explanation_findings(
    explanation: Explanation | None, localization: Localization | None
) -> list[str]:
    """The verdict's second line: batch differs / identical, and the first differing module."""
    if explanation is None:
        return []
    step = explanation.comparison.first_step
    parts = []
    if explanation.batch_differs is True:
        parts.append(f"batch differs at step {step}")
    elif explanation.batch_differs is False:
        parts.append(f"batch identical at step {step}")
    if localization is not None:
        parts.append(localization.describe())
    return ["; ".join(parts)] if parts else []
