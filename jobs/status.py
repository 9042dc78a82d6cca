"""`rdm status OUT`: how a bulk generation or embedding job is doing, read from its output (local or s3://).

Its run in progress (or its last run): images (shards, for `rdm embed`) asked for, done before, done and
failed in this run, the rate and the time left at that rate, actors that stalled on their accelerator, and
whether its driver still reports (a driver that has not written its progress for three intervals has
probably died: run the job again, it resumes); then its runs so far (`job.json`). Nothing on the cluster is
asked: this works from any machine that can read OUT.
"""

from __future__ import annotations

import argparse
import json

from jobs.common import EXIT_OK, exit_codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm status", description=__doc__)
    parser.add_argument("out", help="the job's output folder or s3:// prefix (rdm generate --out, rdm embed --out)")
    parser.add_argument("--json", action="store_true", help="print the progress record (and the runs) as JSON")
    return parser


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def describe(progress: dict, runs: list[dict], stalls: int) -> str:
    """The human summary `rdm status` prints."""
    unit, state = progress.get("unit", "images"), progress["state"]
    requested, before, done, failed = (progress[k] for k in ("requested", "done_before", "done", "failed"))
    if state == "running" and progress["stale"]:
        headline = (f"running, but its driver ({progress['driver']}) has not reported for "
                    f"{_duration(progress['updated_s_ago'])}: it has probably died; run the job again to resume")
    elif state == "running":
        headline = f"running (driver {progress['driver']}, last report {_duration(progress['updated_s_ago'])} ago)"
    elif state == "failed":
        headline = f"failed: {progress.get('error', 'unknown error')} (run the job again to resume)"
    else:
        headline = "finished"
    lines = [f"run started {progress['started']}: {headline}",
             f"  {unit}: {before + done} of {requested} done ({before} before this run, {done} in it), "
             f"{failed} failed, {progress['remaining']} to go"]
    if progress.get("per_s"):
        eta = f"; about {_duration(progress['eta_s'])} to go at that rate" if state == "running" else ""
        lines.append(f"  rate: {progress['per_s']:.3g} {unit}/s in this run{eta}")
    if stalls:
        lines.append(f"  {stalls} actor(s) stalled on their accelerator in this run (see _stalls/)")
    if runs:
        last = runs[-1]
        lines.append(f"runs ended: {len(runs)}; the last started {last['started']}: {last['generated']} generated "
                     f"in {_duration(last['seconds'])} ({last['images_per_s']} {unit}/s), {last['errors']} failed")
    return "\n".join(lines)


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.bulk import JOB_STATE
    from cluster.progress import read_progress
    from cluster.storage import open_store
    from cluster.watchdog import STALLS_DIR

    store = open_store(args.out)
    progress = read_progress(store)
    runs = json.loads(store.read_bytes(JOB_STATE)).get("runs", []) if store.exists(JOB_STATE) else []
    stalls = len(store.list(STALLS_DIR + "/"))
    if args.json:
        print(json.dumps({**progress, "stalls": stalls, "runs": runs}, indent=1))
    else:
        print(describe(progress, runs, stalls))
    return EXIT_OK
