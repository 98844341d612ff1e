"""editserve: live, versioned fact editing (ROME / MEMIT) for models served by vLLM."""

__version__ = "0.1.0"
