"""Check a local HTML page in headless Chromium with no extra Python packages.

Chromium's command line alone cannot tell a ``console.error`` from a ``console.log`` (with
``--enable-logging=stderr`` both print as ``INFO:CONSOLE``) and does not report a broken
``<img>`` at all. So :func:`check_page` loads a *copy* of the page with a small probe script
put first in ``<head>`` (and a ``<base href>`` so relative links still resolve against the
original folder). The probe records ``console.error`` calls, uncaught errors, unhandled
rejections and failed resource loads, and after ``load`` checks every ``<img>``
(``complete`` and ``naturalWidth > 0``); it writes the result as JSON into an element that
``chromium --dump-dom`` then prints. :func:`screenshot` takes a full-page screenshot with
``--screenshot``, the window as tall as the page the probe measured.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PROBE_ID = "__browser_probe__"

_PROBE = """<script>(function () {
  var R = {console_errors: [], page_errors: [], failed_resources: [], broken_images: [],
           images: 0, ids: [], height: 0, done: false};
  window.__probe = R;
  var origError = console.error;
  console.error = function () {
    R.console_errors.push(Array.prototype.map.call(arguments, String).join(" "));
    return origError.apply(console, arguments);
  };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) {
      R.failed_resources.push((t.tagName || "?") + " " + String(t.src || t.href).slice(0, 120));
    } else {
      R.page_errors.push(String(e.message) + " @" + e.filename + ":" + e.lineno);
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    R.page_errors.push("unhandled rejection: " + String(e.reason));
  });
  document.addEventListener("DOMContentLoaded", function () {
    // lazy images outside the viewport would otherwise never load and look broken
    document.querySelectorAll("img[loading]").forEach(function (i) { i.loading = "eager"; });
  });
  window.addEventListener("load", function () {
    setTimeout(function () {
      var imgs = document.querySelectorAll("img");
      R.images = imgs.length;
      imgs.forEach(function (i) {
        if (!i.complete || i.naturalWidth === 0) {
          R.broken_images.push((i.alt || "") + " " + String(i.currentSrc || i.src).slice(0, 120));
        }
      });
      document.querySelectorAll("[id]").forEach(function (n) { if (n.id !== "%(pid)s") R.ids.push(n.id); });
      R.height = Math.max(document.documentElement.scrollHeight, document.body ? document.body.scrollHeight : 0);
      R.done = true;
      var out = document.createElement("script");
      out.type = "application/json";
      out.id = "%(pid)s";
      out.textContent = JSON.stringify(R).replace(/</g, "\\u003c");
      (document.body || document.documentElement).appendChild(out);
    }, 50);
  });
})();</script>""" % {"pid": PROBE_ID}


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    """What the probe saw on one page."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_resources: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    ids: list[str] = field(default_factory=list)
    height: int = 0
    dom: str = ""

    @property
    def problems(self) -> list[str]:
        return (
            [f"console.error: {m}" for m in self.console_errors]
            + [f"page error: {m}" for m in self.page_errors]
            + [f"failed resource: {m}" for m in self.failed_resources]
            + [f"broken image: {m}" for m in self.broken_images]
        )

    @property
    def ok(self) -> bool:
        return not self.problems


def _base_args(chromium: str) -> list[str]:
    return [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--hide-scrollbars", "--allow-file-access-from-files", "--virtual-time-budget=5000"]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([*args, f"--user-data-dir={profile}"], capture_output=True, text=True,
                              timeout=timeout, check=False)


def _probed_copy(page: Path, tmp: Path) -> Path:
    text = page.read_text(encoding="utf-8")
    base = f'<base href="{html.escape(page.parent.resolve().as_uri())}/">'
    inject = base + _PROBE
    m = re.search(r"<head[^>]*>", text, re.IGNORECASE)
    if m:
        text = text[: m.end()] + inject + text[m.end():]
    else:
        m = re.search(r"<html[^>]*>", text, re.IGNORECASE)
        pos = m.end() if m else 0
        text = text[:pos] + "<head>" + inject + "</head>" + text[pos:]
    out = tmp / "probed.html"
    out.write_text(text, encoding="utf-8")
    return out


def check_page(page: str | Path, *, width: int = 1280, chromium: str | None = None,
               timeout: float = 60) -> PageCheck:
    """Load ``page`` (a local HTML file) in headless Chromium, ``width`` pixels wide, and
    report what went wrong."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium binary on PATH")
    page = Path(page)
    with tempfile.TemporaryDirectory(prefix="browser-check-") as tmp:
        probed = _probed_copy(page, Path(tmp))
        proc = _run([*_base_args(chromium), f"--window-size={width},800", "--dump-dom", probed.as_uri()],
                    timeout)
    dom = proc.stdout
    m = re.search(rf'<script type="application/json" id="{PROBE_ID}">(.*?)</script>', dom, re.DOTALL)
    if m is None:
        raise RuntimeError(f"the probe did not report (chromium rc={proc.returncode}); stderr tail:\n"
                           + proc.stderr[-2000:])
    data = json.loads(m.group(1))
    if not data.get("done"):
        raise RuntimeError("the probe did not finish")
    keys = PageCheck.__dataclass_fields__.keys() - {"dom"}
    return PageCheck(dom=dom, **{k: data[k] for k in keys if k in data})


def screenshot(page: str | Path, out: str | Path, *, width: int = 1280, height: int = 4000,
               chromium: str | None = None, timeout: float = 60) -> Path:
    """A PNG screenshot of ``page`` in a ``width`` x ``height`` window (pass the page's height
    from :func:`check_page` for a full-page shot)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium binary on PATH")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([*_base_args(chromium), f"--window-size={width},{max(int(height), 200)}",
                 f"--screenshot={out}", Path(page).resolve().as_uri()], timeout)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"no screenshot written (chromium rc={proc.returncode}); stderr tail:\n"
                           + proc.stderr[-2000:])
    return out
