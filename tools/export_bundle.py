#!/usr/bin/env python3
"""Export a trained medflare segmentation model as a MONAI bundle, and check it with MONAI's bundle tools.

    python tools/export_bundle.py WS bundle/                      # the final global model of a run
    python tools/export_bundle.py WS bundle_site1/ --model site-1 # a site's local model (kept by cross-site evaluation)
    python tools/export_bundle.py best_FL_global_model.pt bundle/

Then, from the bundle folder:

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES --output_dir OUT
"""

from __future__ import annotations

import argparse

from model_cli import add_model_arguments, load_model, run_main

from medflare.artefacts.bundle import export_bundle, verify_bundle


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("out", help="bundle folder to write")
    parser.add_argument("--version", default="0.1.0", help="bundle version (metadata.json)")
    parser.add_argument("--schema", default=None, help="local copy of MONAI's metadata schema for verify_metadata")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    out = export_bundle(load_model(args), args.out, args.version)
    checks = verify_bundle(out, args.schema)
    print(f"wrote MONAI bundle {out}; MONAI checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()))
    print(f"run it: cd {out} && python -m monai.bundle run --config_file configs/inference.json "
          "--dataset_dir IMAGES --output_dir OUT")
    return 0


if __name__ == "__main__":
    run_main(main)
