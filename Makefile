# Two commands a user needs: `make demo` and `make test`. Both install into .venv first.
.PHONY: setup demo test clean

setup:
	@bash tools/setup_env.sh

demo: setup
	.venv/bin/moeq2gguf demo

test: setup
	@t0=$$(date +%s); .venv/bin/python -m pytest -q; rc=$$?; echo "[test] pytest: $$(( $$(date +%s) - t0 )) s"; exit $$rc

clean:
	rm -rf .venv .cache
