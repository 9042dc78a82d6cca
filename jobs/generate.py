"""`rdm generate`: bulk generation on Ray from a prompts file (txt, csv, jsonl, parquet; local or s3://).

Resumable: a re-run generates only the images that are missing from OUT.
"""

from __future__ import annotations

import argparse
import logging

from cluster.lease import JOB_LOCK_WAIT_S
from jobs.common import EXIT_OK, add_inference_args, exit_codes, parse_pairs, setup_logging
from rdm.sampling import SAMPLERS

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm generate", description=__doc__)
    parser.add_argument("--prompts", required=True, help="prompts file: rows with prompt [database num_images seed image]")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--model", default="tiny", help="shipped model name or .safetensors checkpoint: a path, or "
                                                         "s3:// (each node downloads it once into $RDM_CACHE_DIR)")
    parser.add_argument("--clip-weights", help="CLIP weights file, a path or s3://")
    parser.add_argument("--index", help="index root holding the databases rows name (folder or s3://)")
    parser.add_argument("--num-neighbors", type=int, default=4)
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpmpp_2m")
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="base seed for rows without one: seed + 1000 * row + j")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-format", choices=("png", "webdataset"), default="png",
                        help="png: one object per image; webdataset: one tar per batch under OUT/shards/ "
                             "(<sample>.png/.json/.txt), as training pipelines and rdm embed read them")
    parser.add_argument("--image-format", choices=("png", "jpeg", "webp"), default="png",
                        help="how each image is encoded (default png, lossless; jpeg and webp take a fraction of "
                             "the bytes, jpeg of the encoding time too); a job keeps the one it started with")
    parser.add_argument("--image-quality", type=int, metavar="Q",
                        help="jpeg or webp quality, 1..100 (default 90)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's image size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's image size)")
    parser.add_argument("--num-samplers", type=int, default=1, help="sampler actors (one GPU each when present)")
    parser.add_argument("--sampler-num-cpus", type=float, default=0.5)
    parser.add_argument("--query-encoders", type=int, metavar="N",
                        help="most CLIP query-encoder actors at once (0.25 CPU each; Ray Data starts more as their "
                             "queue grows; default: one per sampler): a CPU embeds about 7 RDM-768 prompts a second")
    parser.add_argument("--retriever-options", default='{"num_cpus": 0.05}', metavar="JSON",
                        help="the sharded retriever's actors, as in a Serve config's retriever_options "
                             "(cluster.retriever.RetrieverOptions; default %(default)s)")
    parser.add_argument("--index-version", action="append", default=[], metavar="DATABASE=VERSION",
                        help="retrieve from this version of a database (or =current: the published one) instead "
                             "of the one the job started with (recorded in OUT/job.json; repeatable)")
    parser.add_argument("--stall-timeout-s", type=float, default=600.0,
                        help="a sampler whose accelerator has not finished a sampling step for this long (a hung "
                             "GPU) ends its process; Ray Data starts it again and its unrecorded batches run again "
                             "(0: never; compiled, the first step of a batch shape, which compiles it, gets 30 minutes; "
                             "default %(default)s)")
    parser.add_argument("--allow-clip-mismatch", action="store_true",
                        help="retrieve from databases whose manifests name another CLIP encoder than the model's "
                             "(refused by default, before anything runs: their neighbours are not comparable with "
                             "the model's queries); for the same weights under two names, e.g. a pretrained tag "
                             "and its downloaded file")
    add_inference_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="say what a run would do -- prompt rows usable and failed, images asked for, done and to "
                             "generate, the index versions it would use, the time at the job's last rate -- without "
                             "Ray and without writing anything")
    parser.add_argument("--wait-lock-s", type=float, default=JOB_LOCK_WAIT_S, metavar="S",
                        help="one run of a job at a time per --out (its OUT/LOCK, a lease its driver renews): wait up to "
                             "S seconds for another run to end, then fail naming it (default %(default)s: longer than "
                             "a lease, so a run started right after a driver died takes the dead one's lock over)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_index_versions(items: list[str]) -> dict[str, str]:
    """["ukiyo-e=v2026...", "neon=current"] -> {database: version}."""
    from cluster.index.manifest import check_database_name

    versions = parse_pairs(items, "--index-version", "DATABASE", "VERSION", value_required=True)
    for database in versions:
        check_database_name(database)
    return versions


def describe_plan(job, settings) -> str:
    """`--dry-run`'s report of a `cluster.bulk.JobPlan`."""
    lines = ["dry run: nothing generated or written",
             f"prompt rows: {job.rows} usable, {len(job.row_errors)} failed"
             + "".join(f"\n  row {e['row']}: {e['error']}" for e in job.row_errors[:10])
             + (f"\n  ... and {len(job.row_errors) - 10} more" if len(job.row_errors) > 10 else ""),
             f"images: {job.images} asked for, {job.done} already done, {job.pending} to generate "
             f"({job.size[0]} x {job.size[1]} {settings.encoding().name}, {settings.sampler} {settings.num_steps} steps)"]
    if job.versions:
        lines.append("databases: " + ", ".join(f"{db} version {v}" for db, v in sorted(job.versions.items())))
    if job.unknown_databases:
        lines.append(f"not in the index (their rows will fail): {', '.join(job.unknown_databases)}")
    if job.last_images_per_s:
        minutes = job.pending / job.last_images_per_s / 60
        lines.append(f"at the job's last rate ({job.last_images_per_s:g} images/s): about {minutes:.0f} min "
                     "(start-up and compilation not included)")
    return "\n".join(lines)


@exit_codes
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stall_timeout_s < 0:
        parser.error(f"--stall-timeout-s must be 0 (never) or more, got {args.stall_timeout_s:g}")
    if not 0 <= args.wait_lock_s <= 86_400:
        parser.error(f"--wait-lock-s must be in 0..86400, got {args.wait_lock_s:g}")
    setup_logging(args.verbose)
    from tqdm import tqdm

    from cluster.bulk import BulkSettings, chosen_size, generate, query_encoders
    from cluster.retriever import RetrieverOptions
    from cluster.runtime import connect
    from rdm.pipeline import SamplerParams
    from rdm.retrieval import check_num_neighbors

    SamplerParams(args.sampler, args.num_steps, args.guidance_scale, args.eta)  # validate before starting Ray
    check_num_neighbors(args.num_neighbors)
    retriever_options = RetrieverOptions.from_json(args.retriever_options, where="--retriever-options")
    index_versions = parse_index_versions(args.index_version)
    if args.compile_cache:
        from cluster.storage import open_store

        open_store(args.compile_cache)  # a malformed URI fails here, not in every sampler actor
    settings = BulkSettings(model=args.model, clip_weights=args.clip_weights, index_uri=args.index,
                            num_neighbors=args.num_neighbors, sampler=args.sampler, num_steps=args.num_steps,
                            guidance_scale=args.guidance_scale, eta=args.eta, base_seed=args.seed,
                            batch_size=args.batch_size, num_samplers=args.num_samplers,
                            query_encoders=args.query_encoders,
                            sampler_num_cpus=args.sampler_num_cpus, precision=args.precision,
                            channels_last=args.channels_last, compile=args.compile,
                            kernel_tuning=args.kernel_tuning, attention=args.attention,
                            shared_guidance=args.shared_guidance, dynamic_batch=args.dynamic_batch,
                            compile_cache=args.compile_cache, retriever_options=retriever_options.model_dump(),
                            index_versions=index_versions, height=args.height, width=args.width,
                            output_format=args.output_format, stall_timeout_s=args.stall_timeout_s or None,
                            allow_clip_mismatch=args.allow_clip_mismatch, image_format=args.image_format,
                            image_quality=args.image_quality)
    settings.encoding()  # a quality png does not take, or out of 1..100: exit 2 before Ray starts
    query_encoders(settings)
    chosen_size(settings)  # a size the model cannot sample fails here, not in every sampler actor
    if args.dry_run:
        from cluster.bulk import plan

        print(describe_plan(plan(args.prompts, args.out, settings), settings))
        return EXIT_OK
    connect()
    with tqdm(desc="images", unit="img") as bar:
        result = generate(args.prompts, args.out, settings, progress=bar, wait_lock_s=args.wait_lock_s)
    print(f"{result.images} images in {args.out}/manifest.parquet ({result.generated} generated now in "
          f"{result.seconds:.0f} s, {result.generated / result.seconds:.2f} images/s; {result.skipped} already there); "
          f"{result.errors} rows or images failed (see errors.parquet); runs recorded in job.json")
    return EXIT_OK
