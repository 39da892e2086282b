"""The HTML report of a volume (`mirage_edge.runtime.report`, `predict --no-report`): self-contained, its
numbers are measurements.json's, and it renders in a real headless Chromium without console errors.

The browser test drives the system's Chromium with Selenium and skips, saying what is missing, without
them (README "OCT volumes": ``apt-get install chromium chromium-driver``, ``pip install selenium``).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import run_without_torch
from mirage_edge.data.io import write_png
from mirage_edge.data.synth_render import LAYER_CLASSES
from mirage_edge.data.volume import Volume, VoxelSize
from mirage_edge.runtime.report import REPORT_FILE, format_number, write_report
from mirage_edge.runtime.volume import RECORD_FILE, predict_volume
from test_volume_predict import Labels, Threshold, _layered_volume

VOXEL = VoxelSize(0.004, 0.01, 0.05)
FLUID = len(LAYER_CLASSES)  # class index of "Fluid" after the layers


class LayersAndFluid(Labels):
    """`Labels` (class = grey // 25 at half resolution) with a fluid class: both measurements apply."""

    classes = [*LAYER_CLASSES, "Fluid"]


def synthetic_volume() -> Volume:
    """41 B-scans of 120 x 400 px (RNFL thinning to the fovea at B-scan 23), a fluid box in B-scans
    30-35, a 512 x 512 localizer with the B-scans running up it (B-scan 0 inferior), a right eye."""
    vol = _layered_volume()
    vol[30:36, 40:48, 40:120] = 25 * FLUID
    yy, xx = np.mgrid[0:512, 0:512]
    localizer = (120 + 60 * np.sin(xx / 40.0) * np.cos(yy / 55.0)).astype(np.uint8)
    positions = np.array([[[56.0, 456.0 - 10 * i], [456.0, 456.0 - 10 * i]] for i in range(len(vol))])
    return Volume(vol, VOXEL, laterality="OD", localizer=localizer, positions=positions, source="")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    res = predict_volume(LayersAndFluid(), synthetic_volume(), batch_size=16)
    res.save(out, report=write_report)
    return out, json.loads((out / RECORD_FILE).read_text())


class Page(HTMLParser):
    """Every element as (tag, attrs, text inside it), in document order."""

    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        if tag not in self.VOID:
            self._open.append((tag, text))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, t in self._open:
            t.append(data)

    def find(self, tag: str, attrs: dict[str, str] | None = None, **kw: str) -> list[tuple[dict[str, str], str]]:
        """(attributes, whitespace-normalised text) of every `tag` with these attributes (`kw`: `_` for `-`)."""
        want = {**(attrs or {}), **{k.replace("_", "-"): v for k, v in kw.items()}}
        return [(a, " ".join("".join(t).split())) for g, a, t in self.elements
                if g == tag and all(a.get(k) == v for k, v in want.items())]


def _png(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,"), uri[:60]
    img = cv2.imdecode(np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


def expected_numbers(record: dict) -> dict[str, list[tuple[dict, float | int | None]]]:
    """(attributes of the table cell, the record's value) for every number the tables must show."""
    etdrs, fluid = record["thickness"]["etdrs"], record["fluid"]
    cells: dict[str, list[tuple[dict[str, str], float | int | None]]] = {"etdrs": [], "thickness": [], "fluid": []}
    for name, means in etdrs["means"].items():
        cells["etdrs"] += [({"data-map": name, "data-region": r}, v) for r, v in means.items()]
    cells["etdrs"] += [({"data-map": "coverage", "data-region": r}, v) for r, v in etdrs["coverage"].items()]
    for name, st in record["thickness"]["maps_um"].items():
        cells["thickness"] += [({"data-map": name, "data-stat": k}, v) for k, v in st.items()]
    for c, n in fluid["voxels"].items():
        cells["fluid"] += [({"data-class": c, "data-stat": "voxels"}, n),
                           ({"data-class": c, "data-stat": "volume_mm3"}, fluid["volume_mm3"][c])]
    return cells


def test_report_is_self_contained_and_shows_the_record(report):
    out, record = report
    assert record["outputs"]["report"] == REPORT_FILE
    html = (out / REPORT_FILE).read_text("utf-8")
    page = Page(html)
    # nothing to fetch: no scripts, style sheets or links; every image a PNG data URI
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I)
    assert not page.find("script") and not page.find("link") and "url(" not in html and "@import" not in html
    for tag, attrs, _ in page.elements:
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            if key in attrs:
                assert tag == "img" and key == "src", (tag, key)
                assert attrs[key].startswith("data:image/png;base64,")
    # the localizer with its B-scan lines; five B-scans (first, central, fovea, most fluid, last), each twice
    ((loc, _),) = page.find("img", id="localizer")
    assert loc["class"] == "localizer" and _png(loc["src"]).shape == (512, 512, 3)
    figures = page.find("figure", {"class": "bscan"})
    assert [int(a["data-index"]) for a, _ in figures] == [0, 20, 23, 30, 40]
    assert "fovea (thickness minimum)" in dict((int(a["data-index"]), t) for a, t in figures)[23]
    assert "most fluid" in dict((int(a["data-index"]), t) for a, t in figures)[30]
    bscans = page.find("img", {"class": "bscan-image"})
    overlays = page.find("img", {"class": "bscan-overlay"})
    assert len(bscans) == len(overlays) == 5
    b30, o30 = _png(bscans[3][0]["src"]), _png(overlays[3][0]["src"])
    assert b30.shape == (120, 400) and o30.shape == (120, 400, 3)
    assert np.array_equal(b30, synthetic_volume().bscan(30))
    assert (o30[40:48, 40:120] != o30[40:48, 40:120][..., :1]).any()  # the fluid is coloured
    # every map on disk, embedded byte for byte; the ETDRS chart
    maps = {a["id"].removeprefix("map-"): a for a, _ in page.find("figure") if a.get("id", "").startswith("map-")}
    assert set(maps) == set(record["outputs"]["maps"]) and "fluid" in maps
    map_imgs = page.find("img", {"class": "map"})
    assert list(maps)[:2] == ["thickness_total_retina", "fluid"] and len(map_imgs) == len(maps)
    on_disk = (out / record["outputs"]["maps"]["fluid"]).read_bytes()
    assert base64.b64decode(map_imgs[1][0]["src"].split(",", 1)[1]) == on_disk
    central = record["thickness"]["etdrs"]["means"]["total_retina"]["central"]
    assert [t for a, t in page.find("text", data_region="central")] == [format_number(central)]
    # the numbers: every cell carries the record's value and shows it rounded
    for table, cells in expected_numbers(record).items():
        for attrs, value in cells:
            (cell, text), = page.find("td", attrs)
            assert json.loads(cell["data-value"]) == value, (table, attrs)
            if value is None:
                assert text == "n/a"
            elif attrs.get("data-map") == "coverage" or attrs.get("data-stat") == "measured_share":
                assert float(text) == pytest.approx(value * 100, abs=0.06 if table == "thickness" else 0.5)
            else:
                assert float(text) == pytest.approx(value, abs=0.51 if table == "etdrs" else 0.06), (attrs, text)
    (card, text), = page.find("div", id="central-thickness")
    assert json.loads(card["data-value"]) == central and text == f"{central:.0f} µm"
    total_mm3 = record["fluid"]["volume_mm3"]["total"]
    assert page.find("div", id="fluid-volume")[0][0]["data-value"] == json.dumps(total_mm3)
    # which model, which input, which schema, when
    assert page.find("td", id="schema")[0][1] == f"{record['schema']} v{record['schema_version']}"
    assert page.find("td", id="created")[0][1] == record["created"]
    assert page.find("td", id="input-sha256")[0][1] == "n/a"  # an in-memory volume has no file


def test_report_of_a_real_bscan_folder_shows_the_projection(tmp_path):
    from test_volume_readers import DUKE

    if not DUKE.is_dir():
        pytest.skip(f"real B-scans not found at {DUKE}")
    for f in sorted(DUKE.glob("subject09_*.png"))[:6]:
        shutil.copy(f, tmp_path / f.name)
    res = predict_volume(Threshold(), tmp_path, voxel_size=(0.0039, 0.0114, 0.12))
    record = res.save(tmp_path / "out", report=write_report)
    page = Page((tmp_path / "out" / REPORT_FILE).read_text("utf-8"))
    ((loc, _),) = page.find("img", id="localizer")
    assert loc["class"] == "projection" and _png(loc["src"]).shape[1] >= 768  # no localizer in a folder
    assert [a["data-index"] for a, _ in page.find("figure", {"class": "bscan"})][0] == "0"
    first = _png(page.find("img", {"class": "bscan-image"})[0][0]["src"])
    assert first.shape == (496, 768) and np.array_equal(first, res.volume.bscan(0))
    (cell, text), = page.find("td", data_class="total", data_stat="voxels")
    assert int(text) == int(cell["data-value"]) == record["fluid"]["voxels"]["total"] == int(res.masks.sum())
    assert page.find("td", id="input-sha256")[0][1] == record["input"]["sha256"] is not None


# ------------------------------------------------------------------------------------ CLI
def _cli(*args: str):
    from mirage_edge.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def folder_and_model(tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """An image-folder volume and `predict` arguments whose artifact loads as the `Threshold` double."""
    from mirage_edge.runtime.predictor import Predictor

    vol = np.full((9, 64, 100), 50, np.uint8)
    vol[3:6, 20:30, 30:60] = 255
    for i, im in enumerate(vol):
        write_png(tmp_path / "scan" / f"b{i}.png", im)
    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *a, **k: Threshold()))
    return tmp_path, ["predict", str(tmp_path / "art"), str(tmp_path / "scan"), "--volume",
                      "--voxel-size", "0.004", "0.01", "0.05"]


def test_predict_writes_the_report_unless_told_not_to(folder_and_model, monkeypatch):
    tmp, args = folder_and_model
    r = _cli(*args, "--out", str(tmp / "a"))
    assert r.exit_code == 0, r.output
    assert f"report: {tmp / 'a' / REPORT_FILE}" in r.output
    rec = json.loads((tmp / "a" / RECORD_FILE).read_text())
    assert rec["outputs"]["report"] == REPORT_FILE and (tmp / "a" / REPORT_FILE).stat().st_size > 10_000
    assert _cli(*args, "--out", str(tmp / "a"), "--overwrite").exit_code == 0  # report.html is predict's own
    r = _cli(*args, "--out", str(tmp / "b"), "--no-report")
    assert r.exit_code == 0 and not (tmp / "b" / REPORT_FILE).exists() and "report:" not in r.output
    assert "report" not in json.loads((tmp / "b" / RECORD_FILE).read_text())["outputs"]
    r = _cli(*args[:3], "--no-report", "--out", str(tmp / "c"))  # a folder of separate images
    assert r.exit_code == 2 and "--no-report apply to one OCT volume" in r.output
    # without jinja2: the named extra, before any inference; --no-report still works
    monkeypatch.setitem(sys.modules, "jinja2", None)
    r = _cli(*args, "--out", str(tmp / "d"))
    assert r.exit_code == 3 and 'jinja2 is not installed (needed for the HTML report' in r.output
    assert "--no-report skips it" in r.output and 'pip install "mirage-edge[vendor]"' in r.output
    assert not (tmp / "d" / "masks").exists()
    assert _cli(*args, "--out", str(tmp / "e"), "--no-report").exit_code == 0


def test_runtime_imports_without_jinja2_and_torch():
    res = run_without_torch(
        """
        import sys
        class _NoJinja:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("jinja2", "markupsafe"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _NoJinja())
        import mirage_edge.runtime.cli, mirage_edge.runtime.volume
        from mirage_edge.runtime import report
        from mirage_edge.errors import MissingDependencyError
        try:
            report.check_dependencies()
        except MissingDependencyError as exc:
            print(exc)
        assert "jinja2" not in sys.modules and "torch" not in sys.modules
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'jinja2 is not installed' in res.stdout and 'pip install "mirage-edge[vendor]"' in res.stdout


def test_the_template_is_package_data():
    from mirage_edge.runtime.report import TEMPLATE

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.j2" in data["mirage_edge.runtime"]
    assert (root / "mirage_edge" / "runtime" / "templates" / TEMPLATE).is_file()
    assert "jinja2>=3.1" in tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["vendor"]


# ------------------------------------------------------------------------------------ a real browser
def _chromium() -> tuple[str, str]:
    """(browser binary, chromedriver) of the system, or skip saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium; see README)")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None)
        pytest.skip(f"{missing} not found on PATH (Debian/Ubuntu: apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,900", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:  # an explicit driver path: Selenium Manager would try to download one
        driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    except WebDriverException as exc:
        pytest.skip(f"{binary} with {driver_path} did not start: {exc.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_report_renders_in_headless_chromium(report, browser, tmp_path):
    from selenium.webdriver.common.by import By

    out, record = report
    browser.get((out / REPORT_FILE).resolve().as_uri())
    assert browser.title == "OCT report: volume"
    # no console errors or warnings, nothing fetched, every image decoded
    logs = browser.get_log("browser")
    assert not [e for e in logs if e["level"] in ("SEVERE", "WARNING")], logs
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    broken = browser.execute_script(
        "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)")
    assert broken == []
    localizer = browser.find_element(By.ID, "localizer")
    assert localizer.is_displayed() and localizer.size["width"] >= 400
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.bscan img.bscan-image")) == 5
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.bscan img.bscan-overlay")) == 5
    assert len(browser.find_elements(By.CSS_SELECTOR, "img.map")) == len(record["outputs"]["maps"])
    assert browser.find_element(By.CSS_SELECTOR, "#etdrs-chart svg").size["width"] == 300
    # the tables as rendered show the record's numbers
    means = record["thickness"]["etdrs"]["means"]["total_retina"]
    row = browser.find_element(By.CSS_SELECTOR, "#etdrs tr[data-map='total_retina']")
    shown = {td.get_attribute("data-region"): td.text
             for td in row.find_elements(By.CSS_SELECTOR, "td[data-region]")}
    assert shown == {k: format_number(v) for k, v in means.items()}
    fluid = browser.find_element(By.CSS_SELECTOR, "#fluid tr[data-class='total'] td[data-stat='volume_mm3']")
    assert float(fluid.text) == pytest.approx(record["fluid"]["volume_mm3"]["total"], rel=5e-3)
    assert browser.find_element(By.ID, "schema").text == f"{record['schema']} v{record['schema_version']}"
    # a full-page screenshot that is not blank, and element shots that show the pictures
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1300, height + 150)
    shot_path = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot_path))
    shot = cv2.imread(str(shot_path))
    assert shot.shape[0] >= 2000 and shot.shape[1] >= 1000 and shot.std() > 20
    loc = cv2.imdecode(np.frombuffer(localizer.screenshot_as_png, np.uint8), cv2.IMREAD_COLOR)
    assert loc.std() > 20 and (np.abs(loc[..., 1].astype(int) - loc[..., 2]) > 60).any()  # lines in colour
    total = browser.find_element(By.CSS_SELECTOR, "#map-thickness_total_retina img")
    tmap = cv2.imdecode(np.frombuffer(total.screenshot_as_png, np.uint8), cv2.IMREAD_COLOR)
    assert len(np.unique(tmap.reshape(-1, 3), axis=0)) > 10  # the turbo colours of the thickness
