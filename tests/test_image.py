"""The Containerfile, checked without a container engine: the build context it copies builds the kleidi wheel,
its user is the chart's, hadolint accepts it, and its Debian packages hold every module and tool the chart's
values and scripts name (asked of this machine's dpkg, a Debian bookworm like the image's base)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import kleidi
from scripts.values_doc import load_values
from tests.helm import CHART, render
from tests.plugin import REPO

CONTAINERFILE = REPO / "Containerfile"
IGNORE_FILE = REPO / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def stages(text: str = "") -> list[Stage]:
    """The Containerfile's stages, each a list of (KEYWORD, arguments) with continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for raw in (text or CONTAINERFILE.read_text()).splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "the Containerfile ends inside a continued line"
    found: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            found.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            assert found, f"{keyword} before the first FROM"
            found[-1].instructions.append((keyword, rest))
    return found


def final_stage() -> Stage:
    return stages()[-1]


def context_copies() -> list[tuple[list[str], str, str]]:
    """(sources, destination, working directory) of every COPY/ADD from the build context, in order."""
    copies = []
    for stage in stages():
        workdir = "/"
        for keyword, rest in stage.instructions:
            if keyword == "WORKDIR":
                workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
            if keyword in {"COPY", "ADD"}:
                words = shlex.split(rest)
                if any(word.startswith("--from") for word in words):
                    continue
                assert not any(word.startswith("--") for word in words), f"unexpected COPY flags: {rest}"
                copies.append((words[:-1], words[-1], workdir))
    return copies


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as the engines read it (Go's filepath.Match plus `**`)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def sent_to_engine(relative: str) -> bool:
    """Whether the engine sends this file of the build context: the last pattern matching it or a parent wins."""
    rules = []
    for raw in IGNORE_FILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _ignore_regex(line.lstrip("!").strip("/"))))
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    sent = True
    for negate, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            sent = negate
    return sent


def build_context_tree(target: Path) -> None:
    """Lay out in `target` (the stage's WORKDIR) what the context COPYs put there, ignored files left out."""
    for sources, destination, workdir in context_copies():
        assert workdir == "/src", "the build stage copies into /src"
        dest = destination if destination.startswith("/") else f"{workdir}/{destination}"
        dest_dir = target / Path(dest).relative_to(workdir)
        for source in sources:
            path = REPO / source
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            for file in files:
                relative = file.relative_to(REPO).as_posix()
                if not sent_to_engine(relative):
                    continue
                inside = file.relative_to(path) if path.is_dir() else Path(file.name)
                (dest_dir / inside).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dest_dir / inside)


# (a) the build context


