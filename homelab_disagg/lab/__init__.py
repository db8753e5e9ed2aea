"""Lab tooling: the link lab (network namespaces shaped with tc), the quality harness (injected KV judged
by llama.cpp) and the benchmark commands. It imports the product; the product never imports it
(import-linter contracts in pyproject.toml)."""
