"""Trackers of streams and HTTP sessions: where each of them is, in the served index.

A websocket stream owns one `Track` for its life. An HTTP client that sends
frames one request at a time names a session (`X-VPR-Session: <id>`); its
`Track` lives in `Sessions`, a table bounded in number (`VPR_TRACK_MAX_SESSIONS`,
the least recently used session is forgotten first) and in time (a session
idle for `VPR_TRACK_SESSION_IDLE_S` is forgotten). Each tracker's belief is
bounded by `VPR_TRACK_SUPPORT` (place, velocity) states, so the table's memory is
bounded by their product (`Sessions.nbytes` sums it; under 8 KB per session at the
defaults: 64 states of 40 bytes, the velocity grid, a label per place), plus the
last frame's descriptor in float16 (64 KB for NetVLAD's 32,768 dimensions; so at
most 72 MB for the default 1,024 sessions).

A stream's frames are dated by their numbers (dropped ones widen the motion);
an HTTP session's requests count one step each (a client that sends every
frame it has gets the same behaviour as a stream that drops none).

A `Track` is bound to the index it tracks in: after a hot swap to another
index its place ids mean nothing, so it starts again. The motion model's
knowledge of the database (`DatabaseProfile`: positions or order, spacing) is
read once per index from a bounded sample of its metadata and shared; each
frame's candidates come with their places' hubness when the index recorded it
(`LoadedIndex.hubness`, index/hubness.py).

Everything here runs on the event loop (a tracker update is a few small numpy
operations), so no lock is needed.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vpr.index.store import Hit
from vpr.server.errors import BadRequest
from vpr.server.results import POSITION_KEYS
from vpr.server.serving import Serving
from vpr.settings import TrackSettings
from vpr.track.tracker import PROFILE_SAMPLE, DatabaseProfile, Fix, Tracker

SESSION_HEADER = "X-VPR-Session"
SESSION_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
PROFILES_KEPT = 4  # indexes whose profile is remembered (the served one, and a few across swaps)


class Profiles:
    """`DatabaseProfile` per index version, computed once from its first metadata rows."""

    def __init__(self) -> None:
        self._by_index: OrderedDict[str, DatabaseProfile] = OrderedDict()

    def of(self, serving: Serving) -> DatabaseProfile:
        key = serving.index_spec
        found = self._by_index.get(key)
        if found is None:
            index = serving.index
            rows = index.meta(range(min(index.count, PROFILE_SAMPLE)))
            ids = sorted(rows)
            found = DatabaseProfile.from_rows([rows[i] for i in ids], index.count, ids, index.step)
            self._by_index[key] = found
            while len(self._by_index) > PROFILES_KEPT:
                self._by_index.popitem(last=False)
        return found


class Track:
    """One stream's (or session's) tracker, bound to the index it tracks in."""

    def __init__(self, settings: TrackSettings, profiles: Profiles) -> None:
        self.settings, self.profiles = settings, profiles
        self.tracker: Tracker | None = None
        self.index_spec: str | None = None
        self.used = time.monotonic()

    @property
    def nbytes(self) -> int:
        return 256 + (self.tracker.nbytes if self.tracker else 0)

    def observe(
        self, serving: Serving, hits: Sequence[Hit], at: float | None = None, descriptor: np.ndarray | None = None
    ) -> dict[str, Any] | None:
        """Update with one frame's candidates (and its descriptor: consecutive
        frames' tell standing from moving); the `track` of its answer (None without hits)."""
        if self.tracker is None or self.index_spec != serving.index_spec:
            self.tracker = Tracker(self.settings, self.profiles.of(serving))
            self.index_spec = serving.index_spec
        ids = [h.id for h in hits]
        hub = serving.index.hubness.of(ids) if serving.index.hubness is not None else None
        fix = self.tracker.observe(
            ids, [h.score for h in hits], [h.meta for h in hits], at=at, hubness=hub, descriptor=descriptor
        )
        return track_json(fix, self.tracker.profile.mode) if fix is not None else None


def track_json(fix: Fix, mode: str) -> dict[str, Any]:
    """A `Fix` as the `track` object of an answer (see results.TrackState)."""
    m = fix.meta or {}
    pos = {k: m.get(k) for k in POSITION_KEYS}
    return {
        "id": fix.id,
        "label": m.get("label"),
        "path": m.get("path"),
        "position": pos if any(v is not None for v in pos.values()) else None,
        "confidence": round(fix.confidence, 4),
        "localized": fix.localized,
        "frames": fix.frames,
        "mode": mode,
    }


class Sessions:
    """The HTTP sessions' tracks, bounded in number and idle time."""

    def __init__(self, settings: TrackSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self.profiles = Profiles()
        self._tracks: OrderedDict[str, Track] = OrderedDict()  # least recently used first
        self.expired = self.evicted = 0

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tracks.values())

    def stream_track(self) -> Track:
        """A track for one websocket stream (owned by the stream, not kept here)."""
        return Track(self.settings, self.profiles)

    def get(self, session: str) -> Track:
        """The session's track, created when new (forgetting the least recently
        used one when the table is full); expired sessions are dropped first."""
        check_session(session)
        now = self.clock()
        self._expire(now)
        track = self._tracks.pop(session, None)
        if track is None:
            track = Track(self.settings, self.profiles)
            while len(self._tracks) >= self.settings.max_sessions:
                self._tracks.popitem(last=False)
                self.evicted += 1
        track.used = now
        self._tracks[session] = track
        return track

    def _expire(self, now: float) -> None:
        idle = self.settings.session_idle_s
        while self._tracks:
            name, oldest = next(iter(self._tracks.items()))
            if now - oldest.used <= idle:
                return
            del self._tracks[name]
            self.expired += 1


def check_session(session: str) -> str:
    if not SESSION_RE.match(session):
        raise BadRequest(
            f"bad {SESSION_HEADER} {session[:40]!r}: use 1 to 128 characters of letters, digits, '.', '_', '~', '-'",
            code="bad_session",
        )
    return session
