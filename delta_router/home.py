"""The one cache home (``DELTA_ROUTER_HOME``) and atomic file/directory writes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from delta_router.errors import DeltaRouterError, OutputExistsError

logger = logging.getLogger(__name__)

DEFAULT_HOME = Path("~/.cache/delta_router")


def home() -> Path:
    """Root of every cache: ``$DELTA_ROUTER_HOME`` or ``~/.cache/delta_router``."""
    root = Path(os.environ.get("DELTA_ROUTER_HOME", DEFAULT_HOME)).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there, a parent that is a file, no permission
        raise DeltaRouterError(
            f"cannot use {root} as the cache home ({exc.strerror}): set DELTA_ROUTER_HOME to a directory"
        ) from exc
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the home, created on demand."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """Hex sha256 over several files (names and bytes), order-independent."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def umask() -> int:
    """The process umask (read without changing it): new files get 0666, directories 0777, less it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_existing(path: str | Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Check an output directory before any compute; return it as a Path.

    Refuses (``OutputExistsError``) a path that is a file, a non-empty directory unless ``force``,
    and, even with ``force``, a path that is or contains one of ``inputs`` (writing it would delete
    what the command reads).
    """
    path = refuse_inputs(_refuse_file_parent(Path(path), "--out"), inputs)
    if path.is_file():
        raise OutputExistsError(f"{path} is a file, not a directory: choose another --out")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(
            f"{path} already exists and is not empty: choose another --out or pass --force"
        )
    return path


REPORT_MARKER = ".delta-router-report"


def claim_report_dir(path: str | Path, force: bool) -> Path:
    """Check a report directory before any compute, and mark it as one; return it as a Path.

    A report command rewrites its own file names in ``path`` on every run (and never touches other
    files), so ``path`` must be new, empty, a report directory already (``REPORT_MARKER``), or
    ``force``d: a directory of someone's files is refused (``OutputExistsError``).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a directory: choose another --out")
    held = sorted(p.name for p in path.iterdir())[:3] if path.is_dir() else []
    if held and not (path / REPORT_MARKER).exists() and not force:
        raise OutputExistsError(
            f"{path} holds files no delta-router report wrote ({', '.join(held)}, ...): choose "
            "another --out, or pass --force to write the report's files among them"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / REPORT_MARKER).touch()
    return path


def refuse_inputs(path: str | Path, inputs: tuple[str | Path | None, ...]) -> Path:
    """``path``, unless it is or holds one of ``inputs`` (files or directories the command reads;
    ``None`` and names that are no existing path are skipped): writing it, even with ``--force``,
    would delete them."""
    path = Path(path)
    for source in inputs:
        if source is not None and Path(source).exists() and _is_within(Path(source), path):
            raise OutputExistsError(f"--out {path} would replace the input {source}: choose another --out")
    return path


@contextlib.contextmanager
def report_dir(path: str | Path, force: bool) -> Iterator[Path]:
    """``claim_report_dir`` for the span of a report command: directories the claim created are
    removed again if the command leaves them empty (it failed before writing), so a failed run
    leaves nothing behind."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    claim_report_dir(path, force)
    try:
        yield path
    finally:
        if created and all(p.name == REPORT_MARKER for p in path.iterdir()):
            (path / REPORT_MARKER).unlink(missing_ok=True)
            for directory in created:
                try:
                    directory.rmdir()
                except OSError:  # something else wrote there meanwhile: keep it
                    break


def refuse_existing_file(path: str | Path, force: bool, option: str = "--out") -> Path:
    """Check an output file (of ``option``, for messages) before any compute: not a directory, and not an
    existing file unless ``force``."""
    path = _refuse_file_parent(Path(path), option)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory: give a file path for {option}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists: choose another {option} or pass --force")
    return path


def _refuse_file_parent(path: Path, option: str) -> Path:
    """``path``, unless one of its parents is a file (it could never be created there)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputExistsError(f"{option} {path}: {parent} is a file, not a directory")
    return path


def _is_within(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    The file gets the usual permissions (0666 less the umask), not the temp file's 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # e.g. a read-only cache home: name the file, not a temp name
        raise OSError(exc.errno, f"cannot write {path} ({exc.strerror})") from exc
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; on success it replaces ``path``.

    An existing non-empty ``path`` is refused unless ``force`` (``refuse_existing``). The old
    directory is moved aside, the new one renamed in, and only then the old one deleted; if the
    rename fails the old one is put back. On any error the temp directory is removed and ``path``
    is left as it was. Directories get 0777 and files 0666 less the umask (not ``mkdtemp``'s 0700).
    What a killed run left next to ``path`` is cleaned up first (``sweep_leftovers``).
    """
    sweep_leftovers(Path(path))
    path = refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        for written in tmp.rglob("*"):  # some writers (safetensors) leave 0600 files
            os.chmod(written, (0o777 if written.is_dir() else 0o666) & ~umask())
        if not force and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise OutputExistsError(f"{path} was written by another process meanwhile: choose another --out")
        if not path.exists():
            os.replace(tmp, path)  # a directory that appeared non-empty since fails the rename
            return
        old = tmp.with_suffix(".old")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _owner() -> str:
    """``pid@host`` of this process: temp names carry it, so a later run can tell a dead run's leftovers."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9-]', '-', socket.gethostname())}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_leftovers(path: Path) -> None:
    """Clean up after ``atomic_directory`` runs of ``path`` that were killed (``kill -9``, power loss).

    Their temp directory (``.<name>.<pid>@<host>.*.tmp``, a whole model's worth of files) is removed;
    a previous ``path`` moved aside (``.old``) by a run killed mid-swap is put back if ``path`` is
    missing (else removed: the swap had finished). Only leftovers of processes of this host that are
    no longer running are touched.
    """
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@([A-Za-z0-9-]+)\.\w+\.(tmp|old)")
    host = _owner().split("@", 1)[1]
    for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*@*")):
        match = pattern.fullmatch(entry.name)
        if not match or match[2] != host or _running(int(match[1])) or not entry.is_dir():
            continue
        if match[3] == "old" and not path.exists():
            os.replace(entry, path)
            logger.warning("%s: put back the previous output, which a killed run had moved aside", path)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            logger.warning("removed %s, left by a killed run (pid %s)", entry, match[1])
