"""The HTML report: every section present, self-contained, plots with and without matplotlib."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from torchrepro.check._explain import explain
from torchrepro.check._report import (
    SECTIONS,
    ReportRun,
    compare_page,
    relative_differences,
    render_html,
)
from torchrepro.trace._compare import TraceData, compare_traces, read_trace

REPO = Path(__file__).resolve().parent.parent
HEADER = {"format": "torchrepro-trace", "version": 2, "every": 1}


class _Page(HTMLParser):
    """Collects section ids, tags and the external references of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.tags: dict[str, int] = {}
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name == "id" and tag == "section":
                self.ids.append(str(value))
            if name in ("src", "href") and value and not value.startswith(("data:", "#")):
                self.external.append(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _trace(name: str, scale: float, diverge_at: int, steps: int = 6) -> TraceData:
    """Two parameter groups and the loss; differences grow tenfold per step from diverge_at."""
    records = []
    for step in range(1, steps + 1):
        delta = 0.0 if step < diverge_at else scale * 10.0 ** (step - diverge_at)
        entries = [
            {"name": "loss", "kind": "loss", "checksum": f"{step}{delta}", "value": 1.0 + delta}
        ]
        for p in ("fc1.weight", "fc1.bias", "fc2.weight"):
            entries.append(
                {"name": p, "kind": "param", "checksum": f"{p}{step}{delta}", "norm": 2.0 + delta}
            )
        records.append({"step": step, "entries": entries})
    return TraceData(name, dict(HEADER), records)


def _page(**kw: object) -> str:
    a, b = _trace("a", 0.0, 99), _trace("b", 1e-7, 3)
    comparison = compare_traces(a, b, names=("run 1", "other"))
    return render_html(
        title="torchrepro check -- python train.py",
        verdict=comparison.verdict,
        ok=False,
        runs=[ReportRun("run 1", {}, a), ReportRun("other", {"TORCHREPRO_NUM_WORKERS": "2"}, b)],
        comparisons=[comparison],
        findings=["batch identical at step 3"],
        **kw,  # type: ignore[arg-type]
    )


def test_relative_difference_is_zero_until_the_divergence_then_grows():
    series = relative_differences(_trace("a", 0.0, 99), _trace("b", 1e-7, 3))
    assert sorted(series) == ["fc1", "fc2", "loss"]
    steps = series["fc2"]["fc2.weight"]
    assert [s for s, v in steps if v == 0.0] == [1, 2]
    values = [v for _, v in steps[2:]]
    assert values == sorted(values) and values[0] == pytest.approx(1e-7 / 2.0)


@pytest.mark.parametrize("image_format", ["svg", "png"])
def test_every_section_and_one_plot_per_group(image_format):
    pytest.importorskip("matplotlib")
    page = _parse(_page(image_format=image_format))
    assert page.ids == list(SECTIONS)
    assert page.external == []  # nothing to fetch: the page works offline
    assert page.tags.get("figure") == 3  # loss, fc1, fc2
    assert page.tags.get("svg" if image_format == "svg" else "img") == 3
    text = " ".join(page.text)
    assert 'DIVERGED at step 3 (run "other" vs "run 1")' in text
    assert "batch identical at step 3" in text and "TORCHREPRO_NUM_WORKERS=2" in text


def test_without_matplotlib_the_page_has_the_tables(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = _parse(_page())
    assert page.ids == list(SECTIONS)
    assert "svg" not in page.tags and "figure" not in page.tags
    text = " ".join(page.text)
    assert "matplotlib is not installed" in text
    assert "first differing step" in text


def test_image_format_is_checked():
    with pytest.raises(ValueError, match="image_format must be 'svg' or 'png', got 'gif'"):
        _page(image_format="gif")


def test_compare_report_lists_the_suspects(tmp_path):
    def write(path: Path, cudnn: str, trace: TraceData) -> TraceData:
        header = {**HEADER, "fingerprint": {"torch": {"cudnn": cudnn}, "hostname": cudnn}}
        lines = [json.dumps(header)] + [json.dumps(r) for r in trace.records]
        path.write_text("\n".join(lines) + "\n")
        return read_trace(path)

    a = write(tmp_path / "a.jsonl", "9.1.0", _trace("a", 0.0, 99))
    b = write(tmp_path / "b.jsonl", "9.3.0", _trace("b", 1e-7, 1))
    page = _parse(compare_page(explain(a, b), a, b, image_format="svg"))
    assert page.ids == list(SECTIONS)
    text = " ".join(page.text)
    assert "torch.cudnn" in text and "cuDNN versions differ" in text
    assert "Harmless differences (1)" in text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_folk_recipe_report_shows_the_step_one_divergence(tmp_path):
    """The README's folk-recipe comparison, one short epoch: the report's plot starts at step 1."""
    pytest.importorskip("matplotlib")
    report = tmp_path / "r.html"
    keep = tmp_path / "runs"
    # The folk recipe: its own script once the examples are split, else the example's flag.
    folk = REPO / "examples" / "folk_recipe.py"
    script = (
        [str(folk)]
        if folk.exists()
        else [str(REPO / "examples" / "train_digits.py"), "--folk-recipe"]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torchrepro", "check", "--vary", "num_workers=0,2",
         "--keep", str(keep), "--report", str(report), "--",
         sys.executable, *script, "--epochs", "1", "--limit", "320"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith('DIVERGED at step 1 (run "num_workers=2" vs "run 1")')
    page = _parse(report.read_text())
    assert page.ids == list(SECTIONS) and page.external == []
    assert page.tags.get("svg", 0) >= 5  # the loss and each parameter group
    # The data behind the plot: every group differs from step 1 on.
    series = relative_differences(
        read_trace(keep / "run1/trace.jsonl"), read_trace(keep / "run3/trace.jsonl")
    )
    for group, members in series.items():
        assert any(
            points[0] == (1, v) and v > 0 for points in members.values() for v in [points[0][1]]
        ), group
    text = " ".join(page.text)
    assert "num_workers=2 vs run 1" in text
    # torch's DataLoader records no batch; the one-step re-run saw the model's input differ,
    # so the batch is blamed and num_workers ranks as a suspect for such a loader.
    assert "re-ran" in proc.stdout and "(1 step each)" in proc.stdout
    assert "the model's input already differed" in proc.stdout
    assert "batch differs at step 1" in text
    assert "env.TORCHREPRO_NUM_WORKERS" in text and "other loaders' batches depend on it" in text
    if _chromium():
        shot = tmp_path / "shot.png"
        subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
        pil = pytest.importorskip("PIL.Image")
        with pil.open(shot) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50  # text, tables and plots, not a blank page
