"""Screenshot of a loop run's review page (for the README; not a test).

    python jobs/stal_loop.py --config configs/camvid_stal.yaml run=camvid_entropy ...
    python docs/screenshot_review_page.py --run runs/camvid_entropy --out docs/review_page.png

Opens ``<run>/review.html`` as a file in headless Chromium (Debian's ``chromium``; playwright
is in the dev extras) and saves the top of the page at ``--height`` pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a local run folder holding review.html")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "review_page.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    page_file = Path(args.run).resolve() / "review.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=args.out)
        browser.close()
    print(f"screenshot: {args.out} of {page_file}")


if __name__ == "__main__":
    main()
