"""Open ``report.html`` in headless Chromium and check what a reader would see.

    python -m openpluto.demo.check_report DIR/report.html [--screenshot page.png]

Checks: the file is under ``--max-mb`` (5); in the rendered page every image decoded
(``naturalWidth > 0``) and no raw Markdown shows (table rows like ``| a | b |``, ``|---|``, ``**bold**``,
``# heading`` lines, code fences). A copy of the page with a small checking script appended is loaded
with ``--dump-dom``; the script writes its findings into the DOM once the page has loaded. With
``--screenshot`` a full-page PNG is taken as well, to look at. Exit status 0 when all checks pass,
1 when one fails, 2 when no Chromium is found (``--chromium`` or ``OPENPLUTO_CHROMIUM`` names one).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars")
HANG_GUARD_S = 600  # only a browser that never returns gets near this
MARK = "openpluto-check"

# Runs in the page after it has loaded: every image decoded? raw Markdown left in the visible text?
_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || i.src.slice(0, 60); });
  // Markdown tables, bold and fences anywhere; headings outside <pre> (where "# " starts a comment).
  var md = [/^\\s*\\|.*\\|\\s*$/m, /\\|\\s*:?-{3,}/, /\\*\\*[^*\\n]+\\*\\*/, /```/];
  var text = document.body.innerText;
  var found = md.map(function (re) { var m = text.match(re); return m ? m[0].slice(0, 80) : null; });
  var blocks = document.body.querySelectorAll('p, li, td, th, caption, figcaption, h1, h2, h3, h4, div');
  var heading = null;
  Array.prototype.forEach.call(blocks, function (e) {
    var m = e.closest('pre') ? null : e.innerText.match(/^\\s*#{1,6} \\S.*$/m);
    if (m && heading === null) { heading = m[0].trim().slice(0, 80); }
  });
  found.push(heading);
  found = found.filter(function (m) { return m !== null; });
  var out = document.createElement('pre');
  out.id = 'MARK';
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, markdown: found,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>""".replace("MARK", MARK)


def find_chromium(explicit: str | None = None) -> str | None:
    """Path of a Chromium/Chrome executable: ``explicit``, ``$OPENPLUTO_CHROMIUM``, else on PATH."""
    for name in (explicit, os.environ.get("OPENPLUTO_CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    return None


def _chromium(browser: str, url: str, extra: list[str], profile: Path) -> subprocess.CompletedProcess:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD_S)


def check_report(report: str | Path, browser: str, screenshot: str | Path | None = None,
                 max_mb: float = 5.0, width: int = 1280) -> dict:
    """Render ``report`` and return ``{"ok", "problems", "images", "broken", "markdown", "mb"}``."""
    report = Path(report)
    mb = report.stat().st_size / 2**20
    problems = [f"{report.name} is {mb:.1f} MB (limit {max_mb:g} MB)"] if mb > max_mb else []
    with tempfile.TemporaryDirectory(prefix="openpluto-check-") as tmp:
        page = Path(tmp) / "page.html"
        text = report.read_text(encoding="utf-8")
        page.write_text(text.replace("</body>", _SCRIPT + "</body>") if "</body>" in text else text + _SCRIPT,
                        encoding="utf-8")
        res = _chromium(browser, page.as_uri(), ["--dump-dom", f"--window-size={width},900"],
                        Path(tmp) / "profile-dom")
        start = res.stdout.find(f'id="{MARK}">')
        if start < 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            return {"ok": False, "problems": problems + [f"the page did not render in {browser}: "
                                                         + " | ".join(tail)], "mb": round(mb, 2)}
        body = res.stdout[start + len(MARK) + 6:]
        found = json.loads(html.unescape(body[:body.find("</pre>")]))
        if found["broken"]:
            problems.append(f"{len(found['broken'])} of {found['images']} images did not decode: "
                            + "; ".join(found["broken"][:5]))
        if found["markdown"]:
            problems.append("raw Markdown on the page: " + "; ".join(repr(m) for m in found["markdown"]))
        if screenshot is not None:
            height = int(min(max(found.get("height") or 900, 900), 30000))
            shot = Path(screenshot).resolve()
            _chromium(browser, page.as_uri(), [f"--screenshot={shot}", f"--window-size={width},{height}"],
                      Path(tmp) / "profile-shot")
            if not shot.is_file():
                problems.append(f"no screenshot was written to {shot}")
    return {"ok": not problems, "problems": problems, "images": found["images"], "broken": found["broken"],
            "markdown": found["markdown"], "mb": round(mb, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m openpluto.demo.check_report",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="report.html to check")
    ap.add_argument("--screenshot", help="also write a full-page PNG here")
    ap.add_argument("--chromium", help="Chromium/Chrome executable (default: found on PATH)")
    ap.add_argument("--max-mb", type=float, default=5.0, help="largest acceptable page, MB (default: 5)")
    args = ap.parse_args(argv)
    if not Path(args.report).is_file():
        print(f"error: {args.report} does not exist", file=sys.stderr)
        return 1
    browser = find_chromium(args.chromium)
    if browser is None:
        print("error: no Chromium found (install it, e.g. `apt-get install chromium`, or pass "
              "--chromium PATH)", file=sys.stderr)
        return 2
    res = check_report(args.report, browser, args.screenshot, args.max_mb)
    print(f"{args.report}: {res['mb']} MB, {res.get('images', 0)} images rendered in {Path(browser).name}"
          + ("" if res["ok"] else "; PROBLEMS:"))
    for p in res["problems"]:
        print(f"  - {p}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
