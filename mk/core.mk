# Core: benchmarks of the resolver.
.PHONY: bench-resolve
bench-resolve: venv
	$(BIN)/python benchmarks/resolve_bench.py
