"""The software versions a provenance file records (``training.json``, a merge's ``delta_router.json``)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("delta-router", "torch", "transformers", "peft", "mergekit")


def package_versions() -> dict[str, str | None]:
    """``{package: installed version}`` of ``PACKAGES`` (``None`` if one is not installed).

    The one source of versions: every provenance file asks the installed distributions' metadata,
    without importing them, so a trained adapter and a merge built in one environment record the
    same versions under the same names.
    """
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
