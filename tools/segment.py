#!/usr/bin/env python3
"""Segment images with a trained medflare model; one NIfTI label map per input, with the input's affine and shape.

    python tools/segment.py WS/server/simulate_job/app_server/FL_global_model.pt scan.nii.gz --out seg/
    python tools/segment.py WS images/ --out seg/ --model best_global      # a folder of NIfTI files
    python tools/segment.py WS dicom_series/ --out seg/                     # a DICOM series folder
    python tools/segment.py WS dataset.json --key test --out seg/           # a datalist; Dice when it has labels

The preprocessing is the site loader's, with the settings recorded in the checkpoint. With labels, ``<out>/dice.csv``
holds Dice per case and class at the training resolution (what cross-site evaluation scores) and at the images'
native resolution, and the means.
"""

from __future__ import annotations

import argparse
import os
import time

from model_cli import add_device_argument, add_model_arguments, device, load_model, progress, run_main

from medflare.artefacts.inference.inputs import segmentation_cases
from medflare.artefacts.inference.segmentation import CaseResult, Segmenter, dice_rows, segment_cases
from medflare.common.results import write_csv


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("input", help="NIfTI file, folder of NIfTI files, DICOM series folder, or datalist (.json)")
    parser.add_argument("--out", required=True, help="output folder of the label maps (<name>_seg.nii.gz)")
    parser.add_argument("--key", default="test", help="list of a datalist to segment (default: test)")
    parser.add_argument("--base-dir", default=None, help="folder a datalist's relative paths resolve against")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None,
                        help="sliding-window size (default: the job's eval_roi_size, if any)")
    add_device_argument(parser)
    return parser.parse_args()


def report(index: int, total: int, result: CaseResult) -> None:
    dice = (f" dice {result.dice['dice']:.4f} (native {result.native_dice['dice']:.4f})" if result.dice else "")
    progress(index + 1, total, f"{result.case.name} {tuple(result.shape)} {result.seconds:.2f}s{dice}")


def main() -> int:
    args = parse_args()
    segmenter = Segmenter(load_model(args), device(args.device), roi_size=args.roi_size)
    cases = segmentation_cases(args.input, args.key, args.base_dir)
    start = time.time()
    results = segment_cases(segmenter, cases, args.out, on_case=report)
    seconds = time.time() - start
    print(f"wrote {len(results)} label maps to {args.out} in {seconds:.1f}s ({seconds / len(results):.2f}s per case "
          f"on {segmenter.device})")
    summary = segmenter.summary()
    rows = dice_rows(results, summary)
    if rows:
        path = os.path.join(args.out, "dice.csv")
        write_csv(path, rows)
        print(f"mean Dice over {len(rows) - 1} labelled cases: {summary['dice']['dice']:.4f} at the training "
              f"resolution, {summary['native_dice']['dice']:.4f} at native resolution ({path})")
    return 0


if __name__ == "__main__":
    run_main(main)
