"""Command-line plumbing shared by the tools that use a trained model (segment, classify, export_bundle)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom"))

import torch  # noqa: E402

from medflare.data.datalist import DataError  # noqa: E402
from medflare.artefacts.provenance import ProvenanceError  # noqa: E402
from medflare.artefacts.trained_model import TrainedModel, load_trained_model  # noqa: E402

USER_ERRORS = (DataError, ProvenanceError, FileNotFoundError, ValueError)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``checkpoint`` (a file, a server run folder or a simulator workspace) and ``--model``."""
    parser.add_argument("checkpoint", help="checkpoint file (FL_global_model.pt...), server run folder "
                                           "(.../server/simulate_job) or simulator workspace")
    parser.add_argument("--model", default="global",
                        help="for a folder: global (default), best_global, or a site name for the model the site "
                             "submitted to cross-site evaluation (its personal model under ditto and fedbn_ft, "
                             "else its last local model)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1...")


def device(name: str) -> torch.device:
    """``auto`` picks CUDA when available."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def load_model(args: argparse.Namespace) -> TrainedModel:
    model = load_trained_model(args.checkpoint, args.model)
    record = model.provenance
    print(f"model '{model.name}' of job '{record['job'].get('name')}' after "
          f"{record['checkpoint']['rounds_completed']} rounds ({model.source})", file=sys.stderr)
    return model


def progress(done: int, total: int, text: str = "") -> None:
    """One progress line on stderr: a bar, the count and ``text``."""
    width = 30
    filled = int(width * done / max(total, 1))
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}", file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run a tool's ``main``; errors about the user's input end it with the message (naming the file), code 2."""
    try:
        sys.exit(main())
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
