"""What every command line of the project shares: one-line usage errors, the user-error exit code,
`--device` parsing, and the main() wrapper that turns a `DCDPError` into one line and exit 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import torch

from util.errors import ConfigError, DCDPError

EXIT_BAD_INPUT = 2         # a user error: one line naming the file or flag and the fix
EXIT_FAILED_IMAGES = 3     # dcdp.py: some images failed (recorded with their reasons); the others are done
EXIT_INTERRUPTED = 130     # Ctrl-C: the finished images are kept and summarised


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other user error.

    `command` is how the user starts the program (named in the hint to --help)."""

    def __init__(self, *args, command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = command

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {message} ({self.command} --help lists the options)\n")


def run_command(parser: argparse.ArgumentParser, argv, run: Callable[[argparse.Namespace], int]) -> int:
    """Parse `argv`, then `run(args)`; a user error (`DCDPError`) is printed as one line, exit 2.

    Returns the exit code (--help: 0; a usage error: 2, already printed as one line)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    try:
        return run(args)
    except DCDPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def pick_device(name: Optional[str], cuda_index: Optional[int] = None) -> torch.device:
    """The device a `--device` value names: auto (or None: the GPU when there is one), cpu, cuda, cuda:N.

    `cuda_index` is the GPU that `auto` and a bare `cuda` mean (a torchrun rank's LOCAL_RANK)."""
    cuda = "cuda" if cuda_index is None else f"cuda:{cuda_index}"
    if name is None or name == "auto":
        return torch.device(cuda if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cuda if name == "cuda" else name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA GPU is available here; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return device
