"""Train the embedded class-conditional flow-matching digits model (srds_trt/models/digits-flow).

The flow counterpart of ``scripts/train_digits.py``: same data (scikit-learn's digits, 16x16, [-1, 1]), same
UNet (0.69 M parameters), same optimiser, EMA, class dropout and thread discipline (one thread: see that
script's docstring), so the two models differ only in what they learn. Run from the repo root:

    python scripts/train_digits_flow.py            # writes srds_trt/models/digits-flow/
    python scripts/train_digits_flow.py --steps 20 --out /tmp/f   # smoke run

Choices, and why:
- Objective: rectified flow / flow matching as SD3 and Flux train it. x_sigma = (1 - sigma) x0 + sigma * noise,
  the network predicts the velocity v = noise - x0 (d x_sigma / d sigma) and sees the timestep sigma * 1000,
  exactly the ``timesteps`` diffusers' ``FlowMatchEulerDiscreteScheduler`` hands the model.
- Training sigmas: u ~ U(0, 1) pushed through the same time shift the sampler uses,
  sigma = s u / (1 + (s - 1) u) with s = ``--shift`` (2.0), so training effort follows the shipped sampling
  grid (more steps at high noise). A small floor (sigma >= 1e-3) keeps the endpoint out of the loss.
- Shipped sampler config: ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)``, no
  dynamic shifting (one fixed resolution).
- Class dropout to the null class 10 (12%) trains the unconditional branch for classifier-free guidance.
- AdamW with warm-up and cosine decay; the EMA of the weights (decay 0.999) is what ships.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import NULL_CLASS, RESOLUTION, build_unet, load_dataset  # noqa: E402  (one model shape)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "srds_trt" / "models" / "digits-flow"
NUM_TRAIN_TIMESTEPS = 1000


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift (SD3): sigma = s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def sampling_scheduler_config(shift: float) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    # the class name tells srds_trt.models.registry (and diffusers' from_pretrained) this is a flow model
    return {"_class_name": "FlowMatchEulerDiscreteScheduler",
            **{k: v for k, v in scheduler.config.items() if not k.startswith("_")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--class-dropout", type=float, default=0.12)
    parser.add_argument("--shift", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    images, labels = load_dataset()
    unet = build_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters, {len(images)} images", flush=True)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(500, max(1, args.steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=generator) < args.class_dropout] = NULL_CLASS
        sigma = shifted(torch.rand(args.batch_size, generator=generator), args.shift).clamp(min=1e-3)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        loss = F.mse_loss(unet(xt, sigma * NUM_TRAIN_TIMESTEPS, class_labels=y).sample, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if (step + 1) % 250 == 0:
            print(f"step {step + 1} loss(ema) {running:.4f} elapsed {time.perf_counter() - start:.0f}s", flush=True)
    elapsed = time.perf_counter() - start

    meta = {
        "family": "digits",
        "resolution": RESOLUTION,
        "null_class": NULL_CLASS,
        "class_names": [str(d) for d in range(10)],
        "default_guidance_scale": 4.0,
        "prediction_type": "flow",
        "training": {
            "objective": "flow matching, v = noise - x0, t = 1000 sigma", "shift": args.shift,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
            "class_dropout": args.class_dropout, "seed": args.seed, "final_loss_ema": round(running, 5),
            "train_seconds": round(elapsed, 1), "torch": torch.__version__,
        },
    }
    # Write into a temporary sibling folder and rename: never a half-written model folder.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}-", dir=args.out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder private
    ema.save_pretrained(tmp, safe_serialization=True)
    (tmp / "scheduler_config.json").write_text(json.dumps(sampling_scheduler_config(args.shift), indent=2) + "\n")
    (tmp / "digits_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for file in tmp.iterdir():
        file.chmod(0o644)
    if args.out.exists():
        old = args.out.with_name(f".{args.out.name}-old-{os.getpid()}")
        args.out.rename(old)
        tmp.rename(args.out)
        import shutil

        shutil.rmtree(old)
    else:
        tmp.rename(args.out)
    print(f"done: {args.steps} steps in {elapsed:.0f}s, final loss(ema) {running:.4f}, wrote {args.out}")


if __name__ == "__main__":
    main()
