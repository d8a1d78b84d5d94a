# Two commands: `make demo` and `make test` (`make test-fast`: all but the tests marked slow).
# Each creates .venv and installs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lossfloor-installed
DEMO_DIR ?= demo-output

.PHONY: demo test test-fast install lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lossfloor estimate --data digits --sigmas 0.02:50:20 --estimator full --total edm \
		--out $(DEMO_DIR)/digits-optimal-loss.json --plot $(DEMO_DIR)/digits-optimal-loss.png

# mypy on every module of the package (pyproject's [tool.mypy]), then ruff.
lint: typecheck
	$(VENV)/bin/ruff check src tests benchmarks experiments examples
	$(VENV)/bin/ruff format --check src tests benchmarks experiments examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Every test but those marked slow: under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Then the numerically sensitive tests again under PyTorch's other CPU kernels (scalar, AVX2),
# so that a test that holds only on one CPU's rounding fails here, not on a user's machine.
test: lint
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'pytest collected no tests'; exit 1; fi; exit $$rc
	for cap in $$($(PY) -c "$$CAPABILITIES"); do \
		echo "numerics under ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -m numerics -p no:cacheprovider || exit 1; \
	done

# The kernels to test besides this CPU's best: default always, avx2 where the CPU has it.
export CAPABILITIES := import torch; c = torch.backends.cpu.get_cpu_capability(); \
	print("default avx2" if c in ("AVX2", "AVX512") else "default")

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
