"""The web page at `/`, driven in headless Chromium against the real app.

A tiny registered model and its index (database images with UTM positions)
are served by uvicorn in a thread on a free loopback port; Selenium drives
Debian's chromium through /usr/bin/chromedriver (never Selenium Manager, which
would download a driver). The browser tests skip with the reason when
chromium, chromedriver or selenium are missing, and fail instead in CI
(CI=true; `.ci/install-browser.sh` installs them); the image route behind the
thumbnails is also checked without a browser.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_CONFIG, skip_or_fail
from vpr.index.meta import Entry
from vpr.index.store import IndexStore
from vpr.model.network import build_model
from vpr.model.registry import Registry

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
    "--autoplay-policy=no-user-gesture-required",
)
N_PLACES = 8
IMG_SIZE = (96, 72)
WAIT_S = 30


# ---- the served home: a tiny teacher and an index of positioned images ----------------
@dataclass
class Served:
    url: str
    home: Path
    images: list[Path]  # database images, id i = images[i]
    model: str
    index: str


def _place_images(folder: Path) -> list[Path]:
    """Distinct textured JPEGs (one per place), so each is its own best match."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(N_PLACES):
        base = rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)
        p = folder / f"place{i:02d}.jpg"
        Image.fromarray(base).resize(IMG_SIZE, Image.Resampling.BILINEAR).save(p, quality=92)
        paths.append(p)
    return paths


def _build_home(home: Path) -> tuple[list[Path], str, str]:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    images = _place_images(home / "data" / "db")  # under a default data root: thumbnails out of the box
    reg = Registry(home / "models")
    ref = reg.register("webteacher", build_model(TINY_CONFIG), role="teacher")
    loaded = reg.load(ref, "cpu")
    entries = [
        Entry(p, label=f"place {i}", utm=(500_000 + 12.5 * i, 4_000_000 + (i % 3) * 20.0 + i), utm_zone="56H")
        for i, p in enumerate(images)
    ]
    iref = IndexStore(home / "indexes").build("webdemo", loaded, entries, root=images[0].parent)
    return images, str(ref), str(iref)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """The real app on a free loopback port, ready (model and index loaded)."""
    from vpr.server.app import create_app
    from vpr.server.harness import ThreadServer
    from vpr.settings import ServerSettings

    home = tmp_path_factory.mktemp("web") / "home"
    images, model_spec, index_spec = _build_home(home)
    settings = ServerSettings(home=home, device="cpu", max_wait_ms=0.0, decode_threads=2)
    with ThreadServer(create_app(settings)).start(timeout=90) as srv:
        yield Served(srv.url, home, images, model_spec, index_spec)


# ---- the browser -------------------------------------------------------------------------
def _browser_binaries() -> tuple[str, str]:
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if chrome is None or driver is None:
        skip_or_fail(
            "headless browser test needs Debian's chromium and chromium-driver (run .ci/install-browser.sh as root)"
        )
    return chrome, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    chrome, driver_path = _browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("headless browser test needs the selenium package (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="vpr-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    drv = webdriver.Chrome(options=opts, service=Service(driver_path))
    drv.set_page_load_timeout(WAIT_S)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, served):
    """A freshly loaded page, after its readiness check has answered."""
    browser.get(served.url + "/")
    _until(browser, "document.getElementById('ready').dataset.state === 'ready'", "the ready badge")
    return browser


