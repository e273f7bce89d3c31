"""Jobs for tests/test_distributed.py, run by every process of a group that mlx.launch started:

    mlx.launch -n 2 --backend ring -- python tests/parallel_runner.py JOBS.json OUT_DIR

Rank 0 runs each job of JOBS.json (model, preset, request) with the group's engine, as the CLI and the app do,
saving the frames as OUT_DIR/NAME.npy and how it ended as OUT_DIR/NAME.json; a job may stop its run with the cancel
token (`cancel_at`: [stage, step]) or by closing the engine's generator (`close_at`), as a page that goes away does.
The other processes serve rank 0's requests until it releases them.
"""

import json
import sys
from pathlib import Path

import numpy as np

from wan_engine import CancelToken, Cancelled, Engine, Follower, GenerationRequest, Result, WanError, join_group


def run_job(engine: Engine, job: dict, out_dir: Path) -> dict:
    request = GenerationRequest(**job["request"], keep_frames=True, output=str(out_dir / f"{job['name']}.mp4"))
    cancel, last = CancelToken(), None
    events = engine.generate(request, cancel)
    try:
        for event in events:
            if isinstance(event, Result):
                np.save(out_dir / f"{job['name']}.npy", event.frames)
                return {"parallel": event.parallel, "sidecar": json.loads(event.sidecar_path.read_text())}
            last = [event.stage, event.step]
            if last == job.get("cancel_at"):
                cancel.cancel()
            if last == job.get("close_at"):
                events.close()
                return {"closed_at": last}
    except Cancelled:
        return {"cancelled_after": last}
    except WanError as error:
        return {"error": str(error)}


def main(jobs_path: str, out_dir: str) -> None:
    jobs, out_dir = json.loads(Path(jobs_path).read_text()), Path(out_dir)
    group = join_group()
    if not group.is_owner:
        Follower(group).serve(jobs[0]["model"], jobs[0]["preset"], "float32")
        return
    engines = {}
    for job in jobs:
        key = (job["model"], job["preset"])
        if key not in engines:
            engines[key] = Engine(job["model"], dtype="float32", preset=job["preset"], output_dir=out_dir, group=group)
            if len(engines) == 1:
                group.wait_for_all()  # as the followers do once they have opened the first model
        outcome = run_job(engines[key], job, out_dir)
        (out_dir / f"{job['name']}.json").write_text(json.dumps(outcome))
    group.release_followers()


if __name__ == "__main__":
    main(*sys.argv[1:])
