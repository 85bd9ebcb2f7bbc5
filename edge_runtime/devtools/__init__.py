"""Developer tools: quantize, benchmark, the model zoo and the demo."""
