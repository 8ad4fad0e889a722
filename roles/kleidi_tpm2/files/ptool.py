# Runs tpm2_ptool (Debian's python3-tpm2-pkcs11-tools, entry point tpm2_pkcs11.tpm2_ptool:main) inside this
# process, so that no PIN, and no authorisation value derived from one, is ever in a process's arguments.
# Run with the Python that tpm2_ptool's own script uses (/usr/bin/python3), as `python3 -c "<this file>" ...`:
#
#   state TOKEN_LABEL          print the store's state as JSON: primary object, token, labels of its objects
#   run SUBCOMMAND [ARGS...]   tpm2_ptool SUBCOMMAND ARGS, plus --userpin/--sopin from standard input
#
# The store is $TPM2_PKCS11_STORE (which must exist). Standard input is a JSON object {"userpin": ..., "sopin":
# ...}; "run" appends each entry as --NAME=VALUE to sys.argv, which lives in this process's memory, not in
# /proc/<pid>/cmdline. tpm2_ptool hands tpm2-tools the authorisation values it derives from the PINs (the
# seal objects' auth, sha256 of PIN and salt, is all one needs to unseal the token's wrapping key) and the keys'
# random auth values as `-p VALUE` / `-P VALUE` arguments: they are moved into files in a private directory and
# passed as `-p file:PATH`, which tpm2-tools reads exactly like the value itself.
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile

_AUTH_OPTIONS = ("-p", "-P")
_SOURCED = ("file:", "session:", "pcr:")


class _Failed(Exception):
    pass


def _ptool(*args):
    """tpm2_ptool with these arguments; its standard output as text. Raises _Failed when it exits non-zero."""
    from tpm2_pkcs11.tpm2_ptool import main as _ptool_main  # imported when needed: it takes about half a second

    sys.argv = ["tpm2_ptool", *args, "--path=" + os.environ["TPM2_PKCS11_STORE"]]
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            _ptool_main()
        except SystemExit as exc:
            code = exc.code
    if code not in (None, 0):
        raise _Failed(f"tpm2_ptool {args[0]} failed: {code}\n{out.getvalue()}")
    return out.getvalue()


def _auth_in_files(authdir):
    """Make every tpm2-tools command tpm2_ptool starts read its auth values from files in authdir."""
    from tpm2_pkcs11 import tpm2 as _tpm2

    popen = _tpm2.Popen

    def guarded(cmd, *args, **kwargs):
        cmd = list(cmd)
        for i in range(len(cmd) - 1):
            value = cmd[i + 1]
            if cmd[i] in _AUTH_OPTIONS and value and not value.startswith(_SOURCED):
                fd, path = tempfile.mkstemp(dir=authdir)
                with os.fdopen(fd, "w") as handle:
                    handle.write(value)
                cmd[i + 1] = "file:" + path
        return popen(cmd, *args, **kwargs)

    _tpm2.Popen = guarded


def state(token_label):
    """The primary object, whether the token exists, and its objects' labels, as one line of JSON."""
    result = {"primary": None, "token": False, "labels": []}
    if os.path.exists(os.path.join(os.environ["TPM2_PKCS11_STORE"], "tpm2_pkcs11.sqlite3")):
        import yaml

        primaries = yaml.safe_load(_ptool("listprimaries")) or []
        for primary in primaries:
            result["primary"] = result["primary"] or primary["id"]
            tokens = yaml.safe_load(_ptool("listtokens", f"--pid={primary['id']}")) or []
            if any(token["label"] == token_label for token in tokens):
                result["primary"], result["token"] = primary["id"], True
                objects = yaml.safe_load(_ptool("listobjects", "--label=" + token_label)) or []
                result["labels"] = [obj["CKA_LABEL"] for obj in objects]
                break
    print(json.dumps(result))


def run(args, secrets):
    authdir = tempfile.mkdtemp(prefix="kleidi-ptool-")
    try:
        _auth_in_files(authdir)
        print(_ptool(*args, *(f"--{name}={value}" for name, value in secrets.items())), end="")
    finally:
        shutil.rmtree(authdir, ignore_errors=True)


def _main():
    secrets = json.loads(sys.stdin.read() or "{}")
    try:
        if sys.argv[1:2] == ["state"]:
            state(sys.argv[2])
        elif sys.argv[1:2] == ["run"]:
            run(sys.argv[2:], secrets)
        else:
            sys.exit("usage: ptool.py state TOKEN_LABEL | run SUBCOMMAND [ARGS...]")
    except Exception as exc:  # reported without any secret, then a non-zero exit
        message = f"{type(exc).__name__}: {exc}"
        for value in secrets.values():
            message = message.replace(value, "<redacted>")
        sys.exit(message)


_main()
