"""vppo-trl's benchmarks: run them from the repository root (see benchmarks/README.md)."""
