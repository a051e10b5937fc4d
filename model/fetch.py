"""Fetch catalogue files into `$VPR_HOME/weights`, checked by sha256 before any use.

`fetch` tries the entry's mirrors in order (URLs given by the caller first).
Bytes go to `<file>.part`; a `.part` left by a broken connection is resumed
with an HTTP Range request (a server that ignores Range starts it over). Only
when the whole file is there and its sha256 matches is it renamed into place,
so nothing ever reads an unchecked file under its real name. A record
`<entry>.json` beside it says which sha256 was checked, against what, and which
mirror served it. `import_file` does the same for a file brought by hand.

Downloads are a caller's decision: every function that could download takes
`offline`, and with it set a missing file is an `OfflineError` that names the
entry and the `vpr weights import` command. The model package reads no
settings; the CLI passes `VPR_OFFLINE` (or CI) in.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpr.model.catalogue import Entry
from vpr.model.fileio import atomic_write_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class FetchError(ValueError):
    """A catalogue file that could not be fetched, imported or verified, with the reason."""


class OfflineError(FetchError):
    """A file is missing and downloads are forbidden (VPR_OFFLINE=1, or CI)."""


class HashMismatch(FetchError):
    """A file whose sha256 is not the expected one."""


class _MirrorFailed(Exception):
    """One mirror's failure; the next mirror is tried."""


@dataclass(frozen=True)
class Fetched:
    entry: str
    path: Path
    sha256: str
    source: str  # the URL that served it, "present" (already here) or "import:<path>"
    downloaded: int = 0  # bytes transferred by this call
    resumed_from: int = 0  # bytes of an earlier partial download that were kept


def stored_path(entry: Entry, weights_home: Path) -> Path:
    return Path(weights_home) / entry.file_name


def record_path(entry: Entry, weights_home: Path) -> Path:
    return Path(weights_home) / f"{entry.name}.json"


def read_record(entry: Entry, weights_home: Path) -> dict[str, Any]:
    path = record_path(entry, weights_home)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise FetchError(f"{path}: unreadable record ({e}); delete it and fetch or import again") from e
    return data if isinstance(data, dict) else {}


