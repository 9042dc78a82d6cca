"""The `rdm` command: `rdm <subcommand> [args]`; each subcommand is a job module's `main(argv)`."""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "demo": ("jobs.demo", "build the toy-art style databases and generate a gallery (make run)"),
    "convert": ("jobs.convert", "convert a CompVis RDM checkpoint to safetensors"),
    "sample": ("jobs.sample", "generate images in one process"),
    "generate": ("jobs.generate", "bulk generation on Ray from a prompts file"),
    "status": ("jobs.status", "a bulk generation or embedding job's progress, read from its output"),
    "embed": ("jobs.embed", "embed a corpus with CLIP on Ray Data"),
    "index": ("jobs.index", "build, rebuild or query a sharded FAISS index; list, roll back or prune its versions"),
    "serve": ("jobs.serve", "run the online serving app (Ray Serve)"),
    "keys": ("jobs.keys", "add, revoke or list the serving app's named client keys"),
    "make-corpus": ("jobs.make_corpus", "write the procedural toy-art corpus as parquet shards"),
    "train-tiny": ("jobs.train_tiny", "train the tiny CLIP, autoencoder and RDM from a seed"),
    "eval-style": ("jobs.eval_style", "style control: retrieval database vs prompt (the RDM paper's test)"),
}


def usage() -> str:
    lines = ["usage: rdm <subcommand> [args]  (rdm <subcommand> --help for details)", "", "subcommands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n{usage()}", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        # before anything imports Ray, which reads it once: a local Ray started by this command binds loopback
        from cluster.runtime import loopback_env

        loopback_env()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    try:
        return module.main(rest)
    except SystemExit as exit_:  # argparse exits 2 on bad arguments
        return int(exit_.code or 0)


if __name__ == "__main__":
    sys.exit(main())
