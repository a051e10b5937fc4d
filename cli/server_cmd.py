"""`vpr serve`, `vpr query`, `vpr stream`: run the server and talk to it."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpr.cli.common import CLIError, home_from, positive_float, positive_int
from vpr.settings import ServerSettings

_SERVER = ServerSettings.model_fields  # the defaults `--help` shows; flags left out keep them (and VPR_*)


def main_serve(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "model": args.model,
            "index": args.index,
            "device": args.device,
            "admin_token_file": args.admin_token_file,
        }.items()
        if v is not None
    }
    settings = ServerSettings(home=home_from(args).home, **overrides)
    preflight(settings)
    if args.demo and settings.model is None and settings.index is None:
        settings = with_demo(settings)
    from vpr.server.app import serve  # after the quieting: it imports faiss

    print(f"vpr: serving on http://{settings.host}:{settings.port}/ (API docs at /docs)", flush=True)
    return serve(settings)


def preflight(settings: ServerSettings) -> None:
    """What the app would refuse at start-up (a missing GPU, a broken admin token
    file), refused now: before a demo is built and before "serving on" is printed."""
    from vpr.model.extract import resolve_device

    resolve_device(settings.device)
    settings.resolved_admin_token()


def with_demo(settings):
    """Serve the demo when it exists, or build it when nothing is registered yet."""
    from vpr.cli.demo import INDEX, STUDENT, ensure_demo, existing_demo
    from vpr.index.ops import store_for

    demo = existing_demo(settings)
    if demo is None and store_for(settings).names():
        return settings  # the user has indexes of their own: serve those
    demo = demo or ensure_demo(settings)
    print(f"vpr: demo ready: model {demo.model}, index {demo.index}, teacher weights: {demo.weights}", flush=True)
    return settings.model_copy(update={"model": STUDENT, "index": INDEX})


# Libraries that log routine events at INFO: httpx every request (the clients print
# their own line per image or frame), faiss which CPU build it loaded.
def main_query(args: argparse.Namespace) -> int:
    from vpr.server.client import ServerError, query_command

    try:
        return query_command(args.url, [Path(p) for p in args.images], top_k=args.top_k, as_json=args.json)
    except (ConnectionError, ServerError) as e:
        raise CLIError(str(e)) from None


def main_stream(args: argparse.Namespace) -> int:
    from vpr.server.client import ServerError, stream_command

    try:
        return stream_command(
            args.url,
            Path(args.video),
            codec=args.codec,
            top_k=args.top_k,
            realtime=not args.fast,
            speed=args.speed,
            as_json=args.json,
            max_frames=args.max_frames,
        )
    except (ConnectionError, ServerError, TimeoutError) as e:
        raise CLIError(str(e)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP/websocket server",
        description="Serve a query model and an index, chosen as --model and --index tell "
        "(env VPR_* configures the rest, see vpr/settings.py).",
    )
    p.add_argument("--host", help=f"address to listen on (default {_SERVER['host'].default}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help=f"port (default {_SERVER['port'].default})")
    p.add_argument(
        "--model",
        help="query model NAME or NAME@VERSION (default: $VPR_MODEL, else the model last chosen through the admin "
        "API ($VPR_HOME/serving.json), else the active version of the newest student that can query the index, "
        "else of a teacher that can)",
    )
    p.add_argument(
        "--index",
        help="index NAME or NAME@VERSION (default: $VPR_INDEX, else the index last chosen through the admin API, "
        "else the only index the model can query)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: $VPR_DEVICE, else cuda when present); checked first")
    p.add_argument("--admin-token-file", help="file holding the admin token (enables /v1/admin)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="with nothing registered, build a demo (synthetic route, teacher, index, student) first",
    )
    p.set_defaults(func=main_serve)

    url_help = "server URL (default $VPR_URL or http://127.0.0.1:8000)"
    p = sub.add_parser("query", help="send images to a server, print the top matches")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (their images, sorted by name)")
    p.add_argument("--url", help=url_help)
    p.add_argument("--top-k", type=positive_int, help="matches per image (server default 5)")
    p.add_argument("--json", action="store_true", help="one JSON answer per line")
    p.set_defaults(func=main_query)

    p = sub.add_parser("stream", help="stream a video file to a server at its frame rate, print results")
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--url", help=url_help)
    p.add_argument(
        "--codec",
        choices=("h264", "jpeg"),
        default="h264",
        help="send the H.264 bitstream (Annex-B) or one JPEG per frame (default h264)",
    )
    p.add_argument("--top-k", type=positive_int, help="matches per frame (server default 5)")
    p.add_argument("--speed", type=positive_float, default=1.0, help="playback speed factor (default 1)")
    p.add_argument("--fast", action="store_true", help="send as fast as possible (the server drops frames)")
    p.add_argument("--max-frames", type=positive_int, help="stop after this many frames")
    p.add_argument("--json", action="store_true", help="print the raw JSON messages")
    p.set_defaults(func=main_stream)
