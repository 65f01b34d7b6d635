"""Fetch a file once, check it, keep it: the download helper of ``nnlib.data``.

``download_file(urls, dest, md5=..., sha256=...)`` tries each mirror in turn,
streams the response into ``dest.part`` next to ``dest``, checks the digest
and only then renames the file into place (``os.replace``), so ``dest`` is
either absent or complete and verified; an interrupted or corrupted download
never poisons the cache. A ``dest`` that already holds the expected bytes is
not downloaded again.

Any URL ``urllib`` opens works, ``file://`` included (tests and offline
mirrors). A checksum mismatch is reported as :class:`ChecksumError` naming
the URL, the expected and the actual digest; it is never silently retried
into success from a different mirror without saying so.

Loaders call this only when the user passes ``download=True``; nothing here
runs on import.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

_CHUNK = 1 << 20
# Some dataset hosts refuse urllib's default agent string.
_USER_AGENT = "nnlib-data/0.1 (Python urllib)"


class ChecksumError(ValueError):
    """A file's digest differs from the published one."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``algorithm``: any ``hashlib`` name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    return {a: d.lower() for a, d in (("md5", md5), ("sha256", sha256)) if d is not None}


def verify_checksum(
    path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
    source: str | None = None,
) -> None:
    """Raises :class:`ChecksumError` unless ``path`` has every given digest.

    ``source`` (e.g. the URL the file came from) is named in the message.
    """
    path = Path(path)
    for algorithm, expected in _expected_digests(md5, sha256).items():
        actual = file_digest(path, algorithm)
        if actual != expected:
            origin = f" downloaded from {source}" if source else ""
            raise ChecksumError(
                f"checksum mismatch for {path.name}{origin}: expected {algorithm} {expected}, "
                f"got {actual} ({path.stat().st_size} bytes). The file is truncated, corrupted "
                "or the mirror serves different data; it was not kept."
            )


def _has_digests(path: Path, md5: str | None, sha256: str | None) -> bool:
    return all(file_digest(path, a) == d for a, d in _expected_digests(md5, sha256).items())


def download_file(
    urls: str | Sequence[str],
    dest: str | os.PathLike,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Downloads the first mirror that answers into ``dest`` and verifies it.

    Args:
      urls: one URL or mirrors tried in order (``https://``, ``http://``,
        ``file://``).
      dest: where the file ends up; parent folders are created.
      md5, sha256: published digests; every one given must match. With none
        the bytes are kept unchecked (the caller then validates the content).
      timeout: seconds to wait for each connection.

    Returns:
      ``dest`` as a ``Path``.

    Raises:
      ChecksumError: a mirror served bytes with the wrong digest (and no
        later mirror served the right ones).
      OSError: no mirror could be reached; the message lists each URL and
        its error.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError(f"download_file: no URL given for {dest}")
    dest = Path(dest)
    if dest.exists() and (md5 or sha256) and _has_digests(dest, md5, sha256):
        return dest  # cached and verified
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    mismatch: ChecksumError | None = None
    for url in urls:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response, \
                    open(part, "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
            verify_checksum(part, md5=md5, sha256=sha256, source=url)
        except ChecksumError as e:
            mismatch = e
            failures.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
            continue
        except (urllib.error.URLError, OSError, ValueError) as e:
            failures.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, dest)
        return dest
    if mismatch is not None and len(urls) == 1:
        raise ChecksumError(f"download_file: {mismatch}")
    tried = "\n  ".join(failures)
    error = ChecksumError if mismatch is not None else OSError
    raise error(f"download_file: could not fetch {dest.name} from any mirror:\n  {tried}")