def _until(drv, js_condition: str, what: str, timeout: float = WAIT_S):
    """Wait until a JavaScript expression is truthy; fail with the page's state otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(drv, timeout, poll_frequency=0.1).until(
            lambda d: d.execute_script(f"return ({js_condition});")
        )
    except TimeoutException:
        state = drv.execute_script(
            "return {error: document.getElementById('error').textContent,"
            " stream: document.getElementById('stream-status').textContent,"
            " results: document.getElementById('results').children.length};"
        )
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page state: {state}") from None


def _upload(drv, path: Path) -> None:
    from selenium.webdriver.common.by import By

    drv.find_element(By.ID, "image-file").send_keys(str(path))


def _set_top_k(drv, k: int) -> None:
    drv.execute_script("document.getElementById('top-k').value = arguments[0];", str(k))


CARDS_JS = """
return [...document.querySelectorAll('#results .result')].map(li => {
  const img = li.querySelector('img.thumb');
  return {id: li.dataset.id, top1: li.classList.contains('top1'),
          rank: li.querySelector('.rank').textContent, score: li.querySelector('.score').textContent,
          label: li.querySelector('.label').textContent, pos: li.querySelector('.pos').textContent,
          src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth,
          height: img.naturalHeight};
});"""
THUMBS_LOADED_JS = (
    "[...document.querySelectorAll('#results img.thumb')].length > 0 && "
    "[...document.querySelectorAll('#results img.thumb')].every(i => i.complete)"
)


# ---- tests -------------------------------------------------------------------------------
def test_page_is_served_with_its_assets(served):
    """`/` is the page; its script and stylesheet come from this server, nothing external."""
    r = httpx.get(served.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="image-file"' in r.text and 'id="video-file"' in r.text
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        a = httpx.get(served.url + asset)
        assert a.status_code == 200 and kind in a.headers["content-type"], asset
    for text in (r.text, httpx.get(served.url + "/static/app.js").text):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_place_image_route(served):
    """The thumbnails' source: the database image of an id; unknown ids are 404 JSON."""
    r = httpx.get(f"{served.url}/v1/places/3/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == served.images[3].read_bytes()
    for bad in ("/v1/places/999/image", "/v1/places/-1/image"):
        r = httpx.get(served.url + bad)
        assert r.status_code in (404, 422) and "detail" in r.json(), bad
    assert httpx.get(f"{served.url}/v1/places/abc/image").status_code == 422


def test_place_image_path_stays_under_the_index_root(tmp_path):
    """A metadata row pointing outside the index root (tampered) or at a vanished
    file is a 404, and a file outside the data roots a 403, never a read of that file."""
    import contextlib
    from types import SimpleNamespace

    from vpr.server.errors import Forbidden, NotFound
    from vpr.server.routes.web import place_image_path

    root = tmp_path / "root"
    (root / "private").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(b"x")
    (root / "private" / "ok.jpg").write_bytes(b"y")
    (root / "link.jpg").symlink_to(root / "private" / "ok.jpg")
    (tmp_path / "secret.txt").write_text("private")
    rows = {
        0: {"path": "ok.jpg"},
        1: {"path": "../secret.txt"},
        2: {"path": str(tmp_path / "secret.txt")},
        3: {"path": "gone.jpg"},
        5: {"path": "private/ok.jpg"},
        6: {"path": "link.jpg"},
    }
    index = SimpleNamespace(root=root, meta=lambda ids: {i: rows[i] for i in ids if i in rows})
    runtime = SimpleNamespace(lease=lambda: contextlib.nullcontext(SimpleNamespace(index=index)))
    assert place_image_path(runtime, 0, [tmp_path]) == (root / "ok.jpg").resolve()
    assert place_image_path(runtime, 6, [tmp_path]) == (root / "private" / "ok.jpg").resolve()
    for bad in (1, 2, 3, 4):
        with pytest.raises(NotFound):
            place_image_path(runtime, bad, [tmp_path])
    # data roots that hold only part of the index root: the rest is not served, links included
    assert place_image_path(runtime, 0, [root / "ok.jpg"]) == (root / "ok.jpg").resolve()
    for outside in (5, 6):
        with pytest.raises(Forbidden, match="outside the data roots"):
            place_image_path(runtime, outside, [root / "ok.jpg"])
    with pytest.raises(Forbidden):
        place_image_path(runtime, 0, [])


def test_image_query_shows_thumbnails_scores_positions_and_timings(page, served, tmp_path):
    """Uploading a database image: its own place is the top match (score ~1),
    every thumbnail loads from the server, positions are plotted, timings shown."""
    query = tmp_path / "query.jpg"
    shutil.copyfile(served.images[5], query)
    _set_top_k(page, 4)
    _upload(page, query)
    _until(page, "document.querySelectorAll('#results .result').length === 4", "4 result cards")
    _until(page, THUMBS_LOADED_JS, "the thumbnails to load")
    cards = page.execute_script(CARDS_JS)

    assert [c["rank"] for c in cards] == ["#1", "#2", "#3", "#4"]
    assert cards[0]["top1"] and not any(c["top1"] for c in cards[1:])
    assert cards[0]["id"] == "5" and cards[0]["label"] == "place 5"
    scores = [float(c["score"]) for c in cards]
    assert scores[0] > 0.99 and scores == sorted(scores, reverse=True)
    assert len({c["id"] for c in cards}) == 4
    for c in cards:
        assert c["src"] == f"/v1/places/{c['id']}/image"
        assert (c["width"], c["height"]) == IMG_SIZE, f"thumbnail of id {c['id']} did not load: {c}"
        i = int(c["id"])
        assert f"E {500_000 + 12.5 * i:.1f}" in c["pos"], c

    circles = page.execute_script(
        "return [...document.querySelectorAll('#plot circle')].map(c => c.getAttribute('class'));"
    )
    assert len(circles) == 4 and circles.count("pt top1") == 1

    timings = page.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('#timings td')]"
        ".map(td => [td.dataset.key, td.textContent]));"
    )
    for key in ("decode", "embed", "search", "total"):
        assert timings[key].endswith(" ms") and float(timings[key].split()[0]) >= 0, timings
    assert page.find_element("id", "model-version").text == served.model
    assert page.find_element("id", "index-version").text == served.index
    assert page.find_element("id", "error").get_attribute("hidden") is not None
    page.save_screenshot("/tmp/vpr_webpage_query.png")