@pytest.mark.unit
def test_every_path_the_containerfile_copies_is_in_the_build_context() -> None:
    copies = context_copies()
    sources = [source for sources, _, _ in copies for source in sources]
    assert sources == ["pyproject.toml", "README.md", "LICENSE", "kleidi/"]
    for source in sources:
        assert (REPO / source).exists(), source
        assert sent_to_engine(source.rstrip("/")), f".dockerignore keeps {source} out of the build context"
    assert not sent_to_engine("kleidi/__pycache__/cli.cpython-311.pyc")
    assert not sent_to_engine(".tools/bin/helm")
    assert not sent_to_engine("tests/test_image.py")


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from exactly the files the Containerfile copies, as roles/kleidi_plugin builds it."""
    source = tmp_path_factory.mktemp("context") / "src"
    build_context_tree(source)
    out = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("*.whl"))
    assert [w.name for w in wheels] == [f"kleidi-{kleidi.__version__}-py3-none-any.whl"]
    return zipfile.ZipFile(wheels[0])


@pytest.mark.integration
def test_the_copied_files_build_a_wheel_with_the_package_its_api_and_the_kleidi_command(
    image_wheel: zipfile.ZipFile,
) -> None:
    names = set(image_wheel.namelist())
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "kleidi").rglob("*.py") if "__pycache__" not in p.parts}
    assert package <= names, sorted(package - names)
    generated = {p for p in package if p.startswith("kleidi/api/") and "_pb2" in p}
    assert {"kleidi/api/v2_pb2.py", "kleidi/api/v2_pb2_grpc.py", "kleidi/api/v1beta1_pb2.py"} <= generated
    assert not any("__pycache__" in name for name in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = image_wheel.read(entry_points).decode()
    assert re.search(r"^\[console_scripts\]\s*^kleidi = kleidi\.cli:main$", text, re.MULTILINE), text
    metadata = image_wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: PyKCS11" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    license_file = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert image_wheel.read(license_file) == (REPO / "LICENSE").read_bytes()


# (b) the user, the command and the mount points


@pytest.mark.unit
def test_the_image_user_is_the_charts_securitycontext_user() -> None:
    context = load_values()["securityContext"]
    uid, gid = context["runAsUser"], context["runAsGroup"]
    final = final_stage()
    assert final.all("USER") == [f"{uid}:{gid}"]
    run = " ".join(final.all("RUN"))
    assert re.search(rf"groupadd\b[^&]*--gid {gid} kleidi\b", run), run
    assert re.search(rf"useradd\b[^&]*--uid {uid} --gid {gid}\b[^&]* kleidi\b", run), run
    for values_file in sorted((CHART / "ci").glob("*-values.yaml")):
        override = (yaml.safe_load(values_file.read_text()) or {}).get("securityContext", {})
        assert override.get("runAsUser", uid) == uid, values_file.name
        assert override.get("runAsGroup", gid) == gid, values_file.name


@pytest.mark.integration
def test_the_charts_commands_run_in_the_image_without_an_entrypoint_and_its_mount_points_exist() -> None:
    final = final_stage()
    assert final.all("ENTRYPOINT") == []
    assert final.all("CMD") == ['["kleidi", "--help"]']
    made = set()
    for run in final.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["install", "-d"]:
                made |= {w for w in words[2:] if w.startswith("/")}
    objects = render()
    daemonset = next(o for o in objects if o["kind"] == "DaemonSet")
    plugin = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert plugin["command"][0] == "kleidi"
    plugin_mounts = {m["mountPath"] for m in plugin["volumeMounts"]}
    assert plugin_mounts <= made, sorted(plugin_mounts - made)
    for pod_spec in [daemonset["spec"]["template"]["spec"]] + [o["spec"] for o in objects if o["kind"] == "Pod"]:
        for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
            assert container["command"][0] in {"kleidi", "/bin/sh"}, container["name"]


# (c) hadolint


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    assert HADOLINT.is_file(), f"{HADOLINT} is missing; run: {sys.executable} -m pip install -e '.[test]'"
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.unit
def test_hadolint_passes_the_containerfile() -> None:
    done = hadolint(CONTAINERFILE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.unit
def test_hadolint_rules_ignored_in_the_containerfile_are_only_the_unpinned_debian_versions(tmp_path: Path) -> None:
    text = CONTAINERFILE.read_text()
    ignored = set(re.findall(r"^# hadolint ignore=(\S+)$", text, re.MULTILINE))
    assert ignored == {"DL3008"}
    bare = tmp_path / "Containerfile"
    bare.write_text(re.sub(r"^# hadolint ignore=.*\n", "", text, flags=re.MULTILINE))
    done = hadolint(bare)
    reported = set(re.findall(r"\b(DL\d{4}|SC\d{4})\b", done.stdout))
    assert done.returncode != 0
    assert reported == {"DL3008"}, done.stdout


# (d) the Debian packages


def multiarch() -> str:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout
    tpm_vars = yaml.safe_load((REPO / "roles" / "kleidi_tpm2" / "vars" / "main.yml").read_text())
    return str(tpm_vars["kleidi_tpm2__multiarch"][arch.strip()])


def files_the_chart_needs_from_debian() -> set[str]:
    """The PKCS#11 modules the chart's values name, the TPM module and TCTIs the roles use, pkcs11-tool."""
    needed: set[str] = set()
    for values_file in [CHART / "values.yaml", *sorted((CHART / "ci").glob("*-values.yaml"))]:
        values = yaml.safe_load(values_file.read_text()) or {}
        module = values.get("config", {}).get("pkcs11", {}).get("module")
        if module:
            needed.add(module)
        tcti = values.get("env", {}).get("TPM2_PKCS11_TCTI")
        if tcti:
            needed.add(f"/usr/lib/{multiarch()}/libtss2-tcti-{tcti.partition(':')[0]}.so.0")
    tpm_vars = (REPO / "roles" / "kleidi_tpm2" / "vars" / "main.yml").read_text()
    assert "'/pkcs11/libtpm2_pkcs11.so'" in tpm_vars
    tpm_module = f"/usr/lib/{multiarch()}/pkcs11/libtpm2_pkcs11.so"
    assert tpm_module in needed, "the tpm ci values name the module roles/kleidi_tpm2 installs"
    # roles/kleidi_tpm2 also supports tpm2-abrmd (kleidi_tpm2_tcti: tabrmd:...).
    needed.add(f"/usr/lib/{multiarch()}/libtss2-tcti-tabrmd.so.0")
    assert "pkcs11-tool " in (CHART / "files" / "softhsm-init.sh").read_text()
    needed.add("/usr/bin/pkcs11-tool")
    return needed


def installed_in_final_stage() -> set[str]:
    packages: set[str] = set()
    for run in final_stage().all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def dependency_closure(packages: set[str]) -> set[str]:
    """The packages apt installs for these with --no-install-recommends (Depends and Pre-Depends, first choice
    of each alternative), as far as this machine's dpkg knows them."""
    seen: set[str] = set()
    todo = list(packages)
    while todo:
        package = todo.pop()
        if package in seen:
            continue
        seen.add(package)
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Pre-Depends}, ${Depends}", package], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            continue
        for clause in done.stdout.split(","):
            first = clause.split("|")[0].strip()
            if first:
                todo.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return seen


@pytest.mark.integration  # about 2 s of dpkg-query and dpkg -S calls
def test_the_final_stage_installs_the_packages_holding_every_module_and_tool_the_chart_names() -> None:
    installed = installed_in_final_stage()
    assert {"softhsm2", "opensc", "libtpm2-pkcs11-1", "libtss2-tcti-tabrmd0"} <= installed
    closure = dependency_closure(installed)
    for path in sorted(files_the_chart_needs_from_debian()):
        done = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"no Debian package on this machine holds {path}: {done.stderr.strip()}"
        owners = {line.split(":")[0].strip() for line in done.stdout.splitlines()}
        assert owners & closure, f"{path} comes from {sorted(owners)}, which the Containerfile does not install"


@pytest.mark.unit
def test_build_tools_stay_in_the_build_stage() -> None:
    assert not installed_in_final_stage() & {"g++", "gcc", "swig", "build-essential"}
    build = stages()[0]
    assert build.name == "build"
    assert stages()[-1].base == build.base == "python:3.11-slim-bookworm"
