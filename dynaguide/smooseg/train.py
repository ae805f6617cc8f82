"""Training a SmooSeg head over a folder of images: :func:`train`.

One run writes ``OUT/checkpoint.pt`` (atomically, every ``checkpoint_every`` steps and at
the end). ``resume=True`` continues the same run from it: the step, the samples consumed,
the head (with the EMA teacher), Adam's state and every random state (dropout, the
cross-image permutations) are restored, so on CPU N steps in one go and N/2 + N/2 with a
resume give bitwise the same weights.

Under ``torchrun`` (``WORLD_SIZE > 1``) the head is wrapped in DistributedDataParallel
(NCCL on CUDA, gloo on CPU), each process reads its own share of every epoch, and rank 0
writes the checkpoint (with every rank's random states). Mixed precision (``amp="bf16"``
or ``"fp16"``) is for CUDA; CPU runs stay in float32.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynaguide.smooseg.model import SmooSegConfig, SmooSegHead, make_optimizer, smooseg_losses

__all__ = ["CHECKPOINT_FORMAT", "TrainOptions", "TrainResult", "load_checkpoint", "train"]

CHECKPOINT_FORMAT = "dynaguide-smooseg-v1"
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainOptions:
    """What a training run does (also recorded in the checkpoint).

    ``backbone`` is ``"texture"``, a checkpoint folder / ``.onnx`` path, or (from Python)
    a :class:`~dynaguide.smooseg.backbones.Backbone`; ``head`` holds SmooSegConfig fields
    other than ``n_classes`` and ``feat_dim`` (shifts, learning rates, ...).
    """

    data: str | os.PathLike
    out: str | os.PathLike
    n_classes: int
    steps: int
    backbone: Any = "texture"
    batch_size: int = 32
    resolution: int = 224
    crop_ratio: float = 0.5
    five_crop: bool = True
    workers: int = 2
    seed: int = 0
    checkpoint_every: int = 500
    device: str = "auto"
    amp: str = "none"
    resume: bool = False
    progress: bool = True
    head: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """Where the checkpoint went, the last losses, the images skipped as unreadable and the
    trained head (this process's copy)."""

    checkpoint: Path
    step: int
    losses: dict[str, float]
    skipped: list[str]
    head: SmooSegHead | None = None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device(name: str, rank: int, world: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} but torch sees no CUDA device")
        if world > 1 and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)  # NCCL collectives run on the current device
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return dev


