"""The sample audit log: JSON lines per rank, appended; a resume drops the steps it will re-run."""

from __future__ import annotations

import json
from pathlib import Path

from pixellm.train.sample_log import SampleLog, sample_log_path


def _steps(path: Path) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["rank"] for r in rows} <= {1}
    return [(r["step"], r["sample_id"]) for r in rows]


def test_resume_truncates_to_the_checkpoint_and_keeps_appending(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    log = SampleLog(run_dir, rank=1, resume_step=0)
    for step in (1, 2, 3):
        log.add(step, [f"a{step}", f"b{step}"])
    log.flush()
    path = Path(sample_log_path(run_dir, 1))
    assert path == tmp_path / "run" / "samples" / "rank-1.jsonl"
    assert [s for s, _ in _steps(path)] == [1, 1, 2, 2, 3, 3]

    resumed = SampleLog(run_dir, rank=1, resume_step=2)  # step 3 is rolled back and re-run
    assert [s for s, _ in _steps(path)] == [1, 1, 2, 2]
    resumed.add(3, ["c3"])
    resumed.add(4, ["c4"])
    resumed.flush()
    resumed.flush()  # nothing pending: no duplicate lines
    assert _steps(path) == [(1, "a1"), (1, "b1"), (2, "a2"), (2, "b2"), (3, "c3"), (4, "c4")]
