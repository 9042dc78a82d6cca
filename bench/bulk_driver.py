"""What a bulk job's driver holds in memory: the images asked for and the manifest records of those done.

A run's driver reads the prompts, expands them into one item per image (its key), reads every manifest part to
tell which are done (`rdm generate --dry-run` does the same: `cluster.bulk.plan`), and at its end merges the
parts into `manifest.parquet`, `errors.parquet` and `index.html` and compacts them. This measures a dry run
(`plan`) and a run's driver without Ray (`run`: the start, then the end) on a job of `--images` images
(`--per-row` per prompt row, 90% done: one compacted part and `--parts` batch parts), each in a fresh process:
its peak resident memory above what the process held after its imports (Linux VmHWM, reset then) and its
seconds. `--baseline-rev REV` runs the same steps on that commit's `cluster/` (a git
worktree) in the same run: the ratio is the change's.

    python bench/bulk_driver.py [--images 200000] [--per-row 4] [--baseline-rev f4b228c]
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_line, markdown_table

REPO = Path(__file__).resolve().parent.parent


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def child(step: str, folder: str) -> dict:
    """In a fresh process: `plan` (a dry run: what a run reads before it starts) or `run` (that, then the end
    of a run: what a driver does besides waiting for its samplers)."""
    import cluster.bulk as bulk

    settings = bulk.BulkSettings(model="tiny")
    prompts, out = f"{folder}/prompts.jsonl", f"{folder}/out"
    if step == "plan":
        base, started = _reset_peak(), time.perf_counter()
        plan = bulk.plan(prompts, out, settings)
        seconds, done = time.perf_counter() - started, plan.done
    else:  # a run's driver, without Ray: what it reads before the samplers start, and its end after them
        base, started = _reset_peak(), time.perf_counter()
        kwargs = {}  # a run's start keeps the compacted part it reads for its end (since `_Run.scratch`)
        if "scratch" in inspect.signature(bulk._Run.prepare).parameters:
            kwargs["scratch"] = tempfile.mkdtemp(prefix="rdm-run-", dir=folder)
        job = bulk._Run.prepare(prompts, out, settings, record=False, **kwargs)
        if hasattr(bulk, "finish_run"):
            done = bulk.finish_run(job, started).images
        else:  # the end of a run as the commits before finish_run did it (their `_generate`, lines as they were)
            done_parts, failed_parts, read = bulk._read_parts_listed(job.store)
            wanted = {i["key"] for i in job.items}
            records = [r for k, r in sorted(done_parts.items()) if k in wanted]
            failed = wanted - set(done_parts)
            errors = [{"row": p["row"], "error": p["error"]} for k, p in failed_parts.items() if k in failed]
            bulk._write_outputs(job.store, records, job.row_errors + errors)
            bulk.compact_parts(job.store, done_parts, failed_parts, read)
            done = len(records)
        seconds = time.perf_counter() - started
    return {"peak_bytes": _status("VmHWM") - base, "seconds": seconds, "done": done}


def make_job(folder: Path, images: int, per_row: int, parts: int) -> int:
    """prompts.jsonl and out/_parts: 90% of the images done, in one compacted part and `parts` batch parts.
    Returns the compacted part's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bulk_parts import record

    import cluster.bulk as bulk
    from cluster.prompts import read_prompts
    from cluster.storage import open_store

    rows = images // per_row
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"a woodblock print of a harbour at dusk, number {i}",
                                "num_images": per_row}) + "\n")
    expanded = bulk.expand(read_prompts(str(folder / "prompts.jsonl"))[0], bulk.BulkSettings(model="tiny"),
                           bulk.content_hash("tiny"))
    items = expanded.to_pylist() if isinstance(expanded, pa.Table) else expanded
    done = [{**record(i), "row": item["row"], "seed": item["seed"], "key": item["key"], "uri": item["key"]}
            for i, item in enumerate(items[: images * 9 // 10])]
    store, batch = open_store(str(folder / "out")), 32
    split = len(done) - parts * batch
    compacted = io.BytesIO()  # row groups as this tree's compaction writes them (older code read any the same)
    pq.write_table(pa.Table.from_pylist(done[:split]), compacted, row_group_size=getattr(bulk, "PART_ROW_GROUP", None))
    store.write_bytes(f"{bulk.PARTS}/{bulk.COMPACTED}0.parquet", compacted.getvalue())
    for p, start in enumerate(range(split, len(done), batch)):
        store.write_bytes(f"{bulk.PARTS}/{p:08x}.parquet", bulk._parquet(pa.Table.from_pylist(done[start:start + batch])))
    return compacted.getbuffer().nbytes


def run_child(step: str, job: Path, code: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        shutil.copytree(job, scratch, dirs_exist_ok=True)  # a finish rewrites the output: each step on its own copy
        env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO / 'bench'}"}
        found = subprocess.run([sys.executable, __file__, "--child", step, scratch], env=env, cwd=code,
                               capture_output=True, text=True, check=True)
        return json.loads(found.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--per-row", type=int, default=4)
    parser.add_argument("--parts", type=int, default=200)
    parser.add_argument("--baseline-rev", help="a commit whose cluster/ the same steps run on, for the ratio")
    parser.add_argument("--child", nargs=2, metavar=("STEP", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    print(f"{args.images} images ({args.per_row} per prompt row), 90% done ({args.parts} batch parts and one "
          f"compacted part); {cpu_line()}\n")
    with tempfile.TemporaryDirectory() as folder:
        job = Path(folder) / "job"
        job.mkdir()
        compacted_bytes = make_job(job, args.images, args.per_row, args.parts)
        print(f"the compacted part: {compacted_bytes / 2**20:.1f} MiB\n")
        codes = {"this tree": REPO}
        if args.baseline_rev:
            worktree = Path(folder) / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree),
                            args.baseline_rev], check=True)
            codes = {args.baseline_rev: worktree, **codes}
        try:
            found = {(name, step): run_child(step, job, code) for name, code in codes.items()
                     for step in ("plan", "run")}
        finally:
            if args.baseline_rev:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)
    rows = []
    for (name, step), m in found.items():
        base = found.get((args.baseline_rev, step)) if args.baseline_rev else None
        ratio = f"{base['peak_bytes'] / m['peak_bytes']:.1f}x" if base else ""
        rows.append([name, step, m["done"], f"{m['peak_bytes'] / 2**20:.0f}", f"{m['peak_bytes'] / args.images:.0f}",
                     ratio, f"{m['seconds']:.2f}"])
    print(markdown_table(["code", "step", "images done", "peak MiB", "bytes per image", "less memory", "seconds"],
                         rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
