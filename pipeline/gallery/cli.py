"""``python -m pipeline.gallery``: build a dataset's gallery (and log it under an MLflow run)."""

from __future__ import annotations

import argparse

from pipeline.gallery.build import build_gallery, log_gallery_to_mlflow

EXAMPLES = """examples:
  python -m pipeline.gallery outputs/quickstart                 # writes outputs/quickstart/gallery/index.html
  python -m pipeline.gallery s3://bucket/dataset --gallery-dir /tmp/g
  python -m pipeline.gallery outputs/quickstart --mlflow-run-id <parent run id> \\
      --tracking-uri sqlite:///outputs/quickstart/mlflow.db     # also log it under that MLflow run

Open the printed index.html in a browser (file:// works), or serve the dataset directory:
  python -m http.server --directory outputs/quickstart 8000      # then http://127.0.0.1:8000/gallery/
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.gallery", description="Static gallery of a dataset: one page that lists every asset and opens each one in place.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output_dir", help="dataset output directory or URI (contains manifest/ and assets/)")
    parser.add_argument("--gallery-dir", default=None, help="where to write the gallery (default <output_dir>/gallery)")
    parser.add_argument("--mlflow-run-id", default=None, help="also log the gallery's index under this MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    gallery = build_gallery(args.output_dir, args.gallery_dir)
    if args.mlflow_run_id:
        log_gallery_to_mlflow(gallery, args.mlflow_run_id, tracking_uri=args.tracking_uri)
    print(gallery / "index.html")
