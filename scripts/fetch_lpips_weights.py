"""Fetch the ImageNet backbone weights that LPIPS needs, once, on a machine with internet.

    python scripts/fetch_lpips_weights.py            # VGG16, the official LPIPS backbone
    python scripts/fetch_lpips_weights.py --net alex # AlexNet, for --lpips alex

dcdp.py never downloads anything: without these files LPIPS is reported unavailable and its columns
stay empty. This command puts torchvision's file (vgg16-397923af.pth, alexnet-owt-7be5be79.pth) where
torchvision and LPIPS look for it, the torch hub cache ($TORCH_HOME/hub/checkpoints, by default
~/.cache/torch/hub/checkpoints), checking its SHA-256 prefix (the part of the file name after the dash).
The LPIPS linear layers ship inside torchmetrics (or the lpips package) and need no download. Copying the
file there by hand works as well.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from util.cli import OneLineParser, run_command  # noqa: E402
from util.errors import DCDPError  # noqa: E402
from util.metrics import BACKBONES, WEIGHTS_URL, backbone_weights_file  # noqa: E402


def fetch(net: str) -> Path:
    """Download `net`'s backbone weights into the torch hub cache (if not there yet); returns the path."""
    target = backbone_weights_file(net)
    if target.is_file():
        print(f"{BACKBONES[net][0]}: already present at {target}")
        return target
    name = BACKBONES[net][1]
    url = WEIGHTS_URL.format(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = name.rsplit("-", 1)[-1].split(".")[0]
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=True)
    except Exception as exc:  # no network, a proxy, a bad hash: one line, nothing left behind
        target.unlink(missing_ok=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DCDPError(f"could not download {url} ({type(exc).__name__}: {first}); on a machine without internet, "
                        f"copy {name} to {target}") from None
    print(f"{BACKBONES[net][0]}: saved {target}")
    return target


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0], command="python scripts/fetch_lpips_weights.py")
    p.add_argument("--net", default="vgg", choices=(*BACKBONES, "all"), help="backbone to fetch (default vgg)")
    return run_command(p, argv, lambda a: [fetch(n) for n in (BACKBONES if a.net == "all" else [a.net])] and 0)


if __name__ == "__main__":
    sys.exit(main())
