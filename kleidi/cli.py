"""The `kleidi` command: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
import sys

from kleidi import __version__, tuning

log = logging.getLogger("kleidi")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kleidi", description="Kubernetes KMS v2 plugin: keys in an HSM, TPM2 or Vault"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve the KMS v2 and v1beta1 APIs on a unix socket")
    serve.add_argument("--config", "-c", required=True, help="configuration file (YAML or JSON)")
    serve.add_argument("--listen", help="override listen (unix:///path/to.sock)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override log_level")

    check = sub.add_parser("check", help="talk to a running plugin the way the apiserver does, and report")
    check.add_argument("--socket", required=True, help="plugin socket (path or unix:///path)")
    check.add_argument("--timeout", type=float, default=3.0, help="per-call deadline in seconds (apiserver: 3)")
    check.add_argument("--v1", action="store_true", help="also check the v1beta1 API")

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"kleidi {__version__}")
        return 0
    if args.command == "check":
        from kleidi.check import run_check

        return run_check(args.socket, args.timeout, include_v1=args.v1)
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    tuning.grpc_environment()  # before anything imports grpc
    from kleidi import config as config_module
    from kleidi.errors import KleidiError
    from kleidi.observability import setup_logging

    try:
        cfg = config_module.load(args.config, {"listen": args.listen, "log_level": args.log_level})
    except KleidiError as exc:
        print(f"kleidi: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    for setting, advice in cfg.retired():
        log.warning("retired setting ignored; remove it from the config", extra={"setting": setting, "advice": advice})
        if not log.isEnabledFor(logging.WARNING):  # log_level: error would hide it; an upgrade must not
            print(f"kleidi: retired setting {setting} ignored; remove it from the config: {advice}", file=sys.stderr)
    from kleidi.server import serve

    try:
        serve(cfg)
    except OSError as exc:  # anything the config did not foresee (permissions, a full disk): one line, no traceback
        log.error("cannot start", extra={"error": type(exc).__name__, "reason": str(exc)})
        print(f"kleidi: cannot start: {exc}", file=sys.stderr)
        return 1
    except KleidiError as exc:
        log.error("cannot start", extra={"error": exc.kind, "reason": str(exc)})
        print(f"kleidi: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
