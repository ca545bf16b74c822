"""``qtip-triton`` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; adding one is one
line in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "autotune": ("qtip_triton.autotune.cmd_autotune", "tune kernel configs for this GPU into autotune_configs/<gpu>.yaml"),
    "precompile": ("qtip_triton.autotune.cmd_precompile", "fill Triton's binary cache with what the registry launches for a GPU's file"),
    "export": ("qtip_triton.autotune.cmd_export", "pack Triton's binary cache into an archive for identical machines"),
    "import": ("qtip_triton.autotune.cmd_import", "unpack a cache archive made by 'export' (checked against this machine)"),
    "quantize": ("qtip_triton.checkpoint", "quantize a Hugging Face Llama-family model into a QTIP checkpoint"),
    "codegen": ("qtip_triton.codegen.cmd", "print the generated Triton kernel for a trellis spec and kernel kind"),
    "sweep": ("qtip_triton.research.sweep", "distortion, real-weight error and kernel speed over a grid of trellis specs"),
    "selftest": ("qtip_triton.selftest", "check this machine's compiled kernels against the float64 reference"),
    "info": ("qtip_triton.info", "versions, GPU, which kernels run, which autotune files apply and why, the vLLM plugin"),
}


def _usage() -> str:
    lines = ["usage: qtip-triton <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    lines += ["", "Run 'qtip-triton <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qtip-triton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"qtip-triton {name}", description=help_)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
