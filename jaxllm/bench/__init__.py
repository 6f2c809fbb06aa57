"""`jaxllm bench`: offline throughput and online serving benchmarks, measured the way vLLM measures itself."""
