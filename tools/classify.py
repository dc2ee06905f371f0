#!/usr/bin/env python3
"""Classify images with a trained medflare model (the fairness jobs'): a CSV of class probabilities per image.

    python tools/classify.py WS images.csv --out predictions.csv        # image list (image[,label])
    python tools/classify.py WS ISIC_GroundTruth.csv --image-dir images --out predictions.csv
    python tools/classify.py WS dicom_folder/ --window 40 80 --out predictions.csv

Each image is read and normalised by the site loader's own code, with the settings recorded in the checkpoint.
Columns: ``image``, ``p_<class>`` per class, ``predicted`` (and ``label`` when the input gives one; then the
accuracy and balanced accuracy are printed).
"""

from __future__ import annotations

import argparse
import os
import time

from model_cli import add_device_argument, add_model_arguments, device, load_model, progress, run_main

from medflare.artefacts.inference.classification import Classifier, accuracy
from medflare.artefacts.inference.inputs import classification_cases
from medflare.common.results import write_csv


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("input", help="image list (.csv/.json), ISIC-style CSV, image file, or folder of images "
                                      "(DICOM, PNG/JPEG, NIfTI)")
    parser.add_argument("--out", required=True, help="CSV file of the predictions")
    parser.add_argument("--image-dir", default=None, help="folder of the listed images (default: the list's folder)")
    parser.add_argument("--extension", default=".jpg", help="added to listed names without one (ISIC: .jpg)")
    parser.add_argument("--window", type=float, nargs=2, default=None, metavar=("CENTER", "WIDTH"),
                        help="HU window of DICOM images (as the RSNA-style site source used)")
    parser.add_argument("--classes", nargs="+", default=None, help="class names (default: the CSV's class columns)")
    parser.add_argument("--batch-size", type=int, default=32)
    add_device_argument(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    model = load_model(args)
    cases, columns = classification_cases(args.input, args.image_dir, args.extension)
    classifier = Classifier(model, device(args.device), args.window, args.classes or columns)
    start = time.time()
    rows = classifier.rows(cases, args.batch_size, on_batch=lambda done, total: progress(done, total))
    seconds = time.time() - start
    write_csv(os.path.abspath(args.out), rows)
    print(f"wrote {len(rows)} predictions to {args.out} in {seconds:.1f}s ({seconds / len(rows) * 1000:.1f} ms per "
          f"image on {classifier.device})")
    scores = accuracy(rows)
    if scores:
        print(f"{scores['n']} labelled images: accuracy {scores['accuracy']:.4f}, balanced accuracy "
              f"{scores['balanced_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    run_main(main)
