"""Leases in a shared folder (model/lease.py): one holder per key among any number
of contenders, renewal, hand-over on release, on expiry, and at once when the holder
is a dead process of this machine; a holder whose lease was taken learns it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time

from vpr.model.lease import Lease, LeaseRecord, Leases, Owner


def leases(tmp_path, name: str, ttl: float = 30.0) -> Leases:
    return Leases(tmp_path / "leases", Owner.this_process(name), ttl)


def test_one_holder_until_release(tmp_path):
    a, b = leases(tmp_path, "a"), leases(tmp_path, "b")
    got = a.acquire("rebuild.places", {"job": "j1"})
    assert isinstance(got, Lease) and got.record.generation == 1
    held = b.acquire("rebuild.places", {"job": "j2"})
    assert isinstance(held, LeaseRecord) and held.owner.replica == "a" and held.data == {"job": "j1"}
    assert b.holder("rebuild.places").data == {"job": "j1"}  # type: ignore[union-attr]
    assert isinstance(b.acquire("rebuild.other"), Lease), "keys are independent"
    a.release(got)
    assert b.holder("rebuild.places") is None
    again = b.acquire("rebuild.places", {"job": "j2"})
    assert isinstance(again, Lease) and again.record.owner.replica == "b"


def test_contenders_in_many_threads_get_one_winner(tmp_path):
    contenders = [leases(tmp_path, f"r{i}") for i in range(8)]
    start = threading.Barrier(len(contenders))
    results: list[Lease | LeaseRecord | None] = [None] * len(contenders)

    def contend(i: int) -> None:
        start.wait()
        results[i] = contenders[i].acquire("activate", {"who": i})

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1
    assert all(isinstance(r, LeaseRecord) and r.data == winners[0].record.data for r in results if r is not winners[0])


def test_an_expired_lease_is_taken_and_its_holder_learns_it(tmp_path):
    a, b = leases(tmp_path, "a", ttl=1.0), leases(tmp_path, "b")
    got = a.acquire("rebuild.places")
    assert isinstance(got, Lease) and a.renew(got)
    # the holder stalls: its record expires (written as a stalled holder would have left it)
    stale = dataclasses.replace(got.record, expires=time.time() - 1)
    got.path.write_text(json.dumps(stale.as_dict()))
    taken = b.acquire("rebuild.places")
    assert isinstance(taken, Lease) and taken.record.generation == 2
    assert not got.path.exists(), "older generations are removed by the new holder"
    assert not a.renew(got) and got.lost.is_set()
    a.release(got)  # must not remove b's lease
    assert b.holder("rebuild.places").owner.replica == "b"  # type: ignore[union-attr]


def test_a_dead_holder_on_this_machine_is_replaced_at_once(tmp_path):
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from vpr.model.lease import Leases, Owner; "
            "print(Leases(Path(sys.argv[1]), Owner.this_process('gone'), 3600).acquire('rebuild.places').path)",
            str(tmp_path / "leases"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    record = Leases._read(tmp_path / "leases" / "rebuild.places" / "1.json")
    assert record is not None and record.owner.replica == "gone" and record.expires > time.time() + 3000
    assert record.owner.alive() is False  # the process has exited
    b = leases(tmp_path, "b")
    assert b.holder("rebuild.places") is None
    assert isinstance(b.acquire("rebuild.places"), Lease)


def test_a_holder_on_another_machine_counts_until_its_lease_expires(tmp_path):
    b = leases(tmp_path, "b")
    far = dataclasses.replace(Owner.this_process("far"), host="another-host", pid=1)
    assert far.alive() is None
    folder = tmp_path / "leases" / "rebuild.places"
    folder.mkdir(parents=True)
    record = LeaseRecord("rebuild.places", 1, far, time.time() + 3600, {"job": "x"})
    (folder / "1.json").write_text(json.dumps(record.as_dict()))
    assert b.holder("rebuild.places") is not None and not isinstance(b.acquire("rebuild.places"), Lease)
    record.expires = time.time() - 1
    (folder / "1.json").write_text(json.dumps(record.as_dict()))
    assert isinstance(b.acquire("rebuild.places"), Lease)


def test_the_renewing_thread_keeps_a_lease_and_stop_releases_it(tmp_path):
    a, b = leases(tmp_path, "a", ttl=1.0), leases(tmp_path, "b")
    got = a.acquire("activate")
    assert isinstance(got, Lease)
    first = got.record.expires
    a.start()
    try:
        deadline = time.monotonic() + 10
        while Leases._read(got.path).expires == first:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never renewed"
            time.sleep(0.05)
        assert b.holder("activate") is not None
    finally:
        a.stop()
    assert b.holder("activate") is None and isinstance(b.acquire("activate"), Lease)
