"""`python -m validation.tryout --out CONVERT_OUT [--port P] [--checkpoint W] [--threads T]`

Serves the try-out page on http://127.0.0.1:P (never another interface) with the sample photos
shipped in pipeline/sample_photos and every file listed by the manifests under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import run_main, setup_logging
from pipeline.datasets import SAMPLE_DIR, list_images
from pipeline.errors import PipelineError


def _port(text: str) -> int:
    value = int(text)
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 1024..65535, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.tryout", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="a convert output folder")
    parser.add_argument("--port", type=_port, default=7860)
    parser.add_argument("--checkpoint", type=Path, help="the weights the files were converted from")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup_logging()
    try:
        from validation.tryout.page import serve
    except ImportError as error:
        raise PipelineError(f"the try-out page needs the tryout extra ({error}); run it with `nox -s tryout`") from None
    from validation.tryout.engine import TryoutEngine

    engine = TryoutEngine(args.out, args.checkpoint, args.threads)
    photos = {path.name: path for path in list_images(SAMPLE_DIR)}
    print(f"try-out page on http://127.0.0.1:{args.port} ({len(engine.files)} files under {args.out})", flush=True)
    serve(engine, photos, args.port)
    return 0


if __name__ == "__main__":
    run_main(main)
