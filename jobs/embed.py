"""`rdm embed`: embed a corpus (local or s3://) with CLIP on Ray Data into per-shard parquet files."""

from __future__ import annotations

import argparse
import logging

from cluster.lease import JOB_LOCK_WAIT_S
from jobs.common import EXIT_OK, exit_codes, setup_logging
from rdm.errors import InputError
from rdm.images import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm embed", description=__doc__)
    parser.add_argument("--corpus", required=True,
                        help="folder or s3:// prefix of parquet files, WebDataset tars or image files")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix")
    parser.add_argument("--clip", default="tiny",
                        help="CLIP: a shipped model name (its CLIP) or an open_clip architecture[:pretrained tag]")
    parser.add_argument("--clip-weights", help="CLIP weights file, a path or s3:// (offline use)")
    parser.add_argument("--shard-size", type=int, default=256, help="image files per shard (parquet: one per file)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward pass")
    parser.add_argument("--num-actors", type=int, default=1, help="CLIP actors in the pool")
    parser.add_argument("--actor-num-cpus", type=float, default=0.5)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help="larger images become error records, refused before they are decoded "
                             "(default %(default)s; a decode holds about 15 bytes a pixel)")
    parser.add_argument("--stall-timeout-s", type=float, default=600.0,
                        help="a CLIP actor that finishes no batch for this long (a hung GPU) ends its process; Ray "
                             "Data starts it again and embeds its shard again (0: never; default %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say which shards a run would embed (new, or whose files changed), which are current, "
                             "and whether the corpus moved, without Ray or writing anything")
    parser.add_argument("--wait-lock-s", type=float, default=JOB_LOCK_WAIT_S, metavar="S",
                        help="one run of a job at a time per --out (its OUT/LOCK, a lease its driver renews): wait up to "
                             "S seconds for another run to end, then fail naming it (default %(default)s: longer than "
                             "a lease, so a run started right after a driver died takes the dead one's lock over)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def describe_plan(plan) -> str:
    """`--dry-run`'s report of a `cluster.embedding.EmbedPlan`."""
    lines = ["dry run: nothing embedded or written",
             f"shards: {plan.shards} in the corpus; {plan.pending} to embed ({plan.new} new, {plan.changed} whose "
             f"files changed), {plan.current} current"]
    if plan.gone:
        lines.append(f"{plan.gone} outputs of shards no longer in the corpus (rdm index rebuild deletes them)")
    if plan.moved_from:
        lines.append(f"the corpus moved from {plan.moved_from}: a run rewrites the current shards' sources")
    return "\n".join(lines)


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from cluster.embedding import embed_corpus
    from cluster.runtime import connect

    if min(args.shard_size, args.batch_size, args.num_actors, args.max_image_pixels) < 1:
        raise InputError("--shard-size, --batch-size, --num-actors and --max-image-pixels must be >= 1")
    if args.stall_timeout_s < 0:
        raise InputError(f"--stall-timeout-s must be 0 (never) or more, got {args.stall_timeout_s:g}")
    if not 0 <= args.wait_lock_s <= 86_400:
        raise InputError(f"--wait-lock-s must be in 0..86400, got {args.wait_lock_s:g}")
    if args.dry_run:
        from cluster.embedding import plan_embedding

        print(describe_plan(plan_embedding(args.corpus, args.out, clip=args.clip, clip_weights=args.clip_weights,
                                           shard_size=args.shard_size, dtype=args.dtype)))
        return EXIT_OK
    connect()
    result = embed_corpus(args.corpus, args.out, clip=args.clip, clip_weights=args.clip_weights,
                          shard_size=args.shard_size, batch_size=args.batch_size, num_actors=args.num_actors,
                          actor_num_cpus=args.actor_num_cpus, dtype=args.dtype,
                          max_image_pixels=args.max_image_pixels, stall_timeout_s=args.stall_timeout_s or None,
                          wait_lock_s=args.wait_lock_s)
    print(f"embedded {result.embedded} images ({result.reused} of them taken from earlier outputs: the same image bytes; "
          f"{result.errors} undecodable or too large) in "
          f"{result.shards_total - result.shards_skipped} shards ({result.shards_changed} of them again: their files "
          f"changed); {result.shards_skipped} shards were already done"
          + (f" ({result.relocated} of them moved with the corpus: their sources now name it)" if result.relocated else ""))
    return EXIT_OK
