"""Which negative context steers the tiny model's images away from a style at the least cost in content.

Classifier-free guidance steers from the unconditional context towards the conditional one, [text, n_1..n_k].
A negative prompt replaces the unconditional context (all zeros in the reference). Three ways to build it from
the negative text's embedding e (`rdm.conditioning.negative_context` ships the first):

- copies: e in each of the k + 1 tokens (attention over equal keys: a context of the negative text alone);
- text slot: e in the text's token, zeros (null) in the neighbours' (the null context with its text replaced);
- neighbours kept: e in the text's token, the row's own neighbours in theirs (only the text differs).

Each is measured as `rdm eval-style` measures steering away (prompt "a c", the all-styles database; negative
prompt the style's name, or "a c in the style of s"): the fraction of samples labelled with the style steered
away from (lower is better; no negative prompt gives ~1/8) and content accuracy. The databases are the
library's exact in-process retrievers over the evaluation corpus (the cluster-built ones return the same
neighbours: tests/integration/test_eval_style.py), so this runs without Ray: ~1 minute on 2 cores.

    python bench/negative_context.py [--seed 2026]
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F
from common import cpu_line, markdown_table

import rdm.pipeline
from rdm.conditioning import negative_context
from rdm.evaluation import style_control as sc
from rdm.factory import load_clip_for, load_model
from rdm.toyart import STYLES


def text_slot(context: torch.Tensor, negatives) -> torch.Tensor | None:
    built = negative_context(context, negatives)
    if built is not None:
        for row, negative in enumerate(negatives):
            if negative is not None:
                built[row, 1:] = 0
    return built


def neighbours_kept(context: torch.Tensor, negatives) -> torch.Tensor | None:
    built = negative_context(context, negatives)
    if built is not None:
        for row, negative in enumerate(negatives):
            if negative is not None:
                built[row] = context[row]
                built[row, 0] = F.normalize(torch.as_tensor(negative, dtype=context.dtype), dim=-1)
    return built


VARIANTS = {"copies (shipped)": negative_context, "text slot": text_slot, "neighbours kept": neighbours_kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2026, help="the evaluation corpus and sampling seed")
    args = parser.parse_args(argv)
    print(f"seed {args.seed}; {cpu_line()}\n")
    settings = sc.StyleEvalSettings()
    model = load_model("tiny")
    clip = load_clip_for(model)
    databases = sc.exact_databases(clip, sc.database_split(args.seed, settings))
    generator = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # as run_style_control trains them
        style_model, content_model, _ = sc.train_label_classifiers(args.seed, settings, generator)

    def measure(method: str) -> list[str]:
        """[rate of the style steered away from, content accuracy], as eval-style's `summarize` scores them."""
        samples = torch.stack([sc.generate_style_row(model, clip, databases, method, style, args.seed, settings)
                               for style in range(len(STYLES))])
        scores = sc.summarize({method: sc.label_samples(samples, style_model, content_model)})
        return [f"{scores[method]:.3f}", f"{scores[f'content_{method}']:.3f}"]

    rows = [["none", "no negative prompt", *measure("all_styles")]]
    for name, build in VARIANTS.items():
        with mock.patch.object(rdm.pipeline, "negative_context", build):
            for method, negative in (("away_name", '"s"'), ("away_prompt", '"a c in the style of s"')):
                rows.append([name, negative, *measure(method)])
    print(markdown_table(["negative context", "negative prompt", "rate of the style steered away from",
                          "content accuracy"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
