"""Fetch a file once, check it, keep it: the one download helper of ``nnlib.data``.

``download_file(urls, dest, md5=..., sha256=...)`` tries each mirror in turn,
streams the response into a uniquely named temporary file beside ``dest``
(``<dest>.<random>.part``, so two processes filling the same cache never
write into each other's bytes), hashes it on the way, and only when every given
digest matches renames it into place (``os.replace``, atomic on one
filesystem). So ``dest`` is either absent or complete and verified: an
interrupted, failed or corrupted download never leaves a file behind, and the
temporary file is removed whatever goes wrong (Ctrl-C included). A ``dest``
that already holds the expected bytes is not downloaded again.

Digests are hex strings in either case (published lists mix ``ABC..`` and
``abc..``). Any URL ``urllib`` opens works, ``file://`` included (tests and
offline mirrors). A checksum mismatch is reported as :class:`ChecksumError`
(a ``ValueError``) naming the URL, the expected and the actual digest; it is
never silently retried into success from a different mirror without saying
so. An unreachable URL is an ``OSError`` naming the URL.

Loaders call this only when the user passes ``download=True``; nothing here
runs on import.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

_CHUNK = 1 << 20
# Some dataset hosts refuse urllib's default agent string.
_USER_AGENT = "nnlib-data/0.1 (Python urllib)"


class ChecksumError(ValueError):
    """A file's digest differs from the published one."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest (lowercase) of a file's bytes; ``algorithm``: any ``hashlib`` name."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    return {a: d.lower() for a, d in (("md5", md5), ("sha256", sha256)) if d is not None}


def _first_mismatch(expected: dict[str, str], actual: dict[str, str], name: str, size: int,
                    source: str | None) -> ChecksumError | None:
    for algorithm, want in expected.items():
        if actual[algorithm] != want:
            origin = f" downloaded from {source}" if source else ""
            return ChecksumError(
                f"checksum mismatch for {name}{origin}: expected {algorithm} {want}, "
                f"got {actual[algorithm]} ({size} bytes). The file is truncated, corrupted "
                "or the source serves different data; it was not kept."
            )
    return None


def verify_checksum(
    path: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
    source: str | None = None,
) -> None:
    """Raises :class:`ChecksumError` unless ``path`` has every given digest.

    ``source`` (e.g. the URL the file came from) is named in the message.
    """
    path = Path(path)
    expected = _expected_digests(md5, sha256)
    actual = {a: file_digest(path, a) for a in expected}
    if error := _first_mismatch(expected, actual, path.name, path.stat().st_size, source):
        raise error


def _has_digests(path: Path, md5: str | None, sha256: str | None) -> bool:
    return all(file_digest(path, a) == d for a, d in _expected_digests(md5, sha256).items())


def _fetch(url: str, dest: Path, expected: dict[str, str], timeout: float) -> None:
    """Streams ``url`` into a temporary file, checks it, renames it to ``dest``."""
    hashers = {a: hashlib.new(a) for a in expected}
    # A random name opened with "x" (exclusive create) is unique like mkstemp's, but
    # gets the umask's permissions rather than mkstemp's owner-only 0600, which would
    # lock other users out of a shared cache once renamed into place.
    tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.part")
    out = open(tmp, "xb")
    try:
        size = 0
        with out:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    for h in hashers.values():
                        h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        actual = {a: h.hexdigest() for a, h in hashers.items()}
        if error := _first_mismatch(expected, actual, dest.name, size, url):
            raise error
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
      md5, sha256: published hex digests (either case); every one given must
        match. With none the bytes are kept unchecked (the caller then
        validates the content) and an existing ``dest`` is fetched again.
      timeout: seconds to wait for each connection.

    Returns:
      ``dest`` as a ``Path``.

    Raises:
      ChecksumError: a mirror served bytes with the wrong digest (and no
        later mirror served the right ones); nothing is written.
      OSError: no mirror could be reached; the message names each URL and
        its error.
      ValueError: ``urls`` is empty.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError(f"download_file: no URL given for {dest}")
    dest = Path(dest)
    expected = _expected_digests(md5, sha256)
    if expected and dest.is_file() and _has_digests(dest, md5, sha256):
        return dest  # cached and verified
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[tuple[str, Exception]] = []
    for url in urls:
        try:
            _fetch(url, dest, expected, timeout)
        # OSError covers urllib's URLError / HTTPError; ValueError is ChecksumError or
        # urllib's "unknown url type" for a malformed URL.
        except (OSError, ValueError) as e:
            failures.append((url, e))
            continue
        bad = [u for u, e in failures if isinstance(e, ChecksumError)]
        if bad:  # the verified bytes are kept, but a mirror served others: say so
            warnings.warn(f"download_file: {dest.name} verified from {url} after a checksum "
                          f"mismatch from {', '.join(bad)}", stacklevel=2)
        return dest
    last = failures[-1][1]
    mismatch = any(isinstance(e, ChecksumError) for _, e in failures)
    error = ChecksumError if mismatch else OSError
    if len(urls) == 1:
        what = "" if mismatch else f"could not fetch {urls[0]}: "
        raise error(f"download_file: {what}{last}") from last
    tried = "\n  ".join(f"{url}: {e}" for url, e in failures)
    raise error(
        f"download_file: could not fetch {dest.name} from any mirror:\n  {tried}"
    ) from last
