"""editserve as a vLLM plugin: live, in-place weight swaps of ledger versions.

The only package that imports vLLM internals (lazily: importing ``editserve.engine`` does not
import vLLM).

- `plugin`   vLLM entry points (``vllm.general_plugins``, ``vllm.endpoint_plugins``)
- `worker`   worker-side methods: rebuild and write this rank's slice in place, checksums
- `wire`     factors and reports as they travel through ``collective_rpc``
- `swap`     the swap protocol (pause → apply → reset prefix cache → verify → commit → resume)
- `control`  the control plane inside the API server (edit, rollback, status, restart safety)
- `http`     its HTTP routes and the served-version header
- `sidecar`  the process with a Hugging Face copy of the model that computes patches
- `launch`   ``editserve serve``: vLLM's own ``serve`` with the plugin enabled

See docs/engine.md.
"""
