"""``hf-galore``: command-line tools. ``hf-galore estimate`` answers "will it fit?" before you train.

Examples::

    hf-galore estimate llama_7b --method galore_8bit_layerwise --rank 1024 --activation-checkpointing
    hf-galore estimate ./my_model_dir --method lora --rank 16 --dtype fp32 --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import HfGaloreError
from .memory import DTYPES, METHODS, estimate_memory, preset_names, resolve_model
from .memory.inputs import check_patterns_in_time
from .optim.accumulation import ACCUMULATE_MODES

PROG = "hf-galore"

#: Longest error line the command prints.
MAX_ERROR_CHARS = 1000


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block): ``hf-galore estimate: error: ...``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{name}` must be a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"`{name}` must be a positive integer (>= 1), got {value}")
        return value

    return parse


def _choice(name: str, choices: Sequence[str]):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {name} {text!r}; valid: {', '.join(choices)}")
        return text

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Tools for hf_galore (GaLore-family optimizers for the Hugging Face stack).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="subcommands")
    methods = list(METHODS)
    est = sub.add_parser(
        "estimate",
        help="bytes of weights, gradients, optimizer states and activations for one training step",
        description=(
            "Estimate training memory for MODEL with a GaLore-family method. The weight and optimizer-state "
            "figures are exactly what hf_galore's optimizers hold; activations are a documented estimate "
            "(docs/memory.md)."
        ),
        epilog="methods: " + ", ".join(f"{m} ({METHODS[m].summary})" for m in methods),
    )
    est.add_argument(
        "model",
        metavar="MODEL",
        help=f"a preset ({', '.join(preset_names())}), a config.json / model directory, or a hub id",
    )
    est.add_argument("--method", default="galore", type=_choice("method", methods), help="default: galore")
    est.add_argument("--rank", default=128, type=_positive_int("rank"), help="projection / adapter rank (default 128)")
    est.add_argument("--dtype", default="bf16", type=_choice("dtype", list(DTYPES)), help="default: bf16")
    est.add_argument("--batch-size", default=1, type=_positive_int("batch-size"), help="micro-batch (default 1)")
    est.add_argument("--seq-len", default=256, type=_positive_int("seq-len"), help="sequence length (default 256)")
    est.add_argument(
        "--grad-accum",
        default=1,
        type=_positive_int("grad-accum"),
        help="micro-batches per optimizer step (default 1); layer-wise methods accumulate in the subspace",
    )
    est.add_argument(
        "--accumulate",
        default=None,
        type=_choice("accumulate", list(ACCUMULATE_MODES)),
        help="where gradients accumulate: auto (default: in the subspace for layer-wise methods), lowrank or full",
    )
    est.add_argument(
        "--target-modules",
        default="all-linear",
        help="comma-separated module-name suffixes, a regex, or all-linear (default)",
    )
    est.add_argument("--proj-type", default="std", help="GaLore proj_type (default std)")
    est.add_argument("--activation-checkpointing", action="store_true", help="keep only each layer's input")
    est.add_argument("--json", action="store_true", help="print JSON (bytes) instead of a table")
    est.set_defaults(handler=_run_estimate)
    return parser


def _target_modules(text: str):
    if text == "all-linear":
        return text
    if "," in text or text.replace("_", "").isalnum():
        return [part.strip() for part in text.split(",") if part.strip()]
    return text  # a regex


def _run_estimate(args: argparse.Namespace) -> int:
    target_modules = _target_modules(args.target_modules)
    model = args.model
    if METHODS[args.method].lowrank or METHODS[args.method].lora:
        model, _ = resolve_model(args.model)  # built once, here; estimate_memory takes the module
        patterns = [target_modules] if isinstance(target_modules, str) else target_modules
        names = [name for name, _ in model.named_modules()]
        check_patterns_in_time([p for p in patterns if p != "all-linear"], names)
    est = estimate_memory(
        model,
        args.method,
        rank=args.rank,
        target_modules=target_modules,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        proj_type=args.proj_type,
        activation_checkpointing=args.activation_checkpointing,
        grad_accum=args.grad_accum,
        options=None if args.accumulate is None else {"accumulate": args.accumulate},
    )
    if args.json:
        print(json.dumps({"model": args.model, **est.to_dict()}, indent=2))
    else:
        print(f"model={args.model}  batch={args.batch_size}x{args.seq_len}"
              + (f"  grad-accum={args.grad_accum}" if args.grad_accum > 1 else "")
              + ("  activation-checkpointing" if args.activation_checkpointing else ""))
        print(est.to_table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-galore`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argparse error (2, message already printed)
        return int(exc.code or 0)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (HfGaloreError, ValueError) as exc:
        message = " ".join(str(exc).split())
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 1] + "…"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
