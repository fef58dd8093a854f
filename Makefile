# Two commands do everything on a fresh machine: `make demo` and `make test` (README, Quickstart).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := demo
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-slow lint benchmarks clean

$(VENV)/installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[beam,test]"
	touch $@

# Raw demo images -> Beam conversion (DirectRunner, both cores) -> training under MirroredStrategy -> 10-crop eval.
demo: $(VENV)/installed
	$(PY) -m pipeline.make_demo_data --output_dir=$(DEMO)/raw
	$(PY) -m pipeline.build_tfrecords --input_dir=$(DEMO)/raw --output_dir=$(DEMO)/data \
		--train_shards=8 --validation_shards=2
	rm -rf $(DEMO)/model
	$(PY) train.py --flagfile=configs/demo.flags
	@echo
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO)/model   (then open http://localhost:6006)"

lint: $(VENV)/installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

test-slow: $(VENV)/installed
	$(PY) -m pytest -q -m slow

benchmarks: $(VENV)/installed
	$(PY) benchmarks/conversion.py
	$(PY) benchmarks/training_step.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/serving_resize.py
	$(PY) benchmarks/serving_memory.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/service_fleet.py

clean:
	rm -rf $(VENV) $(DEMO)
