# Two entry points for a newcomer: `make demo` and `make test`. Both install what they need first.
# etcd-server and etcd-client: the tests start their own etcd on free ports (where systemd runs, the package also
# enables one on 127.0.0.1:2379: `systemctl disable --now etcd` if you do not want it).
SHELL := /bin/bash
# The interpreter that creates the project's virtualenv (.venv); every target then runs the venv's Python, so a
# Debian or Ubuntu system Python (which refuses `pip install`, PEP 668) works unchanged. PYTHON=python3.12 picks
# another one; it takes effect when .venv is made (remove .venv to change it).
PYTHON ?= python3
VENV := $(CURDIR)/.venv
VENV_BIN := $(VENV)/bin
# The venv's Python with its bin first on PATH, as if activated: molecule calls ansible-config, the tests find bao
# and hadolint there.
PY := PATH="$(VENV_BIN):$$PATH" "$(VENV_BIN)/python"
DEB_PACKAGES := softhsm2 opensc swtpm swtpm-tools tpm2-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools \
	tpm2-abrmd libtss2-tcti-tabrmd0 dbus procps python3-venv python3-yaml etcd-server etcd-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: deps deps-system deps-python venv tools demo test lint typecheck unit molecule bench regenerate-api

deps: deps-system deps-python

# Installs only the Debian packages that are missing, so a second run is quick and offline-safe.
deps-system:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The project's virtualenv, made only when it is missing or broken (no Python, or no pip in it: an interpreter that
# went away, an interrupted creation), so a second run is quick. A Debian python3 needs python3-venv (its ensurepip)
# for this; it is installed first when missing.
venv:
	@if ! "$(VENV_BIN)/python" -c 'import pip' >/dev/null 2>&1; then \
		if ! $(PYTHON) -c 'import ensurepip' >/dev/null 2>&1; then \
			version="$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || exit 1; \
			$(MAKE) --no-print-directory deps-system DEB_PACKAGES="python3-venv python$$version-venv" || exit 1; \
		fi; \
		if [ -e "$(VENV)" ]; then echo "$(VENV) is broken: making it again with $(PYTHON)"; \
		else echo "making the project's virtualenv $(VENV) with $(PYTHON)"; fi; \
		$(PYTHON) -m venv --clear "$(VENV)"; \
	fi

# pip runs when pyproject.toml differs from the one last installed into this venv (kept in the venv), so a second
# run is quick and offline-safe; the package itself is editable, so code changes need no reinstall.
deps-python: venv
	@cmp -s pyproject.toml "$(VENV)/installed-pyproject.toml" || { \
		echo "$(VENV_BIN)/python -m pip install -q -e '.[test]'"; \
		$(PY) -m pip install -q -e '.[test]' && cp pyproject.toml "$(VENV)/installed-pyproject.toml"; \
	}

# Helm and kubectl in .tools/bin for the chart's tests (quick and offline once they are there).
tools: venv
	$(PY) -m scripts.tools

demo: deps
	$(PY) -m scripts.demo

lint: tools
	$(PY) -m ruff check kleidi tests bench scripts molecule roles
	$(PY) -m ruff format --check kleidi tests bench scripts molecule roles
	$(PY) -m ansiblelint --profile production -q
	"$(VENV_BIN)/hadolint" Containerfile

# The plugin (pyproject's [tool.mypy]), then the benchmarks and the project's scripts, all strict.
typecheck: venv
	$(PY) -m mypy
	$(PY) -m mypy --strict bench scripts
	$(PY) -m mypy --strict --ignore-missing-imports --follow-imports=silent molecule/default/simnode/*.py

# The quick tests only (marked unit: no backend, plugin process, playbook, helm or simulated node), in under a minute.
unit: deps
	$(PY) -m pytest -q -m unit

# Two pytest-xdist workers, a test module at a time each; the modules that share the host's paths run on one
# (tests/parallel.py). The 25 slowest tests are listed at the end: where the run's time goes.
test: deps tools lint typecheck
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=25
	$(MAKE) --no-print-directory molecule

# Three simulated kubeadm control-plane nodes on this machine (molecule/default/simnode/README.md).
molecule: venv
	$(PY) -m molecule test -s default

# The Go client measures kleidi the way the apiserver's grpc-go client sees it (built offline from Debian's packages).
bench: deps
	@$(MAKE) --no-print-directory deps-system DEB_PACKAGES="golang-go golang-google-grpc-dev"
	$(PY) -m bench

regenerate-api: venv
	PATH="$(VENV_BIN):$$PATH" kleidi/api/regenerate.sh