def backbone_record(backbone: Any, spec: Any) -> dict[str, Any]:
    """What identifies a backbone in a checkpoint: name, dim, patch size, how to rebuild it."""
    rebuild = str(spec) if isinstance(spec, (str, os.PathLike)) else None
    if isinstance(spec, (str, os.PathLike)) and spec != "texture":
        rebuild = str(Path(spec).resolve())
    return {
        "name": str(backbone.name),
        "dim": int(backbone.dim),
        "patch_size": int(backbone.patch_size),
        "spec": rebuild,
    }


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a SmooSeg checkpoint (``torch.load`` with ``weights_only=True``).

    Raises
    ------
    FileNotFoundError
        No such file.
    ModelFileError
        Not a readable dynaguide SmooSeg checkpoint (the message names the file).
    """
    from dynaguide.errors import ModelFileError, first_line

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SmooSeg checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"{p}: not a readable SmooSeg checkpoint ({first_line(exc)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(
            f"{p}: not a dynaguide SmooSeg checkpoint (format {CHECKPOINT_FORMAT!r})"
        )
    for key in ("config", "backbone", "head", "step"):
        if key not in ckpt:
            raise ModelFileError(f"{p}: SmooSeg checkpoint without {key!r}")
    return ckpt


def _check_resume(
    ckpt: dict, path: Path, backbone: dict, config: SmooSegConfig, world: int, run: dict
) -> None:
    """Refuse to continue a checkpoint of another backbone, head, data order or world size."""
    saved = ckpt["backbone"]
    if (saved["name"], saved["dim"], saved["patch_size"]) != (
        backbone["name"],
        backbone["dim"],
        backbone["patch_size"],
    ):
        raise ValueError(
            f"--resume: {path} was trained on backbone {saved['name']!r} (dim {saved['dim']}, "
            f"patch {saved['patch_size']}), this run uses {backbone['name']!r} (dim "
            f"{backbone['dim']}, patch {backbone['patch_size']})"
        )
    if ckpt["config"] != config.to_dict():
        diff = {
            k: (ckpt["config"].get(k), v)
            for k, v in config.to_dict().items()
            if ckpt["config"].get(k) != v
        }
        raise ValueError(f"--resume: {path} has other head settings (saved, now): {diff}")
    saved_run = ckpt.get("train", {})
    changed = {k: (saved_run.get(k), v) for k, v in run.items() if saved_run.get(k) != v}
    if changed:
        raise ValueError(f"--resume: {path} was another run (saved, now): {changed}")
    if len(ckpt.get("rng", [])) != world:
        raise ValueError(
            f"--resume: {path} was written by {len(ckpt.get('rng', []))} processes, this run has {world}"
        )


def _rng_state(perm_gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "perm": perm_gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: dict[str, torch.Tensor], perm_gen: torch.Generator, device: torch.device
) -> None:
    torch.set_rng_state(state["torch"])
    perm_gen.set_state(state["perm"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _save(path: Path, ckpt: dict[str, Any]) -> None:
    from dynaguide.writing import write_atomic

    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(path, buf.getvalue())


def train(options: TrainOptions) -> TrainResult:
    """Train (or continue) a SmooSeg head; see the module docstring.

    Raises
    ------
    ValueError, TypeError
        Bad options, an empty or missing folder, an existing checkpoint without ``resume``,
        or a checkpoint to resume from another backbone, head or number of processes.
    """
    from dynaguide.smooseg.backbones import load_backbone
    from dynaguide.smooseg.data import FiveCropDataset, ResumableSampler, collate_crops

    o = options
    steps = _int(o.steps, "steps", 1, 10**8)
    batch = _int(o.batch_size, "batch_size", 2, 1 << 16)
    workers = _int(o.workers, "workers", 0, 256)
    every = _int(o.checkpoint_every, "checkpoint_every", 1, 10**8)
    if o.amp not in _AMP:
        raise ValueError(f"amp must be one of {list(_AMP)}, got {o.amp!r}")
    rank, world = _distributed()
    device = _device(o.device, rank, world)
    if o.amp != "none" and device.type != "cuda":
        raise ValueError(f"amp={o.amp!r} needs a CUDA device; CPU training runs in float32")
    out = Path(o.out)
    ckpt_path = out / "checkpoint.pt"
    backbone = load_backbone(o.backbone, device="cuda" if device.type == "cuda" else "cpu")
    record = backbone_record(backbone, o.backbone)
    config = SmooSegConfig(n_classes=o.n_classes, feat_dim=backbone.dim, **o.head)
    dataset = FiveCropDataset(
        o.data, resolution=o.resolution, crop_ratio=o.crop_ratio, five_crop=o.five_crop
    )

    torch.manual_seed(o.seed)  # the same initial head on every rank
    head = SmooSegHead(config).to(device)
    optimizer = make_optimizer(head)
    perm_gen = torch.Generator().manual_seed(o.seed * 7919 + rank)
    torch.manual_seed(o.seed + 1_000_003 * (rank + 1))  # dropout masks differ across ranks
    step, samples, skipped = 0, 0, []
    if ckpt_path.exists():
        if not o.resume:
            raise ValueError(
                f"{ckpt_path} exists; pass resume (--resume) to continue it or choose another OUT"
            )
        ckpt = load_checkpoint(ckpt_path)
        same = ("seed", "batch_size", "resolution", "crop_ratio", "five_crop")
        _check_resume(ckpt, ckpt_path, record, config, world, {k: getattr(o, k) for k in same})
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, samples = int(ckpt["step"]), int(ckpt["samples"][rank])
        skipped = list(ckpt.get("skipped", []))
        _set_rng_state(ckpt["rng"][rank], perm_gen, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model: torch.nn.Module = head
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            head, device_ids=[device] if device.type == "cuda" else None
        )
    sampler = ResumableSampler(
        len(dataset), seed=o.seed, start=samples, rank=rank, world_size=world
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_crops,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(o.seed),
        persistent_workers=False,
    )
    scaler = torch.amp.GradScaler("cuda") if o.amp == "fp16" else None
    settings = {
        f.name: str(getattr(o, f.name))
        if isinstance(getattr(o, f.name), os.PathLike)
        else getattr(o, f.name)
        for f in dataclasses.fields(o)
        if f.name != "backbone"
    }
    settings["backbone"] = record["spec"] or record["name"]

    def checkpoint() -> None:
        rngs = _gather(_rng_state(perm_gen, device), world)
        counts = _gather(samples, world)
        if rank == 0:
            _save(
                ckpt_path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config.to_dict(),
                    "backbone": record,
                    "step": step,
                    "samples": counts,
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rngs,
                    "skipped": skipped,
                    "train": settings,
                    "world_size": world,
                },
            )

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        initial=step,
        disable=not o.progress or rank != 0,
        file=sys.stderr,
        unit="step",
        dynamic_ncols=True,
    )
    losses: dict[str, float] = {}
    amp_dtype = _AMP[o.amp]
    head.train()
    it = iter(loader) if step < steps else None
    while step < steps:
        assert it is not None
        item = next(it)
        samples += batch
        for msg in item["skipped"]:
            skipped.append(msg)
            if rank == 0:
                tqdm.write(f"skipped unreadable image {msg}", file=sys.stderr)
        images = item["images"]
        usable = torch.tensor(int(images is not None and images.shape[0] >= 2))
        if world > 1:  # every rank takes the step or none does
            import torch.distributed as dist

            usable = usable.to(device)
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if not int(usable):
            continue  # fewer than two readable images left in this batch
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            feats = backbone(images).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            signal, s_loc, s_glob = model(feats)
        parts = smooseg_losses(signal, s_loc, s_glob, config, generator=perm_gen)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            parts["loss"].backward()
            optimizer.step()
        head.prototypes.ema_update()
        step += 1
        losses = {k: float(v.detach()) for k, v in parts.items()}
        bar.update(1)
        bar.set_postfix(
            loss=f"{losses['loss']:.4f}",
            smooth=f"{losses['smooth']:.4f}",
            data=f"{losses['data']:.4f}",
            refresh=False,
        )
        if step % every == 0 or step == steps:
            checkpoint()
    bar.close()
    del it
    return TrainResult(checkpoint=ckpt_path, step=step, losses=losses, skipped=skipped, head=head)
