# Two entry points for a newcomer: `make demo` and `make test`. Both install what they need first.
# etcd-server and etcd-client: the tests start their own etcd on free ports (where systemd runs, the package also
# enables one on 127.0.0.1:2379: `systemctl disable --now etcd` if you do not want it).
SHELL := /bin/bash
PYTHON ?= python3
DEB_PACKAGES := softhsm2 opensc swtpm swtpm-tools tpm2-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools \
	tpm2-abrmd libtss2-tcti-tabrmd0 dbus procps python3-venv python3-yaml etcd-server etcd-client
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The bin directory of $(PYTHON)'s environment (a venv's bin, or pyenv's versions/X/bin), where pip puts hadolint.
PYTHON_BIN = $(shell dirname "$$($(PYTHON) -c 'import sys; print(sys.executable)')")

.PHONY: deps deps-system deps-python tools demo test lint typecheck unit molecule bench regenerate-api

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

deps-python:
	$(PYTHON) -m pip install -q -e '.[test]'

# Helm and kubectl in .tools/bin for the chart's tests (quick and offline once they are there).
tools:
	$(PYTHON) -m scripts.tools

demo: deps
	$(PYTHON) -m scripts.demo

lint: tools
	$(PYTHON) -m ruff check kleidi tests bench scripts molecule roles
	$(PYTHON) -m ruff format --check kleidi tests bench scripts molecule roles
	$(PYTHON) -m ansiblelint --profile production -q
	"$(PYTHON_BIN)/hadolint" Containerfile

typecheck:
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy --strict --ignore-missing-imports --follow-imports=silent molecule/default/simnode/*.py

test: deps tools lint typecheck
	$(PYTHON) -m pytest -q
	$(MAKE) --no-print-directory molecule

# Three simulated kubeadm control-plane nodes on this machine (molecule/default/simnode/README.md).
molecule:
	PATH="$$(dirname "$$($(PYTHON) -c 'import sys; print(sys.executable)')"):$$PATH" $(PYTHON) -m molecule test -s default

# The Go client measures kleidi the way the apiserver's grpc-go client sees it (built offline from Debian's packages).
bench: deps
	@$(MAKE) --no-print-directory deps-system DEB_PACKAGES="golang-go golang-google-grpc-dev"
	$(PYTHON) -m bench

regenerate-api:
	kleidi/api/regenerate.sh
