"""The web page draws the stream's track: a line of tracked places ending in a
square on its positions plot, and the tracked place in words (headless
Chromium against the real app; skips or fails like tests/server/test_webpage.py)."""

from __future__ import annotations

import pytest

from tests.server.test_webpage import _until, _upload, _write_webm, browser, page, served  # noqa: F401

TRACKED_JS = "document.querySelector('#plot rect.tracked') !== null"
pytestmark = pytest.mark.slow  # a browser and a video stream, like the page's own stream test


def test_stream_draws_the_track_and_an_image_query_clears_it(page, served, tmp_path):  # noqa: F811
    video = tmp_path / "walk.webm"
    _write_webm(video, served.images[:3])
    page.find_element("id", "video-file").send_keys(str(video))
    _until(page, "!document.getElementById('stream-start').disabled", "the Stream button")
    page.find_element("id", "stream-start").click()
    _until(page, TRACKED_JS, "the tracked place on the plot")
    text = page.find_element("id", "track").text
    assert text.startswith("Tracked: place "), text
    assert page.execute_script("return document.querySelector('#plot polyline.track-line') !== null")
    _until(page, "document.getElementById('stream-status').textContent.startsWith('done')", "the stream's end")
    _upload(page, served.images[0])  # a single image: no track any more
    _until(page, "document.getElementById('track').textContent === ''", "the track to clear")
    _until(page, "!document.querySelector('#plot rect.tracked')", "the plot without a track")
