"""Restoring given measurements (`dcdp.py --measurements DIR`): the driver's loop when y is not synthesised.

Per image i: read y (and its mask or kernel, `runner/measurement_input.py`), check it against the task's
operator, run DCDP with the image's generator (seed + i), and write recon/, input/ (y as a picture),
measurements/ (y as given) and the record, whose numbers are the data-consistency residuals
‖A(x̂) − y‖ / ‖y‖ before and after the last purification (there is no ground truth).

The generator is advanced exactly as the benchmark path advances it before DCDP: the operator's
per-image draw (inpainting mask, nonlinear-blur latent kernel; replaced by the files') and the
measurement noise of y's shape (not added: the task YAML's σ is the assumed noise level). So a y that
the benchmark path wrote (measurements/NAME.pt, states/NAME.pt, operator_state.pt), restored with the
same seed and index, gets the same purification noise and the same result bit for bit (Gaussian noise;
Poisson noise draws a value-dependent number of variates, so there the noise stream differs).

Pixel priors are convolutional: a measurement whose image size is not a multiple of the network's
downsampling factor is purified reflect-padded to the next multiple and cropped back.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from runner.measurement_input import (
    MeasurementError, read_blur_kernel, read_latent_kernel, read_mask, read_measurement,
)

log = logging.getLogger("dcdp")

CSV_COLUMNS = ("index", "file", "status", "reason", "residual_before", "residual", "seconds", "nfe", "dc_steps")
METRIC_KEYS = ("residual", "residual_before", "seconds")
FAR_FROM_TRAINING = 2.0   # sides beyond 2x (or below 1/2) the prior's training size get one warning
_warned: set = set()


# ---- per task: the image size a measurement means, and its companion files ----

def _same_size(op, hw):
    return hw


def _super_resolution_size(op, hw):
    return hw[0] * op.scale_factor, hw[1] * op.scale_factor


def _phase_retrieval_size(op, hw):
    """The image size H whose padded size H + 2·int(oversample/8·H) is the magnitude's (and likewise W)."""
    def solve(n):
        found = [h for h in range(1, n + 1) if h + 2 * op.padding(h, h)[0] == n]
        if not found:
            raise MeasurementError(f"a Fourier magnitude of side {n} is no padded image's size for oversample "
                                   f"{op.oversample:g}; give the magnitude of the zero-padded image as the task computes it")
        return found[0]

    return solve(hw[0]), solve(hw[1])


IMAGE_SIZE = {"super_resolution": _super_resolution_size, "phase_retrieval": _phase_retrieval_size}


def load(ctx, path: Path, kernel_ops: dict):
    """y (1, 3, h, w), the operator state from files, the operator, the image size (H, W) for one measurement."""
    name, op = ctx.task.operator_name, ctx.operator
    y = read_measurement(path, tensor_only=name == "phase_retrieval")
    hw = tuple(y.shape[-2:])
    x_hw = IMAGE_SIZE.get(name, _same_size)(op, hw)
    state = {}
    if name == "inpainting":
        mask = read_mask(path, hw)
        if mask is None and op.is_random:
            raise MeasurementError(f"no mask for '{path.name}' and the task draws random masks; add "
                                   f"{path.stem}.mask.png (white = known) or mask.png for the folder")
        state = {} if mask is None else {"mask": mask}
    elif name in ("gaussian_blur", "motion_blur"):
        kernel = read_blur_kernel(path)
        if kernel is not None:
            key = kernel.numpy().tobytes() + str(kernel.shape).encode()
            if key not in kernel_ops:
                kernel_ops[key] = type(op).from_kernel(kernel, device=ctx.device)
            op = kernel_ops[key]
    elif name == "nonlinear_blur":
        kernel = read_latent_kernel(path, op.kernel_channels, x_hw)
        if kernel is None:
            raise MeasurementError(f"no latent kernel for '{path.name}'; add {path.stem}.kernel.pt (1, "
                                   f"{op.kernel_channels}, H/128, W/128), e.g. the benchmark path's states/NAME.pt "
                                   f"as {path.stem}.state.pt")
        state = {"kernel": kernel}
    return y, state, op, x_hw


def _fits(op, y: torch.Tensor, state: dict, x_hw, device) -> None:
    try:
        with torch.no_grad():
            out = op.forward(torch.zeros((1, 3, *x_hw), device=device), **{k: v.to(device) for k, v in state.items()})
    except ValueError as exc:
        raise MeasurementError(f"the task's operator cannot take this measurement: {exc}") from None
    if tuple(out.shape) != tuple(y.shape):
        raise MeasurementError(f"the operator maps a {x_hw[1]}x{x_hw[0]} image to {tuple(out.shape)}, not to the "
                               f"measurement's {tuple(y.shape)}")


# ---- any size: reflect padding to the network's multiple ----

class PaddedPrior:
    """A pixel prior purifying images of any size: reflect-pad to a multiple of `multiple`, purify, crop back."""

    to_image = None

    def __init__(self, prior, multiple: int):
        self.prior, self.multiple = prior, multiple

    def init(self, shape, generators):
        return self.prior.init(shape, generators)

    def levels(self, timesteps):
        return self.prior.levels(timesteps)

    def nfe(self, level) -> int:
        return self.prior.nfe(level)

    def purify(self, x, level, generators):
        h, w = x.shape[-2:]
        ph, pw = -h % self.multiple, -w % self.multiple
        if not (ph or pw):
            return self.prior.purify(x, level, generators)
        top, left = ph // 2, pw // 2
        padded = F.pad(x, (left, pw - left, top, ph - top), mode="reflect")       # (B, 3, H', W')
        return self.prior.purify(padded, level, generators)[..., top:top + h, left:left + w]


