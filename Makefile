# `make run`: set up (once) and train the default job; `make test`: set up and run every test.
VENV   ?= .venv
PY     := $(VENV)/bin/python
NP     ?= 11
ARGS   ?=
# pip's MPICH lands in the venv; a site MPI (mpicc on PATH at set-up) provides its own mpirun.
MPIRUN ?= $(if $(wildcard $(VENV)/bin/mpirun),$(VENV)/bin/mpirun,mpirun)
export MPIR_CVAR_ENABLE_HEAVY_YIELD ?= 1
export OMPI_MCA_mpi_yield_when_idle ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: setup run test test-serial test-mpi bench plot clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: setup.py scripts/setup.sh scripts/torch_build.sh
	bash scripts/setup.sh

run: setup
	$(MPIRUN) -n $(NP) $(PY) -m mpisage.run $(ARGS)
	$(PY) -m mpisage.tools.plot $(or $(RUN_DIR),runs/default)

test: setup test-serial test-mpi

test-serial:
	$(PY) -m pytest -q -p no:cacheprovider tests --timeout=600

# All multi-rank tests in ONE launch (each launch pays torch's import on every rank).
test-mpi:
	$(MPIRUN) -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests \
		--timeout=600 --timeout-method=thread

bench: setup
	$(PY) -m mpisage.tools.bench $(ARGS)

clean:
	rm -rf runs .pytest_cache
