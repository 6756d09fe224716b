"""The gallery page of a batch (and of a single run with --gallery), looked at in a real browser:
headless Chromium loads it from disk. Also --open, by the command it starts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

import generate_image as gi
from conftest import CliRunner
from fake_api import FakeImagesAPI, Reply, images_answer, make_gif, make_png, make_svg

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE = "a cat <script>window.pwned = 1</script> & <b>bold</b>"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, with its background networking off: the page must load only from disk."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium and chromedriver here (the README's test command installs them with apt-get "
                    "where it may)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def look_at(browser, page: Path) -> dict:
    """What the page shows and did: images decoded, the totals line, the prompts as text, scripts run,
    and every resource it asked for."""
    browser.get(page.as_uri())
    return browser.execute_script("""
        const images = Array.from(document.images);
        return {decoded: images.map(i => i.complete && i.naturalWidth > 0),
                totals: document.querySelector('.totals').textContent,
                prompts: Array.from(document.querySelectorAll('.prompt')).map(p => p.textContent),
                statuses: Array.from(document.querySelectorAll('article')).map(a => a.className),
                scripts: document.scripts.length, pwned: window.pwned === 1,
                resources: performance.getEntriesByType('resource').map(r => r.name)};""")


def test_a_batch_gallery_shows_every_item_in_a_browser(online: CliRunner, api: FakeImagesAPI, isolated: Path,
                                                       browser) -> None:
    api.queue(Reply(body=images_answer([make_png(320, 200)])), Reply(body=images_answer([make_gif(64, 64, 4)])),
              Reply(body=images_answer([make_svg(300, 150)])),
              Reply(status=400, body={"error": {"message": "bad size", "code": "invalid_value"}}))
    (isolated / "set.json").write_text(json.dumps({"description": "pets <i>", "prompts": [
        {"prompt": HOSTILE, "filename": "one cat.png"}, {"prompt": "dog", "filename": "dog.png"},
        {"prompt": "owl", "filename": "owl.png"}, "fish"]}), encoding="utf-8")
    run = online("--batch", "set.json", "-j", "1")
    assert run.code == gi.EXIT_BATCH_PARTIAL
    seen = look_at(browser, isolated / "set.html")
    assert seen["decoded"] == [True, True, True]             # png, gif and svg, through <img>
    assert seen["statuses"] == ["ok", "ok", "ok", "failed"]
    assert seen["totals"].startswith("3 done, 1 failed, 0 skipped, 0 not run")
    assert seen["prompts"][0] == HOSTILE and (seen["scripts"], seen["pwned"]) == (0, False)
    assert all(url.startswith("file://") for url in seen["resources"]), seen["resources"]
    lines = [json.loads(line) for line in (isolated / "set.results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok", "ok", "ok", "failed"]
    page = (isolated / "set.html").read_text(encoding="utf-8")
    assert "bad size" in page and 'href="one%20cat.png"' in page and "<script>" not in page


def test_a_single_run_gallery_and_no_gallery_for_a_batch(online: CliRunner, isolated: Path, browser) -> None:
    assert online("-p", HOSTILE, "-f", "out/cat.png", "--gallery").code == 0
    seen = look_at(browser, isolated / "out" / "cat.html")
    assert seen["decoded"] == [True] and seen["prompts"] == [HOSTILE] and not seen["pwned"]
    (isolated / "b.json").write_text('["x"]', encoding="utf-8")
    assert online("--batch", "b.json", "--no-gallery").code == 0
    assert not (isolated / "b.html").exists()


@pytest.mark.skipif(os.name == "nt", reason="a POSIX shell script stands in for the viewer")
@pytest.mark.parametrize("viewer", [True, False], ids=["viewer", "no-viewer"])
def test_open_starts_the_systems_viewer_or_warns(online: CliRunner, isolated: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, viewer: bool) -> None:
    bin_dir, opened = tmp_path / "bin", tmp_path / "opened.txt"
    bin_dir.mkdir()
    if viewer:
        script = bin_dir / ("open" if sys.platform == "darwin" else "xdg-open")
        script.write_text(f'#!/bin/sh\necho "$1" > "{opened}"\n')
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    run = online("-p", "cat", "-f", "cat.png", "--open")
    assert (run.code, run.out) == (0, "cat.png\n")
    if viewer:
        for _ in range(100):
            if opened.exists() and opened.read_text().strip():
                break
            __import__("time").sleep(0.05)
        assert opened.read_text().strip() == "cat.png"
    else:
        assert "warning: could not open cat.png with xdg-open" in run.err or sys.platform == "darwin"


@pytest.mark.parametrize("platform, command", [("linux", ["xdg-open", "p.png"]), ("darwin", ["open", "p.png"]),
                                               ("freebsd13", ["xdg-open", "p.png"]), ("win32", None)])
def test_the_viewer_each_platform_uses(platform: str, command: list) -> None:
    assert gi.viewer_command(Path("p.png"), platform) == command


def test_a_page_not_ours_is_never_replaced(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    (isolated / "b.html").write_text("<p>my notes</p>", encoding="utf-8")
    (isolated / "b.json").write_text('["x"]', encoding="utf-8")
    run = online("--batch", "b.json")
    assert (run.code, api.requests) == (gi.EXIT_USAGE, []) and "b.html exists and is not a gallery" in run.err
    (isolated / "cat.html").write_text("<p>mine too</p>", encoding="utf-8")
    run = online("-p", "cat", "-f", "cat.png", "--gallery")
    assert run.code == 0 and "warning: the gallery was not written: cat.html exists" in run.err
    assert (isolated / "cat.html").read_text(encoding="utf-8") == "<p>mine too</p>"
    again = online("-p", "cat", "-f", "cat.png", "--gallery")          # cat-2.png gets a page of its own
    assert again.out == "cat-2.png\n" and "apiyi-gpt-image-2-gen gallery" in (isolated / "cat-2.html").read_text()


def test_an_svg_thumbnail_is_not_a_link(online: CliRunner, api: FakeImagesAPI, isolated: Path) -> None:
    api.queue(Reply(body=images_answer([make_svg(100, 100)])))
    assert online("-p", "logo", "--model", "gpt-image-2.6-all", "-o", "svg", "-f", "logo.svg", "--gallery").code == 0
    page = (isolated / "logo.html").read_text(encoding="utf-8")
    assert '<img src="logo.svg"' in page and 'href="logo.svg"' not in page
