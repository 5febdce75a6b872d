# make run   : set up .venv and run the default MPI experiment (mpirun -n 4)
# make test  : set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
NP     ?= 4

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip "setuptools>=77"  # 77: the SPDX licence field; the wheel test builds offline
	$(VENV)/bin/pip install -q -e ".[mpi,test]"
	$(VENV)/bin/python -m mlpcore.nn.kernels
	touch $@

.PHONY: setup run test
setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/mpirun -n $(NP) $(VENV)/bin/python mpi_train.py

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -q
