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

    _pki_parser(sub)
    sub.add_parser("version", help="print the version")
    return parser


def _pki_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = sub.add_parser("pki", help="make the dev/test certificates of proxy mode (docs/remote.md)")
    verbs = pki.add_subparsers(dest="pki_command", required=True, metavar="VERB")
    init = verbs.add_parser("init", help="a new CA dedicated to proxy mode, and key server and client certificates")
    issue = verbs.add_parser("issue", help="more certificates from the CA in --dir (new nodes, rotation)")
    for verb in (init, issue):
        verb.add_argument("--dir", required=True, help="the CA's directory (ca.pem, ca-key.pem); created by init")
        verb.add_argument(
            "--server",
            action="append",
            default=[],
            metavar="NAME[,EXTRA_SAN...]",
            help="a key server certificate (server-NAME.pem); IP literals become IP SANs; repeatable",
        )
        verb.add_argument(
            "--client",
            action="append",
            default=[],
            metavar="NAME",
            help="a client certificate (client-NAME.pem) with CN and DNS SAN NAME, for allowed_client_names; "
            "repeatable",
        )
        verb.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    init.add_argument("--ca-days", type=int, default=3650, help="validity of the CA (default 3650)")
    init.add_argument("--ca-name", default="kleidi proxy-mode CA", help="the CA's common name")
    issue.add_argument(
        "--out", help="write the certificates here instead of --dir (rotation: files are never overwritten)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"kleidi {__version__}")
        return 0
    if args.command == "check":
        from kleidi.check import run_check

        return run_check(args.socket, args.timeout, include_v1=args.v1)
    if args.command == "pki":
        return _pki(args)
    return _serve(args)


def _pki(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kleidi import pki

    try:
        requests = [pki.Request("server", *_server_spec(spec)) for spec in args.server]
        requests += [pki.Request("client", name) for name in args.client]
        if args.pki_command == "init":
            written = pki.init(Path(args.dir), requests, args.days, args.ca_days, args.ca_name)
        else:
            if not requests:
                print("kleidi: pki issue: give at least one --server or --client", file=sys.stderr)
                return 2
            written = pki.issue(Path(args.dir), requests, Path(args.out) if args.out else None, args.days)
    except pki.PkiError as exc:
        print(f"kleidi: pki: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def _server_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    from kleidi import pki

    name, extra = pki.parse_server_spec(spec)
    return name, tuple(extra)


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
