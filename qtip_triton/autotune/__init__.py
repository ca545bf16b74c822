"""Autotuning: find the best launch config per (spec, layer shape, M bucket) once per GPU, ship it, look it up.

- :mod:`.buckets` — M buckets (1..4096) and the bucket covering a batch size.
- :mod:`.device` — GPU identity and software versions recorded in every file.
- :mod:`.store` — the YAML file format: validate, merge (faster wins), atomic locked writes.
- :mod:`.lookup` — user cache -> shipped file for this GPU -> same family, with warnings.
- :mod:`.kernel_api` — the contract with ``qtip_triton.kernels`` (configs, launcher).
- :mod:`.space` — candidate configs per task, pruned to a budget; stored-config validation.
- :mod:`.tuner` — the timing loop (injectable timer, deadline, progress bar).
- :mod:`.shapes` — the shipped Llama layer shapes.
- :mod:`.triton_cache` — precompile, export and import of Triton's binary cache.
- ``cmd_*`` — the ``qtip-triton autotune | precompile | export | import`` subcommands.

Serving code does not import this package directly: it goes through :mod:`qtip_triton.registry`.
"""
