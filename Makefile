# The two commands a new user needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
# Pinned together: this torch/torchvision pair installs from local wheels here and runs on the CPU.
# Override for your platform, e.g. `make install TORCH_PINS="torch==2.5.1 torchvision==0.20.1"`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# The full suite in two worker processes (pytest-xdist, a dev dependency): a module's tests share a
# worker and its fixtures, the planted seeds and kill -9 trials spread (tests/conftest.py). Serial:
# `make test XDIST=`.
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder

export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast browser bench clean

install:
	$(PYTHON) -m pip install --quiet $(TORCH_PINS)
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: install
	rsvc compare experiment=planted_synthetic

test: install browser
	$(PYTHON) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The edit-test loop: unit tests and agreement with scikit-learn/scipy, no pipelines on real data, no
# subprocess runs or browser (docs/testing.md). `make test` runs everything.
FAST_TESTS ?= tests/algorithms tests/data tests/models tests/store tests/viz tests/cli

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not subprocess and not browser" $(FAST_TESTS) $(PYTEST_ARGS)

# Debian's Chromium for the report's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "could not install chromium: the browser test will fail"

bench:
	$(PYTHON) scripts/bench_extract.py
	$(PYTHON) scripts/bench_nmf.py
	$(PYTHON) scripts/bench_lasso.py
	$(PYTHON) scripts/bench_nnls.py
	$(PYTHON) scripts/bench_pipeline.py

clean:
	rm -rf rsvc-store .pytest_cache
