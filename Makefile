# make demo  - create .venv, install, restore the demo images with the embedded prior
# make test  - create .venv, install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test eval-demo bench check-models clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) dcdp.py

test: install
	$(PY) -m pytest -q tests

eval-demo: install
	$(PY) scripts/eval_demo.py

bench: install
	$(PY) scripts/benchmark.py --random_weights --max_rounds 20

check-models: install
	$(PY) dcdp.py --check_models

clean:
	rm -rf $(VENV) results purification_results
