"""The selection-vs-random protocol of the reports (same as `delta-router compare`, defaults spelled out).

python evals/compare.py                                   # every domain, k 1/3/5, linear + ties
python evals/compare.py --domain sentiment --k 3 --recipe linear --limit 32   # a quick slice
"""

from __future__ import annotations

import sys

from delta_router.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", "--out", "reports/compare", *sys.argv[1:]]))
