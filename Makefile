# glm-tune: `make demo` runs the main job on tiny models, `make test` runs the whole suite.
# Both create (or refresh, when requirements/constraints change) the pinned virtual environment .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD ?= build
PYTEST_ARGS ?=
# The slowest tests of each suite are printed with its result, so a suite that grows slower is seen where it grew.
DURATIONS := --durations=15

AVENV := ascend/.venv
APY := $(AVENV)/bin/python
ASTAMP := $(AVENV)/.installed
QVENV := qlora/.venv
QPY := $(QVENV)/bin/python
QSTAMP := $(QVENV)/.installed

.PHONY: venv test test-fast test-main test-qlora test-ascend demo demo-tools assets lock clean

venv: $(STAMP) $(QSTAMP) $(ASTAMP)

# Each environment also gets this project itself, editable (pyproject.toml): `glm_tune`, `data`, `utils` and
# `argument` import from anywhere without sys.path edits. The siblings take it without its Paddle stack.
INSTALL_SELF := -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) $(INSTALL_SELF)
	touch $(STAMP)

# The PyTorch QLoRA sibling has its own pinned environment (different torch-side stack).
$(QSTAMP): qlora/requirements.txt qlora/constraints.txt pyproject.toml
	test -x $(QPY) || $(PYTHON) -m venv $(QVENV)
	$(QPY) -m pip install --quiet --disable-pip-version-check -r qlora/requirements.txt -c qlora/constraints.txt
	$(QPY) $(INSTALL_SELF)
	touch $(QSTAMP)

# The MindSpore sibling too (mindspore/mindformers pin numpy<2 and their own transformers).
$(ASTAMP): ascend/requirements.txt ascend/constraints.txt pyproject.toml
	test -x $(APY) || $(PYTHON) -m venv $(AVENV)
	$(APY) -m pip install --quiet --disable-pip-version-check -r ascend/requirements.txt -c ascend/constraints.txt
	$(APY) $(INSTALL_SELF)
	touch $(ASTAMP)

# The whole suite, slow end-to-end tests included (what CI runs): the Paddle suite, then the siblings. Every suite
# runs even when an earlier one failed (one failure must not hide the others' results); the exit status is non-zero
# if any failed, and the last line names them.
test: $(STAMP) $(QSTAMP) $(ASTAMP)
	@failed=""; \
	for suite in test-main test-qlora test-ascend; do \
	  $(MAKE) --no-print-directory $$suite || failed="$$failed $$suite"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed"; exit 1; fi; \
	echo "make test: all three suites passed"

test-main: $(STAMP)
	$(PY) -m pytest -q $(DURATIONS) $(PYTEST_ARGS) tests

test-qlora: $(STAMP) $(QSTAMP)
	$(QPY) -m pytest -q $(DURATIONS) $(PYTEST_ARGS) qlora/tests

test-ascend: $(STAMP) $(ASTAMP)
	$(APY) -m pytest -q -p no:cacheprovider $(DURATIONS) $(PYTEST_ARGS) ascend/tests

# Everything but the tests marked slow.
test-fast: $(STAMP) $(QSTAMP) $(ASTAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests
	$(QPY) -m pytest -q -m "not slow" $(PYTEST_ARGS) qlora/tests
	$(APY) -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS) ascend/tests

# Tiny models of all three generations (paddle layout) and the demo data, under $(BUILD)/.
assets: $(STAMP)
	$(PY) tools/make_demo_data.py --output_dir $(BUILD)/data/AdvertiseGen
	for t in chatglm chatglm2 chatglm3; do \
	  $(PY) tools/make_tiny_model.py --model_type $$t --output_dir $(BUILD)/tiny/$$t || exit 1; done

demo: $(STAMP)
	$(PY) tools/demo.py --work_dir $(BUILD)/demo

# ChatGLM3 tool use end to end: tune a tiny ChatGLM3 on tool conversations, score its calls, serve, call tools.
demo-tools: $(STAMP)
	$(PY) tools/demo_tools.py --work_dir $(BUILD)/demo-tools

# Re-resolve the lock after editing requirements.txt.
lock:
	rm -rf $(BUILD)/lockvenv && $(PYTHON) -m venv $(BUILD)/lockvenv
	$(BUILD)/lockvenv/bin/pip install --quiet -r requirements.txt
	( echo '# Lock of every package in the tested .venv (pip freeze). Regenerate with `make lock` after changing requirements.txt.'; \
	  $(BUILD)/lockvenv/bin/pip freeze --all | grep -v "^pip==" ) > constraints.txt

clean:
	rm -rf $(BUILD) .pytest_cache
