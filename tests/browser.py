"""Open an HTML report in headless Chromium (Playwright driving /usr/bin/chromium) and check what a
person sees: the first screen shows images that loaded, no image is broken or a placeholder, every
placeholder says why, and every section is reachable from the table of contents.

    inspect_page(path, screenshot) -> PageCheck

Skips (with the reason) only where chromium is absent; `make test` installs it (Makefile
APT_PACKAGES), so CI runs these checks.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1280, "height": 900}


def chromium_path() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not path:
        pytest.skip("chromium is not installed (make test installs it: apt-get install chromium)")
    return path


@dataclass
class PageCheck:
    first_screen_images: int      # <img> elements at least partly inside the first viewport, loaded
    first_screen_thumbnails: int  # of those, thumbnails (not plots)
    images: int                   # every <img>
    broken: list[str]             # alt of <img> elements that did not load (naturalWidth 0)
    placeholders: list[str]       # text of the placeholders shown instead of an image
    sections: list[str]           # section ids, in page order
    toc: list[str]                # ids the table of contents links to, in order
    unreachable: list[str]        # TOC links whose click did not bring the section into view
    screenshot: Path


_IMAGES = """() => [...document.images].map(i => {
  const r = i.getBoundingClientRect();
  return {alt: i.alt, cls: i.className, ok: i.complete && i.naturalWidth > 0, top: r.top + window.scrollY,
          bottom: r.bottom + window.scrollY, src: i.src.slice(0, 30)};
})"""


def inspect_page(path: Path, screenshot: Path) -> PageCheck:
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu",
                                                                "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(screenshot))
            imgs = page.evaluate(_IMAGES)
            first = [i for i in imgs if i["ok"] and i["top"] < VIEWPORT["height"] and i["bottom"] > 0]
            placeholders = page.evaluate("() => [...document.querySelectorAll('.missing')].map(e => e.textContent)")
            sections = page.evaluate("() => [...document.querySelectorAll('section')].map(s => s.id)")
            toc = page.evaluate("() => [...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href'))")
            unreachable = []
            for href in toc:
                page.click(f'nav.toc a[href="{href}"]')
                seen = page.evaluate("""(id) => {
                  const el = document.getElementById(id);
                  if (!el || el.tagName !== 'SECTION') return false;
                  const top = el.getBoundingClientRect().top;
                  const atEnd = window.scrollY + window.innerHeight >= document.documentElement.scrollHeight - 2;
                  return top >= -2 && (top < 120 || (atEnd && top < window.innerHeight));
                }""", href.removeprefix("#"))
                if not seen:
                    unreachable.append(href)
        finally:
            browser.close()
    return PageCheck(first_screen_images=len(first), first_screen_thumbnails=sum("plot" not in i["cls"] for i in first),
                     images=len(imgs), broken=[i["alt"] for i in imgs if not i["ok"]], placeholders=placeholders,
                     sections=sections, toc=[h.removeprefix("#") for h in toc], unreachable=unreachable,
                     screenshot=screenshot)


def assert_readable_report(check: PageCheck, min_first_screen: int = 1, placeholders: int = 0) -> None:
    """The checks every report passes in a browser (see the module docstring)."""
    assert check.screenshot.is_file() and check.screenshot.stat().st_size > 1000
    assert check.first_screen_images >= min_first_screen, check
    assert not check.broken, f"images that did not load: {check.broken}"
    assert len(check.placeholders) == placeholders, check.placeholders
    assert check.sections and check.toc == check.sections, (check.toc, check.sections)
    assert not check.unreachable, f"sections not reachable from the table of contents: {check.unreachable}"
