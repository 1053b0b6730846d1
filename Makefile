# The two quick-start commands are `make demo` and `make test`; each installs what it needs.
PYTHON ?= python3
# -P: never import the source tree by accident instead of the installed package.
PYTEST = $(PYTHON) -P -m pytest
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-ext test-noext ctest sanitize racecheck lint bench clean

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) -m labelkit_ext run supervised --dataset digits --out $(DEMO_OUT) --overwrite

# The whole suite: with the compiled kernels (required to load), again on the pure-PyTorch
# fallback, then the C++ tests through ctest.
test: install test-ext test-noext ctest

test-ext:
	LABELKIT_EXT_REQUIRE_EXT=1 $(PYTEST) python_tests -q

test-noext:
	LABELKIT_EXT_NO_EXT=1 $(PYTEST) python_tests -q

ctest:
	cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > cmake-build.log
	cmake --build cmake-build -j2 >> cmake-build.log
	ctest --test-dir cmake-build --output-on-failure

# The CPU kernels and C++ tests built with ASan + UBSan (cmake-build-sanitize/), then ctest and
# the ops' Python tests (-m ops) against that build; see scripts/sanitize.sh, docs/testing.md.
sanitize: install
	PYTHON=$(PYTHON) bash scripts/sanitize.sh

# The emulated CUDA kernels under ThreadSanitizer (cmake-build-racecheck/): a self-check, then
# the ops' CUDA and fuzz tests; any data race between the threads of a block fails the run
# (scripts/racecheck.sh, docs/testing.md).
racecheck: install
	PYTHON=$(PYTHON) bash scripts/racecheck.sh

# Style: ruff's lint rules and its formatter (pyproject.toml; `ruff format` fixes the latter).
lint:
	$(PYTHON) -m ruff check labelkit_ext python_tests bench scripts csrc/tests/cuemu
	$(PYTHON) -m ruff format --check labelkit_ext python_tests bench scripts csrc/tests/cuemu

bench:
	$(PYTHON) bench/bench_entropy.py

clean:
	rm -rf build cmake-build cmake-build.log labelkit_ext/_C*.so labelkit_ext/_build_info.json
	rm -rf cmake-build-sanitize cmake-build-sanitize.log cmake-build-racecheck cmake-build-racecheck.log
