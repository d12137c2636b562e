"""``fusedit serve [RUN_OR_FOLDER]``: a web page (Gradio) to try a model; needs ``pip install "fusedit[serve]"``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fusedit.commands.values import positive_int

NAME = "serve"
HELP = "a web page to try a model (Gradio; pip install 'fusedit[serve]')"
DEFAULT_MODEL = "runs/demo/fusedit"
EPILOG = f"""Opens http://HOST:PORT/ with a prompt box, the sampling settings and a model picker over --runs-dir.
The default model is the demo's ({DEFAULT_MODEL}, made by `make demo`). Scripts call the same endpoint through
Gradio's API: gradio_client.Client(URL).predict(..., api_name="/generate")."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_MODEL,
        metavar="RUN_OR_FOLDER",
        help=f"the model shown first: a run, an exported folder or a reference folder (default {DEFAULT_MODEL})",
    )
    p.add_argument("--runs-dir", default="runs", help="the model picker lists the models under this folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when available)")
    p.add_argument("--max-images", type=positive_int, default=4, help="the most images one request may ask for")


def run(args: argparse.Namespace) -> int:
    from fusedit.serve.host import ModelHost, find_models, is_model_folder

    default = Path(args.path)
    if not is_model_folder(default):
        hint = " (run `make demo` first)" if args.path == DEFAULT_MODEL else ""
        raise FileNotFoundError(f"{default} is not a run, an exported pipeline or a reference folder{hint}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("fusedit serve needs Gradio: pip install 'fusedit[serve]' (or make venv)") from None
    from fusedit.serve.app import build_app

    models = [str(p) for p in find_models(Path(args.runs_dir))]
    if str(default) not in models:
        models.insert(0, str(default))
    host = ModelHost(device=args.device, max_images=args.max_images)
    app = build_app(host, models, str(default))
    print(f"fusedit serve: {default} on http://{args.host}:{args.port}/ ({len(models)} model(s) in the picker)")
    app.launch(server_name=args.host, server_port=args.port, show_error=True, ssr_mode=False, quiet=True)
    return 0