def update_record(entry: Entry, weights_home: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the entry's record (atomic write)."""
    rec = {**read_record(entry, weights_home), "entry": entry.name, **fields}
    atomic_write_json(record_path(entry, weights_home), rec)
    return rec


def check_sha256_text(value: str) -> str:
    v = value.strip().lower()
    if not SHA256_RE.match(v):
        raise FetchError(f"{value!r} is not a sha256 (64 hex digits)")
    return v


def expected_sha256(entry: Entry, weights_home: Path, override: str | None = None) -> tuple[str | None, str]:
    """(sha256 to check against, where it comes from): the caller's, the catalogue's,
    else the one pinned by an earlier trust-on-first-use download."""
    if override:
        return check_sha256_text(override), "given"
    if entry.sha256:
        return entry.sha256, "catalogue"
    pinned = read_record(entry, weights_home).get("sha256")
    if isinstance(pinned, str) and SHA256_RE.match(pinned):
        return pinned, "pinned at first use"
    return None, "none"


def _no_hash_error(entry: Entry) -> FetchError:
    return FetchError(
        f"{entry.name}: no sha256 is published for {entry.file_name}; pass --sha256 HEX from a source you "
        "trust, or --trust-on-first-use to pin the sum of this download"
    )


def present(entry: Entry, weights_home: Path, sha256: str | None = None) -> Fetched | None:
    """The stored file when it is there and matches its expected sha256; None when absent.
    A stored file that does not match is an error (never used, never silently replaced)."""
    path = stored_path(entry, weights_home)
    if not path.is_file():
        return None
    expected, origin = expected_sha256(entry, weights_home, sha256)
    if expected is None:
        raise _no_hash_error(entry)
    actual = sha256_file(path)
    if actual != expected:
        raise HashMismatch(
            f"{path}: sha256 {actual} does not match {expected} ({origin}); delete it and run "
            f"`vpr weights fetch {entry.name}` (or `vpr weights import {entry.name} FILE`)"
        )
    return Fetched(entry.name, path, actual, "present")


def fetch(
    entry: Entry,
    weights_home: Path,
    *,
    offline: bool,
    sha256: str | None = None,
    trust_first_use: bool = False,
    urls: tuple[str, ...] | list[str] = (),
    progress: bool = True,
    timeout: float = 30.0,
) -> Fetched:
    """The entry's file, checked: already here, or downloaded from the first mirror that works."""
    weights_home = Path(weights_home)
    found = present(entry, weights_home, sha256) if stored_path(entry, weights_home).is_file() else None
    if found:
        return found
    path = stored_path(entry, weights_home)
    if offline:
        raise OfflineError(
            f"{entry.name}: {path} is missing and downloads are off (VPR_OFFLINE=1, or CI=true); {entry.import_hint()}"
        )
    expected, origin = expected_sha256(entry, weights_home, sha256)
    if expected is None and not trust_first_use:
        raise _no_hash_error(entry)
    weights_home.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    mirrors = [*urls, *entry.urls]
    log.info("fetching %s (%s, %s) into %s", entry.name, entry.file_name, entry.size_text(), weights_home)
    failures: list[str] = []
    for url in mirrors:
        try:
            got, start = _download(url, part, entry.size, progress, timeout, entry.file_name)
        except _MirrorFailed as e:
            log.warning("%s: mirror %s failed: %s", entry.name, url, e)
            failures.append(f"{url}: {e}")
            continue
        actual = sha256_file(part)
        if expected is not None and actual != expected:
            part.unlink()  # a complete file with the wrong bytes: nothing in it is worth resuming
            log.warning("%s: %s served a file whose sha256 %s is not %s", entry.name, url, actual, expected)
            failures.append(f"{url}: sha256 {actual} does not match {expected} ({origin})")
            continue
        os.replace(part, path)
        fsync_dir(path.parent)
        checked = origin if expected is not None else "pinned at first use (no published sum)"
        if expected is None:
            log.warning("%s: no published sha256; pinned the sum of this download: %s", entry.name, actual)
        update_record(entry, weights_home, file=entry.file_name, sha256=actual, checked_against=checked, source=url)
        log.info("%s: served by %s (%d bytes downloaded, %d resumed)", entry.name, url, got, start)
        return Fetched(entry.name, path, actual, url, downloaded=got, resumed_from=start)
    raise FetchError(f"{entry.name}: no mirror served a good file ({'; '.join(failures)}); {entry.import_hint()}")


def _download(url: str, part: Path, size: int | None, progress: bool, timeout: float, label: str) -> tuple[int, int]:
    """Append the rest of `url` to `part` (Range resume); returns (bytes got now, bytes kept)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return 0, have  # a complete part from an earlier run; the hash decides
    request = urllib.request.Request(url, headers={"User-Agent": "vpr-weights/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing past what we have: the part may be whole already
            return 0, have
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise _MirrorFailed(str(getattr(e, "reason", e))) from None
    with resp:
        start = 0
        if have and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise _MirrorFailed(f"asked for bytes {have}- and got {content_range or 'no Content-Range'}")
            start = have
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else size
        if size is not None and total is not None and total != size:
            raise _MirrorFailed(f"server announces {total} bytes; the catalogue says {size}")
        got = 0
        mode = "ab" if start else "wb"  # a server that ignored Range (200) sends the whole file again
        with (
            part.open(mode) as f,
            tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=label, disable=not progress, leave=False
            ) as bar,
        ):
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise _MirrorFailed(f"connection lost after {start + got} bytes ({e}); the part is kept") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
    final = part.stat().st_size
    if total is not None and final != total:
        if final > total:
            part.unlink()
        raise _MirrorFailed(f"truncated download: {final} of {total} bytes (the part is kept for a resume)")
    return got, start


def import_file(
    entry: Entry,
    src: Path,
    weights_home: Path,
    *,
    sha256: str | None = None,
    trust_first_use: bool = False,
) -> Fetched:
    """Copy a file brought by hand into `weights_home` once its sha256 is the entry's."""
    src = Path(src)
    if not src.is_file():
        raise FetchError(f"{src}: no such file")
    expected, origin = expected_sha256(entry, weights_home, sha256)
    if expected is None and not trust_first_use:
        raise _no_hash_error(entry)
    actual = sha256_file(src)
    if expected is not None and actual != expected:
        raise HashMismatch(
            f"{src}: sha256 {actual} is not {entry.name}'s {expected} ({origin}); it is not {entry.file_name} "
            f"(or it is damaged); get it from {entry.urls[0]}"
        )
    dest = stored_path(entry, weights_home)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not (dest.exists() and dest.resolve() == src.resolve()):
        tmp = dest.with_name(dest.name + ".import")
        shutil.copyfile(src, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        copied = sha256_file(tmp)
        if copied != actual:  # the source changed while it was copied
            tmp.unlink()
            raise FetchError(f"{src}: changed while it was copied; import it again")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    checked = origin if expected is not None else "pinned at first use (no published sum)"
    update_record(
        entry, weights_home, file=entry.file_name, sha256=actual, checked_against=checked, source=f"import:{src}"
    )
    log.info("%s: imported %s (sha256 %s, %s)", entry.name, src, actual, checked)
    return Fetched(entry.name, dest, actual, f"import:{src}")


def verify(entry: Entry, weights_home: Path) -> Fetched:
    """Re-hash the stored file against its expected sha256 (FetchError when absent or different)."""
    found = present(entry, Path(weights_home))
    if found is None:
        raise FetchError(f"{entry.name}: {stored_path(entry, weights_home)} is not here; fetch or import it first")
    return found
