# One-command entry points. `make demo` and `make test` set everything up first (idempotent).
.PHONY: setup natten demo test test-fast bench clean-demo

setup:            ## create .venv, install the locked deps, build mmcv-full once into the wheel cache
	bash .ci/setup.sh

natten:           ## optional: also build natten 0.17.5 (fast ContMix on CUDA) into the wheel cache
	WITH_NATTEN=1 bash .ci/setup.sh

demo: setup       ## run the whole pipeline on the built-in demo data
	. .venv/bin/activate && dvc repro

test: setup       ## run the whole suite, brief benchmark runs included (what CI runs)
	. .venv/bin/activate && python -m pytest -q --timeout=900

test-fast: setup  ## skip the slow end-to-end tests and the benchmark runs
	. .venv/bin/activate && python -m pytest -q -m "not slow and not bench"

bench: setup      ## brief runs of every benchmark script
	. .venv/bin/activate && python -m pytest -q -m bench

clean-demo:       ## remove the demo outputs, MLflow store and resumable state
	rm -rf data models metrics plots reports mlflow.db mlruns .overlock dvc.lock
