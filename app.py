"""Start the Zhiwen web page and HTTP API: `python app.py` (host, port, root path and login from the settings).

    python app.py                       # settings from configs/default.yaml (+ ZHIWEN_PROFILE / ZHIWEN_CONFIG / env)
    python app.py --port 8080 --host 0.0.0.0
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python app.py", description="知问 Zhiwen: the intranet page and API.")
    parser.add_argument("--host", help="listen address (default: app.host)")
    parser.add_argument("--port", type=int, help="port (default: app.port)")
    parser.add_argument("--config", help="a YAML file merged over configs/default.yaml")
    parser.add_argument("--no-warm-up", action="store_true", help="load the models on the first question instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from configs import SettingsError, load_settings

    flags = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    try:  # before the web stack is imported: a settings mistake is reported in a second, as one sentence
        settings = load_settings(args.config, **({"app": flags} if flags else {}))  # flags win over every source
    except SettingsError as e:
        print(f"配置错误 / settings error: {e}", file=sys.stderr)
        return 2

    from app.server import run

    return run(settings, warm_up=not args.no_warm_up)


if __name__ == "__main__":
    sys.exit(main())
