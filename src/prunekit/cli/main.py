"""``prunekit`` command line: thin wrappers over the public functions."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from prunekit.app.divergence import DivergenceError
from prunekit.app.launch import launch_train
from prunekit.app.recipe import load_recipe
from prunekit.app.run_dir import OUTPUTS
from prunekit.app.training import train
from prunekit.config import ConfigError
from prunekit.methods import available_methods, get_method
from prunekit.posttrain import HessianError, available_compressors, get_compressor
from prunekit.serialization import CheckpointError
from prunekit.structured.io import SlimSpecError
from prunekit.structured.registry import available_structured, get_structured


def _outputs_line(out: str, metrics: dict[str, Any], kind: str) -> str:
    """What the run directory holds now, or that a complete run was left as it was."""
    names = [n for n in OUTPUTS[kind] if (Path(out) / n).exists()]
    listed = ", ".join(f"{n}/" if (Path(out) / n).is_dir() else n for n in names)
    if metrics.get("outputs_unchanged"):
        return f"{out} holds this run, complete; its outputs are left as they are: {listed}"
    return f"outputs in {out}: {listed}"


def _cmd_train(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    options = {
        "resume": not args.no_resume,
        "overwrite": args.overwrite,
        "progress": not args.quiet,
    }
    if args.nproc is None:
        metrics = train(recipe, args.out, device=args.device, **options)
    else:
        from prunekit.distributed import WorkerError

        try:
            metrics = launch_train(
                recipe,
                args.out,
                args.nproc,
                device=args.device,
                level=logging.getLogger().getEffectiveLevel(),
                **options,
            )
        except WorkerError as exc:  # the failing rank's exception, not its whole traceback
            lines = [line for line in str(exc).splitlines() if line.strip()]
            print(f"prunekit: error: {lines[0]} {lines[-1]}", file=sys.stderr)
            return 2
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return 0
    keys = ("method", "model", "global_sparsity", "compression", "test_accuracy", "wall_seconds")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    print(_outputs_line(args.out, metrics, "train"))
    return 0


def _lm_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The compress recipe that ``--model DIR --calibration TEXT ...`` spell out."""
    if args.recipe is not None:
        raise ConfigError("give either --recipe or --model (with --calibration), not both")
    if args.calibration is None:
        raise ConfigError("--model needs --calibration TEXT (a text file to calibrate on)")
    section: dict[str, Any] = {"method": args.method}
    for key in ("sparsity", "pattern", "bits", "group_size"):
        if getattr(args, key) is not None:
            section[key] = getattr(args, key)
    calibration: dict[str, Any] = {"text": args.calibration, "samples": args.samples}
    if args.seq_len is not None:
        calibration["seq_len"] = args.seq_len
    recipe: dict[str, Any] = {
        "model": {"pretrained": args.model},
        "calibration": calibration,
        "compress": section,
    }
    if args.eval is not None:
        recipe["evaluation"] = {"text": args.eval}
    return recipe


def _cmd_compress(args: argparse.Namespace) -> int:
    from prunekit.app.compress_recipe import compress_recipe_from_dict, load_compress_recipe
    from prunekit.app.compression import compress_run
    from prunekit.app.recipe import apply_overrides

    if args.model is not None:
        recipe = compress_recipe_from_dict(apply_overrides(_lm_recipe(args), args.set))
    elif args.recipe is None:
        raise ConfigError("give --recipe FILE, or --model DIR --calibration TEXT")
    else:
        recipe = load_compress_recipe(args.recipe, args.set)
    metrics = compress_run(
        recipe, args.out, device=args.device, progress=not args.quiet, overwrite=args.overwrite
    )
    keys = (
        "method",
        "model",
        "input_global_sparsity",
        "input_test_accuracy",
        "input_perplexity",
        "global_sparsity",
        "test_accuracy",
        "perplexity",
        "finetuned_test_accuracy",
        "compress_seconds",
    )
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    print(_outputs_line(args.out, metrics, "compress"))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from prunekit.app.lm_compression import evaluate_pretrained

    result = evaluate_pretrained(
        args.model, args.eval, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device
    )
    print(json.dumps(result, indent=2))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    del args
    print("sparse training (prunekit train, prunekit.sparsify):")
    for name in available_methods():
        cls = get_method(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"  {name:9s} {doc}")
    print("post-training (prunekit compress, prunekit.compress):")
    for name in available_compressors():
        doc = (get_compressor(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:9s} {doc}")
    print("structured, Only-Train-Once (prunekit train with structured: {optimizer: NAME}):")
    for name in available_structured():
        doc = (get_structured(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:9s} {doc}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from prunekit.cli.demo import run_demo

    run_demo(
        Path(args.out),
        epochs=args.epochs,
        sparsity=args.sparsity,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Sparse and slim neural networks for PyTorch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a recipe and write the sparse model, metrics, report and plots"
    )
    p.add_argument("--recipe", required=True, help="YAML recipe file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe entry",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start this run again even if --out holds its unfinished checkpoint",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another run in --out (otherwise refused)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data parallel on N local ranks (global batch N x batch_size); under torchrun leave "
        "it out",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="LeNet-300-100 on MNIST: dense vs DPF at high sparsity")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--sparsity", type=float, default=0.98)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "compress",
        help="compress a trained model one-shot (SparseGPT, GPTQ, OBC, ...) from a recipe, or a "
        "Hugging Face language model folder with --model",
    )
    p.add_argument("--recipe", default=None, help="YAML compress recipe file")
    p.add_argument(
        "--model", default=None, help="a Hugging Face causal LM folder (instead of --recipe)"
    )
    p.add_argument("--calibration", default=None, help="with --model: calibration text file")
    p.add_argument("--eval", default=None, help="with --model: text file for perplexity")
    p.add_argument("--method", default="sparsegpt", help="with --model: the method")
    p.add_argument("--sparsity", type=float, default=None)
    p.add_argument("--pattern", default=None, help="unstructured or N:M, e.g. 2:4")
    p.add_argument("--bits", type=int, default=None)
    p.add_argument("--group-size", dest="group_size", type=int, default=None)
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override an entry"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of another run in --out (otherwise refused)",
    )
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("evaluate", help="perplexity of a Hugging Face language model on a text")
    p.add_argument("--model", required=True, help="a Hugging Face causal LM folder")
    p.add_argument("--eval", required=True, help="text file")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("methods", help="list the registered sparse-training methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    # OSError: a missing data file, a full disk ...: one line too, not a traceback
    except BrokenPipeError:  # `prunekit ... | head`: the reader left, the run itself succeeded
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return 0
    except (
        ConfigError,
        CheckpointError,
        DivergenceError,
        HessianError,
        SlimSpecError,
        OSError,
    ) as exc:
        print(f"prunekit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "prunekit: interrupted; run the same command again to resume (from the last "
            "checkpoint, if an epoch had completed)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
