"""Check that the site's diagrams render offline and fit the page, with screenshots.

``python scripts/docs_screenshot.py`` (after ``bash scripts/docs.sh``'s set-up; needs the
``chromium`` package) builds the site strictly into a temporary directory, serves it on
127.0.0.1 and opens every page that has a diagram in headless Chromium with a 1280 px wide
window, every host name but 127.0.0.1 made unresolvable: a diagram that needed the internet
(the theme's CDN copy of Mermaid, say) would not render. On each page it measures every
drawn diagram against the content column and fails if one is not drawn, is Mermaid's
error picture, sticks out of the column, or had to be shrunk below ``MIN_SCALE`` to fit (its
text would be too small to read), and if a page asked for anything not on the site (without
the bundled copy, the theme asks unpkg.com for Mermaid). It prints one line per diagram
and writes a screenshot of each, cut from a screenshot of the whole page, and those lines
(``check.txt``) to ``docs/images/diagrams/`` (``--out`` for elsewhere).

The theme draws a diagram inside a closed shadow root, out of reach of a page's scripts.
The pages this check opens are copies with one script added before the theme's: it makes
shadow roots open, so that the diagram can be measured, and writes what it measured into
the page, which ``--dump-dom`` prints. Nothing else in the copies differs from the site.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, ClassVar

try:
    from PIL import Image  # the serve extra's
except ImportError:
    sys.exit("no Pillow: pip install -e '.[serve]' (scripts/test.sh's set-up installs it)")

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 1280
# A diagram may be drawn a little smaller than Mermaid laid it out, not much: below this
# its 16 px labels fall under 13 px.
MIN_SCALE = 0.8
MARKER = 'class="mermaid"'

# Runs before the theme's scripts. ``EXPECTED`` is the number of diagrams in the page's
# HTML.
PROBE = """
<script>
(function () {
  const attach = Element.prototype.attachShadow;
  Element.prototype.attachShadow = function (init) {
    return attach.call(this, Object.assign({}, init, {mode: "open"}));
  };
  const EXPECTED = %(expected)d, started = Date.now();
  function drawn() {
    return [...document.querySelectorAll("div.mermaid")].filter(
      (h) => h.shadowRoot && h.shadowRoot.querySelector("svg"));
  }
  function report() {
    const column = document.querySelector(".md-content__inner").getBoundingClientRect();
    const diagrams = drawn().map((host) => {
      const svg = host.shadowRoot.querySelector("svg");
      const box = svg.getBoundingClientRect();
      const natural = svg.viewBox.baseVal ? svg.viewBox.baseVal.width : box.width;
      return {
        natural_px: Math.round(natural), drawn_px: Math.round(box.width),
        height_px: Math.round(box.height), column_px: Math.round(column.width),
        top_px: Math.round(box.top + window.scrollY),
        left_px: Math.round(box.left - column.left), right_px: Math.round(column.right - box.right),
        scale: natural ? box.width / natural : 0,
        host_scrolls: host.scrollWidth > host.clientWidth + 1,
        error: svg.getAttribute("aria-roledescription") === "error"
          || /Syntax error/.test(svg.textContent),
      };
    });
    // Every script the page has and every resource it asked for, failed ones too.
    const asked = [...document.scripts].map((s) => s.src).filter((s) => s).concat(
      performance.getEntriesByType("resource").map((e) => e.name));
    const out = document.createElement("pre");
    out.id = "diagram-check";
    out.textContent = JSON.stringify({expected: EXPECTED, diagrams: diagrams, asked: asked,
      page_px: document.documentElement.scrollHeight});
    document.body.appendChild(out);
  }
  function wait() {
    if (drawn().length >= EXPECTED || Date.now() - started > 15000) { report(); return; }
    setTimeout(wait, 100);
  }
  window.addEventListener("load", () => setTimeout(wait, 100));
})();
</script>
"""


class _Quiet(http.server.SimpleHTTPRequestHandler):
    requested: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        _Quiet.requested.append(self.path)


def _chromium(*args: str) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium: apt-get install chromium")
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # run as root in a container; the pages are the project's own
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=20000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if done.returncode != 0:
        sys.exit(f"chromium failed:\n{done.stderr}")
    return done.stdout


def _probe_copy(site: Path, page: Path, expected: int) -> str:
    """A copy of ``page`` beside it with the probe, as a path relative to the site."""
    html = page.read_text()
    html = html.replace("<head>", "<head>" + PROBE % {"expected": expected}, 1)
    copy = page.with_name("_check.html")
    copy.write_text(html)
    return copy.relative_to(site).as_posix()


def _crop(page_png: Path, top: int, height: int, shot: Path) -> None:
    """The window's whole width around one diagram, in few colours: small in git."""
    with Image.open(page_png) as image:
        box = (0, max(top - 120, 0), image.width, min(top + height + 40, image.height))
        part = image.convert("RGB").crop(box)
    part.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(shot, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "diagrams")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        build = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)]
        subprocess.run(build, cwd=ROOT, env=env, check=True)
        pages = sorted(p for p in site.rglob("*.html") if MARKER in p.read_text())
        if not pages:
            sys.exit("no page of the site has a diagram")

        handler = functools.partial(_Quiet, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}/"

        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("*.png"):
            old.unlink()
        failures: list[str] = []
        lines: list[str] = []
        for page in pages:
            name = page.parent.relative_to(site).as_posix() or "index"
            expected = page.read_text().count(MARKER)
            url = base + _probe_copy(site, page, expected)
            dom = _chromium(f"--window-size={WIDTH},900", "--dump-dom", url)
            found = re.search(r'<pre id="diagram-check">(.*?)</pre>', dom, flags=re.S)
            if found is None:
                failures.append(f"{name}: the page's probe reported nothing")
                continue
            result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
            remote = {s for s in result["asked"] if not s.startswith((base, "data:", "blob:"))}
            if remote:
                failures.append(f"{name}: asked for what is not on the site: {sorted(remote)}")
            if len(result["diagrams"]) != expected:
                failures.append(f"{name}: {len(result['diagrams'])} of {expected} diagrams drawn")
            # The whole page in one window as tall as it is: no scrolling, every diagram drawn
            # where a reader finds it; each screenshot is cut from it.
            page_png = Path(tmp) / "page.png"
            _chromium(f"--window-size={WIDTH},{result['page_px']}", f"--screenshot={page_png}", url)
            for i, d in enumerate(result["diagrams"]):
                fits = d["left_px"] >= 0 and d["right_px"] >= 0 and not d["host_scrolls"]
                ok = fits and not d["error"] and d["scale"] >= MIN_SCALE
                shot = args.out / f"{name.replace('/', '_')}_{i + 1}.png"
                lines.append(
                    f"{'ok  ' if ok else 'FAIL'} {name} diagram {i + 1}: drawn {d['drawn_px']} px"
                    f" of a {d['column_px']} px column (laid out {d['natural_px']} px, scale"
                    f" {d['scale']:.2f}), {d['height_px']} px high"
                    f"{', Mermaid error' if d['error'] else ''} -> {shot.name}"
                )
                print(lines[-1], flush=True)
                if not ok:
                    failures.append(f"{name} diagram {i + 1}")
                _crop(page_png, d["top_px"], d["height_px"], shot)
        server.shutdown()
        if "/javascripts/mermaid.min.js" not in _Quiet.requested:
            failures.append("the bundled javascripts/mermaid.min.js was never requested")
    lines += [f"FAIL {failure}" for failure in failures]
    lines.append(
        f"{'FAILED' if failures else 'passed'}: {len(pages)} pages, {WIDTH} px window, no host"
        f" but 127.0.0.1 resolvable, diagrams no smaller than {MIN_SCALE:g}x"
    )
    print("\n".join(lines[-1 - len(failures) :]))
    (args.out / "check.txt").write_text("\n".join(lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