def _detail(served: Served, path: Path, content_type: str) -> str:
    """The server's own reason for refusing this upload, as the page should show it."""
    r = httpx.post(f"{served.url}/v1/query", content=path.read_bytes(), headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500, r.text
    return r.json()["detail"]


def test_bad_uploads_show_the_server_error(page, served, tmp_path):
    """A non-image (415) and a corrupt JPEG (400): the server's reason is shown
    and the previous matches are cleared; the next good query clears the error."""
    _upload(page, served.images[2])
    _until(page, "document.querySelectorAll('#results .result').length === 5", "the first query's results")

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    _upload(page, text)
    _until(page, "!document.getElementById('error').hidden", "the error message")
    msg = page.find_element("id", "error").text
    assert msg.startswith("Error 415") and _detail(served, text, "text/plain") in msg, msg
    assert page.find_elements("css selector", "#results .result") == []
    assert page.find_elements("css selector", "#plot circle") == []

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(served.images[0].read_bytes()[:200])
    _upload(page, broken)
    _until(page, "document.getElementById('error').textContent.startsWith('Error 400')", "the 400 message")
    assert _detail(served, broken, "image/jpeg") in page.find_element("id", "error").text
    page.save_screenshot("/tmp/vpr_webpage_error.png")

    _upload(page, served.images[2])
    _until(page, "document.getElementById('error').hidden", "the error to clear")
    _until(page, "document.querySelector('#results .result.top1')?.dataset.id === '2'", "the good query's results")


def _write_webm(path: Path, images: list[Path], seconds: float = 2.0, fps: int = 10) -> None:
    """A short VP8 video cycling through a few database images (Chromium plays WebM)."""
    av = pytest.importorskip("av")
    frames = [np.asarray(Image.open(p).convert("RGB").resize((128, 96))) for p in images]
    with av.open(str(path), "w", format="webm") as out:
        st = out.add_stream("libvpx", rate=fps)
        st.width, st.height, st.pix_fmt = 128, 96, "yuv420p"
        for n in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(frames[(n * len(frames)) // int(seconds * fps)], format="rgb24")
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


@pytest.mark.slow
def test_video_streams_frames_and_shows_results(page, served, tmp_path):
    """Picking a video and pressing Stream: frames go over the websocket as JPEGs
    and each answer updates the view until the video ends and the stream closes."""
    video = tmp_path / "walk.webm"
    _write_webm(video, served.images[:2])
    page.find_element("id", "video-file").send_keys(str(video))
    _until(page, "!document.getElementById('stream-start').disabled", "the Stream button")
    page.find_element("id", "stream-start").click()
    _until(page, "document.getElementById('stream-status').textContent.startsWith('frame ')", "a frame answer")
    _until(page, THUMBS_LOADED_JS, "the thumbnails to load")
    cards = page.execute_script(CARDS_JS)
    assert len(cards) == 5 and all(c["width"] > 0 for c in cards), cards  # the page's default top_k
    _until(
        page,
        "document.getElementById('stream-status').textContent.startsWith('done')",
        "the stream's end",
        timeout=WAIT_S,
    )
    status = page.find_element("id", "stream-status").text
    answered = int(status.split()[1])
    assert answered >= 2, status
    assert page.find_element("id", "error").get_attribute("hidden") is not None, page.find_element("id", "error").text
    assert page.find_element("id", "stream-start").is_enabled()
    page.save_screenshot("/tmp/vpr_webpage_stream.png")
