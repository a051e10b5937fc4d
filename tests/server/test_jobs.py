"""Job files: what the API reports about a job is already on disk."""

from __future__ import annotations

import json
from typing import Any

from vpr.server.jobs import JobManager


def test_an_update_is_written_before_it_is_reported(tmp_path):
    jobs = JobManager(tmp_path, runtime=None)  # type: ignore[arg-type]  # updates need no runtime
    job: dict[str, Any] = {"id": "a" * 32, "state": "running", "progress": {"done": 0, "total": 4}}
    jobs._jobs[job["id"]] = job
    seen_while_writing: list[dict[str, Any] | None] = []
    write = jobs._write

    def observed(snapshot: dict) -> None:
        seen_while_writing.append(jobs.get(job["id"]))  # what a poller sees mid-write
        write(snapshot)

    jobs._write = observed  # type: ignore[method-assign]
    jobs._update(job, progress={"done": 4, "total": 4})

    assert seen_while_writing[0] is not None and seen_while_writing[0]["progress"]["done"] == 0
    assert jobs.get(job["id"])["progress"]["done"] == 4  # type: ignore[index]
    on_disk = json.loads((tmp_path / f"{job['id']}.json").read_text())
    assert on_disk["progress"] == {"done": 4, "total": 4} and on_disk["updated"] == job["updated"]
