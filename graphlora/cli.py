"""The ``graphlora`` command: ``demo`` (the main job), ``inspect`` (the sites table) and ``viz`` (pictures)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _targets(value: str | None):
    if value is None or value == "all-linear" or not value.replace(",", "").replace("_", "").isalnum():
        return value or "all-linear"
    return [t for t in value.split(",") if t]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.model, steps=args.steps, seed=args.seed, svg=args.svg or None)
    ok = result["identity_at_injection"] and result["disable_exact"] and result["code_unchanged"]
    return 0 if ok else 1


def _load_model(model_dir: str | None):
    if model_dir is None:
        from .demo import small_llama

        return small_llama()
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    except ValueError:
        return AutoModel.from_pretrained(model_dir, local_files_only=True).eval()


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import LoraConfig, inject

    gm = inject(_load_model(args.model), LoraConfig(r=args.r, target_modules=_targets(args.target)))
    print(gm.sites_table(adapted_only=not args.all))
    gm.print_trainable_parameters()
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import LoraConfig, inject
    from .viz import FORMATS, VizError, export_graph

    if Path(args.output).suffix.lower() not in FORMATS:  # fail before tracing
        print(f"graphlora viz: cannot write {args.output!r}: name the file with one of {', '.join(FORMATS)}.",
              file=sys.stderr)
        return 2
    gm = inject(_load_model(args.model), LoraConfig(r=args.r, target_modules=_targets(args.target)))
    try:
        path = export_graph(gm, args.output, view=args.view, depth=args.depth, within=args.within)
    except VizError as exc:
        print(f"graphlora viz: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the {args.view} view of {gm._get_name()} ({len([s for s in gm.sites if s.ranks])} adapted sites) "
          f"to {path}")
    return 0


def _model_args(parser: argparse.ArgumentParser) -> None:
    """The model and adapter options shared by ``inspect`` and ``viz``."""
    parser.add_argument("--model", metavar="DIR", help="a local transformers checkpoint (default: the demo's Llama)")
    parser.add_argument("--target", default="all-linear",
                        help="target_modules: 'all-linear', a comma list (q_proj,v_proj) or a regex")
    parser.add_argument("--r", type=int, default=8)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphlora", description="Adapters injected by rewriting the traced graph.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fine-tune, switch and disable adapters on a small model (offline)")
    demo.add_argument("--model", metavar="DIR", help="a local transformers checkpoint directory")
    demo.add_argument("--steps", type=int, default=120, help="training steps per adapter (default 120)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--svg", metavar="PATH", default="graphlora-demo-modules.svg",
                      help="where to draw the modules view (default ./graphlora-demo-modules.svg; '' skips it)")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="print the sites table of a model")
    _model_args(inspect)
    inspect.add_argument("--all", action="store_true", help="list every linear site, adapted or not")
    inspect.set_defaults(func=_cmd_inspect)

    viz = sub.add_parser("viz", help="draw where the adapters sit (.svg .html .graphml .json .dot .mmd)")
    _model_args(viz)
    viz.add_argument("--view", choices=("modules", "full", "diff"), default="modules",
                     help="modules: one node per block (default); full: every op; diff: traced vs rewritten")
    viz.add_argument("--depth", type=int, default=None,
                     help="modules view: path components per node (default: one node per repeated block)")
    viz.add_argument("--within", metavar="PATH", help="only this module and below (e.g. model.layers.0.self_attn)")
    viz.add_argument("-o", "--output", required=True, metavar="FILE", help="output file; the suffix picks the format")
    viz.set_defaults(func=_cmd_viz)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
