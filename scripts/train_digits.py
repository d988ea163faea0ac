"""Train the embedded class-conditional digits model (srds_trt/models/digits).

Deterministic (seeded, deterministic algorithms, fixed thread count) and CPU-only: the default budget
(5k steps of batch 128, ~0.29 s each on one thread) takes about 25 minutes. One thread, not two: on a 2-core
machine shared with other work, two OpenMP threads fighting a busy core were measured at 10 s/step (spin-waiting
at every barrier), while one thread stays at 0.29 s/step. The weights depend on the thread count (reduction
order), so keep ``--threads`` fixed to reproduce them bit for bit. Run from the repo root:

    python scripts/train_digits.py            # writes srds_trt/models/digits/
    python scripts/train_digits.py --steps 20 --out /tmp/d   # smoke run

Choices, and why:
- Data: scikit-learn's bundled ``load_digits`` (1797 images, 8x8, values 0..16), bilinear-upsampled to 16x16
  and scaled to [-1, 1]. No augmentation: the quality gate classifies samples with a classifier trained on the
  un-augmented digits, so the model should match that distribution.
- Schedule: DDPM's ``linear`` betas (1e-4 .. 0.02) over 1000 training steps. A first model used
  ``squaredcos_cap_v2``; that schedule caps beta at 0.999, so alpha_bar(999) = 2.4e-9 and any DDIM step out of
  t ~ 999 multiplies the model's epsilon error by sqrt(alpha_bar(t_1) / alpha_bar(999)) (30x at N = 1000, ~1000x
  for an SRDS coarse step over a block at N = 1024). Every grid of N >= 500 starts there: serial DDIM at
  N = 1000 recognised 4/10 digits and SRDS's first residual at N = 1024 was 2.7e3. With linear betas
  alpha_bar(999) = 4e-5 and neighbouring steps differ by 2%: measured on this model, serial DDIM at N = 100 and
  N = 1000 recognised 20/20, and pipelined SRDS at N = 1024 was 2.9e-3 / 1.1e-4 / 6e-6 from serial after 1 / 2 / 3
  iterations (fp32, CPU, guidance 3).
- Shipped sampler config: DDIM, ``timestep_spacing="leading"`` (t_0 = 1000 - 1000/N: 990 at N=100, 900 at
  N=10), ``set_alpha_to_one=True`` so the last step lands on the clean image; no clipping (SRDS's coarse/fine
  difference must stay a smooth function of the state).
- Class dropout to the null class 10 (12%) trains the unconditional branch for classifier-free guidance.
- Size: 0.69 M parameters, channels (16, 32, 64), self-attention only at 4x4. Measured on 2 cores, batch 128:
  (32, 64, 64) costs 0.34 s/step, this 0.15 s/step; the data carry only 8x8 pixels of information, so the
  budget buys more by steps than by width.
- AdamW with warm-up and cosine decay; the EMA of the weights (decay 0.999) is what ships.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NULL_CLASS = 10
RESOLUTION = 16
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "srds_trt" / "models" / "digits"


def load_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as [N, 1, 16, 16] float32 in [-1, 1] and labels [N] int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, torch.from_numpy(digits.target.astype(np.int64))


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
        num_class_embeds=NULL_CLASS + 1,
    )


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=False)


def sampling_scheduler_config() -> dict:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                              clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    return dict(scheduler.config)


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--class-dropout", type=float, default=0.12)
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
    ddpm = training_scheduler()
    alphas_cumprod = ddpm.alphas_cumprod.float()
    print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters, {len(images)} images")

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(500, max(1, args.steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.perf_counter()
    running = None
    bar = tqdm(range(args.steps), mininterval=5.0)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(args.batch_size, generator=generator) < args.class_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            # Ramp the EMA decay so a short run is not dominated by the random initialisation.
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if (step + 1) % 500 == 0:
            print(f"step {step + 1} loss(ema) {running:.4f} elapsed {time.perf_counter() - start:.0f}s", flush=True)
    elapsed = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(args.out, safe_serialization=True)
    (args.out / "scheduler_config.json").write_text(json.dumps(sampling_scheduler_config(), indent=2) + "\n")
    meta = {
        "family": "digits",
        "resolution": RESOLUTION,
        "null_class": NULL_CLASS,
        "class_names": [str(d) for d in range(10)],
        "default_guidance_scale": 4.0,
        "prediction_type": "epsilon",
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay,
            "class_dropout": args.class_dropout, "seed": args.seed, "final_loss_ema": round(running, 5),
            "train_seconds": round(elapsed, 1), "torch": torch.__version__,
        },
    }
    (args.out / "digits_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done: {args.steps} steps in {elapsed:.0f}s, final loss(ema) {running:.4f}, wrote {args.out}")


if __name__ == "__main__":
    main()
