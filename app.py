"""Wan Studio: text and image to video with Wan2.2 TI2V-5B on MLX, in the browser.

    python app.py                 # the official model (downloaded on first use), at http://127.0.0.1:7860
    python app.py --demo          # the offline demo model: tiny and random, shows the app working in seconds
    python app.py --share --auth me:secret   # a temporary public link, with a password
    mlx.launch -n 2 -- python app.py         # two processes share each video; rank 0 serves the page

The model loads at launch, with a short warm-up run so the first video is as fast as the next ones ("Getting the
model ready" on the page meanwhile; a Generate clicked then waits for it); `--no-warmup` loads it on the first
Generate instead. Only the output folder's files are served.
"""

import argparse
import os
import sys
from pathlib import Path

from wan_engine import DEFAULT_MODEL, available_presets

AUTH_VARIABLE = "WAN_STUDIO_AUTH"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a Hugging Face repo id, a Diffusers snapshot folder, or 'demo' (default {DEFAULT_MODEL})")
    parser.add_argument("--demo", action="store_true", help="use the offline demo model (same as --model demo)")
    parser.add_argument("--preset", choices=available_presets(), default="normal",
                        help="memory preset the page starts with (default normal; low-ram for small machines)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    parser.add_argument("--auth", default=os.environ.get(AUTH_VARIABLE), metavar="USER:PASSWORD",
                        help=f"ask for this login (default: the {AUTH_VARIABLE} environment variable)")
    parser.add_argument("--output-dir", default="outputs", help="where videos and their settings go (default outputs/)")
    parser.add_argument("--queue-size", type=int, default=20,
                        help="how many requests may wait for their turn (default 20)")
    parser.add_argument("--prompt-model", default=None,
                        help="the model of Improve prompt (default: a 4-bit Qwen2.5 instruct model; needs "
                             "`pip install -r requirements-prompt.txt`)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="load the model on the first Generate instead of at launch with a short warm-up run")
    args = parser.parse_args(argv)
    if args.auth is not None:
        user, colon, password = args.auth.partition(":")
        if not (user and colon and password):
            parser.error(f"--auth (or {AUTH_VARIABLE}) must look like user:password")
        args.auth = (user, password)
    if args.queue_size < 1:
        parser.error("--queue-size must be at least 1")
    return args


def exposure_warning(args: argparse.Namespace) -> str | None:
    if args.share and args.auth is None:
        return (f"warning: --share without --auth: anyone with the link can use this machine. Add --auth "
                f"user:password (or set {AUTH_VARIABLE}).")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    from wan_engine import Follower, WanError, join_group

    model = "demo" if args.demo else args.model
    try:
        group = join_group(serving=True)  # under mlx.launch: this process's place in the group; None alone
        if group is not None and not group.is_owner:  # the others work on rank 0's requests, and serve no page
            Follower(group).serve(model, args.preset, None)
            return 0
    except WanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from ui import CSS, StudioConfig, build_app  # here: Gradio and MLX take seconds to import, --help need not wait
    from wan_engine import recommended_settings

    output_dir = Path(args.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    if warning := exposure_warning(args):
        print(warning, file=sys.stderr)
    if group is not None:
        print(f"Waiting for the {group.size - 1} other processes of the group to open the model", flush=True)
        group.wait_for_all()  # before the warm-up, which in a group is a shared run
    app = build_app(StudioConfig(model, args.preset, output_dir, recommended_settings(model), not args.no_warmup,
                                 group, args.queue_size, args.prompt_model))
    app.queue(max_size=args.queue_size)
    try:
        _, local_url, share_url = app.launch(
            server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
            allowed_paths=[str(output_dir)], css=CSS, show_error=True, quiet=True, prevent_thread_lock=True,
            run_history=False,  # the output folder is the history
        )
    except OSError as error:  # the port is taken, the address is wrong, ...
        print(f"error: cannot serve on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    print(f"Wan Studio is running at {local_url}", flush=True)
    if share_url:
        print(f"Share link (temporary): {share_url}", flush=True)
    print(f"Videos go to {output_dir}. Press Ctrl+C to quit.", flush=True)
    app.block_thread()  # until Ctrl+C
    return 0


if __name__ == "__main__":
    sys.exit(main())