def _size_problem(ctx, x_hw) -> Optional[str]:
    multiple = getattr(ctx.prior, "size_multiple", None)
    if multiple and (x_hw[0] % multiple or x_hw[1] % multiple) and min(x_hw) < multiple:
        return (f"the image would be {x_hw[1]}x{x_hw[0]}, smaller than {multiple} pixels (the network's downsampling "
                f"factor) on a side; give a larger measurement")
    trained = ctx.model_config.get("image_size")
    if trained and (max(x_hw) > FAR_FROM_TRAINING * trained or min(x_hw) < trained / FAR_FROM_TRAINING):
        if ctx.root not in _warned:
            _warned.add(ctx.root)
            log.warning(f"warning: images of {x_hw[1]}x{x_hw[0]} are far from the prior's training size {trained}x"
                        f"{trained}; the restoration may be poor (warned once per run)")
    return None


def residuals(op, x: torch.Tensor, y: torch.Tensor, state: dict) -> list:
    """‖A(x_b) − y_b‖ / ‖y_b‖ per image (inf for y = 0)."""
    with torch.no_grad():
        r = (op.forward(x, **state) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)
    return [float(v) for v in r]


# ---- the batch ----

def restore_batch(ctx, batch: list, lpips=None) -> list:
    """Restore the measurements `batch` (indices into ctx.files) together; write their outputs and records."""
    from guided_diffusion.solver import run_dcdp
    from util import run_outputs as out

    args, root, device = ctx.args, ctx.root, ctx.device
    kernel_ops = ctx.measurements.kernel_ops
    records, items = [], []

    def fail(i: int, reason: str) -> None:
        records.append(out.record_failure(root, i, ctx.files[i], reason, "measurement"))

    for i in batch:
        try:
            y, state, op, x_hw = load(ctx, Path(ctx.files[i]), kernel_ops)
            _fits(op, y, state, x_hw, device)
        except MeasurementError as exc:
            fail(i, str(exc))
            continue
        problem = _size_problem(ctx, x_hw)
        if problem:
            fail(i, problem)
            continue
        # advance the image's generator past the benchmark path's draws: the operator's state, then the noise
        g = torch.Generator().manual_seed(args.seed + i)
        try:
            drawn = ctx.operator.draw_state(g, (3, *x_hw))
        except ValueError as exc:  # e.g. the YAML's box does not fit; fine when a file gives the state
            if not state:
                fail(i, f"the task's operator cannot take this measurement: {exc}")
                continue
            drawn = {}
        ctx.noiser(y, g)
        items.append((i, y, {**drawn, **state}, op, x_hw, g))
    if not items:
        return records
    if len({(tuple(it[1].shape), id(it[3]), tuple(sorted(it[2]))) for it in items}) > 1:  # one by one
        return records + [r for it in items for r in restore_batch(ctx, [it[0]], lpips)]
    start = time.perf_counter()
    kept, generators = [it[0] for it in items], [it[5] for it in items]
    op, x_hw = items[0][3], items[0][4]
    y = torch.cat([it[1] for it in items]).to(device)                              # (B, 3, h, w) as given
    state = {k: torch.cat([it[2][k].to(device) for it in items]) for k in items[0][2]}
    shape = (len(kept), 3, *x_hw)
    multiple = getattr(ctx.prior, "size_multiple", None)
    prior = PaddedPrior(ctx.prior, multiple) if multiple else ctx.prior
    x_init = prior.init(shape, generators)
    result = run_dcdp(y, op, prior, ctx.settings, generators, x_init, operator_state=state,
                      to_image=ctx.prior.to_image, record_iterates=args.save_iterates)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / len(kept)
    after, before = residuals(op, result.x, y, state), residuals(op, result.x_before, y, state)
    for b, i in enumerate(kept):
        failed = result.failed_at[b]
        iterates = [t[b:b + 1] for t in result.iterates] if result.iterates is not None else None
        out.save_image_outputs(root, i, None, y[b], None if failed is not None else result.x[b],
                               {k: v[b:b + 1] for k, v in state.items()}, iterates,
                               log_scale=ctx.task.operator_name == "phase_retrieval")
        rec = out.image_record(i, ctx.files[i], seconds, result.nfe, result.dc_steps, failed, "measurement")
        if failed is None:
            rec.update(residual=after[b], residual_before=before[b])
        out.write_record(root, rec)
        records.append(rec)
    return records


def summary_line(summary: dict) -> str:
    m = summary["metrics"]
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std']:.4f}"
    return (f"no ground truth: mean residual ‖A(x̂) − y‖/‖y‖ {fmt(m['residual'])} over {summary['ok']} image(s) "
            f"(before the last purification: {fmt(m['residual_before'])})"
            + (f"; {summary['missing']} of {summary['images']} not done yet" if summary["missing"] else ""))
